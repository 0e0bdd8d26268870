//! The HTTP API (axum): routes, authentication, `application/problem+json`
//! errors. The only module that imports axum.
//!
//! Every handler parses its input at the edge into the core's types, calls
//! the [`Ledger`], and maps the answer; [`ApiError`] is the one place that
//! knows HTTP statuses. Bodies are read as bytes and parsed here, so that a
//! malformed body gets a problem document naming the field, not axum's
//! plain-text rejection.
//!
//! This file holds the router and the handlers of programs, affiliates,
//! customers, balances, statements, statistics, referrals, the event feed,
//! month close, withdrawals, credits and replays; the submodules hold the
//! rest: `errors` (problem+json), `auth` (tokens and roles), `ingestion`
//! (tracking input, one at a time or in a batch), `links` (`/r/{code}` and
//! the pixel), `telemetry` (`/metrics`) and `openapi_doc`.

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

mod auth;
mod errors;
mod ingestion;
mod links;
mod openapi_doc;
mod telemetry;

pub use auth::MAX_TOKEN_TTL_SECONDS;
pub use errors::{ApiError, problem};
pub use ingestion::{MAX_BATCH_BYTES, MAX_BATCH_ITEMS};
pub use links::VISITOR_COOKIE;
pub use openapi_doc::openapi;
pub use telemetry::HttpMetrics;

use auth::{ADMIN, Caller, INGEST, READERS, caller, may_act_for, mint, require};
use errors::{ApiResult, problems_for_rejections};
use ingestion::{batch, click, expense, payment, refund, signup};
use links::{follow_link, pixel};
use openapi_doc::openapi_json;
use telemetry::{metrics, track};

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
// Extractors: query strings and bodies.

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
