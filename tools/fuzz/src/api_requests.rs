//! Requests built from arbitrary bytes, answered by the whole router (every
//! layer the server runs) in process, over one ledger that lives as long
//! as the fuzzer (or the test run): a program `p` with affiliates `alice` and `bob`,
//! and a key of every role. No request may panic or be answered 500,
//! every refusal is `application/problem+json`, and a refusal (4xx)
//! appends nothing.
//!
//! The input: a method, a route, a caller and flags (four bytes), then the
//! route's path segments, the query and the body, separated by 0xFF bytes.
//! Segments and the query are percent-encoded (`=` and `&` kept), so the
//! router sees any text in them. The event stream, which never ends, is
//! left out.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, header};
use commission_ledger::api::{self, ApiConfig};
use commission_ledger::events::{Role, Timestamp};
use commission_ledger::ledger::{Ledger, LedgerConfig};
use tower::ServiceExt;

pub const ROUTES: [&str; 34] = [
    "/r/{}",
    "/px.gif",
    "/healthz",
    "/readyz",
    "/v1/verify",
    "/v1/events",
    "/v1/programs/{}",
    "/v1/programs/p/affiliates",
    "/v1/programs/p/affiliates/{}",
    "/v1/programs/p/affiliates/{}/balance",
    "/v1/programs/p/affiliates/{}/statements/{}",
    "/v1/programs/p/affiliates/{}/stats",
    "/v1/programs/p/affiliates/{}/referrals",
    "/v1/programs/p/affiliates/{}/withdrawals",
    "/v1/programs/p/affiliates/{}/credits",
    "/v1/programs/p/affiliates/{}/tokens",
    "/v1/programs/p/withdrawals/{}/paid",
    "/v1/programs/p/withdrawals/{}/reject",
    "/v1/programs/p/clicks",
    "/v1/programs/p/signups",
    "/v1/programs/p/expenses",
    "/v1/programs/p/payments",
    "/v1/programs/p/refunds",
    "/v1/programs/p/batch",
    "/v1/programs/p/months/{}/close",
    "/v1/programs/p/customers/{}/close",
    "/v1/programs/p/customers/{}/group",
    "/v1/programs/p/customers/{}/reassign",
    "/v1/programs/p/replays",
    "/v1/programs/p/replays/{}",
    "/v1/programs/p/replays/{}/apply",
    "/metrics",
    "/openapi.json",
    "/{}",
];
const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];

/// The router and its ledger, shared by every input.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    router: Router,
    ledger: Arc<Ledger>,
    /// Admin, ingest and portal keys, an affiliate token, and a key that is none.
    callers: Vec<Option<String>>,
}

impl Server {
    /// A ledger in `dir` (which it must be alone in), with the program, the
    /// affiliates and the keys every input meets.
    pub fn start(dir: &std::path::Path) -> Server {
        let mut config = LedgerConfig::new(dir);
        let now = Timestamp::parse("2026-08-15T12:00:00Z").expect("RFC 3339");
        config.clock = Arc::new(move || now);
        let ledger = Arc::new(Ledger::open(config).expect("a ledger opens"));
        let key = |role| ledger.create_key(role, "fuzz").expect("a key").1;
        let (admin, ingest, portal) = (key(Role::Admin), key(Role::Ingest), key(Role::Portal));
        let api_config = ApiConfig {
            auto_close_every: None,
            public_per_minute: 1 << 30,
            public_burst: 1 << 30,
            ..ApiConfig::default()
        };
        let router = api::router(ledger.clone(), api_config);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let send = |method: &str, path: &str, key: &str, body: serde_json::Value| {
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(header::AUTHORIZATION, format!("Bearer {key}"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .expect("a request");
            runtime.block_on(async {
                let response = router.clone().oneshot(request).await.expect("infallible");
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
                    .await
                    .unwrap_or_default();
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default()
            })
        };
        let rules = serde_json::json!({
            "id": "p", "name": "Fuzz", "currency": "USD", "timezone": "Europe/Amsterdam",
            "site_url": "https://provider.example/", "default_rate": "20",
            "payout_threshold": "10.00", "bounty": "5.00", "promo_code_template": "P-@ID@",
            "tiers": [{"min_active_referrals": 2, "rate": "25"}],
        });
        send("PUT", "/v1/programs/p", &admin, rules);
        for affiliate in ["alice", "bob"] {
            send(
                "POST",
                "/v1/programs/p/affiliates",
                &portal,
                serde_json::json!({"affiliate_id": affiliate}),
            );
        }
        let minted = send(
            "POST",
            "/v1/programs/p/affiliates/alice/tokens",
            &portal,
            serde_json::json!({}),
        );
        let token = minted["token"].as_str().map(str::to_string);
        Server {
            runtime,
            router,
            ledger,
            callers: vec![
                Some(admin),
                Some(ingest),
                Some(portal),
                token,
                None,
                Some("cl_nobody".into()),
            ],
        }
    }
}

fn encode(bytes: &[u8], keep: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn run(server: &Server, data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let method = METHODS[usize::from(data[0]) % METHODS.len()];
    let route = ROUTES[usize::from(data[1]) % ROUTES.len()];
    let caller = &server.callers[usize::from(data[2]) % server.callers.len()];
    let flags = data[3];
    let mut parts = data[4..].split(|b| *b == 0xFF);
    let mut path = String::new();
    let mut pieces = route.split("{}").peekable();
    while let Some(piece) = pieces.next() {
        path.push_str(piece);
        if pieces.peek().is_some() {
            path.push_str(&encode(parts.next().unwrap_or_default(), b""));
        }
    }
    let query = parts.next().unwrap_or_default();
    if !query.is_empty() {
        path.push('?');
        path.push_str(&encode(query, b"=&"));
    }
    let body = parts.next().unwrap_or_default().to_vec();
    let mut request = Request::builder().method(method).uri(&path);
    if let Some(key) = caller {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    if flags & 1 == 1 {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    if flags & 2 == 2 {
        request = request.header("idempotency-key", format!("k{}", flags >> 4));
    }
    if flags & 4 == 4 {
        request = request.header(header::ACCEPT, "text/html");
    }
    if flags & 8 == 8 {
        request = request.header(header::ACCEPT, "text/csv");
    }
    let Ok(mut request) = request.body(Body::from(body)) else {
        return;
    };
    // What the server's listener gives every request: the peer's address.
    let peer = std::net::SocketAddr::from(([127, 0, 0, 1], 40000 + u16::from(flags >> 4)));
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    let head = server.ledger.state().head.seq;
    server.runtime.block_on(async {
        let response = server
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let problem = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/problem+json"));
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 26).await;
        assert!(bytes.is_ok(), "{method} {path}: the body could not be read");
        assert!(status.as_u16() != 500, "{method} {path}: 500 {:?}", bytes);
        assert!(
            !status.is_client_error() && !status.is_server_error() || problem,
            "{method} {path}: {status} without problem+json: {:?}",
            bytes
        );
        if status.is_client_error() {
            let now = server.ledger.state().head.seq;
            assert_eq!(now, head, "{method} {path}: {status} appended: {:?}", bytes);
        }
    });
}
