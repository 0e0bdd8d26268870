//! `application/problem+json`: [`ApiError`], the one place that knows HTTP
//! statuses, and the middleware that turns axum's and tower's own plain
//! refusals into problem documents.

use super::*;

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
pub(super) fn rejection_kind(rejection: &Rejection) -> (&'static str, StatusCode) {
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

pub(super) type ApiResult = Result<Response, ApiError>;

/// axum and tower answer some refusals themselves (a body over the limit,
/// a method the route lacks, a timeout) in plain text or with no body; the
/// contract is problem+json everywhere. Other error bodies a handler chose
/// (the pixel's image) are left as they are.
pub(super) async fn problems_for_rejections(response: Response) -> Response {
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
