//! The HTTP API on a real server bound to 127.0.0.1:0, through `TestApp`
//! (one helper per endpoint), with a clock the test drives.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use commission_ledger::api::{self, ApiConfig};
use commission_ledger::events::{Role, Timestamp};
use commission_ledger::ledger::{Ledger, LedgerConfig};
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

use crate::support::ts;

/// A client that, like a test looking at a link, stops at its redirect.
fn visitor() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

pub struct TestApp {
    pub base: String,
    pub admin: String,
    pub ingest: String,
    pub portal: String,
    pub clock: Arc<AtomicI64>,
    client: Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestApp {
    pub fn start() -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut app = TestApp::start_in(dir.path(), None);
        app._dir = Some(dir);
        app
    }

    /// A server on `data`; with `admin`, reuses that key instead of issuing keys.
    /// Months are closed by hand only: a test moves the clock at will.
    pub fn start_in(data: &std::path::Path, admin: Option<String>) -> TestApp {
        TestApp::start_with(data, admin, |_| {})
    }

    /// A server that makes the closes `auto_close_day` owes every `every`.
    pub fn start_auto_closing(every: std::time::Duration) -> TestApp {
        TestApp::start_configured(move |config| config.auto_close_every = Some(every))
    }

    /// A server on a new directory, its API configured by `configure`.
    pub fn start_configured(configure: impl FnOnce(&mut ApiConfig) + Send + 'static) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut app = TestApp::start_with(dir.path(), None, configure);
        app._dir = Some(dir);
        app
    }

    fn start_with(
        data: &std::path::Path,
        admin: Option<String>,
        configure: impl FnOnce(&mut ApiConfig) + Send + 'static,
    ) -> TestApp {
        let clock = Arc::new(AtomicI64::new(ts("2026-08-01T00:00:00Z").micros()));
        let mut config = LedgerConfig::new(data);
        config.preallocate_bytes = 64 << 10;
        let read = clock.clone();
        config.clock = Arc::new(move || Timestamp::from_micros(read.load(Ordering::SeqCst)));
        let ledger = Arc::new(Ledger::open(config).unwrap());
        let key = |role| ledger.create_key(role, "test").unwrap().1;
        let (admin, ingest, portal) = match admin {
            Some(admin) => (admin.clone(), admin.clone(), admin),
            None => (key(Role::Admin), key(Role::Ingest), key(Role::Portal)),
        };
        let (bound, address) = std::sync::mpsc::channel();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let base = format!("http://{}", listener.local_addr().unwrap());
                bound.send(base.clone()).unwrap();
                let mut config = ApiConfig {
                    base_url: "https://aff.example".into(),
                    auto_close_every: None,
                    ..ApiConfig::default()
                };
                configure(&mut config);
                api::serve(listener, ledger, config, async {
                    let _ = stop.await;
                })
                .await
                .unwrap();
            });
        });
        let base = address.recv().unwrap();
        TestApp {
            base,
            admin,
            ingest,
            portal,
            clock,
            client: Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap(),
            shutdown: Some(shutdown),
            server: Some(server),
            _dir: None,
        }
    }

    pub fn set_now(&self, at: &str) {
        self.clock.fetch_max(ts(at).micros(), Ordering::SeqCst);
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, key: Option<&str>, path: &str) -> Response {
        let mut request = self.client.get(self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().unwrap()
    }

    pub fn send(
        &self,
        method: &str,
        key: Option<&str>,
        path: &str,
        body: &Value,
        idempotency: Option<&str>,
    ) -> Response {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, self.url(path)).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(idem) = idempotency {
            request = request.header("Idempotency-Key", idem);
        }
        request.send().unwrap()
    }

    pub fn post(&self, key: &str, path: &str, body: Value) -> (u16, Value) {
        // Time passes: the clock reaches the moment the billing system reports.
        if let Some(at) = body
            .get("at")
            .and_then(Value::as_str)
            .and_then(|t| Timestamp::parse(t).ok())
        {
            self.clock.fetch_max(at.micros(), Ordering::SeqCst);
        }
        let response = self.send("POST", Some(key), path, &body, None);
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// The log's head seq, as `/readyz` reports it.
    pub fn head(&self) -> u64 {
        self.get(None, "/readyz").json::<Value>().unwrap()["head_seq"]
            .as_u64()
            .unwrap()
    }

    // One helper per endpoint.

    pub fn put_program(&self, program: &str, rules: Value) -> (u16, Value) {
        let response = self.send(
            "PUT",
            Some(&self.admin),
            &format!("/v1/programs/{program}"),
            &rules,
            None,
        );
        (
            response.status().as_u16(),
            response.json().unwrap_or(Value::Null),
        )
    }

    pub fn enroll(&self, program: &str, body: Value) -> (u16, Value) {
        self.post(
            &self.portal,
            &format!("/v1/programs/{program}/affiliates"),
            body,
        )
    }

    pub fn click(&self, program: &str, body: Value) -> (u16, Value) {
        self.post(
            &self.ingest,
            &format!("/v1/programs/{program}/clicks"),
            body,
        )
    }

    pub fn signup(&self, program: &str, body: Value) -> (u16, Value) {
        self.post(
            &self.ingest,
            &format!("/v1/programs/{program}/signups"),
            body,
        )
    }

    /// `cust-1` clicks `code` as visitor `v-1` at `clicked`, and signs up at
    /// `signed_up`: the answer to the signup.
    pub fn cust_1_follows(
        &self,
        program: &str,
        code: &str,
        clicked: &str,
        signed_up: &str,
    ) -> (u16, Value) {
        self.click(
            program,
            json!({"referral_code": code, "visitor": "v-1", "at": clicked}),
        );
        self.signup(
            program,
            json!({"customer_id": "cust-1", "visitor": "v-1", "at": signed_up}),
        )
    }

    pub fn expense(&self, program: &str, body: Value) -> (u16, Value) {
        self.post(
            &self.ingest,
            &format!("/v1/programs/{program}/expenses"),
            body,
        )
    }

    pub fn refund(&self, program: &str, body: Value) -> (u16, Value) {
        self.post(
            &self.ingest,
            &format!("/v1/programs/{program}/refunds"),
            body,
        )
    }

    pub fn close(&self, program: &str, month: &str) -> (u16, Value) {
        self.post(
            &self.admin,
            &format!("/v1/programs/{program}/months/{month}/close"),
            json!({}),
        )
    }

    pub fn withdraw(&self, program: &str, affiliate: &str, amount: &str) -> (u16, Value) {
        self.post(
            &self.portal,
            &format!("/v1/programs/{program}/affiliates/{affiliate}/withdrawals"),
            json!({"amount": amount}),
        )
    }

    pub fn balance(&self, program: &str, affiliate: &str) -> Value {
        let response = self.get(
            Some(&self.portal),
            &format!("/v1/programs/{program}/affiliates/{affiliate}/balance"),
        );
        assert_eq!(response.status().as_u16(), 200);
        response.json().unwrap()
    }

    pub fn statement(&self, program: &str, affiliate: &str, month: &str) -> Value {
        let response = self.get(
            Some(&self.portal),
            &format!("/v1/programs/{program}/affiliates/{affiliate}/statements/{month}"),
        );
        assert_eq!(response.status().as_u16(), 200);
        response.json().unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

fn hosting_rules() -> Value {
    json!({
        "id": "hosting", "name": "Hosting partners", "currency": "USD",
        "timezone": "Europe/Amsterdam", "site_url": "https://provider.example/signup",
        "cookie_days": 30, "attribution": "last_click", "basis": "expenses",
        "default_rate": "20", "product_rates": {"domains": "5"},
        "payout_threshold": "50.00", "promo_code_template": "HOST-@ID@",
        "eligible_groups": [], "forbidden_groups": ["staff"], "auto_close_day": 1
    })
}

/// BILLmanager rewards on the 1st for the month before: a program with
/// `auto_close_day` is closed by the server itself, once, in its zone.
#[test]
fn the_server_closes_a_month_by_itself_on_the_auto_close_day() {
    let app = TestApp::start_auto_closing(std::time::Duration::from_millis(20));
    assert_eq!(app.put_program("hosting", hosting_rules()).0, 200);
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap();
    app.cust_1_follows(
        "hosting",
        code,
        "2026-08-03T10:00:00Z",
        "2026-08-04T09:00:00Z",
    );
    let line = json!({"id": "inv-1", "customer_id": "cust-1", "amount": "100.00", "currency": "USD", "at": "2026-08-10T12:00:00Z"});
    assert_eq!(app.expense("hosting", line).0, 201);
    // 23:30 on 31 August in Amsterdam: August has not ended there
    app.set_now("2026-08-31T21:30:00Z");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let balance = app.balance("hosting", "alice");
    assert_eq!(
        (balance["pending"].as_str(), balance["earned"].as_str()),
        (Some("20.00"), Some("0.00"))
    );
    // 00:30 on 1 September there: the server closes August by itself
    app.set_now("2026-08-31T22:30:00Z");
    let waited = std::time::Instant::now();
    while app.balance("hosting", "alice")["earned"] != "20.00" {
        assert!(
            waited.elapsed().as_secs() < 20,
            "August was not closed by itself"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let closes: Value = app
        .get(Some(&app.admin), "/v1/events?type=MonthClosed")
        .json()
        .unwrap();
    let closes = closes["events"].as_array().unwrap();
    assert_eq!(closes.len(), 1, "closed once: {closes:?}");
    assert_eq!(closes[0]["actor"], "auto-close");
    assert_eq!(closes[0]["data"]["month"], "2026-08");
    assert_eq!(closes[0]["data"]["total"], "20.00");
    // The auto-closer counts its close once it has the answer, a moment
    // after readers see the close.
    let metrics = loop {
        let metrics = app.get(Some(&app.admin), "/metrics").text().unwrap();
        if metrics
            .lines()
            .any(|l| l == "commission_ledger_auto_closes_total 1")
            || waited.elapsed().as_secs() >= 20
        {
            break metrics;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    for line in [
        "commission_ledger_auto_closes_total 1",
        "commission_ledger_auto_close_refusals_total 0",
        "commission_ledger_auto_close_owed 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in {metrics}"
        );
    }
    // by hand again: already closed, nothing appended
    let head = app.head();
    let (status, again) = app.close("hosting", "2026-08");
    assert_eq!(
        (status, again["already_closed"].as_bool()),
        (200, Some(true))
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(app.head(), head, "a second close appended events");
}

/// The BILLmanager story of the core, end to end over HTTP.
#[test]
fn a_month_of_commission_over_http() {
    let app = TestApp::start();
    let (status, rules) = app.put_program("hosting", hosting_rules());
    assert_eq!((status, rules["currency"].as_str()), (200, Some("USD")));
    let (status, alice) = app.enroll(
        "hosting",
        json!({"affiliate_id": "alice", "customer_id": "c-alice"}),
    );
    assert_eq!(status, 201);
    assert_eq!(alice["promo_code"], "HOST-alice");
    let code = alice["referral_code"].as_str().unwrap().to_string();
    assert_eq!(
        alice["referral_link"],
        format!("https://aff.example/r/{code}")
    );
    app.enroll("hosting", json!({"affiliate_id": "bob"}));

    let (status, click) = app.click("hosting", json!({"referral_code": code, "visitor": "v-1", "creative": "banner-1", "referrer": "https://blog.example/post?x=1", "at": "2026-08-03T10:00:00Z"}));
    assert_eq!((status, click["visitor"].as_str()), (201, Some("v-1")));
    let (status, signup) = app.signup(
        "hosting",
        json!({"customer_id": "cust-1", "visitor": "v-1", "at": "2026-08-04T09:00:00Z"}),
    );
    assert_eq!(
        (status, signup),
        (
            201,
            json!({"attributed": true, "affiliate_id": "alice", "via": "click"})
        )
    );
    let (status, signup) = app.signup(
        "hosting",
        json!({"customer_id": "cust-2", "promo_code": "HOST-bob", "at": "2026-08-05T09:00:00Z"}),
    );
    assert_eq!((status, signup["via"].as_str()), (201, Some("promo_code")));
    // the H-Sphere fan-out: nothing matches, acknowledged and ignored
    let head = app.head();
    let (status, signup) = app.signup(
        "hosting",
        json!({"customer_id": "cust-9", "visitor": "v-unknown"}),
    );
    assert_eq!((status, signup), (200, json!({"attributed": false})));
    assert_eq!(app.head(), head);

    let line = |id: &str, customer: &str, amount: &str, at: &str| json!({"id": id, "customer_id": customer, "amount": amount, "currency": "USD", "product": "shared-hosting", "at": at});
    assert_eq!(
        app.expense(
            "hosting",
            line("inv-1", "cust-1", "100.00", "2026-08-10T12:00:00Z")
        )
        .0,
        201
    );
    assert_eq!(
        app.expense(
            "hosting",
            line("inv-2", "cust-1", "3.85", "2026-08-20T12:00:00Z")
        )
        .0,
        201
    );
    assert_eq!(
        app.expense(
            "hosting",
            line("inv-3", "cust-2", "200.00", "2026-08-15T12:00:00Z")
        )
        .0,
        201
    );
    // the same line again: its first seq, nothing appended
    let head = app.head();
    let (status, again) = app.expense(
        "hosting",
        line("inv-3", "cust-2", "200.00", "2026-08-15T12:00:00Z"),
    );
    assert_eq!((status, again["duplicate"].as_bool()), (200, Some(true)));
    assert_eq!(app.head(), head);
    let (status, _) = app.refund("hosting", json!({"id": "cn-1", "customer_id": "cust-2", "refunds": "inv-3", "amount": "50.00", "currency": "USD", "at": "2026-08-25T12:00:00Z"}));
    assert_eq!(status, 201);

    app.set_now("2026-08-31T12:00:00Z");
    assert_eq!(app.balance("hosting", "alice")["pending"], "20.77");
    let (status, problem) = app.close("hosting", "2026-08");
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            422,
            Some("https://commission-ledger.dev/problems/month-not-ended")
        )
    );
    app.set_now("2026-09-01T06:00:00Z");
    let (status, closed) = app.close("hosting", "2026-08");
    assert_eq!(
        (status, closed),
        (
            200,
            json!({"month": "2026-08", "rewards": 3, "total": "50.77", "already_closed": false})
        )
    );
    let (_, again) = app.close("hosting", "2026-08");
    assert_eq!(again["already_closed"], true);

    let balance = app.balance("hosting", "alice");
    assert_eq!(
        (
            balance["earned"].as_str(),
            balance["to_threshold"].as_str(),
            balance["available"].as_str(),
            balance["pending"].as_str()
        ),
        (Some("20.77"), Some("29.23"), Some("0.00"), Some("0.00"))
    );
    let statement = app.statement("hosting", "alice", "2026-08");
    assert_eq!(
        (
            statement["closing_balance"].as_str(),
            statement["lines"].as_array().unwrap().len()
        ),
        (Some("20.77"), 2)
    );
    assert_eq!(statement["lines"][0]["ref"], "inv-1");
    assert_eq!(statement["log_hash"].as_str().unwrap().len(), 64);

    let stats: Value = app
        .get(
            Some(&app.portal),
            "/v1/programs/hosting/affiliates/alice/stats?from=2026-08-01&to=2026-08-31&by=creative",
        )
        .json()
        .unwrap();
    assert_eq!(
        (
            &stats["clicks"],
            &stats["unique_visitors"],
            &stats["signups"],
            &stats["conversions"],
            &stats["commission"]
        ),
        (&json!(1), &json!(1), &json!(1), &json!(1), &json!("20.77"))
    );
    assert_eq!(
        (&stats["series"][0]["key"], &stats["series"][0]["clicks"]),
        (&json!("banner-1"), &json!(1))
    );
    let bad = app.get(
        Some(&app.portal),
        "/v1/programs/hosting/affiliates/alice/stats?by=week",
    );
    assert_eq!(bad.status().as_u16(), 422);
    let referrals: Value = app
        .get(
            Some(&app.portal),
            "/v1/programs/hosting/affiliates/alice/referrals?sort=-commission&limit=10",
        )
        .json()
        .unwrap();
    assert_eq!(referrals["total"], 1);
    assert_eq!(
        (
            &referrals["referrals"][0]["customer_id"],
            &referrals["referrals"][0]["billed"],
            &referrals["referrals"][0]["commission"],
            &referrals["referrals"][0]["status"]
        ),
        (
            &json!("cust-1"),
            &json!("103.85"),
            &json!("20.77"),
            &json!("active")
        )
    );
    assert_eq!(referrals["next_cursor"], Value::Null);
    let bad = app.get(
        Some(&app.portal),
        "/v1/programs/hosting/affiliates/alice/referrals?limit=5000",
    );
    assert_eq!(bad.status().as_u16(), 422);

    // bob: 40.00 − 10.00 = 30.00, below the 50.00 threshold
    let (status, problem) = app.withdraw("hosting", "bob", "30.00");
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            422,
            Some("https://commission-ledger.dev/problems/below-threshold")
        )
    );
}

#[test]
fn keys_and_roles_decide_who_may_do_what() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let balance = "/v1/programs/hosting/affiliates/alice/balance";
    assert_eq!(app.get(None, balance).status().as_u16(), 401);
    assert_eq!(
        app.get(Some("cl_k-nope_nope"), balance).status().as_u16(),
        401
    );
    assert_eq!(app.get(Some(&app.ingest), balance).status().as_u16(), 403);
    assert_eq!(app.get(Some(&app.portal), balance).status().as_u16(), 200);
    assert_eq!(app.get(Some(&app.admin), balance).status().as_u16(), 200);
    let put = app.send(
        "PUT",
        Some(&app.portal),
        "/v1/programs/hosting",
        &hosting_rules(),
        None,
    );
    assert_eq!(put.status().as_u16(), 403);
    assert_eq!(put.headers()["content-type"], "application/problem+json");
    let (status, _) = app.post(
        &app.portal,
        "/v1/programs/hosting/expenses",
        json!({"id": "x", "customer_id": "c", "amount": "1.00", "currency": "USD"}),
    );
    assert_eq!(status, 403);
    let (status, _) = app.post(
        &app.ingest,
        "/v1/programs/hosting/months/2026-07/close",
        json!({}),
    );
    assert_eq!(status, 403);
    assert_eq!(
        app.get(Some(&app.portal), "/v1/verify").status().as_u16(),
        403
    );
    let verify: Value = app.get(Some(&app.admin), "/v1/verify").json().unwrap();
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["projections"], "equal");
}

#[test]
fn bad_input_gets_a_problem_and_appends_nothing() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let head = app.head();
    let expenses = "/v1/programs/hosting/expenses";
    let line = |amount: Value, currency: &str| json!({"id": "inv-1", "customer_id": "c-1", "amount": amount, "currency": currency});
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            expenses,
            line(json!("10.001"), "USD"),
            422,
            "invalid-amount",
        ),
        (expenses, line(json!("0.00"), "USD"), 422, "invalid-amount"),
        (expenses, line(json!("-5.00"), "USD"), 422, "invalid-amount"),
        (expenses, line(json!("1e3"), "USD"), 422, "invalid-amount"),
        (
            expenses,
            line(json!("10.00"), "EUR"),
            422,
            "currency-mismatch",
        ),
        (expenses, line(json!(10), "USD"), 400, "malformed"),
        (
            expenses,
            json!({"id": "inv-1", "amount": "1.00", "currency": "USD"}),
            400,
            "malformed",
        ),
        (
            expenses,
            json!({"id": "inv-1", "customer_id": "c-1", "amount": "1.00", "currency": "USD", "surprise": 1}),
            400,
            "malformed",
        ),
        (
            expenses,
            json!({"id": "bad id", "customer_id": "c-1", "amount": "1.00", "currency": "USD"}),
            422,
            "invalid-value",
        ),
        (
            expenses,
            json!({"id": "inv-1", "customer_id": "c-1", "amount": "1.00", "currency": "USD", "at": "2099-01-01T00:00:00Z"}),
            422,
            "invalid-value",
        ),
        (
            expenses,
            json!({"id": "inv-1", "customer_id": "c-1", "amount": "1.00", "currency": "USD", "at": "1969-12-31T23:59:59Z"}),
            422,
            "invalid-value",
        ),
        (
            "/v1/programs/hosting/signups",
            json!({"customer_id": "c-1", "promo_code": "HOST-alice", "at": "0026-08-01T00:00:00Z"}),
            422,
            "invalid-value",
        ),
        (
            expenses,
            json!({"id": "inv-1", "customer_id": "c-1", "amount": "1.00", "currency": "USD", "at": "yesterday"}),
            422,
            "invalid-value",
        ),
        (
            "/v1/programs/hosting/refunds",
            json!({"id": "cn-1", "customer_id": "c-1", "refunds": "nope", "amount": "1.00", "currency": "USD"}),
            422,
            "unknown-line",
        ),
        (
            "/v1/programs/hosting/clicks",
            json!({"referral_code": "nope"}),
            422,
            "unknown-referral-code",
        ),
        (
            "/v1/programs/nope/expenses",
            line(json!("1.00"), "USD"),
            404,
            "unknown-program",
        ),
        (
            "/v1/programs/hosting/affiliates/nobody/withdrawals",
            json!({"amount": "1.00"}),
            404,
            "unknown-affiliate",
        ),
        (
            "/v1/programs/hosting/affiliates",
            json!({"affiliate_id": "alice"}),
            409,
            "affiliate-exists",
        ),
        (
            "/v1/programs/hosting/months/2026-13/close",
            json!({}),
            422,
            "invalid-value",
        ),
    ];
    for (path, body, status, kind) in cases {
        let key = if path.contains("withdrawals") || path.ends_with("/affiliates") {
            &app.portal
        } else if path.contains("close") {
            &app.admin
        } else {
            &app.ingest
        };
        let response = app.send("POST", Some(key), path, &body, None);
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{path} {body}"
        );
        let problem: Value = response.json().unwrap();
        assert_eq!(
            problem["type"],
            format!("https://commission-ledger.dev/problems/{kind}"),
            "{path} {body}: {problem}"
        );
        assert!(!problem["detail"].as_str().unwrap().is_empty());
        assert_eq!(app.head(), head, "{path} {body} appended");
    }
    // A program's bounty and threshold are held to what every amount is:
    // at most 15 integer digits (two bounties past that overflowed a
    // balance's pending estimate), and none past what an event may carry.
    for field in ["bounty", "payout_threshold"] {
        for (amount, status, kind) in [
            ("1000000000000000", 422, "invalid-value"),
            ("79228162514264337593543950335", 400, "malformed"),
        ] {
            let mut rules = hosting_rules();
            rules[field] = json!(amount);
            let (got, problem) = app.put_program("hosting", rules);
            assert_eq!(got, status, "{field} {amount}: {problem}");
            assert_eq!(
                problem["type"],
                format!("https://commission-ledger.dev/problems/{kind}"),
                "{field} {amount}: {problem}"
            );
            assert_eq!(app.head(), head, "{field} {amount} appended");
        }
    }
    // not JSON at all, and a body over the 1 MiB limit
    let raw = |body: Vec<u8>| {
        app.client
            .post(app.url(expenses))
            .bearer_auth(&app.ingest)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap()
    };
    let response = raw(b"{not json".to_vec());
    assert_eq!(response.status().as_u16(), 400);
    let huge = format!(
        "{{\"id\":\"x\",\"customer_id\":\"c\",\"amount\":\"1.00\",\"currency\":\"USD\",\"product\":\"{}\"}}",
        "p".repeat(2 << 20)
    );
    // A connection refused mid-body is closed by the server: its own client.
    let response = Client::new()
        .post(app.url(expenses))
        .bearer_auth(&app.ingest)
        .header("content-type", "application/json")
        .body(huge.into_bytes())
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(app.head(), head);
    assert_eq!(
        app.get(Some(&app.admin), "/v1/nothing-here")
            .status()
            .as_u16(),
        404
    );
}

#[test]
fn idempotency_keys_replay_the_first_answer_and_refuse_another_body() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let body = json!({"affiliate_id": "alice"});
    let path = "/v1/programs/hosting/affiliates";
    let first = app.send("POST", Some(&app.portal), path, &body, Some("enroll-alice"));
    assert_eq!(first.status().as_u16(), 201);
    let first: Value = first.json().unwrap();
    let head = app.head();
    let again = app.send("POST", Some(&app.portal), path, &body, Some("enroll-alice"));
    assert_eq!(again.status().as_u16(), 201);
    assert_eq!(again.json::<Value>().unwrap(), first);
    assert_eq!(app.head(), head);
    let other = app.send(
        "POST",
        Some(&app.portal),
        path,
        &json!({"affiliate_id": "bob"}),
        Some("enroll-alice"),
    );
    assert_eq!(other.status().as_u16(), 409);
    assert_eq!(
        other.json::<Value>().unwrap()["type"],
        "https://commission-ledger.dev/problems/idempotency-conflict"
    );
    assert_eq!(app.head(), head);
}

#[test]
fn the_referral_link_sets_the_cookie_and_never_redirects_off_site() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap().to_string();
    let client = visitor();
    let follow = |query: &str, headers: &[(&str, &str)]| {
        let mut request = client.get(format!("{}/r/{code}{query}", app.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().unwrap()
    };
    let head = app.head();
    let first = follow("", &[("referer", "https://blog.example/post?utm_source=x")]);
    assert_eq!(first.status().as_u16(), 302);
    assert_eq!(
        first.headers()["location"],
        "https://provider.example/signup"
    );
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("cl_visitor=v-")
            && cookie.contains("Max-Age=2592000")
            && cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"));
    assert_eq!(app.head(), head + 1, "one click recorded");
    let visitor = cookie.split(';').next().unwrap().to_string();
    // the same browser again, over https behind a proxy: same visitor, Secure cookie
    let again = follow(
        "?to=/pricing?plan=pro",
        &[("cookie", &visitor), ("x-forwarded-proto", "https")],
    );
    assert_eq!(
        again.headers()["location"],
        "https://provider.example/pricing?plan=pro"
    );
    let cookie = again.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.starts_with(&visitor) && cookie.contains("Secure"),
        "{cookie}"
    );
    // a signup with that cookie is the affiliate's
    let (_, signup) = app.signup(
        "hosting",
        json!({"customer_id": "cust-1", "visitor": visitor.trim_start_matches("cl_visitor=")}),
    );
    assert_eq!(signup["affiliate_id"], "alice");
    // every open-redirect attempt lands on the site itself
    for to in [
        "https://evil.example/",
        "//evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "%2F%2Fevil.example",
        "/%2F/evil.example",
        "/%5Cevil.example",
        "/%2F%2Fevil.example",
        "javascript:alert(1)",
        "http:/evil.example",
        "/\u{3000}/evil",
        "/ /evil",
        "%0d%0aLocation:%20https://evil.example",
    ] {
        let response = follow(&format!("?to={}", encode(to)), &[]);
        let location = response.headers()["location"].to_str().unwrap().to_string();
        assert!(
            location == "https://provider.example/signup"
                || location.starts_with("https://provider.example/"),
            "{to} → {location}"
        );
        assert!(
            !location.contains("evil.example") || location.starts_with("https://provider.example/"),
            "{to} → {location}"
        );
        assert_eq!(
            location.split('/').nth(2),
            Some("provider.example"),
            "{to} → {location}"
        );
    }
    // an unknown code takes the visitor to the only program's site, and
    // records nothing and sets no cookie
    let head = app.head();
    let unknown = client
        .get(format!("{}/r/nope-nope?to=/pricing", app.base))
        .send()
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 302);
    assert_eq!(
        unknown.headers()["location"],
        "https://provider.example/pricing"
    );
    assert!(unknown.headers().get("set-cookie").is_none());
    assert_eq!(app.head(), head);
}

#[test]
fn an_unknown_code_goes_to_the_fallback_site_or_is_not_found() {
    let get = |app: &TestApp, path: &str| {
        let client = visitor();
        let response = client.get(app.url(path)).send().unwrap();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        (response.status().as_u16(), location)
    };
    // no program yet: no site to send anyone to
    let app = TestApp::start();
    assert_eq!(get(&app, "/r/nope").0, 404);
    // with two programs there is no one site
    app.put_program("hosting", hosting_rules());
    let mut other = hosting_rules();
    other["id"] = json!("other");
    other["site_url"] = json!("https://other.example/");
    app.put_program("other", other);
    let head = app.head();
    let (status, _) = get(&app, "/r/nope");
    assert_eq!(status, 404);
    assert_eq!(app.head(), head);
    // unless the operator names one
    let app = TestApp::start_configured(|config| {
        config.fallback_site = Some("https://hub.example/start".into());
    });
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let head = app.head();
    assert_eq!(
        get(&app, "/r/nope?to=//evil.example"),
        (302, Some("https://hub.example/start".to_string()))
    );
    assert_eq!(
        get(&app, "/r/nope?to=/pricing"),
        (302, Some("https://hub.example/pricing".to_string()))
    );
    assert_eq!(app.head(), head);
    // a known code still goes to its program's site
    let code = alice["referral_code"].as_str().unwrap();
    assert_eq!(
        get(&app, &format!("/r/{code}")),
        (302, Some("https://provider.example/signup".to_string()))
    );
    assert_eq!(app.head(), head + 1);
}

/// Percent-encodes everything but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[test]
fn the_tracking_pixel_records_a_click_when_the_page_carries_ref() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap();
    let head = app.head();
    let page = format!("https://provider.example/hosting?ref={code}&utm=1");
    let pixel = app
        .client
        .get(app.url(&format!(
            "/px.gif?r={}&p={}",
            encode("https://forum.example/thread/9?page=2"),
            encode(&page)
        )))
        .send()
        .unwrap();
    assert_eq!(
        (
            pixel.status().as_u16(),
            pixel.headers()["content-type"].to_str().unwrap()
        ),
        (200, "image/gif")
    );
    assert!(
        pixel.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("cl_visitor=")
    );
    assert_eq!(pixel.bytes().unwrap().len(), 43);
    assert_eq!(app.head(), head + 1);
    let plain = app
        .client
        .get(app.url(&format!(
            "/px.gif?p={}",
            encode("https://provider.example/")
        )))
        .send()
        .unwrap();
    assert_eq!(plain.status().as_u16(), 200);
    assert_eq!(app.head(), head + 1, "no ref, no click");
}

#[test]
fn per_affiliate_tokens_read_one_affiliate_and_expire() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.enroll("hosting", json!({"affiliate_id": "bob"}));
    let tokens = "/v1/programs/hosting/affiliates/alice/tokens";
    let (status, minted) = app.post(&app.portal, tokens, json!({"ttl_seconds": 600}));
    assert_eq!(status, 201);
    assert_eq!(minted["expires_at"], "2026-08-01T00:10:00Z");
    let token = minted["token"].as_str().unwrap().to_string();
    let alice = "/v1/programs/hosting/affiliates/alice";
    assert_eq!(
        app.get(Some(&token), &format!("{alice}/balance"))
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        app.get(Some(&token), &format!("{alice}/statements/2026-08"))
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        app.get(Some(&token), "/v1/programs/hosting/affiliates/bob/balance")
            .status()
            .as_u16(),
        403
    );
    assert_eq!(
        app.get(Some(&token), "/v1/programs/hosting")
            .status()
            .as_u16(),
        403
    );
    // it may request alice's withdrawals (refused here by the threshold, not the role) …
    let (status, problem) = app.post(
        &token,
        &format!("{alice}/withdrawals"),
        json!({"amount": "1.00"}),
    );
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            422,
            Some("https://commission-ledger.dev/problems/below-threshold")
        )
    );
    // … but not bob's, nor mint tokens, nor write anything else
    assert_eq!(
        app.post(
            &token,
            "/v1/programs/hosting/affiliates/bob/withdrawals",
            json!({"amount": "1.00"})
        )
        .0,
        403
    );
    assert_eq!(app.post(&token, tokens, json!({})).0, 403);
    assert_eq!(
        app.post(
            &token,
            "/v1/programs/hosting/expenses",
            json!({"id": "x", "customer_id": "c", "amount": "1.00", "currency": "USD"})
        )
        .0,
        403
    );
    // a changed token, or one past its time, is no token
    let mut tampered = token.clone();
    tampered.replace_range(6..8, "00");
    assert_eq!(
        app.get(Some(&tampered), &format!("{alice}/balance"))
            .status()
            .as_u16(),
        401
    );
    // nor is one whose hex names the same bytes in other text: a sign
    // before a digit (`+a` for `0a`), which the parser of numbers took
    let (hex, mac) = token.strip_prefix("clt.").unwrap().split_once('.').unwrap();
    let pair = hex
        .as_bytes()
        .chunks(2)
        .position(|pair| pair[0] == b'0')
        .expect("a byte below 0x10 in the payload (its newlines)");
    let mut signed_hex = hex.to_string();
    signed_hex.replace_range(2 * pair..2 * pair + 1, "+");
    let signed = format!("clt.{signed_hex}.{mac}");
    assert_ne!(signed, token);
    assert_eq!(
        app.get(Some(&signed), &format!("{alice}/balance"))
            .status()
            .as_u16(),
        401
    );
    app.set_now("2026-08-01T00:10:01Z");
    assert_eq!(
        app.get(Some(&token), &format!("{alice}/balance"))
            .status()
            .as_u16(),
        401
    );
    // only portal and admin keys mint, for a time that is bounded
    assert_eq!(app.post(&app.ingest, tokens, json!({})).0, 403);
    assert_eq!(
        app.post(&app.portal, tokens, json!({"ttl_seconds": 0})).0,
        422
    );
    assert_eq!(
        app.post(
            &app.portal,
            "/v1/programs/hosting/affiliates/nobody/tokens",
            json!({})
        )
        .0,
        404
    );
}

#[test]
fn statements_by_accept_reassignment_and_the_audit_log() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.enroll("hosting", json!({"affiliate_id": "bob"}));
    app.signup(
        "hosting",
        json!({"customer_id": "cust-1", "promo_code": "HOST-alice", "at": "2026-08-02T10:00:00Z"}),
    );
    app.expense("hosting", json!({"id": "inv-1", "customer_id": "cust-1", "amount": "100.00", "currency": "USD", "product": "vps, large", "at": "2026-08-03T10:00:00Z"}));
    app.set_now("2026-09-01T06:00:00Z");
    app.close("hosting", "2026-08");

    let statement = "/v1/programs/hosting/affiliates/alice/statements/2026-08";
    let csv = app
        .client
        .get(app.url(statement))
        .bearer_auth(&app.portal)
        .header("accept", "text/csv")
        .send()
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "at,kind,customer_id,product,basis,rate,amount,currency,late,ref"
    );
    assert_eq!(rows[1], "2026-08-01,opening_balance,,,,,0.00,USD,,");
    assert_eq!(
        rows[2],
        "2026-08-03T10:00:00Z,reward,cust-1,\"vps, large\",100.00,20,20.00,USD,false,inv-1"
    );
    assert!(rows[3].starts_with("2026-09-01,closing_balance,,,,,20.00,USD,,"));
    let html = app
        .client
        .get(app.url(statement))
        .bearer_auth(&app.portal)
        .header("accept", "text/html")
        .send()
        .unwrap();
    assert_eq!(html.headers()["content-type"], "text/html; charset=utf-8");
    let html = html.text().unwrap();
    assert!(
        html.contains("<h1>Commission statement 2026-08</h1>")
            && html.contains("vps, large")
            && html.contains("Closing balance <b>20.00</b>")
    );

    // the customer was alice's by mistake: all of it moves to bob, in the open month
    app.set_now("2026-09-10T00:00:00Z");
    let (status, moved) = app.post(
        &app.admin,
        "/v1/programs/hosting/customers/cust-1/reassign",
        json!({"to": "bob", "retroactive": true, "reason": "ticket 4411"}),
    );
    assert_eq!(status, 201);
    let adjustments = moved["adjustments"].as_array().unwrap();
    assert_eq!(
        (
            adjustments[0]["affiliate_id"].as_str(),
            adjustments[0]["amount"].as_str(),
            adjustments[0]["month"].as_str()
        ),
        (Some("alice"), Some("-20.00"), Some("2026-09"))
    );
    assert_eq!(
        (
            adjustments[1]["affiliate_id"].as_str(),
            adjustments[1]["amount"].as_str()
        ),
        (Some("bob"), Some("20.00"))
    );
    assert_eq!(app.balance("hosting", "bob")["earned"], "20.00");
    // a signup forwarded again finds the customer where the operator put
    // them, and says so without claiming how a signup brought them
    assert_eq!(
        app.signup(
            "hosting",
            json!({"customer_id": "cust-1", "promo_code": "HOST-alice"})
        ),
        (200, json!({"attributed": true, "affiliate_id": "bob"}))
    );
    assert_eq!(
        app.statement("hosting", "alice", "2026-08")["closing_balance"],
        "20.00",
        "the closed month stays"
    );
    assert_eq!(
        app.post(
            &app.ingest,
            "/v1/programs/hosting/customers/cust-1/reassign",
            json!({"to": "alice", "reason": "x"})
        )
        .0,
        403
    );
    assert_eq!(
        app.post(
            &app.ingest,
            "/v1/programs/hosting/customers/cust-1/group",
            json!({"group": "staff"})
        )
        .0,
        201
    );
    assert_eq!(
        app.post(
            &app.ingest,
            "/v1/programs/hosting/customers/cust-1/close",
            json!({"reason": "cancelled"})
        )
        .0,
        201
    );

    // the audit log: a page, a filter by type, and NDJSON
    let page: Value = app
        .get(Some(&app.admin), "/v1/events?limit=2")
        .json()
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["events"][0]["type"], "ApiKeyIssued");
    assert_eq!(page["next_after"], 2);
    assert_eq!(page["events"][0]["hash"].as_str().unwrap().len(), 64);
    let adjustments: Value = app
        .get(
            Some(&app.admin),
            "/v1/events?type=AdjustmentPosted&program=hosting",
        )
        .json()
        .unwrap();
    let found: Vec<&str> = adjustments["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["affiliate_id"].as_str().unwrap())
        .collect();
    assert_eq!(found, vec!["alice", "bob"]);
    assert_eq!(adjustments["events"][0]["data"]["reason"], "ticket 4411");
    let ndjson = app
        .client
        .get(app.url("/v1/events?type=MonthClosed"))
        .bearer_auth(&app.admin)
        .header("accept", "application/x-ndjson")
        .send()
        .unwrap();
    assert_eq!(ndjson.headers()["content-type"], "application/x-ndjson");
    let text = ndjson.text().unwrap();
    assert_eq!(text.lines().count(), 1);
    assert_eq!(
        serde_json::from_str::<Value>(text.lines().next().unwrap()).unwrap()["data"]["total"],
        "20.00"
    );
    assert_eq!(
        app.get(Some(&app.admin), "/v1/events?type=Nope")
            .status()
            .as_u16(),
        422
    );
    assert_eq!(
        app.get(Some(&app.portal), "/v1/events").status().as_u16(),
        403
    );
}

#[test]
fn a_batch_takes_thousands_of_items_with_one_result_each() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap();
    app.set_now("2026-08-10T00:00:00Z");
    let mut items = Vec::new();
    const CLICKS: usize = 8_000;
    for i in 0..CLICKS {
        items.push(json!({"type": "click", "referral_code": code, "visitor": format!("v-{i}"), "creative": "banner", "referrer": "https://blog.example/hosting", "at": "2026-08-02T10:00:00Z"}));
    }
    for i in 0..500 {
        items.push(json!({"type": "signup", "customer_id": format!("c-{i}"), "visitor": format!("v-{i}"), "at": "2026-08-03T10:00:00Z"}));
        items.push(json!({"type": "expense", "id": format!("inv-{i}"), "customer_id": format!("c-{i}"), "amount": "10.00", "currency": "USD", "at": "2026-08-04T10:00:00Z"}));
    }
    items.push(json!({"type": "expense", "id": "inv-0", "customer_id": "c-0", "amount": "10.00", "currency": "USD", "at": "2026-08-04T10:00:00Z"})); // duplicate
    items.push(json!({"type": "expense", "id": "bad", "customer_id": "c-0", "amount": "10.001", "currency": "USD"}));
    items.push(json!({"type": "teleport"}));
    items.push(json!({"type": "refund", "id": "cn-1", "customer_id": "c-1", "refunds": "inv-1", "amount": "5.00", "currency": "USD", "at": "2026-08-05T10:00:00Z"}));
    items.push(json!({"referral_code": code})); // no type
    items.push(json!("click")); // not an object
    items.push(json!({"type": "expense", "id": "inv-x", "customer_id": "c-0", "amount": "1.00", "currency": "USD", "cents": 100}));
    let body = json!({"items": items});
    assert!(
        body.to_string().len() > 1 << 20,
        "over the 1 MiB limit of single requests"
    );
    let head = app.head();
    let response = app.send(
        "POST",
        Some(&app.ingest),
        "/v1/programs/hosting/batch",
        &body,
        Some("nightly-import-1"),
    );
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().unwrap();
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), CLICKS + 1_007);
    assert_eq!(
        (
            results[0]["status"].as_u64(),
            results[0]["visitor"].as_str()
        ),
        (Some(201), Some("v-0"))
    );
    assert_eq!(
        (
            results[CLICKS]["status"].as_u64(),
            results[CLICKS]["affiliate_id"].as_str()
        ),
        (Some(201), Some("alice"))
    );
    assert_eq!(results[CLICKS + 1]["status"], 201);
    assert_eq!(
        (
            results[CLICKS + 1_000]["status"].as_u64(),
            results[CLICKS + 1_000]["duplicate"].as_bool()
        ),
        (Some(200), Some(true))
    );
    assert_eq!(
        (
            results[CLICKS + 1_001]["status"].as_u64(),
            results[CLICKS + 1_001]["type"].as_str()
        ),
        (
            Some(422),
            Some("https://commission-ledger.dev/problems/invalid-amount")
        )
    );
    assert_eq!(results[CLICKS + 1_002]["status"], 400);
    assert_eq!(results[CLICKS + 1_003]["status"], 201);
    // each malformed item is refused alone, naming the item and the fault
    for (i, fault) in [
        (CLICKS + 1_002, "unknown variant `teleport`"),
        (CLICKS + 1_004, "missing field `type`"),
        (CLICKS + 1_005, "invalid type: string"),
        (CLICKS + 1_006, "unknown field `cents`"),
    ] {
        let detail = results[i]["detail"].as_str().unwrap();
        assert_eq!(results[i]["status"], 400, "{detail}");
        assert!(
            detail.starts_with(&format!("item {} ", i)) && detail.contains(fault),
            "{detail}"
        );
    }
    assert_eq!(
        app.head(),
        head + CLICKS as u64 + 1_000 + 1,
        "clicks, signups, expenses and the refund"
    );
    // the same batch again, same key: the same answers, nothing appended
    let head = app.head();
    let again: Value = app
        .send(
            "POST",
            Some(&app.ingest),
            "/v1/programs/hosting/batch",
            &body,
            Some("nightly-import-1"),
        )
        .json()
        .unwrap();
    assert_eq!(app.head(), head);
    assert_eq!(again["results"][0]["visitor"], "v-0");
    assert_eq!(
        again["results"][CLICKS + 1_003]["status"].as_u64(),
        Some(200)
    );
    // the same key with another body: each item that recorded is a conflict
    let mut other = body.clone();
    other["items"][0]["visitor"] = json!("v-other");
    let conflict: Value = app
        .send(
            "POST",
            Some(&app.ingest),
            "/v1/programs/hosting/batch",
            &other,
            Some("nightly-import-1"),
        )
        .json()
        .unwrap();
    assert_eq!(conflict["results"][0]["status"], 409);
    assert_eq!(
        conflict["results"][CLICKS]["type"],
        "https://commission-ledger.dev/problems/idempotency-conflict"
    );
    assert_eq!(app.head(), head);
    // over the item limit
    let too_many = json!({"items": vec![json!({"type": "click"}); 10_001]});
    let response = app.send(
        "POST",
        Some(&app.ingest),
        "/v1/programs/hosting/batch",
        &too_many,
        None,
    );
    assert_eq!(response.status().as_u16(), 422);
    assert_eq!(app.head(), head);
}

#[test]
fn the_event_stream_resumes_from_last_event_id_and_tails_live() {
    use std::io::{BufRead, BufReader};
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules()); // seq 4 (three keys first)
    let client = Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap();
    let response = client
        .get(app.url("/v1/events/stream"))
        .bearer_auth(&app.admin)
        .header("last-event-id", "2")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut lines = BufReader::new(response).lines();
    let mut next_id = || loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(id) = line
            .strip_prefix("id: ")
            .or_else(|| line.strip_prefix("id:"))
        {
            return id.trim().parse::<u64>().unwrap();
        }
    };
    assert_eq!(next_id(), 3);
    assert_eq!(next_id(), 4);
    // live: an event recorded now arrives on the open stream
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    assert_eq!(next_id(), 5);
    assert_eq!(
        app.get(Some(&app.portal), "/v1/events/stream")
            .status()
            .as_u16(),
        403
    );
    // shutting down ends the open stream instead of waiting for it forever
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(app);
        let _ = done.send(());
    });
    assert!(
        stopped
            .recv_timeout(std::time::Duration::from_secs(10))
            .is_ok(),
        "shutdown waited on the open stream"
    );
    drop(lines);
}

#[test]
fn metrics_count_requests_by_route_and_status_and_the_writer() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.balance("hosting", "alice");
    app.balance("hosting", "alice");
    assert_eq!(
        app.get(None, "/v1/programs/hosting/affiliates/alice/balance")
            .status()
            .as_u16(),
        401
    );
    let response = app.get(None, "/metrics");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = response.text().unwrap();
    let route = "route=\"/v1/programs/{program}/affiliates/{affiliate}/balance\",method=\"GET\"";
    assert!(
        text.contains(&format!(
            "commission_ledger_http_requests_total{{{route},status=\"200\"}} 2"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "commission_ledger_http_requests_total{{{route},status=\"401\"}} 1"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "commission_ledger_http_request_duration_seconds_count{{{route},status=\"200\"}} 2"
    )));
    assert!(text.contains("commission_ledger_events_appended_total{type=\"ProgramDefined\"} 1"));
    assert!(text.contains("commission_ledger_events_appended_total{type=\"ApiKeyIssued\"} 3"));
    assert!(text.contains("commission_ledger_head_seq 5"));
    assert!(text.contains("commission_ledger_queue_depth 0"));
    // No checkpoint is due after five events; one is saved at shutdown.
    assert!(text.contains("commission_ledger_checkpoints_total 0"));
    assert!(text.contains("commission_ledger_checkpoint_building 0"));
    assert!(text.contains("# TYPE commission_ledger_group_commit_halves gauge"));
    assert!(text.contains("# TYPE commission_ledger_group_commit_tries_total counter"));
    assert!(text.contains("commission_ledger_group_commit_tries_total 0"));
    // sled keeps up with five events: the syncer never waited for it
    assert!(text.contains("# TYPE commission_ledger_index_waits_total counter"));
    assert!(text.contains("commission_ledger_index_waits_total 0"));
    assert!(text.contains("# TYPE commission_ledger_checkpoint_seconds_total counter"));
    assert!(text.contains("# TYPE commission_ledger_queue_wait_seconds_total counter"));
    assert!(text.contains("\ncommission_ledger_queue_wait_seconds_total 0."));
    assert!(!text.contains("alice"), "no ids in labels");
    // August's close is owed by auto_close_day (this server's closer is off)
    assert!(text.contains("commission_ledger_auto_close_owed 0"));
    app.set_now("2026-09-01T12:00:00Z");
    let text = app.get(None, "/metrics").text().unwrap();
    assert!(
        text.contains("commission_ledger_auto_close_owed 1"),
        "{text}"
    );
    assert!(text.contains("commission_ledger_auto_closes_total 0"));
}

#[test]
fn fifty_racing_withdrawals_never_overdraw() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.signup(
        "hosting",
        json!({"customer_id": "c-1", "promo_code": "HOST-alice", "at": "2026-08-02T10:00:00Z"}),
    );
    // 1,000.00 billed at 20%: 200.00 earned
    app.expense("hosting", json!({"id": "inv-1", "customer_id": "c-1", "amount": "1000.00", "currency": "USD", "at": "2026-08-03T10:00:00Z"}));
    app.set_now("2026-09-01T06:00:00Z");
    app.close("hosting", "2026-08");
    // 50 requests of 30.00 race for 200.00: exactly 6 fit
    let results: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| scope.spawn(|| app.withdraw("hosting", "alice", "30.00").0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|s| **s == 201).count(), 6);
    assert_eq!(results.iter().filter(|s| **s == 422).count(), 44);
    let balance = app.balance("hosting", "alice");
    assert_eq!(
        (
            balance["earned"].as_str(),
            balance["in_withdrawal"].as_str(),
            balance["available"].as_str()
        ),
        (Some("200.00"), Some("180.00"), Some("20.00"))
    );
}

#[test]
fn a_restarted_server_gives_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let reads = [
        "/balance",
        "/statements/2026-08",
        "/stats?from=2026-08-01&to=2026-08-31&by=day",
        "/referrals",
    ];
    let answers = |app: &TestApp| -> Vec<Value> {
        reads
            .iter()
            .map(|r| {
                app.get(
                    Some(&app.admin),
                    &format!("/v1/programs/hosting/affiliates/alice{r}"),
                )
                .json::<Value>()
                .unwrap()
            })
            .collect()
    };
    let (first, admin) = {
        let app = TestApp::start_in(dir.path(), None);
        app.put_program("hosting", hosting_rules());
        let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
        app.click("hosting", json!({"referral_code": alice["referral_code"], "visitor": "v-1", "at": "2026-08-02T09:00:00Z"}));
        app.signup(
            "hosting",
            json!({"customer_id": "c-1", "visitor": "v-1", "at": "2026-08-02T10:00:00Z"}),
        );
        app.expense("hosting", json!({"id": "inv-1", "customer_id": "c-1", "amount": "123.45", "currency": "USD", "at": "2026-08-03T10:00:00Z"}));
        app.set_now("2026-09-01T06:00:00Z");
        app.close("hosting", "2026-08");
        (answers(&app), app.admin.clone())
    };
    let app = TestApp::start_in(dir.path(), Some(admin));
    app.set_now("2026-09-01T06:00:00Z");
    assert_eq!(answers(&app), first);
}

#[test]
fn public_endpoints_are_rate_limited_per_address() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let link = app.url(&format!("/r/{}", alice["referral_code"].as_str().unwrap()));
    let client = visitor();
    let burst = ApiConfig::default().public_burst;
    for _ in 0..burst {
        assert_eq!(client.get(&link).send().unwrap().status().as_u16(), 302);
    }
    let head = app.head();
    let limited = client.get(&link).send().unwrap();
    assert_eq!(limited.status().as_u16(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    // the pixel is still an image, so a page shows no broken one, as documented
    let documented = commission_ledger::api::openapi();
    let limited_pixel = &documented["paths"]["/px.gif"]["get"]["responses"]["429"]["content"];
    assert!(limited_pixel.get("image/gif").is_some(), "{limited_pixel}");
    let pixel = app.get(None, "/px.gif");
    assert_eq!(
        (
            pixel.status().as_u16(),
            pixel.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string()
        ),
        (429, "image/gif".to_string())
    );
    assert_eq!(pixel.bytes().unwrap().len(), 43);
    // trusting no proxy, a claimed address changes nothing
    let spoofed = client.get(&link).header("x-forwarded-for", "203.0.113.9");
    assert_eq!(spoofed.send().unwrap().status().as_u16(), 429);
    assert_eq!(app.head(), head, "a limited click is not recorded");
    // the bucket refills with time: 120 a minute is 2 a second
    app.clock.fetch_add(1_000_000, Ordering::SeqCst);
    assert_eq!(client.get(&link).send().unwrap().status().as_u16(), 302);
    assert_eq!(client.get(&link).send().unwrap().status().as_u16(), 302);
    assert_eq!(client.get(&link).send().unwrap().status().as_u16(), 429);
    // the API itself is not limited this way
    assert_eq!(
        app.get(
            Some(&app.portal),
            "/v1/programs/hosting/affiliates/alice/balance"
        )
        .status()
        .as_u16(),
        200
    );
}

/// An IPv6 subscriber gets a /64 and picks addresses at will: the limit
/// is the network's.
#[test]
fn the_rate_limit_holds_an_ipv6_network_to_one_bucket() {
    let limiter = api::RateLimiter::new(120, 2);
    let now = ts("2026-08-01T00:00:00Z");
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    assert!(limiter.allow(ip("2001:db8:1:2::1"), now));
    assert!(limiter.allow(ip("2001:db8:1:2:ffff::9"), now));
    assert!(
        !limiter.allow(ip("2001:db8:1:2::abcd"), now),
        "the same /64"
    );
    assert!(limiter.allow(ip("2001:db8:1:3::1"), now), "another /64");
    assert!(limiter.allow(ip("192.0.2.1"), now));
    assert!(
        limiter.allow(ip("::ffff:192.0.2.1"), now),
        "the same IPv4 address, mapped"
    );
    assert!(!limiter.allow(ip("192.0.2.1"), now));
    assert!(limiter.allow(ip("192.0.2.2"), now));
}

/// Behind a TLS-terminating proxy every visitor's peer address is the
/// proxy's: with the proxy trusted, each visitor has a limit (and a client
/// hash) of their own, and what a visitor writes into X-Forwarded-For
/// themselves does not get them another.
#[test]
fn behind_a_trusted_proxy_each_visitor_is_limited_by_their_own_address() {
    let app = TestApp::start_configured(|config| {
        config.trusted_proxies = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
    });
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let link = app.url(&format!("/r/{}", alice["referral_code"].as_str().unwrap()));
    let client = visitor();
    let from = |forwarded: &str| {
        client
            .get(&link)
            .header("x-forwarded-for", forwarded)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    let burst = ApiConfig::default().public_burst;
    for _ in 0..burst {
        // the visitor, then a second trusted proxy in front of ours
        assert_eq!(from("203.0.113.7, 10.1.2.3"), 302);
    }
    assert_eq!(from("203.0.113.7"), 429);
    // a claimed address at the left end is not the client: the proxy's is
    assert_eq!(from("198.51.100.1, 203.0.113.7"), 429);
    // another visitor, also with a port or IPv6, has their own limit
    assert_eq!(from("203.0.113.8:4711"), 302);
    assert_eq!(from("[2001:db8::1]:443"), 302);
    // a hop that is no address: the nearest known hop (the proxy) is the client
    for _ in 0..burst {
        assert_eq!(from("unknown"), 302);
    }
    assert_eq!(from("garbage"), 429);
    // the clicks' client hashes tell the visitors apart, and never hold the address
    let clicks: Value = app
        .get(Some(&app.admin), "/v1/events?type=ClickRecorded&limit=1000")
        .json()
        .unwrap();
    let hashes: std::collections::BTreeSet<String> = clicks["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["client_hash"].to_string())
        .collect();
    assert_eq!(hashes.len(), 4, "{hashes:?}");
    assert!(!clicks.to_string().contains("203.0.113"));
}

/// Every endpoint × every kind of caller: no key 401, a key or token that
/// may not do it 403, anything else gets past authorization.
#[test]
fn the_role_matrix() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.enroll("hosting", json!({"affiliate_id": "bob"}));
    let token = |affiliate: &str| {
        app.post(
            &app.portal,
            &format!("/v1/programs/hosting/affiliates/{affiliate}/tokens"),
            json!({}),
        )
        .1["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (own, other) = (token("alice"), token("bob"));
    let p = "/v1/programs/hosting";
    let a = "/v1/programs/hosting/affiliates/alice";
    let w = "00000000-0000-7000-8000-000000000000";
    // (method, path, body, who may: A admin, I ingest, P portal, T alice's token)
    let endpoints: Vec<(&str, String, Value, &str)> = vec![
        ("PUT", p.into(), hosting_rules(), "A"),
        ("GET", p.into(), Value::Null, "AP"),
        (
            "POST",
            format!("{p}/affiliates"),
            json!({"affiliate_id": "x"}),
            "AP",
        ),
        ("GET", a.into(), Value::Null, "APT"),
        ("GET", format!("{a}/balance"), Value::Null, "APT"),
        ("GET", format!("{a}/stats"), Value::Null, "APT"),
        ("GET", format!("{a}/referrals"), Value::Null, "APT"),
        ("GET", format!("{a}/statements/2026-07"), Value::Null, "APT"),
        (
            "POST",
            format!("{a}/withdrawals"),
            json!({"amount": "1.00"}),
            "APT",
        ),
        (
            "POST",
            format!("{a}/credits"),
            json!({"amount": "1.00", "invoice_id": "i"}),
            "AP",
        ),
        ("POST", format!("{a}/tokens"), json!({}), "AP"),
        (
            "POST",
            format!("{p}/withdrawals/{w}/paid"),
            json!({"reference": "r"}),
            "A",
        ),
        (
            "POST",
            format!("{p}/withdrawals/{w}/reject"),
            json!({"reason": "r"}),
            "A",
        ),
        (
            "POST",
            format!("{p}/clicks"),
            json!({"referral_code": "nope"}),
            "AI",
        ),
        (
            "POST",
            format!("{p}/signups"),
            json!({"customer_id": "c-1"}),
            "AI",
        ),
        (
            "POST",
            format!("{p}/expenses"),
            json!({"id": "e", "customer_id": "c", "amount": "1.00", "currency": "USD"}),
            "AI",
        ),
        (
            "POST",
            format!("{p}/payments"),
            json!({"id": "p", "customer_id": "c", "amount": "1.00", "currency": "USD"}),
            "AI",
        ),
        (
            "POST",
            format!("{p}/refunds"),
            json!({"id": "r", "customer_id": "c", "refunds": "e", "amount": "1.00", "currency": "USD"}),
            "AI",
        ),
        ("POST", format!("{p}/batch"), json!({"items": []}), "AI"),
        ("POST", format!("{p}/customers/c/close"), json!({}), "AI"),
        (
            "POST",
            format!("{p}/customers/c/group"),
            json!({"group": "g"}),
            "AI",
        ),
        (
            "POST",
            format!("{p}/customers/c/reassign"),
            json!({"to": "bob", "reason": "r"}),
            "A",
        ),
        ("POST", format!("{p}/months/2026-07/close"), json!({}), "A"),
        ("POST", format!("{p}/replays"), json!({}), "A"),
        ("GET", format!("{p}/replays/{w}"), Value::Null, "A"),
        (
            "POST",
            format!("{p}/replays/{w}/apply"),
            json!({"reason": "r"}),
            "A",
        ),
        ("GET", "/v1/events".into(), Value::Null, "A"),
        ("GET", "/v1/verify".into(), Value::Null, "A"),
    ];
    let callers: Vec<(char, Option<&str>)> = vec![
        ('-', None),
        ('A', Some(&app.admin)),
        ('I', Some(&app.ingest)),
        ('P', Some(&app.portal)),
        ('T', Some(&own)),
        ('O', Some(&other)),
    ];
    for (method, path, body, allowed) in &endpoints {
        for (who, key) in &callers {
            let response = if *method == "GET" {
                app.get(*key, path)
            } else {
                app.send(method, *key, path, body, None)
            };
            let status = response.status().as_u16();
            let expected_denied = match who {
                '-' => Some(401),
                'O' => Some(403), // bob's token never acts for alice, nor elsewhere
                role if allowed.contains(*role) => None,
                _ => Some(403),
            };
            match expected_denied {
                Some(denied) => assert_eq!(status, denied, "{method} {path} as {who}"),
                None => assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {who}: {status}"
                ),
            }
        }
    }
}

/// The bodies of the read endpoints, as billing portals see them.
#[test]
fn read_endpoint_bodies() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice", "customer_id": "c-alice", "group": "resellers", "rate": "30"}));
    let code = alice["referral_code"].as_str().unwrap();
    app.click("hosting", json!({"referral_code": code, "visitor": "v-1", "creative": "banner-1", "at": "2026-08-01T10:00:00Z"}));
    app.click("hosting", json!({"referral_code": code, "visitor": "v-2", "creative": "text", "at": "2026-08-02T10:00:00Z"}));
    app.signup(
        "hosting",
        json!({"customer_id": "cust-1", "visitor": "v-1", "at": "2026-08-02T11:00:00Z"}),
    );
    app.expense("hosting", json!({"id": "inv-7-1", "customer_id": "cust-1", "amount": "100.00", "currency": "USD", "product": "shared-hosting", "order_id": "o-7", "at": "2026-08-03T10:00:00Z"}));
    app.expense("hosting", json!({"id": "inv-7-2", "customer_id": "cust-1", "amount": "12.00", "currency": "USD", "product": "domains", "at": "2026-08-03T10:00:00Z"}));
    app.refund("hosting", json!({"id": "cn-3", "customer_id": "cust-1", "refunds": "inv-7-1", "amount": "25.00", "currency": "USD", "at": "2026-08-20T10:00:00Z"}));
    app.set_now("2026-09-01T06:00:00Z");
    app.close("hosting", "2026-08");
    let a = "/v1/programs/hosting/affiliates/alice";
    let read = |path: &str| app.get(Some(&app.portal), path).json::<Value>().unwrap();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| {
        insta::assert_json_snapshot!("api_affiliate", read(a), {".referral_code" => "[code]", ".referral_link" => "[link]"});
        insta::assert_json_snapshot!("api_balance", read(&format!("{a}/balance")));
        insta::assert_json_snapshot!("api_statement", read(&format!("{a}/statements/2026-08")), {".log_hash" => "[hash]"});
        insta::assert_json_snapshot!("api_stats_by_day", read(&format!("{a}/stats?from=2026-08-01&to=2026-08-31&by=day")));
        insta::assert_json_snapshot!("api_referrals", read(&format!("{a}/referrals?sort=-commission")));
    });
}

#[test]
fn the_openapi_document_is_served_and_committed() {
    let generated = commission_ledger::api::openapi();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/openapi.json");
    let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == text,
        "schemas/openapi.json drifted from the handlers: run `UPDATE_SCHEMAS=1 cargo test` and commit"
    );
    let app = TestApp::start();
    let served: Value = app.get(None, "/openapi.json").json().unwrap();
    assert_eq!(served, generated);
    assert_eq!(served["openapi"], "3.1.0");
    // every path the router serves is described, with its methods
    for (path, method) in [
        (
            "/v1/programs/{program}/affiliates/{affiliate}/balance",
            "get",
        ),
        ("/v1/programs/{program}/expenses", "post"),
        ("/v1/programs/{program}", "put"),
        ("/r/{code}", "get"),
    ] {
        assert!(served["paths"][path][method].is_object(), "{method} {path}");
    }
    // and every $ref points at a schema that is there
    let text = served.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap();
        assert!(
            served["components"]["schemas"][name].is_object(),
            "dangling $ref to {name}"
        );
    }
    // what the public reads answer is the media type documented for them
    for path in ["/healthz", "/readyz", "/metrics", "/px.gif"] {
        let answer = app.get(None, path);
        let essence = |media: &str| media.split(';').next().unwrap().trim().to_string();
        let served_type = essence(answer.headers()["content-type"].to_str().unwrap());
        let documented = &served["paths"][path]["get"]["responses"]["200"]["content"];
        assert!(
            documented
                .as_object()
                .unwrap()
                .keys()
                .any(|media| essence(media) == served_type),
            "{path}: {served_type} is not among {documented}"
        );
    }
}

/// A portal pages through a busy affiliate's referrals while signups go
/// on: each page starts after the last row of the page before, by its sort
/// key and customer id, so a signup between two pages neither repeats a
/// row nor skips one, and the pages of every sort add up to the list; a
/// commission that changes between pages does not move a row when the
/// later pages are read as of the first's `as_of_seq`.
#[test]
fn referral_pages_follow_the_last_row_so_a_signup_between_them_repeats_none() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap().to_string();
    let refer = |customer: &str, day: u32, billed: Option<&str>| {
        let (visitor, at) = (
            format!("v-{customer}"),
            format!("2026-03-{day:02}T10:00:00Z"),
        );
        app.click(
            "hosting",
            json!({"referral_code": code, "visitor": visitor, "at": at}),
        );
        let (status, signup) = app.signup(
            "hosting",
            json!({"customer_id": customer, "visitor": visitor, "at": at}),
        );
        assert_eq!((status, &signup["attributed"]), (201, &json!(true)));
        if let Some(amount) = billed {
            let (status, _) = app.expense(
                "hosting",
                json!({"id": format!("inv-{customer}"), "customer_id": customer,
                       "amount": amount, "currency": "USD", "at": at}),
            );
            assert_eq!(status, 201);
        }
    };
    // c-2 and c-3 bill alike: their commissions tie, and the id orders them.
    refer("c-1", 1, Some("10.00"));
    refer("c-2", 2, Some("50.00"));
    refer("c-3", 3, Some("50.00"));
    refer("c-4", 4, None);
    refer("c-5", 5, Some("5.00"));
    app.set_now("2026-04-02T00:00:00Z");
    assert_eq!(app.close("hosting", "2026-03").0, 200);
    let referrals = "/v1/programs/hosting/affiliates/alice/referrals";
    let page = |query: &str| -> Value {
        let response = app.get(Some(&app.portal), &format!("{referrals}?{query}"));
        assert_eq!(response.status().as_u16(), 200, "{query}");
        response.json().unwrap()
    };
    let ids = |page: &Value| -> Vec<String> {
        page["referrals"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["customer_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&page("sort=-commission")),
        ["c-2", "c-3", "c-1", "c-5", "c-4"]
    );
    for sort in ["-signup", "signup", "-commission", "commission", "-billed"] {
        let whole = ids(&page(&format!("sort={sort}")));
        let (mut walked, mut pages) = (Vec::new(), 0);
        let mut next = page(&format!("sort={sort}&limit=2"));
        loop {
            walked.extend(ids(&next));
            pages += 1;
            assert!(pages <= 3, "sort={sort}: {walked:?}");
            let Some(cursor) = next["next_cursor"].as_str() else {
                break;
            };
            next = page(&format!("sort={sort}&limit=2&cursor={cursor}"));
        }
        assert_eq!((walked, pages), (whole, 3), "sort={sort}");
    }
    let first = page("limit=2");
    assert_eq!(ids(&first), ["c-5", "c-4"]);
    app.set_now("2026-04-03T10:00:00Z");
    refer("c-6", 6, None);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = page(&format!("limit=2&cursor={cursor}"));
    assert_eq!(
        (ids(&second), second["total"].as_u64()),
        (vec!["c-3".to_string(), "c-2".to_string()], Some(6))
    );
    // A cursor of earlier versions counted rows: still read as that.
    assert_eq!(ids(&page("limit=2&cursor=o1")), ["c-5", "c-4"]);
    // Sorted by commission, a row whose commission changes between two
    // pages can cross the boundary; the pages after the first, read as of
    // its `as_of_seq`, show the list as it was then.
    let top = page("sort=-commission&limit=2");
    assert_eq!(ids(&top), ["c-2", "c-3"]);
    let seq = top["as_of_seq"].as_u64().unwrap();
    let (status, _) = app.expense(
        "hosting",
        json!({"id": "inv-c-5-april", "customer_id": "c-5", "amount": "1000.00",
               "currency": "USD", "at": "2026-04-03T11:00:00Z"}),
    );
    assert_eq!(status, 201);
    app.set_now("2026-05-02T00:00:00Z");
    assert_eq!(app.close("hosting", "2026-04").0, 200);
    let after = top["next_cursor"].as_str().unwrap();
    let now = page(&format!("sort=-commission&limit=10&cursor={after}"));
    assert_eq!(
        ids(&now),
        ["c-1", "c-4", "c-6"],
        "c-5 moved before the cursor"
    );
    assert!(now["as_of_seq"].as_u64().unwrap() > seq);
    let then = page(&format!(
        "sort=-commission&limit=10&cursor={after}&as_of={seq}"
    ));
    assert_eq!(ids(&then), ["c-1", "c-5", "c-4", "c-6"]);
    assert_eq!(then["as_of_seq"].as_u64(), Some(seq));
    // The statistics beside them name the position they were read at too.
    let april = |as_of: &str| -> Value {
        let path = "/v1/programs/hosting/affiliates/alice/stats";
        let response = app.get(
            Some(&app.portal),
            &format!("{path}?from=2026-04-01&to=2026-04-30{as_of}"),
        );
        assert_eq!(response.status().as_u16(), 200, "{as_of}");
        response.json().unwrap()
    };
    let (before, after) = (april(&format!("&as_of={seq}")), april(""));
    assert_eq!(
        (&before["as_of_seq"], &before["commission"]),
        (&json!(seq), &json!("0.00"))
    );
    assert_eq!(after["commission"], "200.00");
    assert!(after["as_of_seq"].as_u64().unwrap() > seq);
    for (query, detail) in [
        (format!("sort=commission&cursor={cursor}"), "sort=-signup"),
        ("cursor=nonsense".to_string(), "gave out"),
        ("cursor=-signup~soon~c-1".to_string(), "gave out"),
        ("cursor=o-1".to_string(), "gave out"),
    ] {
        let refused = app.get(Some(&app.portal), &format!("{referrals}?{query}"));
        assert_eq!(refused.status().as_u16(), 422, "{query}");
        let problem: Value = refused.json().unwrap();
        let text = problem["detail"].as_str().unwrap();
        assert!(
            text.contains("cursor") && text.contains(detail),
            "{query}: {text}"
        );
    }
}

#[test]
fn a_query_string_leaves_blank_fields_out_and_names_a_bad_one() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let admin = Some(app.admin.as_str());
    // a form's blank fields are as if left out
    let referrals = "/v1/programs/hosting/affiliates/alice/referrals";
    let blank = app.get(
        admin,
        &format!("{referrals}?q=&sort=&limit=&cursor=&as_of="),
    );
    assert_eq!(blank.status().as_u16(), 200);
    assert_eq!(
        blank.json::<Value>().unwrap(),
        app.get(admin, referrals).json::<Value>().unwrap()
    );
    let events = app.get(admin, "/v1/events?after=&limit=&program=&type=");
    assert_eq!(events.status().as_u16(), 200);
    let balance = "/v1/programs/hosting/affiliates/alice/balance";
    assert_eq!(
        app.get(admin, &format!("{balance}?as_of="))
            .status()
            .as_u16(),
        200
    );
    // a value that does not read is a 400 that names its field
    for (path, field) in [
        (format!("{referrals}?q=x&limit=ten"), "limit"),
        ("/v1/events?after=-1".to_string(), "after"),
    ] {
        let refused = app.get(admin, &path);
        assert_eq!(refused.status().as_u16(), 400, "{path}");
        let problem: Value = refused.json().unwrap();
        assert_eq!(
            problem["type"],
            "https://commission-ledger.dev/problems/malformed"
        );
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{path}: {detail}");
    }
    // a visitor's link whose query does not read still goes to the site
    let client = visitor();
    let link = client.get(app.url("/r/nope?to=/a&to=/b")).send().unwrap();
    assert_eq!(link.status().as_u16(), 302);
    assert_eq!(
        link.headers()["location"],
        "https://provider.example/signup"
    );
}

#[test]
fn every_response_carries_a_request_id() {
    let app = TestApp::start();
    let made = app.get(None, "/healthz");
    let id = made.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    let kept = app
        .client
        .get(app.url("/v1/nothing"))
        .header("x-request-id", "portal-42")
        .send()
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "portal-42");
    assert_eq!(kept.status().as_u16(), 404);
}

/// Every write endpoint gets malformed JSON, a wrong type and an unknown
/// field: each a 400 problem, and the log does not grow.
#[test]
fn every_write_endpoint_refuses_malformed_bodies() {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let p = "/v1/programs/hosting";
    let a = "/v1/programs/hosting/affiliates/alice";
    let w = "00000000-0000-7000-8000-000000000000";
    // (method, path, a field to send with the wrong type)
    let endpoints: Vec<(&str, String, &str)> = vec![
        ("PUT", p.to_string(), "default_rate"),
        ("POST", format!("{p}/affiliates"), "affiliate_id"),
        ("POST", format!("{a}/withdrawals"), "amount"),
        ("POST", format!("{a}/credits"), "amount"),
        ("POST", format!("{a}/tokens"), "ttl_seconds"),
        ("POST", format!("{p}/withdrawals/{w}/paid"), "reference"),
        ("POST", format!("{p}/withdrawals/{w}/reject"), "reason"),
        ("POST", format!("{p}/clicks"), "referral_code"),
        ("POST", format!("{p}/signups"), "customer_id"),
        ("POST", format!("{p}/expenses"), "amount"),
        ("POST", format!("{p}/payments"), "amount"),
        ("POST", format!("{p}/refunds"), "amount"),
        ("POST", format!("{p}/batch"), "items"),
        ("POST", format!("{p}/customers/c-1/close"), "reason"),
        ("POST", format!("{p}/customers/c-1/group"), "group"),
        ("POST", format!("{p}/customers/c-1/reassign"), "to"),
    ];
    let head = app.head();
    for (method, path, field) in &endpoints {
        let wrong_type = json!({ *field: {"nested": [1, 2]} });
        let unknown = json!({"surprise": true});
        for body in [wrong_type, unknown] {
            let response = app.send(method, Some(&app.admin), path, &body, None);
            assert_eq!(response.status().as_u16(), 400, "{method} {path} {body}");
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let problem: Value = response.json().unwrap();
            assert_eq!(
                problem["type"], "https://commission-ledger.dev/problems/malformed",
                "{method} {path} {body}"
            );
        }
        let response = app
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                app.url(path),
            )
            .bearer_auth(&app.admin)
            .header("content-type", "application/json")
            .body("{\"truncated\": ")
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{method} {path} truncated");
    }
    assert_eq!(app.head(), head, "nothing was appended");
}

/// The WHMCS story (seed 001) over HTTP: payments basis, the $50.00 mark,
/// "Request Withdrawal", and the referral list with its filters.
#[test]
fn whmcs_over_http() {
    let app = TestApp::start();
    let mut rules = hosting_rules();
    rules["id"] = json!("whmcs");
    rules["basis"] = json!("payments");
    rules["default_rate"] = json!("10");
    rules["timezone"] = json!("America/New_York");
    rules["product_rates"] = json!({});
    assert_eq!(app.put_program("whmcs", rules).0, 200);
    let (_, pat) = app.enroll("whmcs", json!({"affiliate_id": "pat"}));
    let code = pat["referral_code"].as_str().unwrap().to_string();
    for (customer, visitor) in [("w-1", "v1"), ("w-2", "v2"), ("w-3", "v3")] {
        app.click(
            "whmcs",
            json!({"referral_code": code, "visitor": visitor, "at": "2026-08-02T15:00:00Z"}),
        );
        assert_eq!(
            app.signup(
                "whmcs",
                json!({"customer_id": customer, "visitor": visitor, "at": "2026-08-03T15:00:00Z"})
            )
            .1["affiliate_id"],
            "pat"
        );
    }
    let pay = |id: &str, customer: &str, amount: &str, at: &str| {
        app.post(&app.ingest, "/v1/programs/whmcs/payments", json!({"id": id, "customer_id": customer, "amount": amount, "currency": "USD", "at": at})).0
    };
    assert_eq!(app.expense("whmcs", json!({"id": "inv-1", "customer_id": "w-1", "amount": "300.00", "currency": "USD", "at": "2026-08-09T15:00:00Z"})).0, 201);
    assert_eq!(pay("pay-1", "w-1", "300.00", "2026-08-10T15:00:00Z"), 201); // 30.00
    assert_eq!(pay("pay-2", "w-2", "150.00", "2026-08-12T15:00:00Z"), 201); // 15.00
    app.set_now("2026-09-01T12:00:00Z");
    assert_eq!(app.close("whmcs", "2026-08").1["total"], "45.00");
    let balance = app.balance("whmcs", "pat");
    assert_eq!(
        (balance["earned"].as_str(), balance["to_threshold"].as_str()),
        (Some("45.00"), Some("5.00"))
    );
    assert_eq!(
        app.withdraw("whmcs", "pat", "45.00").1["type"],
        "https://commission-ledger.dev/problems/below-threshold"
    );
    assert_eq!(pay("pay-3", "w-1", "100.00", "2026-09-03T15:00:00Z"), 201); // 10.00
    app.set_now("2026-10-01T12:00:00Z");
    app.close("whmcs", "2026-09");
    let (status, withdrawal) = app.withdraw("whmcs", "pat", "55.00");
    assert_eq!(status, 201);
    let id = withdrawal["withdrawal_id"].as_str().unwrap();
    let (status, paid) = app.post(
        &app.admin,
        &format!("/v1/programs/whmcs/withdrawals/{id}/paid"),
        json!({"reference": "PayPal"}),
    );
    assert_eq!((status, paid["status"].as_str()), (200, Some("paid")));
    let balance = app.balance("whmcs", "pat");
    assert_eq!(
        (
            balance["earned"].as_str(),
            balance["withdrawn_total"].as_str()
        ),
        (Some("0.00"), Some("55.00"))
    );
    app.post(
        &app.ingest,
        "/v1/programs/whmcs/customers/w-2/close",
        json!({"reason": "cancelled"}),
    );
    let list: Value = app
        .get(
            Some(&app.portal),
            "/v1/programs/whmcs/affiliates/pat/referrals?sort=-commission&limit=2",
        )
        .json()
        .unwrap();
    let ids: Vec<&str> = list["referrals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!((ids, list["total"].as_u64()), (vec!["w-1", "w-2"], Some(3)));
    let next: Value = app
        .get(
            Some(&app.portal),
            &format!(
                "/v1/programs/whmcs/affiliates/pat/referrals?sort=-commission&limit=2&cursor={}",
                list["next_cursor"].as_str().unwrap()
            ),
        )
        .json()
        .unwrap();
    assert_eq!(next["referrals"][0]["customer_id"], "w-3");
    let closed: Value = app
        .get(
            Some(&app.portal),
            "/v1/programs/whmcs/affiliates/pat/referrals?status=closed",
        )
        .json()
        .unwrap();
    assert_eq!(
        (
            closed["total"].as_u64(),
            closed["referrals"][0]["commission"].as_str()
        ),
        (Some(1), Some("15.00"))
    );
    let statement = app.statement("whmcs", "pat", "2026-10");
    assert_eq!(
        (
            statement["lines"][0]["kind"].as_str(),
            statement["lines"][0]["amount"].as_str()
        ),
        (Some("withdrawal"), Some("-55.00"))
    );
}

fn rules_for(id: &str, changes: Value) -> Value {
    let mut rules = hosting_rules();
    rules["id"] = json!(id);
    for (key, value) in changes.as_object().unwrap() {
        rules[key] = value.clone();
    }
    rules
}

/// H-Sphere (seed 000) over HTTP: the signup goes to both affiliate servers
/// (two programs); only the one holding the visitor's click acts.
#[test]
fn h_sphere_over_http() {
    let app = TestApp::start();
    for id in ["server-a", "server-b"] {
        app.put_program(id, rules_for(id, json!({"default_rate": "15", "cookie_days": 45, "attribution": "first_click", "timezone": "America/Chicago", "product_rates": {}})));
        app.enroll(id, json!({"affiliate_id": "webmaster"}));
    }
    let code: String = app
        .get(
            Some(&app.portal),
            "/v1/programs/server-a/affiliates/webmaster",
        )
        .json::<Value>()
        .unwrap()["referral_code"]
        .as_str()
        .unwrap()
        .into();
    app.click("server-a", json!({"referral_code": code, "visitor": "cookie-1", "creative": "banner-468x60", "at": "2026-08-10T15:00:00Z"}));
    let a = app.signup(
        "server-a",
        json!({"customer_id": "h-1", "visitor": "cookie-1", "at": "2026-08-12T10:00:00Z"}),
    );
    let b = app.signup(
        "server-b",
        json!({"customer_id": "h-1", "visitor": "cookie-1", "at": "2026-08-12T10:00:00Z"}),
    );
    assert_eq!((a.0, b), (201, (200, json!({"attributed": false}))));
    app.expense("server-a", json!({"id": "hs-1", "customer_id": "h-1", "amount": "39.95", "currency": "USD", "product": "hosting", "at": "2026-08-15T12:00:00Z"}));
    app.expense("server-a", json!({"id": "hs-2", "customer_id": "h-1", "amount": "89.95", "currency": "USD", "product": "ssl-128", "at": "2026-08-15T12:00:00Z"}));
    app.set_now("2026-09-01T12:00:00Z");
    assert_eq!(app.close("server-a", "2026-08").1["total"], "19.48"); // 5.99 + 13.49
    assert_eq!(app.close("server-b", "2026-08").1["total"], "0.00");
    let stats: Value = app.get(Some(&app.portal), "/v1/programs/server-a/affiliates/webmaster/stats?from=2026-08-01&to=2026-08-31&by=creative").json().unwrap();
    assert_eq!(
        (
            stats["clicks"].as_u64(),
            stats["conversions"].as_u64(),
            stats["commission"].as_str()
        ),
        (Some(1), Some(1), Some("19.48"))
    );
}

/// Host.bg (seed 002) over HTTP, in leva: one-time commission on the first
/// order, then commission paying the partner's own invoice.
#[test]
fn host_bg_over_http() {
    let app = TestApp::start();
    app.put_program("hostbg", rules_for("hostbg", json!({"currency": "BGN", "timezone": "Europe/Sofia", "default_rate": "10", "term": {"kind": "first_order"}, "payout_threshold": "100.00", "product_rates": {}})));
    let (_, partner) = app.enroll(
        "hostbg",
        json!({"affiliate_id": "p-1007", "customer_id": "c-1007"}),
    );
    app.click("hostbg", json!({"referral_code": partner["referral_code"], "visitor": "v-b1", "at": "2026-08-01T08:00:00Z"}));
    app.signup(
        "hostbg",
        json!({"customer_id": "b-1", "visitor": "v-b1", "at": "2026-08-01T09:00:00Z"}),
    );
    let line = |id: &str, amount: &str, order: &str, at: &str| json!({"id": id, "customer_id": "b-1", "amount": amount, "currency": "BGN", "order_id": order, "at": at});
    app.expense(
        "hostbg",
        line("f-1", "120.00", "o-1", "2026-08-01T10:00:00Z"),
    );
    app.expense(
        "hostbg",
        line("f-2", "20.00", "o-1", "2026-08-01T10:00:00Z"),
    );
    app.expense(
        "hostbg",
        line("f-3", "120.00", "o-2", "2026-08-20T10:00:00Z"),
    );
    let (status, problem) = app.expense(
        "hostbg",
        json!({"id": "f-4", "customer_id": "b-1", "amount": "1.00", "currency": "USD"}),
    );
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            422,
            Some("https://commission-ledger.dev/problems/currency-mismatch")
        )
    );
    app.set_now("2026-09-01T12:00:00Z");
    assert_eq!(app.close("hostbg", "2026-08").1["total"], "14.00");
    let (status, _) = app.post(
        &app.portal,
        "/v1/programs/hostbg/affiliates/p-1007/credits",
        json!({"amount": "14.00", "invoice_id": "inv-p-1007-09"}),
    );
    assert_eq!(status, 201);
    let balance = app.balance("hostbg", "p-1007");
    assert_eq!(
        (
            balance["currency"].as_str(),
            balance["earned"].as_str(),
            balance["credited_total"].as_str()
        ),
        (Some("BGN"), Some("0.00"), Some("14.00"))
    );
}

/// Yourhosting (seed 003) over HTTP, in euro: kickback per participating
/// product, once the customer has paid.
#[test]
fn yourhosting_over_http() {
    let app = TestApp::start();
    app.put_program("yourhosting", rules_for("yourhosting", json!({"currency": "EUR", "basis": "payments", "default_rate": "0", "product_rates": {"webhosting": "15", "domains": "5"}, "payout_threshold": "0.00", "promo_code_template": null})));
    let (_, friend) = app.enroll("yourhosting", json!({"affiliate_id": "klant-42"}));
    assert_eq!(friend["promo_code"], Value::Null);
    app.click("yourhosting", json!({"referral_code": friend["referral_code"], "visitor": "v-y1", "at": "2026-08-03T18:00:00Z"}));
    app.signup(
        "yourhosting",
        json!({"customer_id": "y-1", "visitor": "v-y1", "at": "2026-08-03T18:10:00Z"}),
    );
    let pay = |id: &str, amount: &str, product: &str| {
        app.post(&app.ingest, "/v1/programs/yourhosting/payments", json!({"id": id, "customer_id": "y-1", "amount": amount, "currency": "EUR", "product": product, "at": "2026-08-04T09:00:00Z"})).0
    };
    assert_eq!(
        (
            pay("p-1", "60.00", "webhosting"),
            pay("p-2", "10.00", "domains"),
            pay("p-3", "100.00", "vps")
        ),
        (201, 201, 201)
    );
    app.set_now("2026-08-31T12:00:00Z");
    assert_eq!(app.balance("yourhosting", "klant-42")["pending"], "9.50");
    app.set_now("2026-09-01T12:00:00Z");
    assert_eq!(app.close("yourhosting", "2026-08").1["total"], "9.50");
    let (status, w) = app.withdraw("yourhosting", "klant-42", "9.50");
    assert_eq!(status, 201);
    let id = w["withdrawal_id"].as_str().unwrap();
    assert_eq!(
        app.post(
            &app.admin,
            &format!("/v1/programs/yourhosting/withdrawals/{id}/paid"),
            json!({"reference": "SEPA"})
        )
        .0,
        200
    );
    assert_eq!(
        app.post(
            &app.admin,
            &format!("/v1/programs/yourhosting/withdrawals/{id}/paid"),
            json!({"reference": "again"})
        )
        .1["type"],
        "https://commission-ledger.dev/problems/withdrawal-settled"
    );
    assert_eq!(
        app.balance("yourhosting", "klant-42")["withdrawn_total"],
        "9.50"
    );
}

/// The operator's walk-through of the README: a customer credited to the
/// wrong affiliate for three closed months, fixed by a replay over HTTP.
#[test]
fn a_wrong_attribution_fixed_by_a_replay_over_http() {
    let app = cust_1_by_alices_link();
    for (id, at, amount) in [
        ("inv-8", "2026-08-10T12:00:00Z", "100.00"),
        ("inv-9", "2026-09-10T12:00:00Z", "50.00"),
        ("inv-10", "2026-10-10T12:00:00Z", "80.00"),
    ] {
        app.expense("hosting", json!({"id": id, "customer_id": "cust-1", "amount": amount, "currency": "USD", "at": at}));
        let month = &at[..7];
        app.set_now(&format!("{}-05T00:00:00Z", next_month(month)));
        assert_eq!(app.close("hosting", month).0, 200);
    }
    assert_eq!(app.balance("hosting", "alice")["earned"], "46.00");
    let closed_before = app.statement("hosting", "alice", "2026-08");
    let head = app.head();

    // Bad overrides: a problem, nothing computed or appended.
    let p = "/v1/programs/hosting";
    let (status, problem) = app.post(&app.admin, &format!("{p}/replays"), json!({"overrides": {"attribution": [{"customer_id": "cust-1", "affiliate_id": "nobody"}]}}));
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            404,
            Some("https://commission-ledger.dev/problems/unknown-affiliate")
        )
    );
    let (status, problem) = app.post(
        &app.admin,
        &format!("{p}/replays"),
        json!({"overrides": {"exclude": "all"}}),
    );
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            400,
            Some("https://commission-ledger.dev/problems/malformed")
        )
    );

    let (status, replay) = app.post(
        &app.admin,
        &format!("{p}/replays"),
        json!({"overrides": {"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}}),
    );
    assert_eq!(status, 201, "{replay}");
    assert_eq!(app.head(), head, "a replay writes nothing");
    assert_eq!(replay["at_seq"], head);
    assert_eq!(replay["diff"]["total_change"], "0.00");
    let changes: Vec<(String, String, String)> = replay["diff"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["affiliate_id"].as_str().unwrap().into(),
                r["month"].as_str().unwrap().into(),
                r["change"].as_str().unwrap().into(),
            )
        })
        .collect();
    let row = |a: &str, m: &str, c: &str| (a.to_string(), m.to_string(), c.to_string());
    assert_eq!(
        changes,
        vec![
            row("alice", "2026-08", "-20.00"),
            row("alice", "2026-09", "-10.00"),
            row("alice", "2026-10", "-16.00"),
            row("bob", "2026-08", "20.00"),
            row("bob", "2026-09", "10.00"),
            row("bob", "2026-10", "16.00"),
        ]
    );
    let id = replay["replay_id"].as_str().unwrap().to_string();
    let path = format!("{p}/replays/{id}");
    let got: Value = app.get(Some(&app.admin), &path).json().unwrap();
    assert_eq!(got["diff"], replay["diff"]);
    let csv = app
        .client
        .get(app.url(&path))
        .bearer_auth(&app.admin)
        .header("Accept", "text/csv")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(csv.starts_with("affiliate_id,month,kind,customer_id,line,basis,rate_before,rate_after,before,after,change\n"), "{csv}");
    assert!(
        csv.contains("alice,2026-08,reward,cust-1,inv-8,100.00,20,,20.00,0.00,-20.00\n"),
        "{csv}"
    );
    let html = app
        .client
        .get(app.url(&path))
        .bearer_auth(&app.admin)
        .header("Accept", "text/html")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        html.contains("<h1>What-if replay") && html.contains("-16.00"),
        "{html}"
    );
    assert_eq!(
        app.get(
            Some(&app.admin),
            &format!("{p}/replays/00000000-0000-7000-8000-000000000000")
        )
        .status()
        .as_u16(),
        404
    );

    // Apply needs a reason; then appends the adjustments once.
    app.set_now("2026-11-06T09:00:00Z");
    let (status, problem) = app.post(&app.admin, &format!("{path}/apply"), json!({"reason": " "}));
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            422,
            Some("https://commission-ledger.dev/problems/invalid-value")
        )
    );
    let (status, applied) = app.post(
        &app.admin,
        &format!("{path}/apply"),
        json!({"reason": "ticket 4411"}),
    );
    assert_eq!(status, 201, "{applied}");
    assert_eq!(applied["adjustments"].as_array().unwrap().len(), 6);
    assert_eq!(app.balance("hosting", "alice")["earned"], "0.00");
    assert_eq!(app.balance("hosting", "bob")["earned"], "46.00");
    let (status, again) = app.post(
        &app.admin,
        &format!("{path}/apply"),
        json!({"reason": "ticket 4411"}),
    );
    assert_eq!(
        (status, again["already_applied"].as_bool()),
        (200, Some(true))
    );
    assert_eq!(
        app.statement("hosting", "alice", "2026-08")["lines"],
        closed_before["lines"]
    );
    let open = app.statement("hosting", "bob", "2026-11");
    let amounts: Vec<&str> = open["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, vec!["20.00", "10.00", "16.00"]);
    assert_eq!(open["lines"][0]["kind"], "adjustment");

    // The audit trail: the events this replay caused, and only those.
    let caused: Value = app
        .get(Some(&app.admin), &format!("/v1/events?cause=replay:{id}"))
        .json()
        .unwrap();
    let types: Vec<&str> = caused["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 8);
    assert_eq!(types[..2], ["ReplayApplied", "ReplayCorrected"]);
    assert!(types[2..].iter().all(|t| *t == "AdjustmentPosted"));
    let actor = caused["events"][0]["actor"].as_str().unwrap();
    assert!(
        actor.starts_with("k-"),
        "the admin key that applied it: {actor}"
    );
    // The corrected world: whose each of cust-1's three rewards is now.
    let corrected = &caused["events"][1]["data"];
    assert_eq!(corrected["lines"].as_array().unwrap().len(), 3);
    assert_eq!(
        corrected["lines"][0]["state"]["closed"]["reward"]["affiliate_id"],
        "bob"
    );
    assert_eq!(caused["events"][2]["data"]["reason"], "ticket 4411");
    assert_eq!(
        app.get(Some(&app.admin), "/v1/events?cause=nonsense")
            .status()
            .as_u16(),
        422
    );
    let verify: Value = app.get(Some(&app.admin), "/v1/verify").json().unwrap();
    assert_eq!(verify["ok"], true);
}

/// A stale replay: money of the program moved in a way that changes it.
#[test]
fn applying_a_replay_the_log_moved_under_is_a_conflict() {
    let app = cust_1_by_alices_link();
    app.expense("hosting", json!({"id": "inv-8", "customer_id": "cust-1", "amount": "100.00", "currency": "USD", "at": "2026-08-10T12:00:00Z"}));
    app.set_now("2026-09-02T00:00:00Z");
    app.close("hosting", "2026-08");
    let p = "/v1/programs/hosting";
    let (_, replay) = app.post(
        &app.admin,
        &format!("{p}/replays"),
        json!({"overrides": {"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}}),
    );
    let id = replay["replay_id"].as_str().unwrap();
    app.expense("hosting", json!({"id": "inv-9", "customer_id": "cust-1", "amount": "50.00", "currency": "USD", "at": "2026-09-10T12:00:00Z"}));
    app.set_now("2026-10-02T00:00:00Z");
    app.close("hosting", "2026-09");
    let head = app.head();
    let (status, problem) = app.post(
        &app.admin,
        &format!("{p}/replays/{id}/apply"),
        json!({"reason": "ticket 1"}),
    );
    assert_eq!(
        (status, problem["type"].as_str()),
        (
            409,
            Some("https://commission-ledger.dev/problems/replay-stale")
        ),
        "{problem}"
    );
    assert_eq!(app.head(), head, "nothing appended");
}

/// alice and bob in `hosting`; cust-1 signed up through alice's link.
fn cust_1_by_alices_link() -> TestApp {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    app.enroll("hosting", json!({"affiliate_id": "bob"}));
    let code = alice["referral_code"].as_str().unwrap();
    app.cust_1_follows(
        "hosting",
        code,
        "2026-08-03T10:00:00Z",
        "2026-08-03T10:05:00Z",
    );
    app
}

fn next_month(month: &str) -> String {
    let (y, m): (i32, u32) = (month[..4].parse().unwrap(), month[5..].parse().unwrap());
    if m == 12 {
        format!("{}-01", y + 1)
    } else {
        format!("{y}-{:02}", m + 1)
    }
}

/// Reads of the past replay the log and take turns; past the waiting
/// limit a read is answered 503 `busy` with `Retry-After`, and the others
/// get their answer.
/// `callers` requests made at once (released together), the i-th by
/// `request(i)`: the status, `Retry-After` and body of each, in order.
fn at_once(
    callers: usize,
    request: impl Fn(usize) -> Response + Sync,
) -> Vec<(u16, Option<String>, Value)> {
    let barrier = std::sync::Barrier::new(callers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..callers)
            .map(|i| {
                let (request, barrier) = (&request, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    let response = request(i);
                    let retry = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    (response.status().as_u16(), retry, response.json().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// alice enrolled, then 20,000 clicks: a log long enough that one replay
/// of it outlasts the arrival of a crowd of callers.
fn a_long_log() -> TestApp {
    let app = TestApp::start();
    app.put_program("hosting", hosting_rules());
    let (_, alice) = app.enroll("hosting", json!({"affiliate_id": "alice"}));
    let code = alice["referral_code"].as_str().unwrap();
    app.set_now("2026-08-10T00:00:00Z");
    for round in 0..2 {
        let items: Vec<Value> = (0..10_000)
            .map(|i| json!({"type": "click", "referral_code": code, "visitor": format!("v-{round}-{i}"), "at": "2026-08-02T10:00:00Z"}))
            .collect();
        let response = app.send(
            "POST",
            Some(&app.ingest),
            "/v1/programs/hosting/batch",
            &json!({"items": items}),
            None,
        );
        assert_eq!(response.status().as_u16(), 200);
    }
    app
}

/// Verifications and what-if replays each read the whole log into a state
/// of their own: they take turns, and beyond the waiting limit the answer
/// is 503 busy, for both kinds alike.
#[test]
fn verifications_and_what_if_replays_take_turns_and_answer_503_when_too_many_wait() {
    use commission_ledger::ledger::WHOLE_LOG_WAITING;
    let app = a_long_log();
    let callers = WHOLE_LOG_WAITING + 8;
    let mut busy = 0;
    let mut rounds = 0;
    // A round whose jobs all end before the others arrive (a loaded
    // machine) proves nothing: up to five rounds.
    while busy == 0 && rounds < 5 {
        rounds += 1;
        let answers = at_once(callers, |i| {
            if i % 2 == 0 {
                app.get(Some(&app.admin), "/v1/verify")
            } else {
                app.send(
                    "POST",
                    Some(&app.admin),
                    "/v1/programs/hosting/replays",
                    &json!({"overrides": {}}),
                    None,
                )
            }
        });
        busy = answers.iter().filter(|(s, _, _)| *s == 503).count();
        assert!(
            busy <= callers - 1 - WHOLE_LOG_WAITING,
            "{busy} refused: {WHOLE_LOG_WAITING} may wait"
        );
        for (status, retry, body) in &answers {
            match status {
                503 => {
                    assert_eq!(body["type"], "https://commission-ledger.dev/problems/busy");
                    assert_eq!(retry.as_deref(), Some("1"));
                }
                200 => assert_eq!(body["ok"], true, "{body}"),
                201 => assert_eq!(body["diff"]["total_change"], "0.00", "{body}"),
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert!(busy > 0, "every caller waited, in {rounds} rounds");
}

#[test]
fn reads_of_the_past_beyond_the_waiting_limit_answer_503_busy() {
    let app = a_long_log();
    let head = app.head();
    let readers = commission_ledger::ledger::HISTORY_WAITING + 16;
    let answers = at_once(readers, |i| {
        // A past each, near the head (a long replay): a replay each, one
        // at a time.
        let seq = head - 1 - i as u64;
        app.get(
            Some(&app.portal),
            &format!("/v1/programs/hosting/affiliates/alice/balance?as_of={seq}"),
        )
    });
    let busy: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!busy.is_empty(), "every reader waited");
    for (_, retry, problem) in &busy {
        assert_eq!(
            problem["type"],
            "https://commission-ledger.dev/problems/busy"
        );
        assert_eq!(retry.as_deref(), Some("1"));
    }
    for (status, _, body) in answers.iter().filter(|(s, _, _)| *s != 503) {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["earned"], "0.00");
    }
}

/// `api::router` is public for servers of one's own. Served without the
/// peer's address, the public endpoints cannot limit a client: they answer
/// 500 as problem+json of type `internal` (it was `malformed`, as if the
/// request were at fault), and every other endpoint still works.
#[test]
fn routes_served_without_the_peer_address_say_so_as_an_internal_problem() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(LedgerConfig::new(dir.path())).unwrap());
    let (bound, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            bound.send(listener.local_addr().unwrap()).unwrap();
            let config = ApiConfig {
                auto_close_every: None,
                ..ApiConfig::default()
            };
            let _ = axum::serve(listener, api::router(ledger, config)).await;
        });
    });
    let base = format!("http://{}", address.recv().unwrap());
    let response = visitor().get(format!("{base}/r/some-code")).send().unwrap();
    assert_eq!(response.status().as_u16(), 500);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().unwrap();
    assert_eq!(
        problem["type"],
        "https://commission-ledger.dev/problems/internal"
    );
    let health = visitor().get(format!("{base}/healthz")).send().unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
