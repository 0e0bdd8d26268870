//! The program rules as pure decisions: `decide(model, context, command, ids)`
//! returns the events a command records, or the [`Rejection`] that refuses
//! it. [`Model`] is the write model the decisions need, folded from recorded
//! events by [`Model::apply`].
//!
//! Pure: no I/O, no clock. Time (`now`, `at`) and fresh ids come in as
//! arguments, so a decision is a function of its inputs and tests read as
//! given events / when command / then events.
//!
//! This file holds the commands, the refusals and [`decide`]; `model` the
//! write model and its fold, `commission` what a line earns (rates, the
//! rewards of a month close, pending estimates).

use std::collections::BTreeMap;

use crate::events::{HashMap, HashSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::*;
use crate::money::{Currency, MoneyError, Rate};

mod commission;
mod model;

pub use commission::{close_rewards, commission_of, pending_estimate};
pub use model::{
    Affiliate, Customer, KeyRecord, Line, LineReward, Model, PaidBounty, ProgramModel, Refund,
    Withdrawal, WithdrawalStatus,
};
pub(crate) use model::{apply_program_event, signed_up};

/// Why a command was refused. Nothing is recorded for a rejected command.
/// The API maps each variant to one HTTP status and problem `type`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A field failed validation (400/422 by the API, see `field`).
    #[error("{0}")]
    Invalid(InvalidValue),
    #[error("{0}")]
    Money(MoneyError),
    #[error("no program `{0}`")]
    UnknownProgram(ProgramId),
    #[error("the rules document is for program `{body}`, not `{path}`")]
    ProgramMismatch { path: ProgramId, body: ProgramId },
    #[error("the program's currency is {current}; a program keeps one currency")]
    CurrencyChange { current: Currency },
    #[error("no affiliate `{0}`")]
    UnknownAffiliate(AffiliateId),
    #[error("affiliate `{0}` already exists")]
    AffiliateExists(AffiliateId),
    #[error("affiliate `{0}` is suspended")]
    AffiliateSuspended(AffiliateId),
    #[error("group `{0}` may not join this program")]
    NotEligible(String),
    #[error("promo code `{0}` is taken")]
    PromoCodeTaken(String),
    #[error("no affiliate has referral code `{0}`")]
    UnknownReferralCode(String),
    #[error("the program's currency is {expected}, not {got}")]
    CurrencyMismatch { expected: Currency, got: String },
    #[error("`{0}` was recorded before with other values")]
    LineConflict(LineId),
    #[error("no basis line `{0}` to refund")]
    UnknownLine(LineId),
    #[error("basis line `{line}` belongs to customer `{owner}`")]
    WrongCustomer { line: LineId, owner: CustomerId },
    #[error("refunds of `{line}` would reach {total}, more than its {amount}")]
    RefundExceedsLine {
        line: LineId,
        total: Decimal,
        amount: Decimal,
    },
    #[error("no customer `{0}`")]
    UnknownCustomer(CustomerId),
    #[error("`{0}` is the affiliate's own account: no self-referral")]
    SelfReferral(CustomerId),
    #[error("month {0} has not ended in the program's time zone")]
    MonthNotEnded(Month),
    #[error("month {month} is before {last_closed}, the last closed month")]
    MonthOutOfOrder { month: Month, last_closed: Month },
    #[error("requested {requested}, available {available}")]
    InsufficientBalance {
        requested: Decimal,
        available: Decimal,
    },
    #[error("earned is {earned}, below the payout threshold of {threshold}")]
    BelowThreshold { earned: Decimal, threshold: Decimal },
    #[error("earned is negative ({0}): nothing can be withdrawn")]
    NegativeEarned(Decimal),
    #[error("no withdrawal `{0}`")]
    UnknownWithdrawal(Uuid),
    #[error("withdrawal `{0}` is already settled")]
    WithdrawalSettled(Uuid),
    #[error("key `{0}` already exists")]
    KeyExists(String),
    #[error("no key `{0}`")]
    UnknownKey(String),
    #[error(
        "the log moved since the replay was computed at seq {at_seq} (seq {moved_at} changed this program's money or attribution): run the replay again"
    )]
    ReplayStale { at_seq: Seq, moved_at: Seq },
}

impl From<InvalidValue> for Rejection {
    fn from(e: InvalidValue) -> Rejection {
        Rejection::Invalid(e)
    }
}

impl From<MoneyError> for Rejection {
    fn from(e: MoneyError) -> Rejection {
        Rejection::Money(e)
    }
}

/// What a command asks for. Amounts arrive as text with their currency, so
/// the rules check scale and currency against the program.
///
/// The rare, large payloads (a program's rules, a replay's overrides) are
/// boxed: every command is moved several times on its way to the writer
/// (a batch moves 10,000 of them), and the enum is as large as its largest
/// variant (472 bytes unboxed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    DefineProgram {
        rules: Box<ProgramRules>,
        reason: Option<String>,
    },
    EnrollAffiliate {
        affiliate_id: AffiliateId,
        customer_id: Option<CustomerId>,
        group: Option<String>,
        rate: Option<Rate>,
    },
    SuspendAffiliate {
        affiliate_id: AffiliateId,
        reason: String,
    },
    RecordClick {
        referral_code: String,
        visitor: Option<Text>,
        creative: Option<Text>,
        referrer: Option<Text>,
        landing: Option<Text>,
        client_hash: Option<Bytes<16>>,
    },
    Signup {
        customer_id: CustomerId,
        visitor: Option<Text>,
        promo_code: Option<String>,
        group: Option<String>,
    },
    RecordBasisLine {
        kind: LineKind,
        id: LineId,
        customer_id: CustomerId,
        amount: String,
        currency: String,
        product: Option<String>,
        order_id: Option<String>,
    },
    RecordRefund {
        id: LineId,
        customer_id: CustomerId,
        refunds: LineId,
        amount: String,
        currency: String,
    },
    CloseCustomer {
        customer_id: CustomerId,
        reason: Option<String>,
    },
    ChangeCustomerGroup {
        customer_id: CustomerId,
        group: String,
    },
    Reassign {
        customer_id: CustomerId,
        to: AffiliateId,
        from: Option<Timestamp>,
        retroactive: bool,
        reason: String,
    },
    CloseMonth {
        month: Month,
    },
    RequestWithdrawal {
        affiliate_id: AffiliateId,
        amount: String,
    },
    PayWithdrawal {
        withdrawal_id: Uuid,
        reference: String,
    },
    RejectWithdrawal {
        withdrawal_id: Uuid,
        reason: String,
    },
    ApplyCredit {
        affiliate_id: AffiliateId,
        amount: String,
        invoice_id: String,
    },
    IssueKey {
        key_id: String,
        key_hash: Bytes<32>,
        role: Role,
    },
    RevokeKey {
        key_id: String,
        reason: String,
    },
    /// Appends a what-if replay's changes as compensating events.
    ApplyReplay {
        replay_id: Uuid,
        at_seq: Seq,
        overrides: Box<Overrides>,
        changes: Vec<ReplayChange>,
        /// The write model as the corrected world has it, where it differs.
        corrected: Box<ReplayCorrected>,
        months: Option<MonthRange>,
        reason: String,
    },
}

// Held to the size the boxing above gives (see the enum's doc).
const _: () = assert!(std::mem::size_of::<Command>() <= 152);

impl Command {
    /// Whether the command acts inside one program (all but key commands).
    pub fn needs_program(&self) -> bool {
        !matches!(self, Command::IssueKey { .. } | Command::RevokeKey { .. })
    }
}

/// A command that was accepted but records nothing, with the answer to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Noop {
    /// No click or promo code matched (H-Sphere sends every signup everywhere).
    SignupIgnored,
    /// The customer already belongs to an affiliate; only reassignment
    /// moves them. `via` is how a signup attributed them, unless an
    /// operator has moved (or placed) them since.
    AlreadyAttributed {
        affiliate_id: AffiliateId,
        via: Option<Via>,
    },
    /// The same basis line or refund was recorded before, at this seq.
    Duplicate {
        seq: Seq,
    },
    MonthAlreadyClosed(MonthClosed),
    /// This replay was applied before, at this seq.
    ReplayAlreadyApplied {
        seq: Seq,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Append(Vec<Event>),
    Noop(Noop),
}

/// Everything a decision may know besides the model and the command.
#[derive(Clone, Copy, Debug)]
pub struct Context<'a> {
    pub program: Option<&'a ProgramId>,
    /// The ledger's clock.
    pub now: Timestamp,
    /// When it happened: the command's `at`, or `now`.
    pub at: Timestamp,
    /// The seq the first event of this decision will get.
    pub next_seq: Seq,
    /// Who asks: a key id, `cli` or `system`.
    pub actor: &'a str,
}

/// Fresh ids for decisions: random in the ledger, scripted in tests.
pub trait IdSource {
    fn uuid(&mut self) -> Uuid;
    /// A short random code for referral links and visitors: `[a-z0-9]{10}`.
    fn code(&mut self) -> String;
}

/// How far ahead of the ledger's clock an `at` may be: billing systems'
/// clocks drift a little; a line from the future is a mistake.
pub const MAX_CLOCK_SKEW_US: i64 = 5 * 60 * 1_000_000;

/// The earliest `at` a command may carry: 1970-01-01T00:00:00Z. No billing
/// system dates a line before it, and a date that far back is a typo
/// (`0026` for `2026`) whose cost is real: a program defined in year 0
/// with an `auto_close_day` owed 24,000 closes (found by `tools/fuzz`).
pub const EARLIEST_AT: Timestamp = Timestamp::from_micros(0);

/// The clicks kept per visitor for attribution: the newest ones. A visitor
/// (or a bot) clicking more often than this keeps only its latest clicks.
pub const MAX_CLICKS_PER_VISITOR: usize = 32;

/// The default group of customers and affiliates that name none.
pub const DEFAULT_GROUP: &str = "default";
const MAX_GROUP_LEN: usize = 128;

fn text(field: &'static str, value: &str, max: usize) -> Result<(), Rejection> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(InvalidValue::new(
            field,
            format!("must be at most {max} characters, no control characters"),
        )
        .into());
    }
    Ok(())
}

fn required_text(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.trim().is_empty() {
        return Err(InvalidValue::new(field, "must not be empty").into());
    }
    text(field, value, MAX_TEXT_LEN)
}

fn optional_text(
    field: &'static str,
    value: &Option<impl AsRef<str>>,
    max: usize,
) -> Result<(), Rejection> {
    match value {
        Some(v) => text(field, v.as_ref(), max),
        None => Ok(()),
    }
}

fn group(field: &'static str, value: &Option<String>) -> Result<String, Rejection> {
    let group = value.clone().unwrap_or_else(|| DEFAULT_GROUP.to_string());
    if group.is_empty() {
        return Err(InvalidValue::new(field, "must not be empty").into());
    }
    text(field, &group, MAX_GROUP_LEN)?;
    Ok(group)
}

/// Keeps a URL's origin and path: no query string, no fragment, no user
/// info (which is only in the authority: an `@` in the path, as in
/// `https://medium.com/@someone/post`, stays).
///
/// Every character it looks for is ASCII, so it searches bytes (a click's
/// referrer is trimmed on the writer's path), and a URL that is already
/// only an origin and path is the same text, not a copy.
pub fn origin_and_path(text: &Text) -> Text {
    let bytes = text.as_bytes();
    let end = bytes
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(bytes.len());
    let url = &bytes[..end];
    let authority_at = url
        .iter()
        .position(|b| *b == b':')
        .filter(|colon| url[*colon..].starts_with(b"://"))
        .map(|colon| colon + 3);
    let user_info_end = authority_at.and_then(|at| {
        let rest = &url[at..];
        let authority = &rest[..rest
            .iter()
            .position(|b| matches!(b, b'/' | b'\\'))
            .unwrap_or(rest.len())];
        authority
            .iter()
            .rposition(|b| *b == b'@')
            .map(|i| (at, at + i + 1))
    });
    // The cuts are at ASCII bytes, so they fall between characters.
    let url = &text[..end];
    match user_info_end {
        None if end == text.len() => text.clone(),
        None => Text::new(url),
        Some((authority_at, host_at)) => {
            let mut kept = String::with_capacity(url.len());
            kept.push_str(&url[..authority_at]);
            kept.push_str(&url[host_at..]);
            Text::from(kept)
        }
    }
}

fn program_of<'m>(
    model: &'m Model,
    ctx: &Context<'_>,
) -> Result<(&'m ProgramId, &'m ProgramModel), Rejection> {
    let id = ctx
        .program
        .ok_or_else(|| Rejection::Invalid(InvalidValue::new("program", "a program is required")))?;
    model
        .programs
        .get_key_value(id)
        .filter(|(_, pm)| !pm.rules.is_empty())
        .ok_or_else(|| Rejection::UnknownProgram(id.clone()))
}

fn current_rules<'m>(pm: &'m ProgramModel, id: &ProgramId) -> Result<&'m ProgramRules, Rejection> {
    pm.current_rules()
        .ok_or_else(|| Rejection::UnknownProgram(id.clone()))
}

fn amount_in(rules: &ProgramRules, amount: &str, currency: &str) -> Result<Decimal, Rejection> {
    if currency != rules.currency.code() {
        return Err(Rejection::CurrencyMismatch {
            expected: rules.currency,
            got: currency.to_string(),
        });
    }
    Ok(rules.currency.parse_positive(amount)?)
}

fn affiliate<'m>(pm: &'m ProgramModel, id: &AffiliateId) -> Result<&'m Affiliate, Rejection> {
    pm.affiliates
        .get(id)
        .ok_or_else(|| Rejection::UnknownAffiliate(id.clone()))
}

/// Decides a command against the model: the events to record, a no-op
/// answer, or a rejection.
pub fn decide(
    model: &Model,
    ctx: &Context<'_>,
    command: &Command,
    ids: &mut dyn IdSource,
) -> Result<Decision, Rejection> {
    let append = |events: Vec<Event>| Ok(Decision::Append(events));
    if ctx.at.micros() > ctx.now.micros().saturating_add(MAX_CLOCK_SKEW_US) {
        return Err(InvalidValue::new("at", format!("{} is in the future", ctx.at)).into());
    }
    if ctx.at < EARLIEST_AT {
        return Err(InvalidValue::new("at", format!("{} is before 1970", ctx.at)).into());
    }
    match command {
        Command::DefineProgram { rules, reason } => {
            let path = ctx.program.ok_or_else(|| {
                Rejection::Invalid(InvalidValue::new("program", "a program is required"))
            })?;
            if &rules.id != path {
                return Err(Rejection::ProgramMismatch {
                    path: path.clone(),
                    body: rules.id.clone(),
                });
            }
            rules.validate()?;
            optional_text("reason", reason, MAX_TEXT_LEN)?;
            if let Some(current) = model.program(path).and_then(ProgramModel::current_rules)
                && current.currency != rules.currency
            {
                return Err(Rejection::CurrencyChange {
                    current: current.currency,
                });
            }
            append(vec![Event::ProgramDefined(Box::new(ProgramDefined {
                rules: ProgramRules::clone(rules),
                reason: reason.clone(),
            }))])
        }
        Command::EnrollAffiliate {
            affiliate_id,
            customer_id,
            group: wanted_group,
            rate,
        } => {
            let (id, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, id)?;
            if pm.affiliates.contains_key(affiliate_id) {
                return Err(Rejection::AffiliateExists(affiliate_id.clone()));
            }
            let group = group("group", wanted_group)?;
            if !rules.eligible_groups.is_empty() && !rules.eligible_groups.contains(&group) {
                return Err(Rejection::NotEligible(group));
            }
            let promo_code = rules
                .promo_code_template
                .as_ref()
                .map(|template| template.replace("@ID@", affiliate_id.as_str()));
            if let Some(promo) = &promo_code
                && pm.affiliate_by_promo(promo).is_some()
            {
                return Err(Rejection::PromoCodeTaken(promo.clone()));
            }
            let mut referral_code = ids.code();
            while model.referral_codes.contains_key(&referral_code) {
                referral_code = ids.code();
            }
            append(vec![Event::AffiliateEnrolled(AffiliateEnrolled {
                affiliate_id: affiliate_id.clone(),
                referral_code,
                promo_code,
                customer_id: customer_id.clone(),
                group,
                rate: *rate,
            })])
        }
        Command::SuspendAffiliate {
            affiliate_id,
            reason,
        } => {
            let (_, pm) = program_of(model, ctx)?;
            let a = affiliate(pm, affiliate_id)?;
            if a.suspended_at.is_some() {
                return Err(Rejection::AffiliateSuspended(affiliate_id.clone()));
            }
            required_text("reason", reason)?;
            append(vec![Event::AffiliateSuspended(AffiliateSuspended {
                affiliate_id: affiliate_id.clone(),
                reason: reason.clone(),
            })])
        }
        Command::RecordClick {
            referral_code,
            visitor,
            creative,
            referrer,
            landing,
            client_hash,
        } => {
            let (_, pm) = program_of(model, ctx)?;
            let affiliate_id = pm
                .affiliate_by_code(referral_code)
                .ok_or_else(|| Rejection::UnknownReferralCode(referral_code.clone()))?;
            if affiliate(pm, affiliate_id)?.suspended_at.is_some() {
                return Err(Rejection::AffiliateSuspended(affiliate_id.clone()));
            }
            let visitor = match visitor {
                Some(v) => {
                    check_identifier_text("visitor", v)?;
                    v.clone()
                }
                None => Text::from(format!("v-{}", ids.code())),
            };
            optional_text("creative", creative, 128)?;
            optional_text("referrer", referrer, 2000)?;
            optional_text("landing", landing, 2000)?;
            append(vec![Event::ClickRecorded(ClickRecorded {
                click_id: ids.uuid(),
                affiliate_id: affiliate_id.clone(),
                visitor,
                creative: creative.clone(),
                referrer: referrer.as_ref().map(origin_and_path),
                landing: landing.as_ref().map(origin_and_path),
                client_hash: *client_hash,
            })])
        }
        Command::Signup {
            customer_id,
            visitor,
            promo_code,
            group: wanted_group,
        } => {
            let (id, pm) = program_of(model, ctx)?;
            let rules = pm
                .rules_at(ctx.at)
                .ok_or_else(|| Rejection::UnknownProgram(id.clone()))?;
            let group = group("group", wanted_group)?;
            if let Some(v) = visitor {
                check_identifier_text("visitor", v)?;
            }
            optional_text("promo_code", promo_code, 128)?;
            let customer = pm.customers.get(customer_id);
            // A customer an operator placed without a signup belongs to
            // someone too: a later signup must not take them elsewhere.
            if let Some(c) = customer
                && let Some(affiliate_id) = c.current_affiliate()
            {
                return Ok(Decision::Noop(Noop::AlreadyAttributed {
                    affiliate_id: affiliate_id.clone(),
                    via: c.via,
                }));
            }
            let has_billed_lines = customer.is_some_and(|c| !c.lines.is_empty());
            let eligible = |a: &AffiliateId| pm.signup_eligible(a, ctx.at, customer_id);
            let by_promo = promo_code
                .as_deref()
                .filter(|_| !has_billed_lines)
                .and_then(|code| pm.affiliate_by_promo(code))
                .filter(|a| eligible(a))
                .map(|a| (a.clone(), Via::PromoCode));
            let by_click = || {
                pm.click_attribution(rules, visitor.as_ref()?, ctx.at, customer_id)
                    .map(|a| (a.clone(), Via::Click))
            };
            let Some((affiliate_id, via)) = by_promo.or_else(by_click) else {
                return Ok(Decision::Noop(Noop::SignupIgnored));
            };
            append(vec![Event::SignupAttributed(SignupAttributed {
                customer_id: customer_id.clone(),
                affiliate_id,
                via,
                visitor: visitor.clone(),
                promo_code: if via == Via::PromoCode {
                    promo_code.clone()
                } else {
                    None
                },
                group,
            })])
        }
        Command::RecordBasisLine {
            kind,
            id,
            customer_id,
            amount,
            currency,
            product,
            order_id,
        } => {
            let (pid, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, pid)?;
            let amount = amount_in(rules, amount, currency)?;
            optional_text("product", product, 128)?;
            optional_text("order_id", order_id, 128)?;
            if let Some(line) = pm.lines.get(id) {
                let same = line.kind == *kind
                    && &line.customer_id == customer_id
                    && line.amount == amount
                    && &line.product == product
                    && &line.order_id == order_id;
                return if same {
                    Ok(Decision::Noop(Noop::Duplicate { seq: line.seq }))
                } else {
                    Err(Rejection::LineConflict(id.clone()))
                };
            }
            append(vec![Event::BasisLineRecorded(BasisLineRecorded {
                kind: *kind,
                id: id.clone(),
                customer_id: customer_id.clone(),
                amount,
                product: product.clone(),
                order_id: order_id.clone(),
            })])
        }
        Command::RecordRefund {
            id,
            customer_id,
            refunds,
            amount,
            currency,
        } => {
            let (pid, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, pid)?;
            let amount = amount_in(rules, amount, currency)?;
            if let Some(refund) = pm.refunds.get(id) {
                let same = &refund.line == refunds
                    && &refund.customer_id == customer_id
                    && refund.amount == amount;
                return if same {
                    Ok(Decision::Noop(Noop::Duplicate { seq: refund.seq }))
                } else {
                    Err(Rejection::LineConflict(id.clone()))
                };
            }
            let line = pm
                .lines
                .get(refunds)
                .ok_or_else(|| Rejection::UnknownLine(refunds.clone()))?;
            if &line.customer_id != customer_id {
                return Err(Rejection::WrongCustomer {
                    line: refunds.clone(),
                    owner: line.customer_id.clone(),
                });
            }
            if line.refunded + amount > line.amount {
                return Err(Rejection::RefundExceedsLine {
                    line: refunds.clone(),
                    total: line.refunded + amount,
                    amount: line.amount,
                });
            }
            append(vec![Event::RefundRecorded(RefundRecorded {
                id: id.clone(),
                customer_id: customer_id.clone(),
                refunds: refunds.clone(),
                amount,
            })])
        }
        Command::CloseCustomer {
            customer_id,
            reason,
        } => {
            program_of(model, ctx)?;
            optional_text("reason", reason, MAX_TEXT_LEN)?;
            append(vec![Event::CustomerClosed(CustomerClosed {
                customer_id: customer_id.clone(),
                reason: reason.clone(),
            })])
        }
        Command::ChangeCustomerGroup {
            customer_id,
            group: wanted,
        } => {
            program_of(model, ctx)?;
            let group = group("group", &Some(wanted.clone()))?;
            append(vec![Event::CustomerGroupChanged(CustomerGroupChanged {
                customer_id: customer_id.clone(),
                group,
            })])
        }
        Command::Reassign {
            customer_id,
            to,
            from,
            retroactive,
            reason,
        } => decide_reassign(model, ctx, customer_id, to, *from, *retroactive, reason),
        Command::ApplyReplay {
            replay_id,
            at_seq,
            overrides,
            changes,
            corrected,
            months,
            reason,
        } => {
            let (id, pm) = program_of(model, ctx)?;
            current_rules(pm, id)?;
            required_text("reason", reason)?;
            if let Some((_, seq, _)) = pm.applied_replays.iter().find(|(r, _, _)| r == replay_id) {
                return Ok(Decision::Noop(Noop::ReplayAlreadyApplied { seq: *seq }));
            }
            if pm.money_seq > *at_seq {
                return Err(Rejection::ReplayStale {
                    at_seq: *at_seq,
                    moved_at: pm.money_seq,
                });
            }
            validate_overrides(pm, id, overrides)?;
            let month = pm.open_month(ctx.now);
            let mut events = vec![Event::ReplayApplied(Box::new(ReplayApplied {
                replay_id: *replay_id,
                at_seq: *at_seq,
                overrides: Overrides::clone(overrides),
                changes: changes.clone(),
                months: *months,
                reason: reason.clone(),
            }))];
            if !corrected.is_empty() {
                events.push(Event::ReplayCorrected(Box::new(ReplayCorrected {
                    replay_id: *replay_id,
                    ..ReplayCorrected::clone(corrected)
                })));
            }
            for change in changes.iter().filter(|c| !c.amount.is_zero()) {
                events.push(Event::AdjustmentPosted(AdjustmentPosted {
                    affiliate_id: change.affiliate_id.clone(),
                    customer_id: change.customer_id.clone(),
                    line: change.line.clone(),
                    amount: change.amount,
                    month,
                    cause: Cause::Replay {
                        replay_id: *replay_id,
                        at_seq: *at_seq,
                    },
                    reason: reason.clone(),
                }));
            }
            append(events)
        }
        Command::CloseMonth { month } => {
            let (id, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, id)?;
            if let Some(closed) = pm.closed.get(month) {
                return Ok(Decision::Noop(Noop::MonthAlreadyClosed(closed.clone())));
            }
            if ctx.now < month.next().start_in(pm.zone()) {
                return Err(Rejection::MonthNotEnded(*month));
            }
            if let Some(last_closed) = pm.last_closed()
                && *month < last_closed
            {
                return Err(Rejection::MonthOutOfOrder {
                    month: *month,
                    last_closed,
                });
            }
            let mut events = close_rewards(pm, *month, *month, None);
            let mut rewards = 0u32;
            let mut total = Decimal::ZERO;
            for event in &events {
                match event {
                    Event::RewardAccrued(r) => {
                        rewards += 1;
                        total += r.amount;
                    }
                    Event::RewardClawedBack(c) => total -= c.amount,
                    _ => {}
                }
            }
            // Each reward is of one line, but a close adds them all: a
            // total no event may carry is refused, not recorded.
            let total = check_event_amount(rules.currency.round_half_even(total)).map_err(|e| {
                InvalidValue::new("month", format!("the close's total {}", e.message))
            })?;
            events.push(Event::MonthClosed(MonthClosed {
                month: *month,
                rewards,
                total,
            }));
            append(events)
        }
        Command::RequestWithdrawal {
            affiliate_id,
            amount,
        } => {
            let (id, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, id)?;
            let amount = rules.currency.parse_positive(amount)?;
            let accounts = &affiliate(pm, affiliate_id)?.accounts;
            let earned = accounts.earned();
            if earned < Decimal::ZERO {
                return Err(Rejection::NegativeEarned(earned));
            }
            if earned < rules.payout_threshold {
                return Err(Rejection::BelowThreshold {
                    earned,
                    threshold: rules.payout_threshold,
                });
            }
            let available = accounts.available(rules.payout_threshold);
            if amount > available {
                return Err(Rejection::InsufficientBalance {
                    requested: amount,
                    available,
                });
            }
            append(vec![Event::WithdrawalRequested(WithdrawalRequested {
                withdrawal_id: ids.uuid(),
                affiliate_id: affiliate_id.clone(),
                amount,
            })])
        }
        Command::PayWithdrawal {
            withdrawal_id,
            reference,
        } => {
            let (_, pm) = program_of(model, ctx)?;
            required_text("reference", reference)?;
            let w = open_withdrawal(pm, withdrawal_id)?;
            append(vec![Event::WithdrawalPaid(WithdrawalPaid {
                withdrawal_id: *withdrawal_id,
                affiliate_id: w.affiliate_id.clone(),
                amount: w.amount,
                reference: reference.clone(),
            })])
        }
        Command::RejectWithdrawal {
            withdrawal_id,
            reason,
        } => {
            let (_, pm) = program_of(model, ctx)?;
            required_text("reason", reason)?;
            let w = open_withdrawal(pm, withdrawal_id)?;
            append(vec![Event::WithdrawalRejected(WithdrawalRejected {
                withdrawal_id: *withdrawal_id,
                affiliate_id: w.affiliate_id.clone(),
                amount: w.amount,
                reason: reason.clone(),
            })])
        }
        Command::ApplyCredit {
            affiliate_id,
            amount,
            invoice_id,
        } => {
            let (id, pm) = program_of(model, ctx)?;
            let rules = current_rules(pm, id)?;
            let amount = rules.currency.parse_positive(amount)?;
            required_text("invoice_id", invoice_id)?;
            let accounts = &affiliate(pm, affiliate_id)?.accounts;
            if accounts.earned() < Decimal::ZERO {
                return Err(Rejection::NegativeEarned(accounts.earned()));
            }
            if amount > accounts.free {
                return Err(Rejection::InsufficientBalance {
                    requested: amount,
                    available: accounts.free.max(Decimal::ZERO),
                });
            }
            append(vec![Event::CreditApplied(CreditApplied {
                affiliate_id: affiliate_id.clone(),
                amount,
                invoice_id: invoice_id.clone(),
            })])
        }
        Command::IssueKey {
            key_id,
            key_hash,
            role,
        } => {
            check_identifier_text("key_id", key_id)?;
            if model.keys.contains_key(key_id) {
                return Err(Rejection::KeyExists(key_id.clone()));
            }
            append(vec![Event::ApiKeyIssued(ApiKeyIssued {
                key_id: key_id.clone(),
                key_hash: *key_hash,
                role: *role,
                issuer: ctx.actor.to_string(),
            })])
        }
        Command::RevokeKey { key_id, reason } => {
            required_text("reason", reason)?;
            match model.keys.get(key_id) {
                Some(key) if !key.revoked => append(vec![Event::ApiKeyRevoked(ApiKeyRevoked {
                    key_id: key_id.clone(),
                    reason: reason.clone(),
                })]),
                _ => Err(Rejection::UnknownKey(key_id.clone())),
            }
        }
    }
}

fn check_identifier_text(field: &'static str, value: &str) -> Result<(), Rejection> {
    let ok = !value.is_empty()
        && value.len() <= MAX_IDENTIFIER_LEN
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '-'));
    if !ok {
        return Err(InvalidValue::new(
            field,
            format!("must be 1 to {MAX_IDENTIFIER_LEN} of A-Z a-z 0-9 . _ : @ -"),
        )
        .into());
    }
    Ok(())
}

fn open_withdrawal<'m>(pm: &'m ProgramModel, id: &Uuid) -> Result<&'m Withdrawal, Rejection> {
    let w = pm
        .withdrawals
        .get(id)
        .ok_or(Rejection::UnknownWithdrawal(*id))?;
    if w.status != WithdrawalStatus::Requested {
        return Err(Rejection::WithdrawalSettled(*id));
    }
    Ok(w)
}

/// Most entries an override list may have.
pub const MAX_OVERRIDES: usize = 10_000;

/// Checks a replay's overrides against the program: the affiliates exist,
/// no one is attributed their own account, corrected rules keep the
/// program's id, currency and time zone.
pub fn validate_overrides(
    pm: &ProgramModel,
    program: &ProgramId,
    overrides: &Overrides,
) -> Result<(), Rejection> {
    for (field, len) in [
        ("attribution", overrides.attribution.len()),
        ("affiliate_rates", overrides.affiliate_rates.len()),
        ("exclude", overrides.exclude.len()),
    ] {
        if len > MAX_OVERRIDES {
            return Err(
                InvalidValue::new(field, format!("at most {MAX_OVERRIDES} entries")).into(),
            );
        }
    }
    for o in &overrides.attribution {
        let target = affiliate(pm, &o.affiliate_id)?;
        if target.customer_id.as_ref() == Some(&o.customer_id) {
            return Err(Rejection::SelfReferral(o.customer_id.clone()));
        }
    }
    for o in &overrides.affiliate_rates {
        affiliate(pm, &o.affiliate_id)?;
    }
    if let Some(model) = &overrides.model
        && model.cookie_days.is_some_and(|d| d > 3650)
    {
        return Err(InvalidValue::new("model.cookie_days", "at most 3650 days").into());
    }
    if let Some(o) = &overrides.rules {
        o.rules.validate()?;
        if &o.rules.id != program {
            return Err(Rejection::ProgramMismatch {
                path: program.clone(),
                body: o.rules.id.clone(),
            });
        }
        if let Some(current) = pm.current_rules() {
            if current.currency != o.rules.currency {
                return Err(Rejection::CurrencyChange {
                    current: current.currency,
                });
            }
            if current.timezone != o.rules.timezone {
                return Err(InvalidValue::new(
                    "rules.rules.timezone",
                    format!(
                        "a replay keeps the program's time zone ({})",
                        current.timezone
                    ),
                )
                .into());
            }
        }
    }
    Ok(())
}

fn decide_reassign(
    model: &Model,
    ctx: &Context<'_>,
    customer_id: &CustomerId,
    to: &AffiliateId,
    from: Option<Timestamp>,
    retroactive: bool,
    reason: &str,
) -> Result<Decision, Rejection> {
    let (id, pm) = program_of(model, ctx)?;
    current_rules(pm, id)?;
    required_text("reason", reason)?;
    let target = affiliate(pm, to)?;
    if target.customer_id.as_ref() == Some(customer_id) {
        return Err(Rejection::SelfReferral(customer_id.clone()));
    }
    let customer = pm
        .customers
        .get(customer_id)
        .ok_or_else(|| Rejection::UnknownCustomer(customer_id.clone()))?;
    let seq = ctx.next_seq;
    let mut events = vec![Event::ReferralReassigned(ReferralReassigned {
        customer_id: customer_id.clone(),
        from_affiliate: customer
            .affiliate_at(from.unwrap_or(Timestamp::MAX))
            .cloned(),
        to: to.clone(),
        from,
        retroactive,
        reason: reason.to_string(),
    })];
    if retroactive {
        let month = pm.open_month(ctx.now);
        let mut moved = customer.clone();
        moved.move_to(from, to);
        events.extend(reassignment_adjustments(
            pm,
            customer,
            customer_id,
            &moved,
            from,
            month,
            seq,
            reason,
        ));
    }
    Ok(Decision::Append(events))
}

/// The adjustments a retroactive reassignment posts in `month`: the net
/// rewards (and the bounty) of the customer's lines from `from` on move
/// from whoever earned them to whoever has the customer at the line's
/// moment once it is moved (`moved`: the customer then; in a replay, a
/// correction may hold over the reassignment).
#[allow(clippy::too_many_arguments)]
pub(crate) fn reassignment_adjustments(
    pm: &ProgramModel,
    customer: &Customer,
    customer_id: &CustomerId,
    moved: &Customer,
    from: Option<Timestamp>,
    month: Month,
    seq: Seq,
    reason: &str,
) -> Vec<Event> {
    let mut events = Vec::new();
    {
        let start = from.unwrap_or(Timestamp::MIN);
        let mut moves: BTreeMap<(AffiliateId, Option<LineId>), (AffiliateId, Decimal)> =
            BTreeMap::new();
        for line_id in &customer.lines {
            let Some(line) = pm.lines.get(line_id) else {
                continue;
            };
            if line.at < start {
                continue;
            }
            if let Some(reward) = &line.reward
                && let Some(to) = moved.affiliate_at(line.at)
                && &reward.affiliate_id != to
            {
                let net = reward.amount - reward.clawed;
                if !net.is_zero() {
                    let key = (reward.affiliate_id.clone(), Some(line_id.clone()));
                    moves.insert(key, (to.clone(), net));
                }
            }
        }
        // The bounty moves with the line it was paid with.
        if let Some(bounty) = &customer.bounty
            && let Some(to) = moved.affiliate_at(bounty.line_at)
            && &bounty.affiliate_id != to
            && bounty.line_at >= start
        {
            let key = (bounty.affiliate_id.clone(), None);
            moves.insert(key, (to.clone(), bounty.amount));
        }
        for ((owner, line), (to, net)) in moves {
            for (affiliate_id, amount) in [(owner, -net), (to, net)] {
                events.push(Event::AdjustmentPosted(AdjustmentPosted {
                    affiliate_id,
                    customer_id: Some(customer_id.clone()),
                    line: line.clone(),
                    amount,
                    month,
                    cause: Cause::Reassignment { seq },
                    reason: reason.to_string(),
                }));
            }
        }
    }
    events
}
