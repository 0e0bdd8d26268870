//! What the API counts of itself: requests and latency by route (`track`)
//! and the Prometheus text of `GET /metrics`, with the writer's counters.

use super::*;

/// Upper bounds of the request latency histogram, in microseconds.
const LATENCY_BUCKETS_US: [u64; 9] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 500_000, 2_500_000,
];

#[derive(Default, Clone)]
struct RouteStats {
    count: u64,
    sum_us: u64,
    /// Cumulative counts per bucket of `LATENCY_BUCKETS_US`.
    buckets: [u64; 9],
}

/// Request counters and latencies. Hand-rolled Prometheus text: the
/// `metrics` crates keep one global recorder per process, and tests run
/// several servers in one.
#[derive(Default)]
pub struct HttpMetrics {
    routes: std::sync::Mutex<std::collections::BTreeMap<(String, String, u16), RouteStats>>,
}

impl HttpMetrics {
    fn record(&self, route: String, method: String, status: u16, micros: u64) {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats = routes.entry((route, method, status)).or_default();
        stats.count += 1;
        stats.sum_us += micros;
        for (bucket, bound) in stats.buckets.iter_mut().zip(LATENCY_BUCKETS_US) {
            if micros <= bound {
                *bucket += 1;
            }
        }
    }
}

/// Seconds written from microseconds, with no floating point.
fn seconds(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

pub(super) async fn track(
    State(app): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let micros = started.elapsed().as_micros() as u64;
    app.metrics
        .record(route, method, response.status().as_u16(), micros);
    response
}

/// `GET /metrics`: Prometheus text format.
pub(super) async fn metrics(State(app): State<AppState>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP commission_ledger_http_requests_total HTTP requests by route, method and status."
    );
    let _ = writeln!(out, "# TYPE commission_ledger_http_requests_total counter");
    let routes = app
        .metrics
        .routes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for ((route, method, status), stats) in &routes {
        let _ = writeln!(
            out,
            "commission_ledger_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {}",
            stats.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP commission_ledger_http_request_duration_seconds HTTP request latency."
    );
    let _ = writeln!(
        out,
        "# TYPE commission_ledger_http_request_duration_seconds histogram"
    );
    for ((route, method, status), stats) in &routes {
        let labels = format!("route=\"{route}\",method=\"{method}\",status=\"{status}\"");
        for (count, bound) in stats.buckets.iter().zip(LATENCY_BUCKETS_US) {
            let _ = writeln!(
                out,
                "commission_ledger_http_request_duration_seconds_bucket{{{labels},le=\"{}\"}} {count}",
                seconds(bound)
            );
        }
        let _ = writeln!(
            out,
            "commission_ledger_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
            stats.count
        );
        let _ = writeln!(
            out,
            "commission_ledger_http_request_duration_seconds_sum{{{labels}}} {}",
            seconds(stats.sum_us)
        );
        let _ = writeln!(
            out,
            "commission_ledger_http_request_duration_seconds_count{{{labels}}} {}",
            stats.count
        );
    }
    let writer = app.ledger.writer_stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let (auto_closes, auto_close_refusals) = app.ledger.auto_closes();
    let counters = [
        (
            "commission_ledger_group_commits_total",
            "Batches made durable, one fdatasync each.",
            load(&writer.batches),
        ),
        (
            "commission_ledger_commands_total",
            "Commands decided, accepted or not.",
            load(&writer.commands),
        ),
        (
            "commission_ledger_group_commit_tries_total",
            "Windows of load the syncer ran in the other grouping (one group or halves), to compare.",
            load(&writer.group_commit_tries),
        ),
        (
            "commission_ledger_index_waits_total",
            "Times the writer's syncer waited for the sled indexer, index_backlog group commits behind.",
            load(&writer.index_waits),
        ),
        (
            "commission_ledger_checkpoints_total",
            "Checkpoints of the state saved to the index store.",
            load(&writer.checkpoints),
        ),
        (
            "commission_ledger_history_replays_total",
            "Replays of the log for reads of the past (as_of).",
            app.ledger.history_replays(),
        ),
        (
            "commission_ledger_auto_closes_total",
            "Months closed by the server itself (auto_close_day).",
            auto_closes,
        ),
        (
            "commission_ledger_auto_close_refusals_total",
            "Closes owed by auto_close_day that the ledger refused.",
            auto_close_refusals,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    // Times kept in microseconds, exported in seconds.
    let times = [
        (
            "commission_ledger_write_sync_seconds_total",
            "Time in write + fdatasync.",
            load(&writer.sync_us),
        ),
        (
            "commission_ledger_queue_wait_seconds_total",
            "Time commands waited for the writer, summed over commands (divided by commission_ledger_commands_total, the mean wait).",
            load(&writer.queue_wait_us),
        ),
        (
            "commission_ledger_checkpoint_seconds_total",
            "Time building and saving checkpoints.",
            load(&writer.checkpoint_us),
        ),
    ];
    for (name, help, micros) in times {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            seconds(micros)
        );
    }
    let _ = writeln!(
        out,
        "# HELP commission_ledger_events_appended_total Events appended, by type.\n# TYPE commission_ledger_events_appended_total counter"
    );
    let by_type = writer
        .events_by_type
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for (name, count) in by_type {
        let _ = writeln!(
            out,
            "commission_ledger_events_appended_total{{type=\"{name}\"}} {count}"
        );
    }
    let (indexed, checkpointed) = app.ledger.store_status();
    let gauges = [
        (
            "commission_ledger_queue_depth",
            "Commands waiting for the writer.",
            app.ledger.queue_depth() as u64,
        ),
        (
            "commission_ledger_head_seq",
            "The seq of the last durable event.",
            app.ledger.durable_head(),
        ),
        (
            "commission_ledger_indexed_seq",
            "The seq the sled indexes reflect.",
            indexed,
        ),
        (
            "commission_ledger_checkpoint_seq",
            "The seq of the last checkpoint.",
            checkpointed,
        ),
        (
            "commission_ledger_checkpoint_bytes",
            "The size of the last checkpoint saved since start.",
            load(&writer.checkpoint_bytes),
        ),
        (
            "commission_ledger_auto_close_owed",
            "Month closes owed by auto_close_day and not made yet.",
            app.ledger.auto_close_due().len() as u64,
        ),
        (
            "commission_ledger_group_commit_halves",
            "1 while the syncer syncs waiting submitters in two alternating halves (chosen by trying).",
            u64::from(
                writer
                    .group_commit_halves
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ),
        (
            "commission_ledger_checkpoint_building",
            "1 while a checkpoint is being built beside the writer.",
            u64::from(
                writer
                    .checkpoint_building
                    .load(std::sync::atomic::Ordering::Acquire),
            ),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
