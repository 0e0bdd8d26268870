//! The tracking edge: `GET /r/{code}` (a referral link, a durable click,
//! the visitor cookie, the redirect) and the conversion pixel, with the
//! client address and cookie handling they share.

use super::errors::{ApiError, ApiResult};
use super::*;

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
pub(super) struct LinkQuery {
    to: Option<String>,
}

/// `GET /r/{code}`: records a click, sets the visitor cookie, and sends the
/// visitor to the program's site (or a safe `to` path on it).
pub(super) async fn follow_link(
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
pub(super) struct PixelQuery {
    /// The referrer of the page (BILLmanager's `r`).
    r: Option<String>,
    /// The page URL, carrying `ref=CODE` (BILLmanager's `p`).
    p: Option<String>,
}

/// `GET /px.gif`: the tracking pixel; records a click when the page URL
/// carries `ref=CODE`. Always answers the GIF.
pub(super) async fn pixel(
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
