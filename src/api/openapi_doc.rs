//! The OpenAPI 3.1 document (`GET /openapi.json`), generated from the
//! types the handlers parse and answer with.

use super::auth::TokenBody;
use super::ingestion::{BatchBody, ClickBody, LineBody, RefundBody, SignupBody};
use super::*;

/// `GET /openapi.json`.
pub(super) async fn openapi_json() -> Response {
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
