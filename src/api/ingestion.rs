//! Tracking input from billing systems: clicks, signups, basis lines and
//! refunds one at a time or in a `POST /v1/batch` of up to
//! `MAX_BATCH_ITEMS`, with each item's answer.

use super::auth::{INGEST, require};
use super::errors::{ApiError, ApiResult, rejection_kind};
use super::*;

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ClickBody {
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
pub(super) struct SignupBody {
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
pub(super) struct LineBody {
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
pub(super) struct RefundBody {
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
        pub(super) async fn $name(
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
pub(super) struct BatchBody {
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
pub(super) async fn batch(
    State(app): State<AppState>,
    Path(program): Path<String>,
    w: Write,
) -> ApiResult {
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
