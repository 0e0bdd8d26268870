//! The HTTP API (axum): routes, authentication, `application/problem+json`
//! errors. The only module that imports axum.
//!
//! Every handler parses its input at the edge into the core's types, calls
//! the [`Ledger`], and maps the answer; [`ApiError`] is the one place that
//! knows HTTP statuses. Bodies are read as bytes and parsed here, so that a
//! malformed body gets a problem document naming the field, not axum's
//! plain-text rejection.
//!
//! This slice serves programs, affiliates, tracking input (clicks, signups,
//! basis lines, refunds), month close, withdrawals, credits, balances and
//! JSON statements, plus `/healthz`, `/readyz` and `/v1/verify`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::events::*;
use crate::ledger::{AsOf, Ledger, Receipt, Submission, SubmitError, request_hash};
use crate::money::{Currency, PositiveAmount, Rate};
use crate::rules::{Command, Noop, Rejection};

/// What the API needs besides the ledger.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The public base URL referral links start with (`https://aff.example`).
    pub base_url: String,
    /// The largest request body accepted.
    pub body_limit_bytes: usize,
    /// How long a request may take before it is answered 408.
    pub request_timeout: std::time::Duration,
    /// Public endpoints (`/r/…`, `/px.gif`): requests per minute per client
    /// address, and the burst allowed above that pace.
    pub public_per_minute: u32,
    pub public_burst: u32,
    /// Reverse proxies (TLS terminators, load balancers) whose
    /// `X-Forwarded-For` is believed: the client address of a request one
    /// of them passes on is the nearest address in that header that is not
    /// a trusted proxy. Empty: the peer's address, whatever the headers say.
    /// Behind a proxy that is not listed, every visitor shares the proxy's
    /// address, and with it one rate limit.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where `/r/{code}` sends a visitor whose code is unknown (mistyped, or
    /// of an affiliate no longer enrolled). `None`: the site of the only
    /// program when there is one; with several, such a link answers 404.
    pub fallback_site: Option<String>,
    /// How often the server looks for the month closes programs'
    /// `auto_close_day` owes (and makes them); `None`: never, the months
    /// are closed by hand only.
    pub auto_close_every: Option<std::time::Duration>,
}

impl Default for ApiConfig {
    fn default() -> ApiConfig {
        ApiConfig {
            base_url: "http://127.0.0.1:8080".into(),
            body_limit_bytes: 1 << 20,
            request_timeout: std::time::Duration::from_secs(30),
            public_per_minute: 120,
            public_burst: 30,
            auto_close_every: Some(std::time::Duration::from_secs(60)),
            trusted_proxies: Vec::new(),
            fallback_site: None,
        }
    }
}

/// What every handler shares. Cloned for every request (axum's `State`),
/// so it is one `Arc`: a clone of five touched five shared counters.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The contents of [`AppState`].
pub struct Shared {
    pub ledger: Arc<Ledger>,
    pub config: Arc<ApiConfig>,
    /// Becomes `true` when the server starts shutting down: live streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Requests counted by route, method and status, for `/metrics`.
    pub metrics: Arc<HttpMetrics>,
    /// The per-address limit of the public endpoints.
    pub public_limit: Arc<RateLimiter>,
}

/// A token bucket per client address, in integers (thousandths of a
/// request). Bounded: past `MAX_TRACKED_ADDRESSES` addresses the table
/// starts over, which can only let a request through, never lock one out.
pub struct RateLimiter {
    per_minute: u64,
    burst: u64,
    buckets: std::sync::Mutex<HashMap<std::net::IpAddr, (u64, i64)>>,
}

/// The most client addresses the rate limiter remembers.
pub const MAX_TRACKED_ADDRESSES: usize = 100_000;

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_minute: u64::from(per_minute.max(1)),
            burst: u64::from(burst.max(1)),
            buckets: std::sync::Mutex::new(HashMap::default()),
        }
    }

    /// Takes one request from the address's bucket; `false` when it is empty.
    /// An IPv6 address shares its bucket with its /64: one subscriber's
    /// network, which hands its hosts as many addresses as they like.
    pub fn allow(&self, address: std::net::IpAddr, now: Timestamp) -> bool {
        let address = match address.to_canonical() {
            std::net::IpAddr::V6(v6) => std::net::IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
            v4 => v4,
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&address) {
            buckets.clear();
        }
        let capacity = self.burst * 1_000;
        let (tokens, last) = buckets.entry(address).or_insert((capacity, now.micros()));
        let elapsed_us = now.micros().saturating_sub(*last).max(0) as u64;
        // per_minute requests per 60 s = per_minute thousandths per 60 ms.
        let refill = elapsed_us.saturating_mul(self.per_minute) / 60_000;
        *tokens = (*tokens + refill).min(capacity);
        *last = now.micros();
        if *tokens >= 1_000 {
            *tokens -= 1_000;
            true
        } else {
            false
        }
    }
}

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

async fn track(
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
async fn metrics(State(app): State<AppState>) -> Response {
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

/// The application's routes. Serve them with the peer's address
/// (`into_make_service_with_connect_info::<SocketAddr>()`, as [`serve`]
/// does): the public endpoints (`/r/…`, `/px.gif`) limit each client by it,
/// and without it answer 500 (`type` `internal`, the cause in the log).
pub fn router(ledger: Arc<Ledger>, config: ApiConfig) -> Router {
    let (_, stopping) = tokio::sync::watch::channel(false);
    routes(ledger, config, stopping)
}

fn routes(
    ledger: Arc<Ledger>,
    config: ApiConfig,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let limit = config.body_limit_bytes;
    let timeout = config.request_timeout;
    let state = AppState(Arc::new(Shared {
        ledger,
        public_limit: Arc::new(RateLimiter::new(
            config.public_per_minute,
            config.public_burst,
        )),
        config: Arc::new(config),
        stopping,
        metrics: Arc::new(HttpMetrics::default()),
    }));
    let program = Router::new()
        .route("/", axum::routing::put(put_program).get(get_program))
        .route("/affiliates", post(enroll))
        .route("/affiliates/{affiliate}", get(get_affiliate))
        .route("/affiliates/{affiliate}/balance", get(balance))
        .route("/affiliates/{affiliate}/statements/{month}", get(statement))
        .route("/affiliates/{affiliate}/stats", get(stats))
        .route("/affiliates/{affiliate}/referrals", get(referrals))
        .route("/affiliates/{affiliate}/withdrawals", post(withdraw))
        .route("/affiliates/{affiliate}/credits", post(credit))
        .route("/affiliates/{affiliate}/tokens", post(mint))
        .route("/withdrawals/{id}/paid", post(withdrawal_paid))
        .route("/withdrawals/{id}/reject", post(withdrawal_reject))
        .route("/clicks", post(click))
        .route("/signups", post(signup))
        .route("/expenses", post(expense))
        .route("/payments", post(payment))
        .route("/refunds", post(refund))
        .route(
            "/batch",
            post(batch).layer(DefaultBodyLimit::max(MAX_BATCH_BYTES)),
        )
        .route("/months/{month}/close", post(close_month))
        .route("/customers/{customer}/close", post(close_customer))
        .route("/customers/{customer}/group", post(customer_group))
        .route("/customers/{customer}/reassign", post(reassign))
        .route("/replays", post(create_replay))
        .route("/replays/{id}", get(get_replay))
        .route("/replays/{id}/apply", post(apply_replay));
    Router::new()
        .route("/r/{code}", get(follow_link))
        .route("/px.gif", get(pixel))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/verify", get(verify))
        .route("/v1/events", get(events))
        .route("/v1/events/stream", get(stream_events))
        .nest("/v1/programs/{program}", program)
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(axum::middleware::map_response(problems_for_rejections))
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        // Every request gets an `x-request-id` (kept when the caller sent
        // one), logged with the request and returned with the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(
            tower_http::trace::TraceLayer::new_for_http().make_span_with(|request: &axum::extract::Request| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(RequestIds))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes the
/// requests in flight.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ledger: Arc<Ledger>,
    config: ApiConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let closer = config
        .auto_close_every
        .map(|every| tokio::spawn(auto_close(ledger.clone(), every, stopping.clone())));
    let app = routes(ledger, config, stopping)
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    let signal = async move {
        shutdown.await;
        // Live streams end, so that the in-flight requests can finish.
        let _ = stop.send(true);
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await;
    if let Some(closer) = closer {
        // It stops with the signal (after a close it is making).
        let _ = closer.await;
    }
    served
}

/// Makes the month closes that programs' `auto_close_day` owes, now and
/// then every `every`, until the server stops.
async fn auto_close(
    ledger: Arc<Ledger>,
    every: std::time::Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stopping.borrow() {
            return;
        }
        for (program, month, result) in ledger.auto_close().await {
            match result {
                Ok(receipt) if receipt.noop.is_none() => {
                    tracing::info!(%program, %month, events = receipt.events.len(), "auto-closed a month");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(%program, %month, error = %e, "auto-close refused"),
            }
        }
        tokio::select! {
            // A zero interval is not a busy loop.
            () = tokio::time::sleep(every.max(std::time::Duration::from_millis(10))) => {}
            _ = stopping.changed() => return,
        }
    }
}

/// Makes request ids: UUID v7, so they sort by time.
#[derive(Clone, Copy)]
struct RequestIds;

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        uuid::Uuid::now_v7()
            .to_string()
            .parse()
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// Every way a request fails. Each variant is one status and problem `type`;
/// a 500's cause is logged, never shown.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON, or a field has the wrong type.
    Malformed(String),
    /// 401: no key, or an unknown or revoked one.
    Unauthenticated,
    /// 403: the key's role may not do this.
    Forbidden,
    /// 404: no such program, affiliate, month statement, withdrawal, route.
    NotFound(String),
    /// 409 or 422: the rules refused the command.
    Rejected(Rejection),
    /// 409: the idempotency key was used with another request.
    IdempotencyConflict(String),
    /// 413: the body is over the limit.
    TooLarge,
    /// 429: a public endpoint's per-address limit.
    RateLimited,
    /// 503: the ledger has stopped taking writes.
    Unavailable,
    /// 503: too many reads of the past wait for their replay, or too many
    /// verifications and what-if replays for their turn.
    Busy(String),
    /// 500: logged; the body says nothing more.
    Internal(String),
}

/// The stable `type` slug and the status of a refusal.
fn rejection_kind(rejection: &Rejection) -> (&'static str, StatusCode) {
    use Rejection::*;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    match rejection {
        Invalid(_) => ("invalid-value", unprocessable),
        Money(_) => ("invalid-amount", unprocessable),
        UnknownProgram(_) => ("unknown-program", StatusCode::NOT_FOUND),
        ProgramMismatch { .. } => ("program-mismatch", unprocessable),
        CurrencyChange { .. } => ("currency-change", unprocessable),
        UnknownAffiliate(_) => ("unknown-affiliate", StatusCode::NOT_FOUND),
        AffiliateExists(_) => ("affiliate-exists", StatusCode::CONFLICT),
        AffiliateSuspended(_) => ("affiliate-suspended", unprocessable),
        NotEligible(_) => ("not-eligible", unprocessable),
        PromoCodeTaken(_) => ("promo-code-taken", StatusCode::CONFLICT),
        UnknownReferralCode(_) => ("unknown-referral-code", unprocessable),
        CurrencyMismatch { .. } => ("currency-mismatch", unprocessable),
        LineConflict(_) => ("line-conflict", StatusCode::CONFLICT),
        UnknownLine(_) => ("unknown-line", unprocessable),
        WrongCustomer { .. } => ("wrong-customer", unprocessable),
        RefundExceedsLine { .. } => ("refund-exceeds-line", unprocessable),
        UnknownCustomer(_) => ("unknown-customer", StatusCode::NOT_FOUND),
        SelfReferral(_) => ("self-referral", unprocessable),
        MonthNotEnded(_) => ("month-not-ended", unprocessable),
        MonthOutOfOrder { .. } => ("month-out-of-order", unprocessable),
        InsufficientBalance { .. } => ("insufficient-balance", unprocessable),
        BelowThreshold { .. } => ("below-threshold", unprocessable),
        NegativeEarned(_) => ("negative-earned", unprocessable),
        UnknownWithdrawal(_) => ("unknown-withdrawal", StatusCode::NOT_FOUND),
        WithdrawalSettled(_) => ("withdrawal-settled", StatusCode::CONFLICT),
        KeyExists(_) => ("key-exists", StatusCode::CONFLICT),
        UnknownKey(_) => ("unknown-key", StatusCode::NOT_FOUND),
        ReplayStale { .. } => ("replay-stale", StatusCode::CONFLICT),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Malformed(detail) => problem(
                StatusCode::BAD_REQUEST,
                "malformed",
                "Malformed request",
                &detail,
            ),
            ApiError::Unauthenticated => problem(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Unauthenticated",
                "send a key as `Authorization: Bearer KEY`",
            ),
            ApiError::Forbidden => problem(
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                "this key's role may not do that",
            ),
            ApiError::NotFound(detail) => {
                problem(StatusCode::NOT_FOUND, "not-found", "Not found", &detail)
            }
            ApiError::Rejected(rejection) => {
                let (kind, status) = rejection_kind(&rejection);
                problem(status, kind, "Refused", &rejection.to_string())
            }
            ApiError::IdempotencyConflict(key) => problem(
                StatusCode::CONFLICT,
                "idempotency-conflict",
                "Idempotency key reused",
                &format!("idempotency key `{key}` was used with another request"),
            ),
            ApiError::TooLarge => problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "Body too large",
                "the body is over the limit",
            ),
            ApiError::RateLimited => {
                let mut response = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate-limited",
                    "Too many requests",
                    "this address sent too many requests; slow down",
                );
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
                response
            }
            ApiError::Unavailable => problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Unavailable",
                "the ledger is not taking writes",
            ),
            ApiError::Busy(detail) => {
                let mut response =
                    problem(StatusCode::SERVICE_UNAVAILABLE, "busy", "Busy", &detail);
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
                response
            }
            ApiError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                problem(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "see the server log",
                )
            }
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> ApiError {
        match e {
            SubmitError::Rejected(r) => ApiError::Rejected(r),
            SubmitError::IdempotencyConflict(key) => ApiError::IdempotencyConflict(key),
            SubmitError::Stopped => ApiError::Unavailable,
            SubmitError::Failed(e) => ApiError::Internal(e),
            SubmitError::Busy => ApiError::Busy(e.to_string()),
        }
    }
}

impl From<InvalidValue> for ApiError {
    fn from(e: InvalidValue) -> ApiError {
        ApiError::Rejected(Rejection::Invalid(e))
    }
}

/// An RFC 9457 problem document with a stable `type`.
pub fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    let body = json!({
        "type": format!("https://commission-ledger.dev/problems/{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

type ApiResult = Result<Response, ApiError>;

/// A query string, its blank fields left out: `?limit=&q=x` reads as
/// `?q=x`, as forms and portals send a field left empty. A value that does
/// not read is a 400 naming the field (axum's own `Query` answered a bare
/// "could not be read").
struct Params<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for Params<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        let read = |uri: &Uri| {
            Query::<T>::try_from_uri(uri)
                .map(|Query(value)| Params(value))
                .map_err(|e| ApiError::Malformed(e.body_text()))
        };
        let query = parts.uri.query().unwrap_or_default();
        let filled = |pair: &&str| pair.split_once('=').is_some_and(|(_, v)| !v.is_empty());
        if query.is_empty() || query.split('&').all(|pair| filled(&pair)) {
            return read(&parts.uri);
        }
        let kept: Vec<&str> = query.split('&').filter(filled).collect();
        let uri = format!("/?{}", kept.join("&"))
            .parse()
            .map_err(|_| ApiError::Malformed("the query string does not read".into()))?;
        read(&uri)
    }
}

/// A write: the parts of a POST or PUT its handler needs besides the path
/// (the idempotency key hashes the method, path and body).
pub struct Write {
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    body: Bytes,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Write {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let (parts, body) = request.into_parts();
        let (method, uri, headers) = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let request = axum::extract::Request::from_parts(parts, body);
        let body = Bytes::from_request(request, state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Write {
            headers,
            method,
            uri,
            body,
        })
    }
}

impl Write {
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_body(&self.body)
    }

    fn submission(
        &self,
        caller: &Caller,
        program: &ProgramId,
        at: Option<Timestamp>,
        command: Command,
    ) -> Result<Submission, ApiError> {
        submission(
            program,
            caller,
            &self.headers,
            (&self.method, &self.uri, &self.body),
            at,
            command,
        )
    }

    async fn submit(
        &self,
        app: &AppState,
        caller: &Caller,
        program: &ProgramId,
        at: Option<Timestamp>,
        command: Command,
    ) -> Result<Receipt, ApiError> {
        let submission = self.submission(caller, program, at, command)?;
        Ok(app.ledger.submit(submission).await?)
    }
}

// ---------------------------------------------------------------------------
// Authentication.

/// Who is calling: a live key and its role.
struct Caller {
    /// The key id, or `token:{program}/{affiliate}` for a per-affiliate token.
    key_id: String,
    /// The key's role; `None` for a per-affiliate token.
    role: Option<Role>,
    /// What a per-affiliate token is bound to.
    affiliate: Option<(ProgramId, AffiliateId)>,
}

/// The prefix of per-affiliate tokens (API keys start with `cl_`).
const TOKEN_PREFIX: &str = "clt.";

/// The longest a per-affiliate token may live.
pub const MAX_TOKEN_TTL_SECONDS: u64 = 30 * 86_400;

/// A per-affiliate token: the program, affiliate and expiry in hex, and a
/// keyed BLAKE3 MAC of them under the server's secret. Stateless: it cannot
/// be revoked, only expire.
fn mint_token(
    ledger: &Ledger,
    program: &ProgramId,
    affiliate: &AffiliateId,
    expires: Timestamp,
) -> String {
    let payload = format!("{program}\n{affiliate}\n{}", expires.micros());
    let mac = ledger.key_hash(&format!("token\n{payload}"));
    let hex: String = payload.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{TOKEN_PREFIX}{hex}.{}", mac.hex())
}

fn check_token(ledger: &Ledger, token: &str) -> Option<(ProgramId, AffiliateId)> {
    let (hex, mac) = token.strip_prefix(TOKEN_PREFIX)?.split_once('.')?;
    if hex.len() > 1024 {
        return None;
    }
    let bytes = crate::events::from_hex_digits(hex)?;
    let payload = String::from_utf8(bytes).ok()?;
    let expected = ledger.key_hash(&format!("token\n{payload}"));
    let given = crate::events::Bytes::<32>::from_hex(mac)?;
    // blake3::Hash compares in constant time.
    if blake3::Hash::from_bytes(expected.0) != blake3::Hash::from_bytes(given.0) {
        return None;
    }
    let mut parts = payload.split('\n');
    let program = ProgramId::parse(parts.next()?).ok()?;
    let affiliate = AffiliateId::parse(parts.next()?).ok()?;
    let expires = Timestamp::from_micros(parts.next()?.parse().ok()?);
    (expires > ledger.now()).then_some((program, affiliate))
}

fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthenticated)?;
    if key.starts_with(TOKEN_PREFIX) {
        let (program, affiliate) =
            check_token(&state.ledger, key).ok_or(ApiError::Unauthenticated)?;
        return Ok(Caller {
            key_id: format!("token:{program}/{affiliate}"),
            role: None,
            affiliate: Some((program, affiliate)),
        });
    }
    let record = state
        .ledger
        .authenticate(key)
        .ok_or(ApiError::Unauthenticated)?;
    Ok(Caller {
        key_id: record.key_id,
        role: Some(record.role),
        affiliate: None,
    })
}

/// The caller, if its role is one of `roles` (tokens have none).
fn require(state: &AppState, headers: &HeaderMap, roles: &[Role]) -> Result<Caller, ApiError> {
    let caller = caller(state, headers)?;
    if !caller.role.is_some_and(|role| roles.contains(&role)) {
        return Err(ApiError::Forbidden);
    }
    Ok(caller)
}

/// Whether the caller may read (and withdraw for) this affiliate: an admin
/// or portal key, or a token bound to exactly this program and affiliate.
fn may_act_for(
    caller: &Caller,
    program: &ProgramId,
    affiliate: &AffiliateId,
) -> Result<(), ApiError> {
    let allowed = match (&caller.role, &caller.affiliate) {
        (Some(role), _) => READERS.contains(role),
        (None, Some((p, a))) => p == program && a == affiliate,
        (None, None) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden)
    }
}

const READERS: &[Role] = &[Role::Admin, Role::Portal];
const INGEST: &[Role] = &[Role::Admin, Role::Ingest];
const ADMIN: &[Role] = &[Role::Admin];

// ---------------------------------------------------------------------------
// Input.

fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(|e| ApiError::Malformed(e.to_string()));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("the body is not the expected JSON: {e}")))
}

fn program_id(text: &str) -> Result<ProgramId, ApiError> {
    ProgramId::parse(text).map_err(|_| ApiError::NotFound(format!("no program `{text}`")))
}

fn affiliate_id(text: &str) -> Result<AffiliateId, ApiError> {
    AffiliateId::parse(text).map_err(|_| ApiError::NotFound(format!("no affiliate `{text}`")))
}

fn parse_at(at: Option<String>) -> Result<Option<Timestamp>, ApiError> {
    at.map(|text| Timestamp::parse(&text))
        .transpose()
        .map_err(ApiError::from)
}

/// Builds the submission: the caller as actor, `at`, and the idempotency
/// key with a hash of the method, path and body it came with.
fn submission(
    program: &ProgramId,
    caller: &Caller,
    headers: &HeaderMap,
    request: (&Method, &Uri, &Bytes),
    at: Option<Timestamp>,
    command: Command,
) -> Result<Submission, ApiError> {
    let mut s = Submission::new(Some(program), &caller.key_id, command);
    s.at = at;
    s.idempotency = idempotency(caller, headers, request)?;
    Ok(s)
}

/// The longest `Idempotency-Key` taken.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// The request's `Idempotency-Key`, scoped to the caller, with a hash of
/// the method, path and body (a retry with another body is a 409).
fn idempotency(
    caller: &Caller,
    headers: &HeaderMap,
    request: (&Method, &Uri, &Bytes),
) -> Result<Option<Idempotency>, ApiError> {
    let mut found = None;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY_LEN)
            .ok_or_else(|| {
                ApiError::Malformed(format!(
                    "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible characters"
                ))
            })?;
        let (method, uri, body) = request;
        let mut fingerprint = Vec::with_capacity(body.len() + 64);
        fingerprint.extend_from_slice(method.as_str().as_bytes());
        fingerprint.push(b' ');
        fingerprint.extend_from_slice(uri.path().as_bytes());
        fingerprint.push(b'\n');
        fingerprint.extend_from_slice(body);
        found = Some(Idempotency {
            key: format!("{}:{key}", caller.key_id),
            request_hash: request_hash(&fingerprint),
        });
    }
    Ok(found)
}

/// Runs `read` against the state as decided, then awaits the durability
/// of what it saw: a worker thread is not held while the sync in flight
/// completes.
async fn durably<T>(ledger: &Ledger, read: impl FnOnce() -> T) -> T {
    let (answer, seq) = ledger.deferring_settle(read);
    ledger.settled(seq).await;
    answer
}

/// Answers from the current state once it is durable ([`durably`]).
async fn settled<T>(app: &AppState, read: impl FnOnce(&crate::ledger::State) -> T) -> T {
    durably(&app.ledger, || read(&app.ledger.state())).await
}

/// A ledger error as the API answers it: busy (503) or internal (500).
fn ledger_error(e: crate::ledger::LedgerError) -> ApiError {
    match e {
        crate::ledger::LedgerError::Busy | crate::ledger::LedgerError::WholeLogBusy => {
            ApiError::Busy(e.to_string())
        }
        e => ApiError::Internal(e.to_string()),
    }
}

/// Runs a read: right here for the current state (a read lock, quick), on
/// the blocking pool for a past state (a replay of the log).
async fn read<T: Send + 'static>(
    app: &AppState,
    as_of: Option<AsOf>,
    read: impl FnOnce(&Ledger, Option<AsOf>) -> Result<T, crate::ledger::LedgerError> + Send + 'static,
) -> Result<T, ApiError> {
    let internal = ledger_error;
    if as_of.is_none() {
        return durably(&app.ledger, || read(&app.ledger, None))
            .await
            .map_err(internal);
    }
    let ledger = app.ledger.clone();
    tokio::task::spawn_blocking(move || read(&ledger, as_of))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(internal)
}

#[derive(Deserialize)]
struct AsOfQuery {
    as_of: Option<String>,
}

fn as_of(query: &AsOfQuery) -> Result<Option<AsOf>, ApiError> {
    let Some(text) = &query.as_of else {
        return Ok(None);
    };
    if let Ok(seq) = text.parse::<Seq>() {
        return Ok(Some(AsOf::Seq(seq)));
    }
    Timestamp::parse(text)
        .map(|t| Some(AsOf::Time(t)))
        .map_err(|_| {
            ApiError::Malformed(format!(
                "as_of `{text}` is neither a seq nor an RFC 3339 time"
            ))
        })
}

fn created(body: Value) -> Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

fn first_event(receipt: &Receipt) -> Result<&Event, ApiError> {
    receipt
        .events
        .first()
        .map(|r| &r.event)
        .ok_or_else(|| ApiError::Internal("an accepted command recorded no event".into()))
}

// ---------------------------------------------------------------------------
// Operations.

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once recovery and projections are loaded: the router only gets
/// the ledger after `Ledger::open` has done both.
async fn readyz(State(app): State<AppState>) -> Response {
    let head = app.ledger.durable_head();
    Json(json!({"ready": true, "head_seq": head})).into_response()
}

async fn verify(State(app): State<AppState>, headers: HeaderMap) -> ApiResult {
    require(&app, &headers, ADMIN)?;
    let ledger = app.ledger.clone();
    let report = tokio::task::spawn_blocking(move || ledger.verify())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ledger_error)?;
    let body = json!({
        "ok": report.ok,
        "events": report.events,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "bad_seq": report.bad_seq,
        "problem": report.problem,
        "projections": report.projections.as_str(),
    });
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    Ok((status, Json(body)).into_response())
}

/// axum and tower answer some refusals themselves (a body over the limit,
/// a method the route lacks, a timeout) in plain text or with no body; the
/// contract is problem+json everywhere. Other error bodies a handler chose
/// (the pixel's image) are left as they are.
async fn problems_for_rejections(response: Response) -> Response {
    let status = response.status();
    let plain = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !plain || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge.into_response(),
        StatusCode::REQUEST_TIMEOUT => problem(
            status,
            "timeout",
            "Request timeout",
            "the request took too long",
        ),
        StatusCode::METHOD_NOT_ALLOWED => problem(
            status,
            "method-not-allowed",
            "Method not allowed",
            "this path does not take that method",
        ),
        StatusCode::NOT_FOUND => problem(status, "not-found", "Not found", "no such endpoint"),
        // Not the request's fault: a layer or extractor the server lacks
        // (the peer's address, when the routes are served without it).
        _ if status.is_server_error() => {
            let cause = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap_or_default();
            tracing::error!(cause = %String::from_utf8_lossy(&cause), "internal error");
            problem(status, "internal", "Internal error", "see the server log")
        }
        _ => problem(
            status,
            "malformed",
            "Malformed request",
            "the request could not be read",
        ),
    }
}

async fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such endpoint",
    )
}

// ---------------------------------------------------------------------------
// Programs and affiliates.

async fn put_program(
    State(app): State<AppState>,
    Path(program): Path<String>,
    w: Write,
) -> ApiResult {
    let caller = require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let rules: ProgramRules = w.json()?;
    let receipt = w
        .submit(
            &app,
            &caller,
            &program,
            None,
            Command::DefineProgram {
                rules: Box::new(rules),
                reason: None,
            },
        )
        .await?;
    match first_event(&receipt)? {
        Event::ProgramDefined(e) => Ok(Json(&e.rules).into_response()),
        _ => Err(ApiError::Internal(
            "DefineProgram recorded another event".into(),
        )),
    }
}

async fn get_program(
    State(app): State<AppState>,
    Path(program): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    require(&app, &headers, READERS)?;
    let program = program_id(&program)?;
    settled(&app, |state| {
        let rules = state
            .model
            .program(&program)
            .and_then(|pm| pm.current_rules())
            .ok_or_else(|| ApiError::NotFound(format!("no program `{program}`")))?;
        Ok(Json(rules).into_response())
    })
    .await
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct EnrollBody {
    #[schemars(with = "AffiliateId")]
    affiliate_id: String,
    #[schemars(with = "Option<CustomerId>")]
    customer_id: Option<String>,
    group: Option<String>,
    rate: Option<String>,
}

fn referral_link(app: &AppState, code: &str) -> String {
    format!("{}/r/{code}", app.config.base_url.trim_end_matches('/'))
}

async fn enroll(State(app): State<AppState>, Path(program): Path<String>, w: Write) -> ApiResult {
    let caller = require(&app, &w.headers, &[Role::Admin, Role::Portal])?;
    let program = program_id(&program)?;
    let input: EnrollBody = w.json()?;
    let command = Command::EnrollAffiliate {
        affiliate_id: AffiliateId::parse(&input.affiliate_id)?,
        customer_id: input
            .customer_id
            .as_deref()
            .map(CustomerId::parse)
            .transpose()?,
        group: input.group,
        rate: input
            .rate
            .as_deref()
            .map(Rate::parse)
            .transpose()
            .map_err(|e| ApiError::Rejected(Rejection::Money(e)))?,
    };
    let receipt = w.submit(&app, &caller, &program, None, command).await?;
    match first_event(&receipt)? {
        Event::AffiliateEnrolled(e) => Ok(created(json!({
            "affiliate_id": e.affiliate_id,
            "referral_code": e.referral_code,
            "referral_link": referral_link(&app, &e.referral_code),
            "promo_code": e.promo_code,
        }))),
        _ => Err(ApiError::Internal(
            "EnrollAffiliate recorded another event".into(),
        )),
    }
}

async fn get_affiliate(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    settled(&app, |state| {
        let a = state
            .views
            .programs
            .get(&program)
            .and_then(|p| p.affiliates.get(&affiliate))
            .ok_or_else(|| {
                ApiError::NotFound(format!("no affiliate `{affiliate}` in `{program}`"))
            })?;
        Ok(Json(json!({
            "affiliate_id": a.profile.affiliate_id,
            "referral_code": a.profile.referral_code,
            "referral_link": referral_link(&app, &a.profile.referral_code),
            "promo_code": a.profile.promo_code,
            "customer_id": a.profile.customer_id,
            "group": a.profile.group,
            "rate": a.profile.rate,
            "enrolled_at": a.enrolled_at,
            "suspended": a.suspended,
        }))
        .into_response())
    })
    .await
}

async fn balance(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    Params(query): Params<AsOfQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    let as_of = as_of(&query)?;
    let (p, a) = (program.clone(), affiliate.clone());
    let balance = read(&app, as_of, move |ledger, as_of| {
        ledger.balance(&p, &a, as_of)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no affiliate `{affiliate}` in `{program}`")))?;
    Ok(Json(balance).into_response())
}

async fn statement(
    State(app): State<AppState>,
    Path((program, affiliate, month)): Path<(String, String, String)>,
    Params(query): Params<AsOfQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let caller = caller(&app, &headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    let month = Month::parse(&month)?;
    let as_of = as_of(&query)?;
    let (p, a) = (program.clone(), affiliate.clone());
    let statement = read(&app, as_of, move |ledger, as_of| {
        ledger.statement(&p, &a, month, as_of)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no affiliate `{affiliate}` in `{program}`")))?;
    Ok(by_accept(
        &headers,
        &statement,
        statement_csv,
        statement_html,
    ))
}

#[derive(Deserialize)]
struct StatsQuery {
    from: Option<String>,
    to: Option<String>,
    by: Option<String>,
    as_of: Option<String>,
}

/// The longest span statistics are grouped over, in days.
const MAX_STATS_DAYS: i64 = 3_660;

async fn stats(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    Params(query): Params<StatsQuery>,
    headers: HeaderMap,
) -> ApiResult {
    use crate::projections::StatsBy;
    let caller = caller(&app, &headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    let day = |text: &Option<String>, field: &'static str| {
        text.as_deref()
            .map(|t| {
                chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d").map_err(|_| {
                    ApiError::from(InvalidValue::new(
                        field,
                        format!("`{t}` is not a date YYYY-MM-DD"),
                    ))
                })
            })
            .transpose()
    };
    let zone = settled(&app, |state| {
        state.model.program(&program).map(|pm| pm.zone())
    })
    .await
    .ok_or_else(|| ApiError::NotFound(format!("no program `{program}`")))?;
    let today = app.ledger.now().date_in(zone);
    let to = day(&query.to, "to")?.unwrap_or(today);
    let from = day(&query.from, "from")?.unwrap_or(to - chrono::Duration::days(29));
    if from > to || (to - from).num_days() > MAX_STATS_DAYS {
        return Err(InvalidValue::new(
            "from",
            format!("must be on or before `to`, at most {MAX_STATS_DAYS} days before"),
        )
        .into());
    }
    let by = match query.by.as_deref() {
        None | Some("day") => StatsBy::Day,
        Some("month") => StatsBy::Month,
        Some("creative") => StatsBy::Creative,
        Some(other) => {
            return Err(InvalidValue::new(
                "by",
                format!("`{other}` is not day, month or creative"),
            )
            .into());
        }
    };
    let as_of = as_of(&AsOfQuery { as_of: query.as_of })?;
    let (p, a) = (program.clone(), affiliate.clone());
    let stats = read(&app, as_of, move |ledger, as_of| {
        ledger.stats(&p, &a, from, to, by, as_of)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no affiliate `{affiliate}` in `{program}`")))?;
    Ok(Json(stats).into_response())
}

#[derive(Deserialize)]
struct ReferralsQuery {
    status: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
    as_of: Option<String>,
}

async fn referrals(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    Params(query): Params<ReferralsQuery>,
    headers: HeaderMap,
) -> ApiResult {
    use crate::projections::{
        MAX_PAGE_SIZE, ReferralCursor, ReferralQuery, ReferralSort, ReferralStart,
    };
    let caller = caller(&app, &headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    if let Some(status) = query.status.as_deref()
        && !matches!(status, "active" | "closed")
    {
        return Err(
            InvalidValue::new("status", format!("`{status}` is not active or closed")).into(),
        );
    }
    let sort = match query.sort.as_deref() {
        None => ReferralSort::SignupDesc,
        Some(text) => ReferralSort::parse(text).ok_or_else(|| {
            InvalidValue::new(
                "sort",
                format!("`{text}` is not signup, -signup, commission, -commission or -billed"),
            )
        })?,
    };
    let limit = query.limit.unwrap_or(50);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(InvalidValue::new("limit", format!("must be 1 to {MAX_PAGE_SIZE}")).into());
    }
    let not_given_out = || InvalidValue::new("cursor", "is not a cursor this API gave out");
    let start = match query.cursor.as_deref().map(|c| (c, c.strip_prefix('o'))) {
        None => ReferralStart::First,
        // A cursor of earlier versions: rows to skip.
        Some((_, Some(rows))) => ReferralStart::Offset(rows.parse().map_err(|_| not_given_out())?),
        Some((cursor, None)) => {
            let cursor = ReferralCursor::parse(cursor).ok_or_else(not_given_out)?;
            if cursor.sort() != sort {
                return Err(InvalidValue::new(
                    "cursor",
                    format!(
                        "was given for sort={}, not sort={}",
                        cursor.sort().as_str(),
                        sort.as_str()
                    ),
                )
                .into());
            }
            ReferralStart::After(cursor)
        }
    };
    let referral_query = ReferralQuery {
        status: query.status,
        q: query.q.filter(|q| !q.is_empty()),
        sort,
        limit,
        start,
    };
    let as_of = as_of(&AsOfQuery { as_of: query.as_of })?;
    let (p, a) = (program.clone(), affiliate.clone());
    let page = read(&app, as_of, move |ledger, as_of| {
        ledger.referrals(&p, &a, &referral_query, as_of)
    })
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no affiliate `{affiliate}` in `{program}`")))?;
    Ok(Json(json!({
        "referrals": page.referrals,
        "total": page.total,
        "next_cursor": page.next.map(|cursor| cursor.to_string()),
        "as_of_seq": page.as_of_seq,
    }))
    .into_response())
}

/// A CSV field, quoted when it must be.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// The statement as CSV: one row per line, with opening and closing rows.
fn statement_csv(statement: &crate::projections::Statement) -> String {
    let mut out = String::from("at,kind,customer_id,product,basis,rate,amount,currency,late,ref\n");
    let currency = statement.currency.code();
    let month_start = statement.month.first_day().to_string();
    out.push_str(&format!(
        "{month_start},opening_balance,,,,,{},{currency},,\n",
        statement.opening_balance
    ));
    for line in &statement.lines {
        let fields = [
            line.at.to_rfc3339(),
            line.kind.name().to_string(),
            line.customer_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            line.product.clone().unwrap_or_default(),
            line.basis.clone().unwrap_or_default(),
            line.rate.map(|r| r.to_string()).unwrap_or_default(),
            line.amount.clone(),
            currency.to_string(),
            line.late.to_string(),
            line.r#ref.clone(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out.push_str(&format!(
        "{},closing_balance,,,,,{},{currency},,{}\n",
        statement.month.next().first_day(),
        statement.closing_balance,
        statement.log_hash
    ));
    out
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The statement as a printable HTML page.
fn statement_html(statement: &crate::projections::Statement) -> String {
    let e = |t: &str| html_escape(t);
    let currency = statement.currency.code();
    let mut rows = String::new();
    for line in &statement.lines {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=n>{}</td><td class=n>{}</td><td class=n>{}</td><td>{}</td><td>{}</td></tr>\n",
            e(&line.at.to_datetime().format("%Y-%m-%d").to_string()),
            e(line.kind.name()),
            e(&line.customer_id.as_ref().map(ToString::to_string).unwrap_or_default()),
            e(&line.product.clone().unwrap_or_default()),
            e(&line.basis.clone().unwrap_or_default()),
            e(&line.rate.map(|r| format!("{r}%")).unwrap_or_default()),
            e(&line.amount),
            if line.late { "late" } else { "" },
            e(&line.r#ref),
        ));
    }
    let totals: String = statement
        .totals
        .iter()
        .map(|(kind, total)| format!("<tr><td>{}</td><td class=n>{}</td></tr>", e(kind), e(total)))
        .collect();
    format!(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>Statement {month} · {affiliate}</title>\n\
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ccc;padding:4px 8px;text-align:left}}.n{{text-align:right;font-variant-numeric:tabular-nums}}@media print{{body{{margin:0}}}}</style></head>\n\
<body><h1>Commission statement {month}</h1>\n<p>Affiliate <b>{affiliate}</b> · amounts in {currency}{status}</p>\n\
<p>Opening balance <b>{opening}</b></p>\n<table><thead><tr><th>Date</th><th>Kind</th><th>Customer</th><th>Product</th><th class=n>Basis</th><th class=n>Rate</th><th class=n>Amount</th><th></th><th>Reference</th></tr></thead>\n<tbody>\n{rows}</tbody></table>\n\
<h2>Totals</h2><table>{totals}</table>\n<p>Closing balance <b>{closing}</b></p>\n\
<p><small>Computed from the log at seq {seq}, hash {hash}.</small></p></body></html>\n",
        month = statement.month,
        affiliate = e(statement.affiliate_id.as_str()),
        status = if statement.closed {
            " · closed"
        } else {
            " · open: the month may still change"
        },
        opening = e(&statement.opening_balance),
        closing = e(&statement.closing_balance),
        seq = statement.as_of_seq,
        hash = e(&statement.log_hash),
    )
}

// ---------------------------------------------------------------------------
// Audit.

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<Seq>,
    limit: Option<usize>,
    program: Option<String>,
    r#type: Option<String>,
    /// `replay:{id}` or `reassignment:{seq}`: the events one correction caused.
    cause: Option<String>,
}

/// A correction whose events `GET /v1/events?cause=` selects.
#[derive(Clone, Copy)]
enum CauseFilter {
    Replay(uuid::Uuid),
    Reassignment(Seq),
}

impl CauseFilter {
    fn parse(text: &str) -> Result<CauseFilter, ApiError> {
        let bad = || {
            ApiError::from(InvalidValue::new(
                "cause",
                format!("`{text}` is not `replay:{{id}}` or `reassignment:{{seq}}`"),
            ))
        };
        match text.split_once(':') {
            Some(("replay", id)) => uuid::Uuid::parse_str(id)
                .map(CauseFilter::Replay)
                .map_err(|_| bad()),
            Some(("reassignment", seq)) => seq
                .parse()
                .map(CauseFilter::Reassignment)
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// The correction's own events and the adjustments it posted.
    fn matches(&self, recorded: &Recorded) -> bool {
        match (self, &recorded.event) {
            (CauseFilter::Replay(id), Event::ReplayApplied(e)) => e.replay_id == *id,
            (CauseFilter::Replay(id), Event::ReplayCorrected(e)) => e.replay_id == *id,
            (CauseFilter::Reassignment(seq), Event::ReferralReassigned(_)) => recorded.seq == *seq,
            (CauseFilter::Replay(id), Event::AdjustmentPosted(e)) => {
                matches!(e.cause, Cause::Replay { replay_id, .. } if replay_id == *id)
            }
            (CauseFilter::Reassignment(seq), Event::AdjustmentPosted(e)) => {
                matches!(e.cause, Cause::Reassignment { seq: s } if s == *seq)
            }
            _ => false,
        }
    }
}

/// The most events one page of `/v1/events` returns.
pub const MAX_EVENTS_PAGE: usize = 1_000;
/// The most events one request reads while filtering.
const MAX_EVENTS_SCANNED: u64 = 20_000;

/// `GET /v1/events`: the log for auditors, from a seq on, optionally of one
/// program and type; JSON, or NDJSON when asked. `next_after` continues it.
async fn events(
    State(app): State<AppState>,
    Params(query): Params<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult {
    require(&app, &headers, ADMIN)?;
    let after = query.after.unwrap_or(0);
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_EVENTS_PAGE).contains(&limit) {
        return Err(InvalidValue::new("limit", format!("must be 1 to {MAX_EVENTS_PAGE}")).into());
    }
    let program = query.program.as_deref().map(ProgramId::parse).transpose()?;
    let wanted_type = query.r#type.clone();
    if let Some(t) = &wanted_type
        && !event_schemas().iter().any(|(name, _, _)| name == t)
    {
        return Err(InvalidValue::new("type", format!("`{t}` is not an event type")).into());
    }
    let cause = query.cause.as_deref().map(CauseFilter::parse).transpose()?;
    let ledger = app.ledger.clone();
    let head = ledger.durable_head();
    let scan_to = head.min(after.saturating_add(MAX_EVENTS_SCANNED));
    let found = tokio::task::spawn_blocking(move || ledger.events_with_hashes(after + 1, scan_to))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut lines = Vec::new();
    let mut last = after;
    for (recorded, hash) in found {
        last = recorded.seq;
        let program_matches = program.is_none() || recorded.program.as_ref() == program.as_ref();
        let type_matches = wanted_type
            .as_deref()
            .is_none_or(|t| t == recorded.event.type_name());
        let cause_matches = cause.is_none_or(|c| c.matches(&recorded));
        if program_matches && type_matches && cause_matches {
            lines.push(crate::ledger::ExportLine::new(&recorded, &hash));
            if lines.len() == limit {
                break;
            }
        }
    }
    let next_after = (last < head).then_some(last);
    let ndjson = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/x-ndjson"));
    if ndjson {
        let mut body = String::new();
        for line in &lines {
            body.push_str(
                &serde_json::to_string(line).map_err(|e| ApiError::Internal(e.to_string()))?,
            );
            body.push('\n');
        }
        let mut response = ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response();
        if let Some(next) = next_after.and_then(|n| n.to_string().parse().ok()) {
            response.headers_mut().insert("x-next-after", next);
        }
        return Ok(response);
    }
    Ok(Json(json!({"events": lines, "next_after": next_after, "head_seq": head})).into_response())
}

#[derive(Deserialize)]
struct StreamQuery {
    after: Option<Seq>,
    program: Option<String>,
    r#type: Option<String>,
}

/// Events read from the log per step of a live tail.
const STREAM_CHUNK: u64 = 500;

/// `GET /v1/events/stream`: server-sent events, one per recorded event
/// (`id` = seq, `event` = type, `data` = the export line), from `after` (or
/// the `Last-Event-ID` a reconnecting client sends, or the head: live only),
/// then live as the log grows.
async fn stream_events(
    State(app): State<AppState>,
    Params(query): Params<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    require(&app, &headers, ADMIN)?;
    let program = query.program.as_deref().map(ProgramId::parse).transpose()?;
    let wanted_type = query.r#type.clone();
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<Seq>().ok());
    let ledger = app.ledger.clone();
    let cursor = last_id
        .or(query.after)
        .unwrap_or_else(|| ledger.durable_head());
    let heads = ledger.subscribe();
    let buffer = std::collections::VecDeque::<SseEvent>::new();
    let stopping = app.stopping.clone();
    let state = (
        ledger,
        cursor,
        heads,
        buffer,
        program,
        wanted_type,
        stopping,
    );
    let stream = futures_util::stream::unfold(
        state,
        |(ledger, mut cursor, mut heads, mut buffer, program, wanted, mut stopping)| async move {
            loop {
                if *stopping.borrow() {
                    return None;
                }
                if let Some(event) = buffer.pop_front() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (ledger, cursor, heads, buffer, program, wanted, stopping),
                    ));
                }
                let head = *heads.borrow_and_update();
                if head <= cursor {
                    // Caught up: wait for the log to grow, or the server to stop.
                    tokio::select! {
                        changed = heads.changed() => changed.ok()?,
                        _ = stopping.changed() => return None,
                    }
                    continue;
                }
                let to = head.min(cursor + STREAM_CHUNK);
                let read = {
                    let ledger = ledger.clone();
                    let from = cursor + 1;
                    tokio::task::spawn_blocking(move || ledger.events_with_hashes(from, to))
                        .await
                        .ok()?
                        .ok()?
                };
                if read.is_empty() {
                    // The head moved but nothing could be read: end the stream;
                    // the client reconnects with Last-Event-ID.
                    return None;
                }
                for (recorded, hash) in read {
                    cursor = recorded.seq;
                    let program_matches =
                        program.is_none() || recorded.program.as_ref() == program.as_ref();
                    let type_matches = wanted
                        .as_deref()
                        .is_none_or(|t| t == recorded.event.type_name());
                    if program_matches && type_matches {
                        let line = crate::ledger::ExportLine::new(&recorded, &hash);
                        let data = serde_json::to_string(&line).ok()?;
                        buffer.push_back(
                            SseEvent::default()
                                .id(recorded.seq.to_string())
                                .event(recorded.event.type_name())
                                .data(data),
                        );
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

// ---------------------------------------------------------------------------
// Customers.

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CloseCustomerBody {
    reason: Option<String>,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

/// A change the billing system reports about one customer: the body names
/// when (`at`) and what; the answer is the seq of the recorded event.
async fn customer_change<B: serde::de::DeserializeOwned>(
    app: AppState,
    (program, customer): (String, String),
    w: Write,
    change: impl FnOnce(CustomerId, B) -> (Option<String>, Command),
) -> ApiResult {
    let caller = require(&app, &w.headers, INGEST)?;
    let program = program_id(&program)?;
    let (at, command) = change(CustomerId::parse(&customer)?, w.json()?);
    let receipt = w
        .submit(&app, &caller, &program, parse_at(at)?, command)
        .await?;
    Ok(created(
        json!({"seq": receipt.events.first().map(|r| r.seq)}),
    ))
}

async fn close_customer(
    State(app): State<AppState>,
    Path(ids): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    customer_change(app, ids, w, |customer_id, body: CloseCustomerBody| {
        (
            body.at,
            Command::CloseCustomer {
                customer_id,
                reason: body.reason,
            },
        )
    })
    .await
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: String,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

async fn customer_group(
    State(app): State<AppState>,
    Path(ids): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    customer_change(app, ids, w, |customer_id, body: GroupBody| {
        (
            body.at,
            Command::ChangeCustomerGroup {
                customer_id,
                group: body.group,
            },
        )
    })
    .await
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReassignBody {
    #[schemars(with = "AffiliateId")]
    to: String,
    /// A date (`2026-08-01`, midnight in the program's zone) or an RFC 3339 time.
    from: Option<String>,
    #[serde(default)]
    retroactive: bool,
    reason: String,
}

async fn reassign(
    State(app): State<AppState>,
    Path((program, customer)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    let caller = require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let input: ReassignBody = w.json()?;
    let zone = settled(&app, |state| {
        state
            .model
            .program(&program)
            .map(|pm| pm.zone())
            .unwrap_or(chrono_tz::UTC)
    })
    .await;
    let from = match input.from.as_deref() {
        None => None,
        Some(text) => Some(match chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
            Ok(date) => {
                let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
                use chrono::TimeZone;
                let local = zone
                    .from_local_datetime(&midnight)
                    .earliest()
                    .ok_or_else(|| {
                        ApiError::from(InvalidValue::new(
                            "from",
                            format!("`{text}` has no midnight in the program's zone"),
                        ))
                    })?;
                Timestamp::from_datetime(local.with_timezone(&chrono::Utc))
            }
            Err(_) => Timestamp::parse(text).map_err(|_| {
                InvalidValue::new(
                    "from",
                    format!("`{text}` is not a date or an RFC 3339 time"),
                )
            })?,
        }),
    };
    let command = Command::Reassign {
        customer_id: CustomerId::parse(&customer)?,
        to: AffiliateId::parse(&input.to)?,
        from,
        retroactive: input.retroactive,
        reason: input.reason,
    };
    let receipt = w.submit(&app, &caller, &program, None, command).await?;
    let adjustments: Vec<Value> = receipt
        .events
        .iter()
        .filter_map(|r| match &r.event {
            Event::AdjustmentPosted(a) => Some(json!({"affiliate_id": a.affiliate_id, "amount": a.amount.to_string(), "month": a.month, "seq": r.seq})),
            _ => None,
        })
        .collect();
    Ok(created(
        json!({"seq": receipt.events.first().map(|r| r.seq), "adjustments": adjustments}),
    ))
}

// ---------------------------------------------------------------------------
// What-if replays.

/// `POST .../replays`: the overrides, and optionally the statement months
/// the diff is restricted to.
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    #[serde(default)]
    pub overrides: Overrides,
    #[serde(default)]
    pub months: Option<MonthRange>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ApplyBody {
    reason: String,
}

async fn create_replay(
    State(app): State<AppState>,
    Path(program): Path<String>,
    w: Write,
) -> ApiResult {
    require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let body: ReplayBody = w.json()?;
    let ledger = app.ledger.clone();
    let replay =
        tokio::task::spawn_blocking(move || ledger.what_if(&program, body.overrides, body.months))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(replay)).into_response())
}

/// A read shape as `text/csv`, `text/html` or JSON, by the `Accept` header.
fn by_accept<T: serde::Serialize>(
    headers: &HeaderMap,
    value: &T,
    csv: fn(&T) -> String,
    html: fn(&T) -> String,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if accept.contains("text/csv") {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            csv(value),
        )
            .into_response()
    } else if accept.contains("text/html") {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html(value),
        )
            .into_response()
    } else {
        Json(value).into_response()
    }
}

/// The answer for a replay that `program` does not have.
fn no_replay(program: &ProgramId, id: &str) -> ApiError {
    ApiError::NotFound(format!("no replay `{id}` in `{program}`"))
}

/// A replay id from the path; one that is not a UUID names no replay (404).
fn replay_id(program: &ProgramId, id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id).map_err(|_| no_replay(program, id))
}

async fn find_replay(
    app: &AppState,
    program: &ProgramId,
    id: &str,
) -> Result<crate::ledger::Replay, ApiError> {
    let replay_id = replay_id(program, id)?;
    let ledger = app.ledger.clone();
    let p = program.clone();
    tokio::task::spawn_blocking(move || ledger.replay(&p, &replay_id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??
        .ok_or_else(|| no_replay(program, id))
}

async fn get_replay(
    State(app): State<AppState>,
    Path((program, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    require(&app, &headers, ADMIN)?;
    let program = program_id(&program)?;
    let replay = find_replay(&app, &program, &id).await?;
    Ok(by_accept(&headers, &replay, replay_csv, replay_html))
}

async fn apply_replay(
    State(app): State<AppState>,
    Path((program, id)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    let caller = require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let body: ApplyBody = w.json()?;
    let replay_id = replay_id(&program, &id)?;
    let ledger = app.ledger.clone();
    let (p, actor) = (program.clone(), caller.key_id.clone());
    let prepared = tokio::task::spawn_blocking(move || {
        ledger.apply_replay_submission(&p, &replay_id, &body.reason, &actor)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??
    .ok_or_else(|| no_replay(&program, &id))?;
    let receipt = w
        .submit(&app, &caller, &program, None, prepared.command)
        .await?;
    if let Some(Noop::ReplayAlreadyApplied { seq }) = receipt.noop {
        return Ok(Json(json!({"replay_id": replay_id, "applied_seq": seq, "adjustments": [], "already_applied": true})).into_response());
    }
    let adjustments: Vec<Value> = receipt
        .events
        .iter()
        .filter_map(|r| match &r.event {
            Event::AdjustmentPosted(a) => Some(json!({"affiliate_id": a.affiliate_id, "amount": a.amount.to_string(), "month": a.month, "line": a.line, "seq": r.seq})),
            _ => None,
        })
        .collect();
    Ok(created(json!({
        "replay_id": replay_id,
        "applied_seq": receipt.events.first().map(|r| r.seq),
        "adjustments": adjustments,
        "already_applied": false,
    })))
}

/// A replay's changed lines as CSV, one row per line (the API and the CLI).
pub fn replay_csv(replay: &crate::ledger::Replay) -> String {
    let mut out = String::from(
        "affiliate_id,month,kind,customer_id,line,basis,rate_before,rate_after,before,after,change\n",
    );
    for row in &replay.diff.rows {
        for line in &row.lines {
            let fields = [
                row.affiliate_id.to_string(),
                row.month.to_string(),
                line.kind.as_str().to_string(),
                line.customer_id
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                line.line
                    .as_ref()
                    .map(|l| l.to_string())
                    .unwrap_or_default(),
                line.basis.clone().unwrap_or_default(),
                line.rate_before.map(|r| r.to_string()).unwrap_or_default(),
                line.rate_after.map(|r| r.to_string()).unwrap_or_default(),
                line.before.clone(),
                line.after.clone(),
                line.change.clone(),
            ];
            let fields: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
    }
    out
}

fn replay_html(replay: &crate::ledger::Replay) -> String {
    let mut rows = String::new();
    for row in &replay.diff.rows {
        rows.push_str(&format!(
            "<tr class=\"month\"><th>{}</th><th>{}</th><th colspan=\"4\"></th><th>{}</th><th>{}</th><th>{}</th></tr>\n",
            html_escape(row.affiliate_id.as_str()),
            row.month,
            html_escape(&row.before),
            html_escape(&row.after),
            html_escape(&row.change),
        ));
        for line in &row.lines {
            rows.push_str(&format!(
                "<tr><td></td><td></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                html_escape(line.kind.as_str()),
                html_escape(line.customer_id.as_ref().map(|c| c.as_str()).unwrap_or("")),
                html_escape(line.line.as_ref().map(|l| l.as_str()).unwrap_or("")),
                html_escape(line.basis.as_deref().unwrap_or("")),
                html_escape(&line.before),
                html_escape(&line.after),
                html_escape(&line.change),
            ));
        }
    }
    let overrides = serde_json::to_string_pretty(&replay.overrides).unwrap_or_default();
    let status = match replay.applied_seq {
        Some(seq) => format!("applied at seq {seq}"),
        None => "not applied".to_string(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Replay {id}</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}}tr.month th{{background:#f4f4f4}}pre{{background:#f8f8f8;padding:1em}}</style></head>\n<body><h1>What-if replay {id}</h1>\n<p>Program {program}, computed at seq {at_seq} on {computed_at}; {status}. Amounts in {currency}. Total change: {total}.</p>\n<h2>Overrides</h2><pre>{overrides}</pre>\n<h2>Changes by affiliate and month</h2>\n<table><thead><tr><th>affiliate</th><th>month</th><th>kind</th><th>customer</th><th>line</th><th>basis</th><th>before</th><th>after</th><th>change</th></tr></thead><tbody>\n{rows}</tbody></table></body></html>\n",
        id = replay.replay_id,
        program = html_escape(replay.program.as_str()),
        at_seq = replay.at_seq,
        computed_at = replay.computed_at,
        currency = replay.diff.currency.code(),
        total = html_escape(&replay.diff.total_change),
        overrides = html_escape(&overrides),
    )
}

// ---------------------------------------------------------------------------
// Tracking: the public link and the pixel.

/// The visitor cookie's name.
pub const VISITOR_COOKIE: &str = "cl_visitor";

/// A 1×1 transparent GIF.
const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// The scheme, host and port of an absolute URL (`https://provider.example`).
fn origin(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let host_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    Some(&url[..url.len() - rest.len() + host_end])
}

/// A `to` path that stays on the site's own origin, or `None`: only a path
/// starting with one `/`, of plain URL characters, that still does after
/// percent-decoding (no `//host`, no backslashes, no encoded tricks).
fn safe_path(to: &str) -> Option<&str> {
    let plain = |s: &str| {
        s.starts_with('/')
            && !s.starts_with("//")
            && !s.contains('\\')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~/?=&%+#:@!$,;*()'".contains(c))
    };
    if to.len() > 2000 || !plain(to) {
        return None;
    }
    let decoded = percent_decode(to)?;
    (plain(&decoded) && !decoded.contains("/\\")).then_some(to)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn visitor_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == VISITOR_COOKIE)
        .map(|(_, value)| value.to_string())
        .filter(|v| ProgramId::parse(v).is_ok())
}

/// The address a public request came from: the peer's or, when the peer
/// is a trusted proxy, the nearest address in `X-Forwarded-For` that is
/// not one. Each proxy appends the address it got the request from, so the
/// list is read from its right end, and what a client wrote at its left end
/// itself is never reached while an untrusted address stands after it.
fn client_ip(
    config: &ApiConfig,
    peer: std::net::SocketAddr,
    headers: &HeaderMap,
) -> std::net::IpAddr {
    let trusted = |ip: &std::net::IpAddr| config.trusted_proxies.iter().any(|n| n.contains(ip));
    let mut client = peer.ip().to_canonical();
    if !trusted(&client) {
        return client;
    }
    // Several header lines are one list, in order.
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            // `unknown`, an obfuscated name or garbage: the nearest known
            // hop is the client.
            let Some(ip) = forwarded_ip(hop.trim()) else {
                return client;
            };
            client = ip;
            if !trusted(&ip) {
                return client;
            }
        }
    }
    client
}

/// An address as proxies write it in `X-Forwarded-For`: `203.0.113.7`,
/// `203.0.113.7:4711`, `2001:db8::7` or `[2001:db8::7]:4711`.
fn forwarded_ip(hop: &str) -> Option<std::net::IpAddr> {
    let ip = match hop.parse::<std::net::IpAddr>() {
        Ok(ip) => ip,
        Err(_) => hop.parse::<std::net::SocketAddr>().ok()?.ip(),
    };
    Some(ip.to_canonical())
}

/// A keyed hash of the client address: never the address itself.
fn client_hash(app: &AppState, client: std::net::IpAddr) -> Bytes16 {
    let full = app.ledger.key_hash(&format!("client:{client}"));
    let mut short = [0u8; 16];
    short.copy_from_slice(&full.0[..16]);
    crate::events::Bytes(short)
}

type Bytes16 = crate::events::Bytes<16>;

#[derive(Deserialize, Default)]
struct LinkQuery {
    to: Option<String>,
}

/// `GET /r/{code}`: records a click, sets the visitor cookie, and sends the
/// visitor to the program's site (or a safe `to` path on it).
async fn follow_link(
    State(app): State<AppState>,
    Path(code): Path<String>,
    query: Result<Params<LinkQuery>, ApiError>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> ApiResult {
    // A visitor's link whose query does not read still goes to the site.
    let query = query.map(|Params(query)| query).unwrap_or_default();
    let client = client_ip(&app.config, peer, &headers);
    if !app.public_limit.allow(client, app.ledger.now()) {
        return Err(ApiError::RateLimited);
    }
    let found = {
        // A code is known only once its enrolment is durable.
        let state = app.ledger.decided_state();
        state
            .model
            .referral_codes
            .get(&code)
            .and_then(|(program, _)| {
                let rules = state.model.program(program)?.current_rules()?;
                Some((program.clone(), rules.site_url.clone(), rules.cookie_days))
            })
    };
    let Some((program, site_url, cookie_days)) = found else {
        // A link that names no known affiliate still takes the visitor to
        // the site, with no click and no cookie.
        let Some(site) = fallback_site(&app) else {
            return Err(ApiError::NotFound(format!("no referral link `{code}`")));
        };
        let target = link_target(&site, query.to.as_deref());
        return Ok((StatusCode::FOUND, [(header::LOCATION, target)]).into_response());
    };
    let target = link_target(&site_url, query.to.as_deref());
    let visitor =
        visitor_cookie(&headers).unwrap_or_else(|| format!("v-{}", crate::ledger::random_code(16)));
    let referrer = headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .map(Text::from);
    let command = Command::RecordClick {
        referral_code: code,
        visitor: Some(Text::from(visitor.as_str())),
        creative: None,
        referrer,
        landing: Some(Text::from(target.as_str())),
        client_hash: Some(client_hash(&app, client)),
    };
    let submission = Submission::new(Some(&program), "public", command);
    // A suspended affiliate's link still takes the visitor to the site.
    let _ = app.ledger.submit(submission).await;
    // The server speaks plain HTTP: https ends at a proxy in front. The
    // header is believed from any peer, unlike `X-Forwarded-For`: all a
    // client can get by forging it is a cookie its own plain-HTTP browser
    // will not send back.
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{VISITOR_COOKIE}={visitor}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax{}",
        u64::from(cookie_days) * 86_400,
        if secure { "; Secure" } else { "" }
    );
    Ok((
        StatusCode::FOUND,
        [(header::LOCATION, target), (header::SET_COOKIE, cookie)],
    )
        .into_response())
}

/// Where a link sends the visitor: the site, or a safe `to` path on its origin.
fn link_target(site_url: &str, to: Option<&str>) -> String {
    match (to.and_then(safe_path), origin(site_url)) {
        (Some(path), Some(origin)) => format!("{origin}{path}"),
        _ => site_url.to_string(),
    }
}

/// The site for a link with an unknown code ([`ApiConfig::fallback_site`]).
fn fallback_site(app: &AppState) -> Option<String> {
    if let Some(site) = &app.config.fallback_site {
        return Some(site.clone());
    }
    let state = app.ledger.decided_state();
    let mut programs = state.model.programs.values();
    match (programs.next(), programs.next()) {
        (Some(only), None) => Some(only.current_rules()?.site_url.clone()),
        _ => None,
    }
}

#[derive(Deserialize, Default)]
struct PixelQuery {
    /// The referrer of the page (BILLmanager's `r`).
    r: Option<String>,
    /// The page URL, carrying `ref=CODE` (BILLmanager's `p`).
    p: Option<String>,
}

/// `GET /px.gif`: the tracking pixel; records a click when the page URL
/// carries `ref=CODE`. Always answers the GIF.
async fn pixel(
    State(app): State<AppState>,
    query: Result<Params<PixelQuery>, ApiError>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let query = query.map(|Params(query)| query).unwrap_or_default();
    let client = client_ip(&app.config, peer, &headers);
    if !app.public_limit.allow(client, app.ledger.now()) {
        // Still the image (browsers draw it whatever the status), so that
        // a page never shows a broken one; nothing is recorded.
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::CONTENT_TYPE, "image/gif"),
                (header::CACHE_CONTROL, "no-store"),
                (header::RETRY_AFTER, "1"),
            ],
            PIXEL_GIF,
        )
            .into_response();
    }
    let code = query.p.as_deref().and_then(|page| {
        let (_, query) = page.split_once('?')?;
        let query = query.split('#').next()?;
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| *name == "ref")
            .map(|(_, code)| code.to_string())
    });
    let mut set_cookie = None;
    if let Some(code) = code {
        // As for `/r`: a code is known only once its event is durable.
        let program = app
            .ledger
            .decided_state()
            .model
            .referral_codes
            .get(&code)
            .map(|(p, _)| p.clone());
        if let Some(program) = program {
            let visitor = visitor_cookie(&headers)
                .unwrap_or_else(|| format!("v-{}", crate::ledger::random_code(16)));
            let command = Command::RecordClick {
                referral_code: code,
                visitor: Some(Text::from(visitor.as_str())),
                creative: None,
                referrer: query.r.as_deref().map(Text::from),
                landing: query.p.as_deref().map(Text::from),
                client_hash: Some(client_hash(&app, client)),
            };
            if app
                .ledger
                .submit(Submission::new(Some(&program), "public", command))
                .await
                .is_ok()
            {
                set_cookie = Some(format!(
                    "{VISITOR_COOKIE}={visitor}; Path=/; HttpOnly; SameSite=Lax"
                ));
            }
        }
    }
    let mut response = (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PIXEL_GIF,
    )
        .into_response();
    if let Some(cookie) = set_cookie.and_then(|c| c.parse().ok()) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

// ---------------------------------------------------------------------------
// What the billing system sends.

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ClickBody {
    referral_code: String,
    visitor: Option<String>,
    creative: Option<String>,
    referrer: Option<String>,
    landing: Option<String>,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SignupBody {
    #[schemars(with = "CustomerId")]
    customer_id: String,
    visitor: Option<String>,
    promo_code: Option<String>,
    group: Option<String>,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LineBody {
    #[schemars(with = "LineId")]
    id: String,
    #[schemars(with = "CustomerId")]
    customer_id: String,
    #[schemars(with = "PositiveAmount")]
    amount: String,
    #[schemars(with = "Currency")]
    currency: String,
    product: Option<String>,
    order_id: Option<String>,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    #[schemars(with = "LineId")]
    id: String,
    #[schemars(with = "CustomerId")]
    customer_id: String,
    #[schemars(with = "LineId")]
    refunds: String,
    #[schemars(with = "PositiveAmount")]
    amount: String,
    #[schemars(with = "Currency")]
    currency: String,
    #[schemars(with = "Option<Timestamp>")]
    at: Option<String>,
}

/// Which body an ingest endpoint or batch item carries.
#[derive(Clone, Copy)]
enum Parse {
    Click,
    Signup,
    Line(LineKind),
    Refund,
}

impl Parse {
    fn read_slice(self, body: &[u8]) -> Result<Ingest, serde_json::Error> {
        Ok(match self {
            Parse::Click => Ingest::Click(serde_json::from_slice(body)?),
            Parse::Signup => Ingest::Signup(serde_json::from_slice(body)?),
            Parse::Line(kind) => Ingest::Line(kind, serde_json::from_slice(body)?),
            Parse::Refund => Ingest::Refund(serde_json::from_slice(body)?),
        })
    }
}

/// What the billing system sends: one of these per endpoint, or per item of
/// a batch (`"type": "click"` …).
enum Ingest {
    Click(ClickBody),
    Signup(SignupBody),
    Line(LineKind, LineBody),
    Refund(RefundBody),
}

impl Ingest {
    /// A request body, parsed straight into its type.
    fn parse_bytes(kind: &str, body: &[u8]) -> Result<Ingest, ApiError> {
        let body = if body.is_empty() {
            b"{}".as_slice()
        } else {
            body
        };
        Ingest::decode(kind, |ty| ty.read_slice(body))
    }

    fn decode(
        kind: &str,
        read: impl FnOnce(Parse) -> Result<Ingest, serde_json::Error>,
    ) -> Result<Ingest, ApiError> {
        let parse = match kind {
            "click" => Parse::Click,
            "signup" => Parse::Signup,
            "expense" => Parse::Line(LineKind::Expense),
            "payment" => Parse::Line(LineKind::Payment),
            "refund" => Parse::Refund,
            other => {
                return Err(ApiError::Malformed(format!(
                    "`{other}` is not click, signup, expense, payment or refund"
                )));
            }
        };
        read(parse)
            .map_err(|e| ApiError::Malformed(format!("the `{kind}` is not the expected JSON: {e}")))
    }

    /// The command, and when it happened.
    fn command(self) -> Result<(Option<Timestamp>, Command), ApiError> {
        Ok(match self {
            Ingest::Click(c) => (
                parse_at(c.at)?,
                Command::RecordClick {
                    referral_code: c.referral_code,
                    visitor: c.visitor.map(Text::from),
                    creative: c.creative.map(Text::from),
                    referrer: c.referrer.map(Text::from),
                    landing: c.landing.map(Text::from),
                    client_hash: None,
                },
            ),
            Ingest::Signup(s) => (
                parse_at(s.at)?,
                Command::Signup {
                    customer_id: CustomerId::parse(&s.customer_id)?,
                    visitor: s.visitor.map(Text::from),
                    promo_code: s.promo_code,
                    group: s.group,
                },
            ),
            Ingest::Line(kind, l) => (
                parse_at(l.at)?,
                Command::RecordBasisLine {
                    kind,
                    id: LineId::parse(&l.id)?,
                    customer_id: CustomerId::parse(&l.customer_id)?,
                    amount: l.amount,
                    currency: l.currency,
                    product: l.product,
                    order_id: l.order_id,
                },
            ),
            Ingest::Refund(r) => (
                parse_at(r.at)?,
                Command::RecordRefund {
                    id: LineId::parse(&r.id)?,
                    customer_id: CustomerId::parse(&r.customer_id)?,
                    refunds: LineId::parse(&r.refunds)?,
                    amount: r.amount,
                    currency: r.currency,
                },
            ),
        })
    }
}

/// The answer to an ingested command: `201` with what was recorded, or
/// `200` for what was acknowledged without recording (a duplicate line, an
/// unattributable or already attributed signup). Its fields are in
/// alphabetical order, as a JSON object of them always was; in a batch
/// result it carries its `status` too.
#[derive(Debug, Default, serde::Serialize)]
struct IngestAnswer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    affiliate_id: Option<&'a AffiliateId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attributed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    click_id: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    via: Option<Via>,
    #[serde(skip_serializing_if = "Option::is_none")]
    visitor: Option<&'a str>,
}

fn ingest_answer(receipt: &Receipt) -> Result<(StatusCode, IngestAnswer<'_>), ApiError> {
    let attributed = |affiliate_id, via| IngestAnswer {
        attributed: Some(true),
        affiliate_id: Some(affiliate_id),
        via,
        ..IngestAnswer::default()
    };
    let recorded = |seq, duplicate| IngestAnswer {
        seq,
        duplicate,
        ..IngestAnswer::default()
    };
    let first = receipt.events.first();
    Ok(match (&receipt.noop, first.map(|r| &r.event)) {
        (Some(Noop::SignupIgnored), _) => (
            StatusCode::OK,
            IngestAnswer {
                attributed: Some(false),
                ..IngestAnswer::default()
            },
        ),
        (Some(Noop::AlreadyAttributed { affiliate_id, via }), _) => {
            (StatusCode::OK, attributed(affiliate_id, *via))
        }
        (Some(Noop::Duplicate { seq }), _) => (StatusCode::OK, recorded(Some(*seq), Some(true))),
        (None, Some(Event::ClickRecorded(e))) => (
            StatusCode::CREATED,
            IngestAnswer {
                click_id: Some(e.click_id),
                visitor: Some(&e.visitor),
                ..IngestAnswer::default()
            },
        ),
        (None, Some(Event::SignupAttributed(e))) => (
            StatusCode::CREATED,
            attributed(&e.affiliate_id, Some(e.via)),
        ),
        (None, Some(_)) if receipt.replayed => {
            (StatusCode::OK, recorded(first.map(|r| r.seq), Some(true)))
        }
        (None, Some(_)) => (StatusCode::CREATED, recorded(first.map(|r| r.seq), None)),
        _ => {
            return Err(ApiError::Internal(
                "an ingested command recorded nothing".into(),
            ));
        }
    })
}

async fn ingest(app: AppState, kind: &str, program: String, w: Write) -> ApiResult {
    let caller = require(&app, &w.headers, INGEST)?;
    let program = program_id(&program)?;
    let (at, command) = Ingest::parse_bytes(kind, &w.body)?.command()?;
    let receipt = w.submit(&app, &caller, &program, at, command).await?;
    let (status, answer) = ingest_answer(&receipt)?;
    Ok((status, Json(answer)).into_response())
}

macro_rules! ingest_endpoint {
    ($name:ident, $kind:literal) => {
        async fn $name(
            State(app): State<AppState>,
            Path(program): Path<String>,
            w: Write,
        ) -> ApiResult {
            ingest(app, $kind, program, w).await
        }
    };
}

ingest_endpoint!(click, "click");
ingest_endpoint!(signup, "signup");
ingest_endpoint!(expense, "expense");
ingest_endpoint!(payment, "payment");
ingest_endpoint!(refund, "refund");

/// The most items one `POST .../batch` takes.
pub const MAX_BATCH_ITEMS: usize = 10_000;
/// The largest batch body.
pub const MAX_BATCH_BYTES: usize = 16 << 20;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[expect(dead_code, reason = "the body's schema; BatchItems reads it")]
struct BatchBody {
    items: Vec<Value>,
}

/// [`BatchBody`] as it is read: each item kept as its raw JSON text, so a
/// bad item is refused alone and the others are parsed once, straight into
/// their types.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItems<'a> {
    #[serde(borrow)]
    items: Vec<&'a serde_json::value::RawValue>,
}

/// One item of a batch, by its `type`.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum BatchItem {
    Click(ClickBody),
    Signup(SignupBody),
    Expense(LineBody),
    Payment(LineBody),
    Refund(RefundBody),
}

impl From<BatchItem> for Ingest {
    fn from(item: BatchItem) -> Ingest {
        match item {
            BatchItem::Click(c) => Ingest::Click(c),
            BatchItem::Signup(s) => Ingest::Signup(s),
            BatchItem::Expense(l) => Ingest::Line(LineKind::Expense, l),
            BatchItem::Payment(l) => Ingest::Line(LineKind::Payment, l),
            BatchItem::Refund(r) => Ingest::Refund(r),
        }
    }
}

/// `POST .../batch`: up to 10,000 clicks, signups, basis lines and refunds;
/// one result per item, in order. Items are independent: a refused item
/// appends nothing and does not stop the others. With an `Idempotency-Key`,
/// item `i` gets the key `KEY#i`, so a retried batch appends nothing twice.
async fn batch(State(app): State<AppState>, Path(program): Path<String>, w: Write) -> ApiResult {
    let caller = require(&app, &w.headers, INGEST)?;
    let program = program_id(&program)?;
    let input: BatchItems<'_> = serde_json::from_slice(&w.body)
        .map_err(|e| ApiError::Malformed(format!("the body is not the expected JSON: {e}")))?;
    if input.items.len() > MAX_BATCH_ITEMS {
        return Err(InvalidValue::new("items", format!("at most {MAX_BATCH_ITEMS} items")).into());
    }
    // Hashed once for the whole body: item `i` is keyed `KEY#i` under it.
    let batch_key = idempotency(&caller, &w.headers, (&w.method, &w.uri, &w.body))?;
    let mut refused: Vec<Option<ApiError>> = Vec::with_capacity(input.items.len());
    let mut submissions = Vec::with_capacity(input.items.len());
    for (i, item) in input.items.iter().enumerate() {
        let parsed = serde_json::from_str::<BatchItem>(item.get())
            .map_err(|e| ApiError::Malformed(format!("item {i} is not the expected JSON: {e}")))
            .and_then(|item| Ingest::from(item).command());
        match parsed {
            Ok((at, command)) => {
                let mut s = Submission::new(Some(&program), &caller.key_id, command);
                s.at = at;
                s.idempotency = batch_key.as_ref().map(|idem| Idempotency {
                    key: format!("{}#{i}", idem.key),
                    request_hash: idem.request_hash,
                });
                submissions.push(s);
                refused.push(None);
            }
            Err(e) => refused.push(Some(e)),
        }
    }
    let mut answers = app.ledger.submit_many(submissions).await.into_iter();
    // Written straight out: for 10,000 items, a JSON value per answer cost
    // more than the parsing.
    let mut out = Vec::with_capacity(64 * refused.len() + 16);
    out.extend_from_slice(b"{\"results\":[");
    for (i, refusal) in refused.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let refusal = match refusal {
            Some(e) => Some(e),
            None => match answers.next() {
                Some(Ok(receipt)) => match ingest_answer(&receipt) {
                    Ok((status, mut answer)) => {
                        answer.status = Some(status.as_u16());
                        write(&mut out, &answer)?;
                        None
                    }
                    Err(e) => Some(e),
                },
                Some(Err(e)) => Some(ApiError::from(e)),
                None => Some(ApiError::Internal("a batch item had no answer".into())),
            },
        };
        if let Some(e) = refusal {
            write(&mut out, &item_error(e))?;
        }
    }
    out.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// Appends one batch result to the answer.
fn write<T: serde::Serialize>(out: &mut Vec<u8>, item: &T) -> Result<(), ApiError> {
    serde_json::to_writer(out, item)
        .map_err(|e| ApiError::Internal(format!("writing a batch answer: {e}")))
}

/// An item's refusal inside a batch answer (fields in alphabetical order,
/// as the JSON object it replaces).
#[derive(serde::Serialize)]
struct ItemProblem {
    detail: String,
    status: u16,
    #[serde(rename = "type")]
    kind: String,
}

/// An item's refusal inside a batch answer: its status, problem type and detail.
fn item_error(error: ApiError) -> ItemProblem {
    let (status, kind, detail) = match error {
        ApiError::Rejected(r) => {
            let (kind, status) = rejection_kind(&r);
            (status, kind, r.to_string())
        }
        ApiError::Malformed(detail) => (StatusCode::BAD_REQUEST, "malformed", detail),
        ApiError::IdempotencyConflict(key) => (StatusCode::CONFLICT, "idempotency-conflict", key),
        ApiError::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the ledger is not taking writes".into(),
        ),
        other => {
            tracing::error!(cause = ?other, "batch item failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "see the server log".into(),
            )
        }
    };
    ItemProblem {
        detail,
        status: status.as_u16(),
        kind: format!("https://commission-ledger.dev/problems/{kind}"),
    }
}

// ---------------------------------------------------------------------------
// Money out and month close.

async fn close_month(
    State(app): State<AppState>,
    Path((program, month)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    let caller = require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let month = Month::parse(&month)?;
    let receipt = w
        .submit(&app, &caller, &program, None, Command::CloseMonth { month })
        .await?;
    let (closed, already) = match (&receipt.noop, receipt.events.last().map(|r| &r.event)) {
        (Some(Noop::MonthAlreadyClosed(closed)), _) => (closed.clone(), true),
        (None, Some(Event::MonthClosed(closed))) => (closed.clone(), receipt.replayed),
        _ => return Err(ApiError::Internal("a close recorded no MonthClosed".into())),
    };
    let currency = settled(&app, |state| {
        state
            .model
            .program(&program)
            .and_then(|pm| pm.current_rules().map(|r| r.currency))
    })
    .await;
    let total = currency
        .map(|c| c.format(closed.total))
        .unwrap_or_else(|| closed.total.to_string());
    Ok(Json(json!({"month": closed.month, "rewards": closed.rewards, "total": total, "already_closed": already})).into_response())
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct AmountBody {
    #[schemars(with = "PositiveAmount")]
    amount: String,
}

async fn withdraw(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    let caller = caller(&app, &w.headers)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    may_act_for(&caller, &program, &affiliate)?;
    let input: AmountBody = w.json()?;
    let command = Command::RequestWithdrawal {
        affiliate_id: affiliate,
        amount: input.amount,
    };
    let receipt = w.submit(&app, &caller, &program, None, command).await?;
    match first_event(&receipt)? {
        Event::WithdrawalRequested(e) => Ok(created(
            json!({"withdrawal_id": e.withdrawal_id, "status": "requested", "amount": e.amount.to_string()}),
        )),
        _ => Err(ApiError::Internal(
            "RequestWithdrawal recorded another event".into(),
        )),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[schemars(range(min = 1, max = MAX_TOKEN_TTL_SECONDS))]
    ttl_seconds: Option<u64>,
}

/// `POST .../affiliates/{a}/tokens`: a token that reads one affiliate and
/// requests its withdrawals, for a portal to hand to that affiliate's page.
async fn mint(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    require(&app, &headers, READERS)?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    let input: TokenBody = parse_body(&body)?;
    let ttl = input.ttl_seconds.unwrap_or(3_600);
    if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
        return Err(InvalidValue::new(
            "ttl_seconds",
            format!("must be 1 to {MAX_TOKEN_TTL_SECONDS}"),
        )
        .into());
    }
    let known = settled(&app, |state| {
        state
            .views
            .programs
            .get(&program)
            .is_some_and(|p| p.affiliates.contains_key(&affiliate))
    })
    .await;
    if !known {
        return Err(ApiError::NotFound(format!(
            "no affiliate `{affiliate}` in `{program}`"
        )));
    }
    let expires = Timestamp::from_micros(
        app.ledger
            .now()
            .micros()
            .saturating_add(ttl as i64 * 1_000_000),
    );
    let token = mint_token(&app.ledger, &program, &affiliate, expires);
    Ok(created(json!({"token": token, "expires_at": expires})))
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreditBody {
    #[schemars(with = "PositiveAmount")]
    amount: String,
    invoice_id: String,
}

async fn credit(
    State(app): State<AppState>,
    Path((program, affiliate)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    let caller = require(&app, &w.headers, &[Role::Admin, Role::Portal])?;
    let (program, affiliate) = (program_id(&program)?, affiliate_id(&affiliate)?);
    let input: CreditBody = w.json()?;
    let command = Command::ApplyCredit {
        affiliate_id: affiliate,
        amount: input.amount,
        invoice_id: input.invoice_id,
    };
    let receipt = w.submit(&app, &caller, &program, None, command).await?;
    match first_event(&receipt)? {
        Event::CreditApplied(e) => Ok(created(
            json!({"seq": receipt.events[0].seq, "amount": e.amount.to_string(), "invoice_id": e.invoice_id}),
        )),
        _ => Err(ApiError::Internal(
            "ApplyCredit recorded another event".into(),
        )),
    }
}

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    reference: Option<String>,
    reason: Option<String>,
}

async fn settle(app: AppState, program: String, id: String, paid: bool, w: Write) -> ApiResult {
    let caller = require(&app, &w.headers, ADMIN)?;
    let program = program_id(&program)?;
    let withdrawal_id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::NotFound(format!("no withdrawal `{id}`")))?;
    let input: SettleBody = w.json()?;
    let command = if paid {
        Command::PayWithdrawal {
            withdrawal_id,
            reference: input.reference.unwrap_or_default(),
        }
    } else {
        Command::RejectWithdrawal {
            withdrawal_id,
            reason: input.reason.unwrap_or_default(),
        }
    };
    w.submit(&app, &caller, &program, None, command).await?;
    let status = if paid { "paid" } else { "rejected" };
    Ok(Json(json!({"withdrawal_id": withdrawal_id, "status": status})).into_response())
}

async fn withdrawal_paid(
    State(app): State<AppState>,
    Path((program, id)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    settle(app, program, id, true, w).await
}

async fn withdrawal_reject(
    State(app): State<AppState>,
    Path((program, id)): Path<(String, String)>,
    w: Write,
) -> ApiResult {
    settle(app, program, id, false, w).await
}

// ---------------------------------------------------------------------------
// OpenAPI.

/// `GET /openapi.json`.
async fn openapi_json() -> Response {
    Json(openapi()).into_response()
}

/// The OpenAPI 3.1 description of the API, generated from the same types
/// the handlers parse and answer with (their JSON Schemas come from
/// schemars); `schemas/openapi.json` is this, committed, and a test fails
/// when they drift.
pub fn openapi() -> Value {
    use crate::projections::{Balance, Referral, Statement, Stats};
    // OpenAPI 3.1 schemas are JSON Schema 2020-12, kept under components.
    let mut generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| {
            s.meta_schema = None;
            s.definitions_path = "/components/schemas".into();
        })
        .into_generator();
    let mut schema = |f: &mut dyn FnMut(&mut schemars::SchemaGenerator) -> schemars::Schema| {
        serde_json::to_value(f(&mut generator)).unwrap_or(Value::Null)
    };
    let rules = schema(&mut |g| g.subschema_for::<ProgramRules>());
    let enroll = schema(&mut |g| g.subschema_for::<EnrollBody>());
    let click = schema(&mut |g| g.subschema_for::<ClickBody>());
    let signup = schema(&mut |g| g.subschema_for::<SignupBody>());
    let line = schema(&mut |g| g.subschema_for::<LineBody>());
    let refund = schema(&mut |g| g.subschema_for::<RefundBody>());
    let amount = schema(&mut |g| g.subschema_for::<AmountBody>());
    let credit = schema(&mut |g| g.subschema_for::<CreditBody>());
    let token = schema(&mut |g| g.subschema_for::<TokenBody>());
    let settle = schema(&mut |g| g.subschema_for::<SettleBody>());
    let reassign = schema(&mut |g| g.subschema_for::<ReassignBody>());
    let batch = schema(&mut |g| g.subschema_for::<BatchBody>());
    let close_customer = schema(&mut |g| g.subschema_for::<CloseCustomerBody>());
    let group = schema(&mut |g| g.subschema_for::<GroupBody>());
    let balance = schema(&mut |g| g.subschema_for::<Balance>());
    let statement = schema(&mut |g| g.subschema_for::<Statement>());
    let stats = schema(&mut |g| g.subschema_for::<Stats>());
    let referral = schema(&mut |g| g.subschema_for::<Referral>());
    let replay_body = schema(&mut |g| g.subschema_for::<ReplayBody>());
    let replay = schema(&mut |g| g.subschema_for::<crate::ledger::Replay>());
    let apply = schema(&mut |g| g.subschema_for::<ApplyBody>());
    let ids = [
        schema(&mut |g| g.subschema_for::<ProgramId>()),
        schema(&mut |g| g.subschema_for::<AffiliateId>()),
        schema(&mut |g| g.subschema_for::<CustomerId>()),
        schema(&mut |g| g.subschema_for::<Month>()),
    ];
    let definitions = generator.take_definitions(true);

    let object = |properties: Value| json!({"type": "object", "properties": properties});
    let string = json!({"type": "string"});
    let seq = json!({"type": "object", "properties": {"seq": {"type": "integer"}, "duplicate": {"type": "boolean"}}});
    let problem = json!({"$ref": "#/components/schemas/Problem"});
    let as_of = json!({"name": "as_of", "in": "query", "required": false, "description": "a seq or an RFC 3339 time: the answer as it was then", "schema": {"type": "string"}});
    let param = |name: &str| {
        let [program, affiliate, customer, month] = &ids;
        let schema = match name {
            "program" => program.clone(),
            "affiliate" => affiliate.clone(),
            "customer" => customer.clone(),
            "month" => month.clone(),
            "id" => json!({"type": "string", "format": "uuid"}),
            _ => json!({"type": "string"}),
        };
        json!({"name": name, "in": "path", "required": true, "schema": schema})
    };
    let query = |name: &str, description: &str| json!({"name": name, "in": "query", "required": false, "description": description, "schema": {"type": "string"}});

    // (method, path, summary, roles, path params, query params, request body, (status, response))
    type Route = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        Vec<&'static str>,
        Vec<Value>,
        Option<Value>,
        (u16, Value),
    );
    let program_params = || vec!["program"];
    let affiliate_params = || vec!["program", "affiliate"];
    let routes: Vec<Route> = vec![
        (
            "put",
            "/v1/programs/{program}",
            "Define or change the program's rules",
            "admin",
            program_params(),
            vec![],
            Some(rules.clone()),
            (200, rules.clone()),
        ),
        (
            "get",
            "/v1/programs/{program}",
            "The program's current rules",
            "admin, portal",
            program_params(),
            vec![],
            None,
            (200, rules.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/affiliates",
            "Enroll an affiliate",
            "admin, portal",
            program_params(),
            vec![],
            Some(enroll),
            (
                201,
                object(
                    json!({"affiliate_id": string, "referral_code": string, "referral_link": string, "promo_code": string}),
                ),
            ),
        ),
        (
            "get",
            "/v1/programs/{program}/affiliates/{affiliate}",
            "An affiliate's profile, link and promo code",
            "admin, portal, token",
            affiliate_params(),
            vec![],
            None,
            (
                200,
                object(
                    json!({"affiliate_id": string, "referral_code": string, "referral_link": string, "promo_code": string, "group": string}),
                ),
            ),
        ),
        (
            "get",
            "/v1/programs/{program}/affiliates/{affiliate}/balance",
            "The balance",
            "admin, portal, token",
            affiliate_params(),
            vec![as_of.clone()],
            None,
            (200, balance),
        ),
        (
            "get",
            "/v1/programs/{program}/affiliates/{affiliate}/stats",
            "Clicks, unique visitors, signups, conversions, commission",
            "admin, portal, token",
            affiliate_params(),
            vec![
                query("from", "YYYY-MM-DD"),
                query("to", "YYYY-MM-DD"),
                query("by", "day | month | creative"),
                as_of.clone(),
            ],
            None,
            (200, stats),
        ),
        (
            "get",
            "/v1/programs/{program}/affiliates/{affiliate}/referrals",
            "The customers referred",
            "admin, portal, token",
            affiliate_params(),
            vec![
                query("status", "active | closed"),
                query("q", "part of a customer id"),
                query(
                    "sort",
                    "signup | -signup | commission | -commission | -billed",
                ),
                query("limit", "1 to 500"),
                query(
                    "cursor",
                    "next_cursor of the previous page, as it is (the same sort)",
                ),
                as_of.clone(),
            ],
            None,
            (
                200,
                object(
                    json!({"referrals": {"type": "array", "items": referral}, "total": {"type": "integer"}, "next_cursor": {"type": ["string", "null"]}, "as_of_seq": {"type": "integer"}}),
                ),
            ),
        ),
        (
            "get",
            "/v1/programs/{program}/affiliates/{affiliate}/statements/{month}",
            "A monthly statement: JSON, text/csv or text/html by Accept",
            "admin, portal, token",
            vec!["program", "affiliate", "month"],
            vec![as_of],
            None,
            (200, statement),
        ),
        (
            "post",
            "/v1/programs/{program}/affiliates/{affiliate}/withdrawals",
            "Request a withdrawal",
            "admin, portal, token",
            affiliate_params(),
            vec![],
            Some(amount),
            (
                201,
                object(json!({"withdrawal_id": string, "status": string, "amount": string})),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/affiliates/{affiliate}/credits",
            "Apply commission to an invoice",
            "admin, portal",
            affiliate_params(),
            vec![],
            Some(credit),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/affiliates/{affiliate}/tokens",
            "Mint a per-affiliate token",
            "admin, portal",
            affiliate_params(),
            vec![],
            Some(token),
            (201, object(json!({"token": string, "expires_at": string}))),
        ),
        (
            "post",
            "/v1/programs/{program}/withdrawals/{id}/paid",
            "Mark a withdrawal paid",
            "admin",
            vec!["program", "id"],
            vec![],
            Some(settle.clone()),
            (
                200,
                object(json!({"withdrawal_id": string, "status": string})),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/withdrawals/{id}/reject",
            "Reject a withdrawal: the money returns",
            "admin",
            vec!["program", "id"],
            vec![],
            Some(settle),
            (
                200,
                object(json!({"withdrawal_id": string, "status": string})),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/clicks",
            "A click recorded by another tracker",
            "admin, ingest",
            program_params(),
            vec![],
            Some(click),
            (201, object(json!({"click_id": string, "visitor": string}))),
        ),
        (
            "post",
            "/v1/programs/{program}/signups",
            "A signup, with cookie and/or promo code (200 attributed:false when nothing matches)",
            "admin, ingest",
            program_params(),
            vec![],
            Some(signup),
            (
                201,
                object(
                    json!({"attributed": {"type": "boolean"}, "affiliate_id": string, "via": {
                        "type": "string", "enum": ["click", "promo_code"],
                        "description": "How a signup brought the customer; absent when an operator placed or moved them"
                    }}),
                ),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/expenses",
            "An expense (charge): a basis line, idempotent by its id",
            "admin, ingest",
            program_params(),
            vec![],
            Some(line.clone()),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/payments",
            "A payment: a basis line, idempotent by its id",
            "admin, ingest",
            program_params(),
            vec![],
            Some(line),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/refunds",
            "A refund of a basis line",
            "admin, ingest",
            program_params(),
            vec![],
            Some(refund),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/batch",
            "Up to 10,000 clicks, signups, basis lines and refunds (each item with a `type`); one result per item",
            "admin, ingest",
            program_params(),
            vec![],
            Some(batch),
            (
                200,
                object(json!({"results": {"type": "array", "items": {"type": "object"}}})),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/customers/{customer}/close",
            "The customer's account was closed",
            "admin, ingest",
            vec!["program", "customer"],
            vec![],
            Some(close_customer),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/customers/{customer}/group",
            "The customer's group changed",
            "admin, ingest",
            vec!["program", "customer"],
            vec![],
            Some(group),
            (201, seq.clone()),
        ),
        (
            "post",
            "/v1/programs/{program}/customers/{customer}/reassign",
            "Move a referral to another affiliate",
            "admin",
            vec!["program", "customer"],
            vec![],
            Some(reassign),
            (
                201,
                object(
                    json!({"seq": {"type": "integer"}, "adjustments": {"type": "array", "items": {"type": "object"}}}),
                ),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/replays",
            "What-if replay: history under overrides, without writing; returns its id and money diff",
            "admin",
            program_params(),
            vec![],
            Some(replay_body),
            (201, replay.clone()),
        ),
        (
            "get",
            "/v1/programs/{program}/replays/{id}",
            "A replay and its diff (JSON, text/csv or text/html by Accept)",
            "admin",
            vec!["program", "id"],
            vec![],
            None,
            (200, replay),
        ),
        (
            "post",
            "/v1/programs/{program}/replays/{id}/apply",
            "Append the replay's diff as adjustments in the open month (409 when the log moved under it)",
            "admin",
            vec!["program", "id"],
            vec![],
            Some(apply),
            (
                201,
                object(
                    json!({"replay_id": string, "applied_seq": {"type": "integer"}, "adjustments": {"type": "array", "items": {"type": "object"}}, "already_applied": {"type": "boolean"}}),
                ),
            ),
        ),
        (
            "post",
            "/v1/programs/{program}/months/{month}/close",
            "Close a month; again = no-op",
            "admin",
            vec!["program", "month"],
            vec![],
            None,
            (
                200,
                object(
                    json!({"month": string, "rewards": {"type": "integer"}, "total": string, "already_closed": {"type": "boolean"}}),
                ),
            ),
        ),
        (
            "get",
            "/v1/events",
            "The log for auditors (JSON, or NDJSON by Accept)",
            "admin",
            vec![],
            vec![
                query("after", "a seq"),
                query("limit", "1 to 1000"),
                query("program", "a program id"),
                query("type", "an event type"),
                query(
                    "cause",
                    "`replay:{id}` or `reassignment:{seq}`: the events one correction caused",
                ),
            ],
            None,
            (
                200,
                object(
                    json!({"events": {"type": "array", "items": {"type": "object"}}, "next_after": {"type": ["integer", "null"]}, "head_seq": {"type": "integer"}}),
                ),
            ),
        ),
        (
            "get",
            "/v1/events/stream",
            "Server-sent events: a live tail, resumable with Last-Event-ID",
            "admin",
            vec![],
            vec![
                query("after", "a seq"),
                query("program", "a program id"),
                query("type", "an event type"),
            ],
            None,
            (200, string.clone()),
        ),
        (
            "get",
            "/v1/verify",
            "Check the chain, the postings and the projections (500 when broken)",
            "admin",
            vec![],
            vec![],
            None,
            (
                200,
                object(
                    json!({"ok": {"type": "boolean"}, "events": {"type": "integer"}, "head_seq": {"type": "integer"}, "head_hash": string, "projections": {"type": "string", "enum": ["equal", "differ", "not_compared"]}}),
                ),
            ),
        ),
        (
            "get",
            "/r/{code}",
            "Follow a referral link: click, visitor cookie, 302 to the site (or a `to` path on it)",
            "public",
            vec!["code"],
            vec![query("to", "a path on the site")],
            None,
            (302, string.clone()),
        ),
        (
            "get",
            "/px.gif",
            "The tracking pixel: records a click when `p` carries ref=CODE",
            "public",
            vec![],
            vec![
                query("r", "the page's referrer"),
                query("p", "the page URL"),
            ],
            None,
            (200, string.clone()),
        ),
        (
            "get",
            "/healthz",
            "Alive",
            "public",
            vec![],
            vec![],
            None,
            (200, string.clone()),
        ),
        (
            "get",
            "/readyz",
            "Ready: recovery and projections loaded",
            "public",
            vec![],
            vec![],
            None,
            (
                200,
                object(json!({"ready": {"type": "boolean"}, "head_seq": {"type": "integer"}})),
            ),
        ),
        (
            "get",
            "/metrics",
            "Prometheus metrics",
            "public",
            vec![],
            vec![],
            None,
            (200, string),
        ),
    ];
    let mut paths = serde_json::Map::new();
    for (method, path, summary, roles, path_params, query_params, request, (status, response)) in
        routes
    {
        let mut parameters: Vec<Value> = path_params.into_iter().map(param).collect();
        parameters.extend(query_params);
        let text = json!({"schema": {"type": "string"}});
        let content = match path {
            "/healthz" => json!({"text/plain": text}),
            "/metrics" => json!({"text/plain; version=0.0.4": text}),
            "/px.gif" => {
                json!({"image/gif": {"schema": {"type": "string", "contentMediaType": "image/gif"}}})
            }
            "/v1/events/stream" => json!({"text/event-stream": text}),
            "/v1/events" => {
                json!({"application/json": {"schema": response}, "application/x-ndjson": text})
            }
            "/v1/programs/{program}/affiliates/{affiliate}/statements/{month}"
            | "/v1/programs/{program}/replays/{id}" => json!({
                "application/json": {"schema": response},
                "text/csv": text,
                "text/html": text,
            }),
            _ => json!({"application/json": {"schema": response}}),
        };
        let answer = if status == 302 {
            json!({"description": "Found", "headers": {"Location": {"schema": {"type": "string"}}}})
        } else {
            json!({"description": "OK", "content": content.clone()})
        };
        let mut operation = json!({
            "summary": summary,
            "description": format!("Roles: {roles}."),
            "parameters": parameters,
            "responses": {
                status.to_string(): answer,
                "default": {"description": "A problem (RFC 9457)", "content": {"application/problem+json": {"schema": problem}}},
            },
        });
        if path == "/px.gif" {
            operation["responses"]["429"] = json!({"description": "Rate limited: the image still, nothing recorded", "content": content.clone()});
        }
        // Acknowledged without recording: a duplicate line, a signup that
        // matches nothing or was attributed before, a replay applied before.
        if matches!(
            path,
            "/v1/programs/{program}/signups"
                | "/v1/programs/{program}/expenses"
                | "/v1/programs/{program}/payments"
                | "/v1/programs/{program}/refunds"
                | "/v1/programs/{program}/replays/{id}/apply"
        ) {
            operation["responses"]["200"] =
                json!({"description": "Acknowledged, nothing new recorded", "content": content});
        }
        if let Some(request) = request {
            operation["requestBody"] =
                json!({"required": true, "content": {"application/json": {"schema": request}}});
        }
        if (method == "post" || method == "put")
            && let Some(parameters) = operation["parameters"].as_array_mut()
        {
            parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": false, "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LEN, "pattern": "^[\\t -~]+$"}}));
        }
        if roles != "public" {
            operation["security"] = json!([{"bearer": []}]);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[method] = operation;
    }
    let mut schemas = serde_json::Map::new();
    for (name, schema) in definitions {
        schemas.insert(name, schema);
    }
    schemas.insert(
        "Problem".into(),
        json!({"type": "object", "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"}, "detail": {"type": "string"}}, "required": ["type", "title", "status", "detail"]}),
    );
    json!({
        "openapi": "3.1.0",
        "info": {"title": "commission-ledger", "version": env!("CARGO_PKG_VERSION"), "description": "An event-sourced, hash-chained commission ledger. Money is sent as strings; errors are application/problem+json."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "an API key (cl_…) or a per-affiliate token (clt.…)"}},
        },
    })
}
