//! Bearer tokens and roles: minting (`POST /v1/tokens`), checking a token
//! against the keys in the log, and what each role may do.

use super::errors::{ApiError, ApiResult};
use super::*;

/// Who is calling: a live key and its role.
pub(super) struct Caller {
    /// The key id, or `token:{program}/{affiliate}` for a per-affiliate token.
    pub(super) key_id: String,
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

pub(super) fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
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
pub(super) fn require(
    state: &AppState,
    headers: &HeaderMap,
    roles: &[Role],
) -> Result<Caller, ApiError> {
    let caller = caller(state, headers)?;
    if !caller.role.is_some_and(|role| roles.contains(&role)) {
        return Err(ApiError::Forbidden);
    }
    Ok(caller)
}

/// Whether the caller may read (and withdraw for) this affiliate: an admin
/// or portal key, or a token bound to exactly this program and affiliate.
pub(super) fn may_act_for(
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

pub(super) const READERS: &[Role] = &[Role::Admin, Role::Portal];

pub(super) const INGEST: &[Role] = &[Role::Admin, Role::Ingest];

pub(super) const ADMIN: &[Role] = &[Role::Admin];

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenBody {
    #[schemars(range(min = 1, max = MAX_TOKEN_TTL_SECONDS))]
    ttl_seconds: Option<u64>,
}

/// `POST .../affiliates/{a}/tokens`: a token that reads one affiliate and
/// requests its withdrawals, for a portal to hand to that affiliate's page.
pub(super) async fn mint(
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
