//! `http-load`: the API under load, on loopback only, bounded in count and
//! time. Starts its own server on 127.0.0.1:0 over a temporary data
//! directory, then measures, one phase at a time on the same server:
//! `GET /healthz` (the HTTP ceiling), `GET /r/{code}`, `GET .../balance`,
//! durable `POST .../expenses`, and `POST .../batch` with 10,000 items.
//!
//! `http-load [SECONDS_PER_PHASE] [CONNECTIONS] [PHASES]` (defaults 5, 64,
//! and every phase; PHASES is a comma list of healthz,r,balance,expenses,batch).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use commission_ledger::api::{self, ApiConfig};
use commission_ledger::events::Role;
use commission_ledger::ledger::{Ledger, LedgerConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn fail(message: &str) -> ! {
    eprintln!("http-load: {message}");
    std::process::exit(2)
}

/// One keep-alive HTTP/1.1 connection: just enough client for this tool.
struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    async fn open(addr: &str) -> Connection {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| fail(&e.to_string()));
        stream.set_nodelay(true).ok();
        Connection {
            stream: BufReader::new(stream),
            host: addr.to_string(),
        }
    }

    /// Sends a request and reads the whole response; returns the status.
    async fn request(
        &mut self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&[u8]>,
    ) -> u16 {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if let Some(key) = key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        // One write per request, as a browser or an HTTP library sends it:
        // head and body in separate writes cost the server a second wakeup.
        let mut request = head.into_bytes();
        request.extend_from_slice(body.unwrap_or_default());
        self.stream
            .get_mut()
            .write_all(&request)
            .await
            .unwrap_or_else(|e| fail(&e.to_string()));
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .await
            .unwrap_or_else(|e| fail(&e.to_string()));
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream
                .read_line(&mut line)
                .await
                .unwrap_or_else(|e| fail(&e.to_string()));
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        self.stream
            .read_exact(&mut body)
            .await
            .unwrap_or_else(|e| fail(&e.to_string()));
        status
    }
}

/// CPU time this process has used (user + system, server and client
/// together), in seconds, from `/proc/self/stat`; 0 where there is none.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here; the
    // kernel counts them in USER_HZ, 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

struct Phase {
    requests: u64,
    seconds: f64,
    /// CPU seconds the whole process used during the phase.
    cpu: f64,
    latencies_us: Vec<u64>,
    errors: u64,
}

impl Phase {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[index] as f64 / 1000.0
    }
    /// CPU microseconds per request, server and client together.
    fn cpu_us(&self) -> f64 {
        self.cpu * 1e6 / self.requests.max(1) as f64
    }
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// Runs `connections` clients for `duration`, each sending what `request`
/// builds for its n-th call.
async fn phase<F>(addr: &str, connections: usize, duration: Duration, request: F) -> Phase
where
    F: Fn(usize, u64) -> (String, String, Option<String>, Option<Vec<u8>>) + Send + Sync + 'static,
{
    let request = Arc::new(request);
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let cpu_before = cpu_seconds();
    let mut tasks = Vec::new();
    for who in 0..connections {
        let request = request.clone();
        let errors = errors.clone();
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&addr).await;
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while start.elapsed() < duration {
                let (method, path, key, body) = request(who, n);
                let sent = Instant::now();
                let status = connection
                    .request(&method, &path, key.as_deref(), body.as_deref())
                    .await;
                latencies.push(sent.elapsed().as_micros() as u64);
                if status >= 400 {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            latencies
        }));
    }
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await.unwrap_or_default());
    }
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    latencies_us.sort_unstable();
    Phase {
        requests: latencies_us.len() as u64,
        seconds,
        cpu,
        latencies_us,
        errors: errors.load(Ordering::Relaxed),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .min(120);
    let connections: usize = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
        .min(1024);
    let duration = Duration::from_secs(seconds);
    let phases: Vec<String> = args
        .get(3)
        .map(|p| p.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| {
            ["healthz", "r", "balance", "expenses", "batch"]
                .map(String::from)
                .to_vec()
        });
    let run = move |name: &str| phases.iter().any(|p| p == name);
    let dir = std::env::temp_dir().join(format!("http-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ledger =
        Arc::new(Ledger::open(LedgerConfig::new(&dir)).unwrap_or_else(|e| fail(&e.to_string())));
    let admin = ledger
        .create_key(Role::Admin, "load")
        .unwrap_or_else(|e| fail(&e.to_string()))
        .1;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| fail(&e.to_string()));
        let addr = listener.local_addr().unwrap_or_else(|e| fail(&e.to_string())).to_string();
        let config = ApiConfig { public_per_minute: u32::MAX, public_burst: u32::MAX, ..ApiConfig::default() };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let stats_ledger = ledger.clone();
        let server = tokio::spawn(api::serve(listener, ledger, config, async {
            let _ = stopped.await;
        }));
        let mut c = Connection::open(&addr).await;
        let rules = br#"{"id":"load","name":"Load","currency":"USD","timezone":"UTC","site_url":"https://provider.example/","default_rate":"20","payout_threshold":"50.00"}"#;
        assert_eq!(c.request("PUT", "/v1/programs/load", Some(&admin), Some(rules)).await, 200);
        c.request("POST", "/v1/programs/load/affiliates", Some(&admin), Some(br#"{"affiliate_id":"alice"}"#)).await;
        // the referral code, read back from the audit log
        let code = {
            let mut s = TcpStream::connect(&addr).await.unwrap_or_else(|e| fail(&e.to_string()));
            let req = format!("GET /v1/events?type=AffiliateEnrolled HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {admin}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok();
            let mut text = String::new();
            s.read_to_string(&mut text).await.ok();
            let at = text.find("\"referral_code\":\"").map(|i| i + 17).unwrap_or_else(|| fail("no referral code"));
            text[at..at + 10].to_string()
        };
        println!("# {connections} connections, {seconds} s per phase, loopback; fsync-bound writes");
        let report = |name: &str, p: &Phase| {
            println!("{name:<34} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  cpu {:>4.0} us/req  errors {}", p.rate(), p.percentile(0.5), p.percentile(0.99), p.cpu_us(), p.errors);
        };
        let short = Duration::from_millis(300);
        let healthz = phase(&addr, connections, if run("healthz") { duration } else { short }, |_, _| ("GET".into(), "/healthz".into(), None, None)).await;
        report("GET /healthz (ceiling)", &healthz);
        let r = phase(&addr, connections, if run("r") { duration } else { short }, move |_, _| ("GET".into(), format!("/r/{code}"), None, None)).await;
        report("GET /r/{code} (durable click)", &r);
        let key = admin.clone();
        let balance = phase(&addr, connections, if run("balance") { duration } else { short }, move |_, _| ("GET".into(), "/v1/programs/load/affiliates/alice/balance".into(), Some(key.clone()), None)).await;
        report("GET .../balance", &balance);
        println!("balance / healthz ratio: {:.2}", balance.rate() / healthz.rate());
        let key = admin.clone();
        let expenses = phase(&addr, connections, if run("expenses") { duration } else { short }, move |who, n| {
            let body = format!(r#"{{"id":"e-{who}-{n}","customer_id":"c-{who}","amount":"12.34","currency":"USD"}}"#);
            ("POST".into(), "/v1/programs/load/expenses".into(), Some(key.clone()), Some(body.into_bytes()))
        })
        .await;
        report("POST .../expenses (durable)", &expenses);
        let s = stats_ledger.writer_stats();
        let batches = s.batches.load(Ordering::Relaxed).max(1);
        println!(
            "  writer so far: {batches} group commits, {:.1} commands each, write+fdatasync {} us each; tries of the other grouping {}, in halves now: {}",
            s.commands.load(Ordering::Relaxed) as f64 / batches as f64,
            s.sync_us.load(Ordering::Relaxed) / batches,
            s.group_commit_tries.load(Ordering::Relaxed),
            s.group_commit_halves.load(Ordering::Relaxed)
        );
        let key = admin.clone();
        let batches = phase(&addr, 4, if run("batch") { duration } else { short }, move |who, n| {
            let mut body = String::from(r#"{"items":["#);
            for i in 0..10_000 {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!(r#"{{"type":"expense","id":"b-{who}-{n}-{i}","customer_id":"c-{i}","amount":"1.00","currency":"USD"}}"#));
            }
            body.push_str("]}");
            ("POST".into(), "/v1/programs/load/batch".into(), Some(key.clone()), Some(body.into_bytes()))
        })
        .await;
        println!(
            "{:<34} {:>9.0} events/s ({} batches of 10,000, p50 {:.0} ms, cpu {:.1} us/event)",
            "POST .../batch, 4 connections",
            batches.requests as f64 * 10_000.0 / batches.seconds,
            batches.requests,
            batches.percentile(0.5),
            batches.cpu_us() / 10_000.0
        );
        let s = stats_ledger.writer_stats();
        println!(
            "  checkpoints so far: {} ({} ms in all, the last {} MB)",
            s.checkpoints.load(Ordering::Relaxed),
            s.checkpoint_us.load(Ordering::Relaxed) / 1000,
            s.checkpoint_bytes.load(Ordering::Relaxed) >> 20
        );
        drop(c);
        let _ = stop.send(());
        let _ = server.await;
    });
    // The runtime's last tasks may still hold the ledger: stop them, so the
    // ledger writes its final checkpoint before the directory goes.
    drop(runtime);
    let _ = std::fs::remove_dir_all(&dir);
}
