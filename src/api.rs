//! The HTTP API (axum): routes, authentication, `application/problem+json`
//! errors. The only module that imports axum.
//!
//! This first slice serves the operational endpoints; the v1 surface of
//! DESIGN.md "HTTP API" is built on the same [`Ledger`] calls.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::ledger::Ledger;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Arc<Ledger>,
}

/// The application's routes.
pub fn router(ledger: Arc<Ledger>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/verify", get(verify))
        .fallback(not_found)
        .with_state(AppState { ledger })
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready once recovery and projections are loaded: the ledger is only
/// handed to the router after `Ledger::open` has done both.
async fn readyz(State(app): State<AppState>) -> Response {
    let head = app.ledger.state().head.seq;
    Json(json!({"ready": true, "head_seq": head})).into_response()
}

async fn verify(State(app): State<AppState>) -> Response {
    let ledger = app.ledger.clone();
    let report = match tokio::task::spawn_blocking(move || ledger.verify()).await {
        Ok(report) => report,
        Err(_) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "verify failed to run",
            );
        }
    };
    let body = json!({
        "ok": report.ok,
        "events": report.events,
        "head_seq": report.head_seq,
        "head_hash": report.head_hash,
        "bad_seq": report.bad_seq,
        "problem": report.problem,
    });
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    (status, Json(body)).into_response()
}

async fn not_found() -> Response {
    problem(
        StatusCode::NOT_FOUND,
        "not-found",
        "Not found",
        "no such endpoint",
    )
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
