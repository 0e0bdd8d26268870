//! The program rules as pure decisions: `decide(model, context, command, ids)`
//! returns the events a command records, or the [`Rejection`] that refuses
//! it. [`Model`] is the write model the decisions need, folded from recorded
//! events by [`Model::apply`].
//!
//! Pure: no I/O, no clock. Time (`now`, `at`) and fresh ids come in as
//! arguments, so a decision is a function of its inputs and tests read as
//! given events / when command / then events.

use std::collections::BTreeMap;

use crate::events::{HashMap, HashSet};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::*;
use crate::money::{Currency, MoneyError, Rate};

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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Affiliate {
    /// The affiliate's place in enrollment order.
    pub index: u32,
    pub referral_code: String,
    pub promo_code: Option<String>,
    pub customer_id: Option<CustomerId>,
    pub group: String,
    pub rate: Option<Rate>,
    pub suspended_at: Option<Timestamp>,
    pub enrolled_at: Timestamp,
    pub accounts: AffiliateAccounts,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Customer {
    /// Who the customer belongs to from when on (`None` = from the start), in order.
    pub attribution: Vec<(Option<Timestamp>, AffiliateId)>,
    pub signup_at: Option<Timestamp>,
    pub via: Option<Via>,
    /// The customer's group from when on, in order.
    pub groups: Vec<(Timestamp, String)>,
    pub closed: bool,
    pub first_line: Option<LineId>,
    pub first_order: Option<String>,
    pub first_line_at: Option<Timestamp>,
    pub bounty: Option<PaidBounty>,
    pub lines: Vec<LineId>,
}

impl Customer {
    pub fn affiliate_at(&self, at: Timestamp) -> Option<&AffiliateId> {
        self.attribution
            .iter()
            .rev()
            .find(|(from, _)| from.is_none_or(|from| from <= at))
            .map(|(_, affiliate)| affiliate)
    }
    pub fn current_affiliate(&self) -> Option<&AffiliateId> {
        self.attribution.last().map(|(_, affiliate)| affiliate)
    }
    /// Whether `affiliate` is named in the attribution, at any time.
    fn names(&self, affiliate: &AffiliateId) -> bool {
        self.attribution.iter().any(|(_, a)| a == affiliate)
    }
    /// Moves the customer to `affiliate` from `from` on (`None`: for all
    /// time); whether `affiliate` was named before.
    pub(crate) fn move_to(&mut self, from: Option<Timestamp>, affiliate: &AffiliateId) -> bool {
        let before = self.names(affiliate);
        match from {
            None => self.attribution = vec![(None, affiliate.clone())],
            Some(from) => {
                self.attribution
                    .retain(|(start, _)| start.is_none_or(|start| start < from));
                self.attribution.push((Some(from), affiliate.clone()));
            }
        }
        before
    }
    pub fn group_at(&self, at: Timestamp) -> &str {
        self.groups
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .or(self.groups.first())
            .map(|(_, group)| group.as_str())
            .unwrap_or(DEFAULT_GROUP)
    }
}

/// The bounty paid for a customer: to whom, how much, and the moment of
/// the line it was paid with (a retroactive reassignment moves it with the
/// lines from a moment up to this one). The write model keeps it in the
/// form a replay's corrected world records it.
pub type PaidBounty = CorrectedBounty;

/// A reward posted for a basis line: whose, at what rate, how much, and the
/// refunds clawed back so far with the claw-backs themselves. Kept in the
/// form a replay's corrected world records it.
pub type LineReward = CorrectedReward;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Line {
    pub id: LineId,
    pub kind: LineKind,
    pub customer_id: CustomerId,
    pub amount: Decimal,
    pub product: Option<String>,
    pub order_id: Option<String>,
    pub at: Timestamp,
    pub month: Month,
    pub seq: Seq,
    pub refunded: Decimal,
    /// Taken by a month close (rewarded or not).
    pub processed: bool,
    /// Boxed: most lines of a busy program wait for their close unrewarded.
    pub reward: Option<Box<LineReward>>,
    /// Excluded by an applied replay: it should never have counted.
    pub excluded: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refund {
    pub line: LineId,
    pub customer_id: CustomerId,
    pub amount: Decimal,
    pub at: Timestamp,
    pub month: Month,
    pub seq: Seq,
    pub processed: bool,
    /// Excluded by an applied replay: it never claws anything back.
    pub excluded: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WithdrawalStatus {
    Requested,
    Paid,
    Rejected,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Withdrawal {
    pub affiliate_id: AffiliateId,
    pub amount: Decimal,
    pub status: WithdrawalStatus,
}

/// The write model of one program.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProgramModel {
    /// Every version of the rules, with the moment it took effect, in order.
    pub rules: Vec<(Timestamp, ProgramRules)>,
    /// When the program was first defined (a corrected version of the
    /// rules may take effect before it).
    defined_at: Option<Timestamp>,
    pub affiliates: BTreeMap<AffiliateId, Affiliate>,
    referral_codes: HashMap<String, AffiliateId>,
    /// Upper-cased: promo codes are typed by people, case does not matter.
    promo_codes: HashMap<String, AffiliateId>,
    own_customers: HashMap<CustomerId, AffiliateId>,
    /// Each visitor's clicks (when, whose), for attribution inside the cookie window.
    visitors: HashMap<Text, Vec<(Timestamp, u32)>>,
    /// Affiliates by enrollment order: clicks name them by index, not by a
    /// copy of the id (clicks are the most numerous events).
    affiliate_order: Vec<AffiliateId>,
    pub customers: HashMap<CustomerId, Customer>,
    /// Boxed: a line is about 150 bytes, and growing the table moved every
    /// one of them (measured: a tenth of the CPU of batch ingest went to
    /// rehashing this table; boxed, a slot is 24 bytes).
    pub lines: HashMap<LineId, Box<Line>>,
    pub refunds: HashMap<LineId, Refund>,
    /// Lines no close has taken yet, by (month, at, seq).
    open_lines: BTreeMap<(Month, Timestamp, Seq), LineId>,
    open_refunds: BTreeMap<(Month, Timestamp, Seq), LineId>,
    /// Every line of a month, for tier counts.
    lines_by_month: HashMap<Month, Vec<LineId>>,
    pub closed: BTreeMap<Month, MonthClosed>,
    pub withdrawals: HashMap<Uuid, Withdrawal>,
    /// Replays applied, in order, with the seq of their `ReplayApplied`:
    /// their overrides are part of history for every later replay.
    pub applied_replays: Vec<(Uuid, Seq, Overrides)>,
    /// The last seq that changed money a replay compares (rewards, claw-backs,
    /// adjustments, closes, reassignments, rules) or what it corrects
    /// (signups): applying a replay computed before it is refused.
    pub money_seq: Seq,
    /// Per-affiliate rates set by applied replays, from a moment on.
    rate_overrides: Vec<AffiliateRateOverride>,
    /// The current rules' time zone, parsed once (again after a checkpoint is loaded).
    #[serde(skip)]
    zone: Option<chrono_tz::Tz>,
    /// Pending estimates already computed, and what they depend on.
    #[serde(skip)]
    pending_memo: PendingMemo,
    /// The customers whose attribution names each affiliate (with, after
    /// a reassignment away and back, a customer twice, and after one for
    /// all time, one no longer named): the pending estimate reads these
    /// instead of every customer of the program. Derived: rebuilt from
    /// `customers` when a checkpoint is loaded.
    #[serde(skip)]
    customers_of: HashMap<AffiliateId, Vec<CustomerId>>,
}

/// The pending estimate of each affiliate as last computed, kept until
/// something it depends on changes: a balance read then costs a lookup
/// instead of a simulated close of the affiliate's open lines (measured:
/// 35–41 ms for an affiliate with 20,000 of them, with the state's read
/// lock held, so the writer waits that long).
///
/// What an estimate depends on is tracked by epochs. A basis line can
/// change only the estimates of the affiliates its customer ever belonged
/// to (whoever had the customer at the line's moment earns it, and tier
/// counts are the affiliate's own), a signup those of the customer's
/// affiliates before and after it, a group change those of the customer's
/// affiliates, a refund those and the affiliate the line rewarded, an
/// enrolment or a suspension the affiliate's own: these bump those
/// affiliates' epochs. Clicks, withdrawals, credits and closed accounts
/// change no estimate. Every other event (rules, closes, rewards,
/// reassignments, replays: all rarer) bumps the program's epoch, which
/// every estimate depends on.
///
/// A busy affiliate's customers are billed all the time, so its estimate
/// would be computed again at nearly every read. Instead, the lines and
/// signups since an estimate was computed are noted with it, and the next
/// read extends the estimate by what they add ([`extend_pending`]) when
/// that is exact, and computes it again only when it is not.
#[derive(Default)]
struct PendingMemo {
    program: u64,
    affiliates: HashMap<AffiliateId, u64>,
    computed: std::sync::Mutex<PendingComputed>,
}

/// (program epoch, affiliate epoch, month): what an estimate holds for.
type PendingKey = (u64, u64, Month);
type PendingComputed = HashMap<AffiliateId, ComputedPending>;

/// One affiliate's estimate and what happened to it since.
struct ComputedPending {
    key: PendingKey,
    pending: Decimal,
    /// What bumped the affiliate's epoch since `key`, one change per bump,
    /// in log order; `None` once one of them cannot be added to the
    /// estimate, or more than `limit` came (computing the estimate again
    /// is then as cheap, and memory stays bounded).
    since: Option<Vec<PendingChange>>,
    limit: usize,
    /// The affiliate's active referrals by month (the count that picks a
    /// tier), as of `key`: counted when an extension first needs them.
    active: HashMap<Month, u32>,
}

/// A change to an affiliate's estimate that [`extend_pending`] may add.
#[derive(Clone)]
enum PendingChange {
    /// A basis line recorded for a customer the affiliate was ever named for.
    Line(LineId),
    /// A signup that changed nothing the estimate reads (its customer had no lines).
    Nothing,
}

impl PendingMemo {
    /// Notes what `recorded` may change, before it is folded in.
    fn note(
        &mut self,
        customers: &HashMap<CustomerId, Customer>,
        lines: &HashMap<LineId, Box<Line>>,
        recorded: &Recorded,
    ) {
        // The customer whose affiliates it concerns, one more affiliate it
        // concerns, and what it adds to their estimates (`None`: they must
        // be computed again).
        let (customer, also, change) = match &recorded.event {
            // Nothing an estimate reads: clicks, withdrawals, credits, a
            // closed account (its lines still earn), adjustments (money
            // moved for posted rewards), keys.
            Event::ClickRecorded(_)
            | Event::WithdrawalRequested(_)
            | Event::WithdrawalPaid(_)
            | Event::WithdrawalRejected(_)
            | Event::CreditApplied(_)
            | Event::CustomerClosed(_)
            | Event::AdjustmentPosted(_)
            | Event::ApiKeyIssued(_)
            | Event::ApiKeyRevoked(_) => return,
            Event::BasisLineRecorded(e) => (
                Some(&e.customer_id),
                None,
                Some(PendingChange::Line(e.id.clone())),
            ),
            Event::SignupAttributed(e) => {
                let no_lines = customers
                    .get(&e.customer_id)
                    .is_none_or(|c| c.lines.is_empty());
                let change = no_lines.then_some(PendingChange::Nothing);
                (Some(&e.customer_id), Some(&e.affiliate_id), change)
            }
            // The lines a group forbids earn whoever had the customer then.
            Event::CustomerGroupChanged(e) => (Some(&e.customer_id), None, None),
            // A claw-back goes to whoever the line rewarded, or will: for
            // a posted reward, maybe an affiliate the customer no longer names.
            Event::RefundRecorded(e) => {
                let line = lines.get(&e.refunds);
                let rewarded = line
                    .and_then(|l| l.reward.as_ref())
                    .map(|r| &r.affiliate_id);
                let customer = line.map_or(&e.customer_id, |l| &l.customer_id);
                (Some(customer), rewarded, None)
            }
            // Only the affiliate's own earnings.
            Event::AffiliateEnrolled(e) => (None, Some(&e.affiliate_id), None),
            Event::AffiliateSuspended(e) => (None, Some(&e.affiliate_id), None),
            // Rules, closes, rewards, reassignments, replays: every estimate.
            _ => {
                self.program += 1;
                return;
            }
        };
        let computed = self
            .computed
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut touch = |affiliate: &AffiliateId| {
            if let Some(entry) = computed.get_mut(affiliate) {
                entry.since = match (entry.since.take(), &change) {
                    (Some(mut since), Some(change)) if since.len() < entry.limit => {
                        since.push(change.clone());
                        Some(since)
                    }
                    _ => None,
                };
            }
            *self.affiliates.entry(affiliate.clone()).or_default() += 1;
        };
        let named = customer
            .and_then(|c| customers.get(c))
            .map_or(&[][..], |c| &c.attribution);
        for (i, (_, affiliate)) in named.iter().enumerate() {
            // once each, however often the customer moved to them
            if !named[..i].iter().any(|(_, a)| a == affiliate) {
                touch(affiliate);
            }
        }
        if let Some(affiliate) = also
            && !named.iter().any(|(_, a)| a == affiliate)
        {
            touch(affiliate);
        }
    }

    fn key(&self, affiliate: &AffiliateId, month: Month) -> PendingKey {
        let epoch = self.affiliates.get(affiliate).copied().unwrap_or(0);
        (self.program, epoch, month)
    }

    fn computed(&self) -> std::sync::MutexGuard<'_, PendingComputed> {
        self.computed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A copy starts with nothing computed (its epochs are its own).
impl Clone for PendingMemo {
    fn clone(&self) -> PendingMemo {
        PendingMemo::default()
    }
}

impl std::fmt::Debug for PendingMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingMemo")
            .field("program", &self.program)
            .finish_non_exhaustive()
    }
}

impl ProgramModel {
    /// The rules in force now (the latest version).
    pub fn current_rules(&self) -> Option<&ProgramRules> {
        self.rules.last().map(|(_, rules)| rules)
    }

    /// The rules in force at a moment (the first version for earlier moments).
    pub fn rules_at(&self, at: Timestamp) -> Option<&ProgramRules> {
        self.rules
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .or(self.rules.first())
            .map(|(_, rules)| rules)
    }

    /// Whether a line is of the basis (expenses or payments) the rules in
    /// force at its moment reward.
    pub fn on_basis(&self, line: &Line) -> bool {
        self.earns_at(line.kind, line.at)
    }

    /// Whether a line of `kind` dated `at` is of the basis in force then.
    pub fn earns_at(&self, kind: LineKind, at: Timestamp) -> bool {
        self.rules_at(at)
            .is_some_and(|rules| kind.earns_under(rules.basis))
    }

    pub fn affiliate_by_code(&self, referral_code: &str) -> Option<&AffiliateId> {
        self.referral_codes.get(referral_code)
    }

    pub fn affiliate_by_promo(&self, promo_code: &str) -> Option<&AffiliateId> {
        self.promo_codes.get(&promo_code.to_uppercase())
    }

    pub fn last_closed(&self) -> Option<Month> {
        self.closed.keys().next_back().copied()
    }

    /// The month whose statement money moved at `at` goes to
    /// ([`Month::open_after`]).
    pub fn open_month(&self, at: Timestamp) -> Month {
        at.month_in(self.zone()).open_after(self.last_closed())
    }

    /// Notes that `affiliate` is now named in `customer`'s attribution,
    /// unless it was already (`before`: whether it was).
    fn note_attributed(&mut self, customer: &CustomerId, affiliate: &AffiliateId, before: bool) {
        if !before {
            self.customers_of
                .entry(affiliate.clone())
                .or_default()
                .push(customer.clone());
        }
    }

    /// The months the program's `auto_close_day` owes a close at `now`,
    /// oldest first.
    ///
    /// Month M closes by itself once day `auto_close_day` of the month
    /// after it has begun in the program's zone (its close moment), if that
    /// moment came while auto-close was on: since the first rules version
    /// of the latest unbroken run of versions that set a day, and never
    /// before the program was defined (an applied replay's corrected rules
    /// may take effect earlier). So switching auto-close on does not close
    /// the months an operator left open, and a server that was down on the
    /// day closes what it missed, in order, when it is back. Never a month
    /// already closed, nor one before the last month closed (closes go in
    /// order).
    pub fn auto_close_due(&self, now: Timestamp) -> Vec<Month> {
        let mut due = Vec::new();
        let Some(day) = self.current_rules().and_then(|r| r.auto_close_day) else {
            return due;
        };
        let Some(since) = self
            .rules
            .iter()
            .rev()
            .take_while(|(_, rules)| rules.auto_close_day.is_some())
            .last()
            .map(|(at, _)| *at)
            .map(|at| self.defined_at.map_or(at, |defined| at.max(defined)))
        else {
            return due;
        };
        let zone = self.zone();
        let last_closed = self.last_closed();
        let current = now.month_in(zone);
        // The first month whose close moment can fall after `since`.
        let mut month = since.month_in(zone).previous();
        while month < current {
            let moment = month.next().day_start_in(day, zone);
            if moment >= since && moment <= now && last_closed.is_none_or(|last| month > last) {
                due.push(month);
            }
            month = month.next();
        }
        due
    }

    /// The time zone of the current rules.
    pub fn zone(&self) -> chrono_tz::Tz {
        self.zone.unwrap_or(chrono_tz::UTC)
    }

    /// Makes `overrides` hold from now on. In a what-if replay (`shadow`)
    /// they are installed before the first event and imposed again as
    /// events fold; an applied replay installs them in the live model, for
    /// the closes still to come: attribution and rates follow them, and
    /// excluded lines that no close took yet never earn.
    pub(crate) fn install_overrides(&mut self, overrides: &Overrides, shadow: bool) {
        self.pending_memo.program += 1;
        for o in &overrides.affiliate_rates {
            self.rate_overrides.push(o.clone());
        }
        self.impose_rules(overrides);
        let customers: Vec<CustomerId> = overrides
            .attribution
            .iter()
            .map(|o| o.customer_id.clone())
            .collect();
        for customer in customers {
            self.impose_attribution(overrides, &customer);
        }
        if !shadow {
            for seq in &overrides.exclude {
                self.open_lines.retain(|(_, _, s), _| s != seq);
                self.open_refunds.retain(|(_, _, s), _| s != seq);
            }
        }
    }

    /// The overrides of the replays applied so far, in order (those before
    /// replay `before`, when given): the layers a new replay starts from.
    pub fn applied_overrides(&self, before: Option<&Uuid>) -> Vec<(Seq, Overrides)> {
        self.applied_replays
            .iter()
            .take_while(|(r, _, _)| Some(r) != before)
            .map(|(_, seq, o)| (*seq, o.clone()))
            .collect()
    }

    /// The attribution model override holds over every version of the
    /// rules, and the rules override from its moment on, over any later
    /// version.
    pub(crate) fn impose_rules(&mut self, overrides: &Overrides) {
        self.pending_memo.program += 1;
        if let Some(model) = &overrides.model {
            for (_, rules) in &mut self.rules {
                if let Some(attribution) = model.attribution {
                    rules.attribution = attribution;
                }
                if let Some(days) = model.cookie_days {
                    rules.cookie_days = days;
                }
            }
        }
        if let Some(o) = &overrides.rules {
            self.rules.retain(|(at, _)| *at < o.from);
            let mut rules = o.rules.clone();
            if let Some(model) = &overrides.model {
                rules.attribution = model.attribution.unwrap_or(rules.attribution);
                rules.cookie_days = model.cookie_days.unwrap_or(rules.cookie_days);
            }
            self.rules.push((o.from, rules));
            self.zone = self.current_rules().map(ProgramRules::zone);
        }
    }

    /// The posted rewards (and bounty) of the customer's lines from `from`
    /// on belong to whoever has the customer at the line's moment: after a
    /// retroactive reassignment that a replay's correction holds over.
    pub(crate) fn reown_since(&mut self, customer_id: &CustomerId, from: Option<Timestamp>) {
        let Some(customer) = self.customers.get_mut(customer_id) else {
            return;
        };
        let start = from.unwrap_or(Timestamp::MIN);
        let bounty_to = customer
            .bounty
            .as_ref()
            .filter(|b| b.line_at >= start)
            .and_then(|b| customer.affiliate_at(b.line_at))
            .cloned();
        if let (Some(bounty), Some(to)) = (&mut customer.bounty, bounty_to) {
            bounty.affiliate_id = to;
        }
        for id in &customer.lines {
            if let Some(line) = self.lines.get_mut(id)
                && line.at >= start
                && let Some(reward) = &mut line.reward
                && let Some(to) = customer.affiliate_at(line.at)
            {
                reward.affiliate_id = to.clone();
            }
        }
    }

    /// The customer's attribution overrides hold over what was recorded.
    pub(crate) fn impose_attribution(&mut self, overrides: &Overrides, customer_id: &CustomerId) {
        self.pending_memo.program += 1;
        let mut wanted = overrides
            .attribution
            .iter()
            .filter(|o| &o.customer_id == customer_id)
            .peekable();
        if wanted.peek().is_none() {
            return;
        }
        let customer = self.customers.entry(customer_id.clone()).or_default();
        let mut named = Vec::new();
        for o in wanted {
            let before = customer.move_to(o.from, &o.affiliate_id);
            named.push((o.affiliate_id.clone(), before));
        }
        for (affiliate, before) in named {
            self.note_attributed(customer_id, &affiliate, before);
        }
    }

    /// The enrolled affiliate a signup by `visitor` at `at` goes to under
    /// `rules`' attribution model and cookie window, if any click counts.
    pub(crate) fn click_attribution(
        &self,
        rules: &ProgramRules,
        visitor: &str,
        at: Timestamp,
        customer_id: &CustomerId,
    ) -> Option<&AffiliateId> {
        let clicks = self.visitors.get(visitor)?;
        let window_start =
            Timestamp::from_micros(at.micros() - i64::from(rules.cookie_days) * 86_400_000_000);
        let inside = clicks
            .iter()
            .filter_map(|(click_at, index)| {
                Some((*click_at, self.affiliate_order.get(*index as usize)?))
            })
            .filter(|(click_at, a)| {
                *click_at >= window_start
                    && *click_at <= at
                    && self.signup_eligible(a, at, customer_id)
            });
        let chosen = match rules.attribution {
            Attribution::LastClick => inside.max_by_key(|(click_at, _)| *click_at),
            Attribution::FirstClick => inside.min_by_key(|(click_at, _)| *click_at),
        };
        chosen.map(|(_, a)| a)
    }

    /// Whether an affiliate may get a signup at `at`: enrolled, not
    /// suspended, and not the customer themselves.
    fn signup_eligible(
        &self,
        affiliate: &AffiliateId,
        at: Timestamp,
        customer_id: &CustomerId,
    ) -> bool {
        self.affiliates.get(affiliate).is_some_and(|a| {
            a.suspended_at.is_none_or(|s| s > at) && a.customer_id.as_ref() != Some(customer_id)
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub role: Role,
    pub issuer: String,
    pub revoked: bool,
}

/// The state the rules decide against: folded from every recorded event.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Model {
    pub programs: HashMap<ProgramId, ProgramModel>,
    pub keys: BTreeMap<String, KeyRecord>,
    /// Keyed hash of a key → key id.
    pub key_hashes: HashMap<Bytes<32>, String>,
    /// Every referral code of every program: `/r/{code}` names no program,
    /// so codes are unique server-wide.
    pub referral_codes: HashMap<String, (ProgramId, AffiliateId)>,
    pub last_seq: Seq,
}

impl Model {
    /// Refund `refund` of `program`, once it is recorded.
    pub fn refund(&self, program: &ProgramId, refund: &LineId) -> Option<&Refund> {
        self.programs.get(program)?.refunds.get(refund)
    }

    /// Restores what a checkpoint does not keep (parsed time zones).
    pub fn after_load(&mut self) {
        for pm in self.programs.values_mut() {
            pm.zone = pm.current_rules().map(ProgramRules::zone);
            let mut customers_of: HashMap<AffiliateId, Vec<CustomerId>> = HashMap::default();
            for (id, customer) in &pm.customers {
                for (i, (_, affiliate)) in customer.attribution.iter().enumerate() {
                    if !customer.attribution[..i]
                        .iter()
                        .any(|(_, a)| a == affiliate)
                    {
                        customers_of
                            .entry(affiliate.clone())
                            .or_default()
                            .push(id.clone());
                    }
                }
            }
            pm.customers_of = customers_of;
        }
    }

    pub fn program(&self, id: &ProgramId) -> Option<&ProgramModel> {
        self.programs.get(id)
    }

    /// Folds one recorded event in. Infallible: events were decided valid
    /// when recorded; an event for an unknown program or affiliate (possible
    /// only in a hand-made import) changes nothing it cannot find.
    pub fn apply(&mut self, recorded: &Recorded) {
        self.last_seq = recorded.seq;
        match &recorded.event {
            Event::ApiKeyIssued(e) => {
                self.key_hashes.insert(e.key_hash, e.key_id.clone());
                self.keys.insert(
                    e.key_id.clone(),
                    KeyRecord {
                        key_id: e.key_id.clone(),
                        role: e.role,
                        issuer: e.issuer.clone(),
                        revoked: false,
                    },
                );
                return;
            }
            Event::ApiKeyRevoked(e) => {
                if let Some(key) = self.keys.get_mut(&e.key_id) {
                    key.revoked = true;
                }
                return;
            }
            _ => {}
        }
        let Some(program) = &recorded.program else {
            return;
        };
        if let Event::AffiliateEnrolled(e) = &recorded.event
            && self
                .programs
                .get(program)
                .is_some_and(|pm| !pm.rules.is_empty())
        {
            self.referral_codes.insert(
                e.referral_code.clone(),
                (program.clone(), e.affiliate_id.clone()),
            );
        }
        if !self.programs.contains_key(program) {
            self.programs
                .insert(program.clone(), ProgramModel::default());
        }
        let Some(pm) = self.programs.get_mut(program) else {
            return;
        };
        if pm.rules.is_empty() && !matches!(recorded.event, Event::ProgramDefined(_)) {
            return;
        }
        for posting in recorded.event.postings() {
            if let Some(affiliate) = posting_affiliate(&posting.account)
                && let Some(a) = pm.affiliates.get_mut(affiliate)
            {
                a.accounts.apply(&posting);
            }
        }
        apply_program_event(pm, recorded);
    }
}

fn posting_affiliate(account: &Account) -> Option<&AffiliateId> {
    match account {
        Account::Earned(a)
        | Account::InWithdrawal(a)
        | Account::PaidOut(a)
        | Account::Credited(a) => Some(a),
        Account::CommissionExpense => None,
    }
}

pub(crate) fn apply_program_event(pm: &mut ProgramModel, recorded: &Recorded) {
    pm.pending_memo.note(&pm.customers, &pm.lines, recorded);
    let at = recorded.occurred_at;
    let seq = recorded.seq;
    if matches!(
        recorded.event,
        Event::ProgramDefined(_)
            | Event::AffiliateSuspended(_)
            | Event::RewardAccrued(_)
            | Event::RewardClawedBack(_)
            | Event::MonthClosed(_)
            | Event::ReferralReassigned(_)
            | Event::AdjustmentPosted(_)
            | Event::ReplayApplied(_)
            | Event::ReplayCorrected(_)
            | Event::SignupAttributed(_)
    ) {
        pm.money_seq = seq;
    }
    match &recorded.event {
        Event::ProgramDefined(e) => {
            pm.zone = Some(e.rules.zone());
            pm.rules.push((at, e.rules.clone()));
            pm.defined_at.get_or_insert(at);
        }
        Event::AffiliateEnrolled(e) => {
            pm.referral_codes
                .insert(e.referral_code.clone(), e.affiliate_id.clone());
            if let Some(promo) = &e.promo_code {
                pm.promo_codes
                    .insert(promo.to_uppercase(), e.affiliate_id.clone());
            }
            if let Some(customer) = &e.customer_id {
                pm.own_customers
                    .insert(customer.clone(), e.affiliate_id.clone());
            }
            let index = pm.affiliate_order.len() as u32;
            pm.affiliate_order.push(e.affiliate_id.clone());
            pm.affiliates.insert(
                e.affiliate_id.clone(),
                Affiliate {
                    index,
                    referral_code: e.referral_code.clone(),
                    promo_code: e.promo_code.clone(),
                    customer_id: e.customer_id.clone(),
                    group: e.group.clone(),
                    rate: e.rate,
                    suspended_at: None,
                    enrolled_at: at,
                    accounts: AffiliateAccounts::default(),
                },
            );
        }
        Event::AffiliateSuspended(e) => {
            if let Some(a) = pm.affiliates.get_mut(&e.affiliate_id) {
                a.suspended_at = Some(at);
            }
        }
        Event::ClickRecorded(e) => {
            let Some(index) = pm.affiliates.get(&e.affiliate_id).map(|a| a.index) else {
                return;
            };
            match pm.visitors.get_mut(&e.visitor) {
                Some(clicks) => {
                    clicks.push((at, index));
                    if clicks.len() > MAX_CLICKS_PER_VISITOR
                        && let Some(oldest) = clicks
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, c)| c.0)
                            .map(|(i, _)| i)
                    {
                        clicks.swap_remove(oldest);
                    }
                }
                None => {
                    pm.visitors.insert(e.visitor.clone(), vec![(at, index)]);
                }
            }
        }
        Event::SignupAttributed(e) => {
            let customer = signed_up(pm, e, at);
            let before = customer.move_to(None, &e.affiliate_id);
            customer.signup_at = Some(at);
            customer.via = Some(e.via);
            pm.note_attributed(&e.customer_id, &e.affiliate_id, before);
        }
        Event::BasisLineRecorded(e) => {
            let month = at.month_in(pm.zone());
            let customer = pm.customers.entry(e.customer_id.clone()).or_default();
            if customer.first_line.is_none() {
                customer.first_line = Some(e.id.clone());
                customer.first_order = e.order_id.clone();
                customer.first_line_at = Some(at);
            }
            customer.lines.push(e.id.clone());
            pm.open_lines.insert((month, at, seq), e.id.clone());
            pm.lines_by_month
                .entry(month)
                .or_default()
                .push(e.id.clone());
            pm.lines.insert(
                e.id.clone(),
                Box::new(Line {
                    id: e.id.clone(),
                    kind: e.kind,
                    customer_id: e.customer_id.clone(),
                    amount: e.amount,
                    product: e.product.clone(),
                    order_id: e.order_id.clone(),
                    at,
                    month,
                    seq,
                    refunded: Decimal::ZERO,
                    processed: false,
                    reward: None,
                    excluded: false,
                }),
            );
        }
        Event::RefundRecorded(e) => {
            let month = at.month_in(pm.zone());
            if let Some(line) = pm.lines.get_mut(&e.refunds) {
                line.refunded += e.amount;
            }
            pm.open_refunds.insert((month, at, seq), e.id.clone());
            pm.refunds.insert(
                e.id.clone(),
                Refund {
                    line: e.refunds.clone(),
                    customer_id: e.customer_id.clone(),
                    amount: e.amount,
                    at,
                    month,
                    seq,
                    processed: false,
                    excluded: false,
                },
            );
        }
        Event::CustomerClosed(e) => {
            pm.customers
                .entry(e.customer_id.clone())
                .or_default()
                .closed = true;
        }
        Event::CustomerGroupChanged(e) => {
            pm.customers
                .entry(e.customer_id.clone())
                .or_default()
                .groups
                .push((at, e.group.clone()));
        }
        Event::RewardAccrued(e) => match e.kind {
            RewardKind::Reward => {
                if let Some(line) = pm.lines.get_mut(&e.line) {
                    line.processed = true;
                    pm.open_lines.remove(&(line.month, line.at, line.seq));
                    line.reward = Some(Box::new(LineReward {
                        affiliate_id: e.affiliate_id.clone(),
                        rate: e.rate,
                        amount: e.amount,
                        refunded: Decimal::ZERO,
                        clawed: Decimal::ZERO,
                    }));
                }
            }
            RewardKind::Bounty => {
                if let Some(customer) = pm.customers.get_mut(&e.customer_id) {
                    customer.bounty = Some(PaidBounty {
                        affiliate_id: e.affiliate_id.clone(),
                        amount: e.amount,
                        line_at: e.line_at,
                    });
                }
            }
        },
        Event::RewardClawedBack(e) => {
            if let Some(refund) = pm.refunds.get_mut(&e.refund) {
                refund.processed = true;
                pm.open_refunds
                    .remove(&(refund.month, refund.at, refund.seq));
                if let Some(reward) = pm
                    .lines
                    .get_mut(&e.line)
                    .and_then(|line| line.reward.as_mut())
                {
                    reward.refunded += refund.amount;
                    reward.clawed += e.amount;
                }
            }
        }
        Event::MonthClosed(e) => {
            let rest = pm
                .open_lines
                .split_off(&(e.month.next(), Timestamp::MIN, 0));
            for (_, id) in std::mem::replace(&mut pm.open_lines, rest) {
                if let Some(line) = pm.lines.get_mut(&id) {
                    line.processed = true;
                }
            }
            let rest = pm
                .open_refunds
                .split_off(&(e.month.next(), Timestamp::MIN, 0));
            for (_, id) in std::mem::replace(&mut pm.open_refunds, rest) {
                if let Some(refund) = pm.refunds.get_mut(&id) {
                    refund.processed = true;
                    // A refund of a rewarded line that clawed nothing back
                    // (its share rounded to nothing): it still counts among
                    // the line's refunds, so that the refund completing the
                    // line takes back all of the reward that is left.
                    if let Some(reward) = pm
                        .lines
                        .get_mut(&refund.line)
                        .and_then(|line| line.reward.as_mut())
                    {
                        reward.refunded += refund.amount;
                    }
                }
            }
            pm.closed.insert(e.month, e.clone());
        }
        Event::WithdrawalRequested(e) => {
            pm.withdrawals.insert(
                e.withdrawal_id,
                Withdrawal {
                    affiliate_id: e.affiliate_id.clone(),
                    amount: e.amount,
                    status: WithdrawalStatus::Requested,
                },
            );
        }
        Event::WithdrawalPaid(e) => {
            if let Some(w) = pm.withdrawals.get_mut(&e.withdrawal_id) {
                w.status = WithdrawalStatus::Paid;
            }
        }
        Event::WithdrawalRejected(e) => {
            if let Some(w) = pm.withdrawals.get_mut(&e.withdrawal_id) {
                w.status = WithdrawalStatus::Rejected;
            }
        }
        Event::ReferralReassigned(e) => reassign(pm, e),
        Event::ReplayApplied(e) => {
            pm.install_overrides(&e.overrides, false);
            pm.applied_replays
                .push((e.replay_id, seq, e.overrides.clone()));
        }
        Event::ReplayCorrected(e) => correct(pm, e),
        Event::CreditApplied(_)
        | Event::AdjustmentPosted(_)
        | Event::ApiKeyIssued(_)
        | Event::ApiKeyRevoked(_) => {}
    }
}

/// Makes the write model what an applied replay's corrected world has, where
/// it differs ([`ReplayCorrected`]).
fn correct(pm: &mut ProgramModel, e: &ReplayCorrected) {
    for c in &e.refunds {
        let Some(refund) = pm.refunds.get_mut(&c.refund) else {
            continue;
        };
        let key = (refund.month, refund.at, refund.seq);
        match &c.state {
            CorrectedState::Open => {
                refund.processed = false;
                pm.open_refunds.insert(key, c.refund.clone());
            }
            CorrectedState::Closed { .. } => {
                refund.processed = true;
                pm.open_refunds.remove(&key);
            }
            CorrectedState::Excluded => {
                refund.processed = true;
                refund.excluded = true;
                pm.open_refunds.remove(&key);
                let amount = refund.amount;
                if let Some(line) = pm.lines.get_mut(&refund.line) {
                    line.refunded -= amount;
                }
            }
        }
    }
    let mut first_lines_changed = Vec::new();
    for c in &e.lines {
        let Some(line) = pm.lines.get_mut(&c.line) else {
            continue;
        };
        let key = (line.month, line.at, line.seq);
        match &c.state {
            CorrectedState::Open => {
                line.processed = false;
                line.reward = None;
                pm.open_lines.insert(key, c.line.clone());
            }
            CorrectedState::Closed { reward } => {
                line.processed = true;
                line.reward = reward.clone().map(Box::new);
                pm.open_lines.remove(&key);
            }
            CorrectedState::Excluded => {
                // Kept (its id stays taken, its refunds find it), but no
                // close, tier count or reassignment sees it again.
                line.processed = true;
                line.reward = None;
                line.excluded = true;
                pm.open_lines.remove(&key);
                if let Some(month) = pm.lines_by_month.get_mut(&line.month) {
                    month.retain(|id| id != &c.line);
                }
                if let Some(customer) = pm.customers.get_mut(&line.customer_id) {
                    customer.lines.retain(|id| id != &c.line);
                    first_lines_changed.push(line.customer_id.clone());
                }
            }
        }
    }
    // A customer's first line is the first of those that still count.
    for customer_id in first_lines_changed {
        let Some(customer) = pm.customers.get_mut(&customer_id) else {
            continue;
        };
        let first = customer.lines.first().and_then(|id| pm.lines.get(id));
        customer.first_line = first.map(|l| l.id.clone());
        customer.first_order = first.and_then(|l| l.order_id.clone());
        customer.first_line_at = first.map(|l| l.at);
    }
    for c in &e.customers {
        let customer = pm.customers.entry(c.customer_id.clone()).or_default();
        let named: Vec<(AffiliateId, bool)> = c
            .attribution
            .iter()
            .map(|a| (a.affiliate_id.clone(), customer.names(&a.affiliate_id)))
            .collect();
        customer.attribution = c
            .attribution
            .iter()
            .map(|a| (a.from, a.affiliate_id.clone()))
            .collect();
        customer.signup_at = c.signup_at;
        customer.via = c.via;
        customer.bounty = c.bounty.clone();
        for (affiliate, before) in named {
            pm.note_attributed(&c.customer_id, &affiliate, before);
        }
    }
    for click in &e.clicks {
        let Some(index) = pm.affiliates.get(&click.affiliate_id).map(|a| a.index) else {
            continue;
        };
        if let Some(clicks) = pm.visitors.get_mut(&click.visitor)
            && let Some(i) = clicks.iter().position(|c| *c == (click.at, index))
        {
            clicks.swap_remove(i);
        }
    }
}

/// The customer a signup names, known from then on, in the group it
/// reports (when no group was known before): what a replay keeps of a
/// signup it excluded or attributes to nobody, as the write model keeps it.
pub(crate) fn signed_up<'a>(
    pm: &'a mut ProgramModel,
    e: &SignupAttributed,
    at: Timestamp,
) -> &'a mut Customer {
    let customer = pm.customers.entry(e.customer_id.clone()).or_default();
    if customer.groups.is_empty() {
        customer.groups.push((at, e.group.clone()));
    }
    customer
}

/// Moves a customer; with `retroactive`, posted rewards of lines from `from`
/// on now belong to the new affiliate (the adjustments moved their money),
/// and processed lines that earned nobody are opened again for the next close.
fn reassign(pm: &mut ProgramModel, e: &ReferralReassigned) {
    // The writer moves only customers it knows; a replay that excluded
    // what made one known still honours the operator's decision.
    let customer = pm.customers.entry(e.customer_id.clone()).or_default();
    let before = customer.move_to(e.from, &e.to);
    // The customer is the operator's placement now, not the signup's.
    customer.via = None;
    pm.note_attributed(&e.customer_id, &e.to, before);
    let Some(customer) = pm.customers.get_mut(&e.customer_id) else {
        return;
    };
    if !e.retroactive {
        return;
    }
    let from = e.from.unwrap_or(Timestamp::MIN);
    if let Some(bounty) = &mut customer.bounty
        && bounty.line_at >= from
    {
        bounty.affiliate_id = e.to.clone();
    }
    for id in customer.lines.clone() {
        let Some(line) = pm.lines.get_mut(&id) else {
            continue;
        };
        if line.at < from {
            continue;
        }
        match &mut line.reward {
            Some(reward) => reward.affiliate_id = e.to.clone(),
            None if line.processed => {
                line.processed = false;
                pm.open_lines
                    .insert((line.month, line.at, line.seq), id.clone());
            }
            None => {}
        }
    }
    for (id, refund) in pm.refunds.iter_mut() {
        if refund.customer_id == e.customer_id
            && refund.processed
            && !refund.excluded
            && pm
                .lines
                .get(&refund.line)
                .is_some_and(|l| l.at >= from && l.reward.is_none())
        {
            refund.processed = false;
            pm.open_refunds
                .insert((refund.month, refund.at, refund.seq), id.clone());
        }
    }
}

// ---------------------------------------------------------------------------
// Decisions.

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

/// Whom one line earns for if a close took it now, under which rules
/// (the ones in force at its moment): `None` when it earns nobody. Rate
/// aside, everything a close asks of a line.
fn line_earner<'a>(
    pm: &'a ProgramModel,
    line: &Line,
) -> Option<(&'a AffiliateId, &'a Affiliate, &'a ProgramRules)> {
    let rules = pm.rules_at(line.at)?;
    if !line.kind.earns_under(rules.basis) {
        return None;
    }
    let customer = pm.customers.get(&line.customer_id)?;
    let affiliate_id = customer.affiliate_at(line.at)?;
    let affiliate = pm.affiliates.get(affiliate_id)?;
    if affiliate.suspended_at.is_some_and(|s| s <= line.at)
        || affiliate.customer_id.as_ref() == Some(&line.customer_id)
    {
        return None;
    }
    let group = customer.group_at(line.at);
    if rules.forbidden_groups.iter().any(|g| g == group) {
        return None;
    }
    let in_term = match rules.term {
        Term::Lifetime => true,
        Term::Months(months) => {
            let start = customer
                .signup_at
                .or(customer.first_line_at)
                .unwrap_or(line.at)
                .to_datetime();
            start
                .checked_add_months(chrono::Months::new(months))
                .is_none_or(|end| line.at.to_datetime() < end)
        }
        Term::FirstOrder => match (&customer.first_order, &line.order_id) {
            (Some(first), Some(order)) => first == order,
            _ => customer.first_line.as_ref() == Some(&line.id),
        },
    };
    in_term.then_some((affiliate_id, affiliate, rules))
}

/// The rate of a tier for an affiliate with `active` active referrals in
/// the month (the default when no tier is reached, never below it).
fn tier_rate(rules: &ProgramRules, active: u32) -> Rate {
    rules
        .tiers
        .iter()
        .filter(|tier| active >= tier.min_active_referrals)
        .map(|tier| tier.rate)
        .max()
        .unwrap_or(rules.default_rate)
        .max(rules.default_rate)
}

/// The active referrals a close looks up, each counted once.
enum TierCounts<'a> {
    /// Every affiliate's, a month at a time, in one pass over the month's
    /// lines: a close, which rewards them all.
    All(HashMap<Month, HashMap<&'a AffiliateId, u32>>),
    /// Each affiliate's own, through its own customers: a pending estimate,
    /// which looks at one affiliate (a pass over a month of a busy program
    /// cost every affiliate's first estimate 133–162 ms at 200,000 lines).
    Own(HashMap<(Month, &'a AffiliateId), u32>),
}

impl<'a> TierCounts<'a> {
    fn active(&mut self, pm: &'a ProgramModel, month: Month, affiliate_id: &'a AffiliateId) -> u32 {
        match self {
            TierCounts::All(counts) => counts
                .entry(month)
                .or_insert_with(|| active_referrals(pm, month))
                .get(affiliate_id)
                .copied()
                .unwrap_or(0),
            TierCounts::Own(counts) => *counts
                .entry((month, affiliate_id))
                .or_insert_with(|| active_referrals_of(pm, affiliate_id, month, Seq::MAX)),
        }
    }
}

/// What one line earns its earner (from [`line_earner`]) if a close took
/// it now: at what rate, how much.
fn line_reward<'a>(
    pm: &'a ProgramModel,
    line: &Line,
    (affiliate_id, affiliate, rules): (&'a AffiliateId, &'a Affiliate, &'a ProgramRules),
    tier_counts: &mut TierCounts<'a>,
) -> (Rate, Decimal) {
    let affiliate_rate = pm
        .rate_overrides
        .iter()
        .rev()
        .find(|o| &o.affiliate_id == affiliate_id && o.from <= line.at)
        .map(|o| o.rate)
        .or(affiliate.rate);
    let rate = match (
        affiliate_rate,
        line.product
            .as_ref()
            .and_then(|p| rules.product_rates.get(p)),
    ) {
        (Some(rate), _) => rate,
        (None, Some(rate)) => *rate,
        // Without tiers, the default (and no count of active referrals).
        (None, None) if rules.tiers.is_empty() => rules.default_rate,
        (None, None) => tier_rate(rules, tier_counts.active(pm, line.month, affiliate_id)),
    };
    (rate, rules.currency.percent_of(line.amount, rate))
}

/// Each affiliate's active referrals in a month: the customers with a
/// basis line dated in it that earns the affiliate commission (so a staff
/// customer, a line past the term, or one after a suspension raises no
/// tier: a forbidden group never earns its affiliate anything). Counted
/// in one pass over the month's lines (once per month and close, not once
/// per affiliate).
fn active_referrals(pm: &ProgramModel, month: Month) -> HashMap<&AffiliateId, u32> {
    let mut customers: HashSet<(&AffiliateId, &CustomerId)> = HashSet::default();
    for id in pm.lines_by_month.get(&month).into_iter().flatten() {
        let Some(line) = pm.lines.get(id) else {
            continue;
        };
        if let Some((affiliate_id, _, _)) = line_earner(pm, line) {
            customers.insert((affiliate_id, &line.customer_id));
        }
    }
    let mut counts = HashMap::default();
    for (affiliate_id, _) in customers {
        *counts.entry(affiliate_id).or_default() += 1;
    }
    counts
}

/// The rewards, bounties and claw-backs a close of every open line and
/// refund dated up to `upto` would post on the statement of `month`. Month
/// close records them; the pending estimate sums them without recording.
/// Restricted to one affiliate when `only` is given.
pub fn close_rewards(
    pm: &ProgramModel,
    upto: Month,
    month: Month,
    only: Option<&AffiliateId>,
) -> Vec<Event> {
    let end = (upto.next(), Timestamp::MIN, 0);
    let lines = pm
        .open_lines
        .range(..end)
        .filter_map(|(key, id)| Some((key, id, &**pm.lines.get(id)?)));
    close_rewards_of(pm, lines, pm.open_refunds.range(..end), month, only)
}

/// The open lines and refunds in `open_lines` / `open_refunds` order.
type OpenEntries<'a> = std::collections::btree_map::Range<'a, (Month, Timestamp, Seq), LineId>;

/// [`close_rewards`] over the given open lines and refunds, in the order
/// of the program's open lines and refunds (a bounty goes with a
/// customer's first line, claw-backs of one line add up in order).
fn close_rewards_of<'a>(
    pm: &'a ProgramModel,
    lines: impl Iterator<Item = (&'a (Month, Timestamp, Seq), &'a LineId, &'a Line)>,
    refunds: OpenEntries<'a>,
    month: Month,
    only: Option<&AffiliateId>,
) -> Vec<Event> {
    let mut events = Vec::new();
    let Some(rules) = pm.current_rules() else {
        return events;
    };
    let mut tier_counts = match only {
        Some(_) => TierCounts::Own(HashMap::default()),
        None => TierCounts::All(HashMap::default()),
    };
    // What this close rewards, for the claw-backs of refunds it also
    // takes: none to take, nothing to keep.
    let any_refunds = refunds.clone().next().is_some();
    let mut new_rewards: HashMap<&LineId, (AffiliateId, Rate, Decimal)> = HashMap::default();
    let mut bounties: HashSet<&CustomerId> = HashSet::default();
    for ((line_month, _, _), id, line) in lines {
        let Some(earner) = line_earner(pm, line) else {
            continue;
        };
        let affiliate_id = earner.0;
        // The customer's first earning line takes the bounty, whomever it
        // earns: also when only another affiliate's money is asked for.
        let bounty = pm.rules_at(line.at).and_then(|r| r.bounty).filter(|_| {
            pm.customers
                .get(&line.customer_id)
                .is_some_and(|c| c.bounty.is_none())
                && bounties.insert(&line.customer_id)
        });
        if only.is_some_and(|only| only != affiliate_id) {
            continue;
        }
        let (rate, amount) = line_reward(pm, line, earner, &mut tier_counts);
        let late = *line_month < month;
        if !amount.is_zero() {
            events.push(Event::RewardAccrued(RewardAccrued {
                affiliate_id: affiliate_id.clone(),
                customer_id: line.customer_id.clone(),
                kind: RewardKind::Reward,
                line: id.clone(),
                product: line.product.clone(),
                line_at: line.at,
                basis: line.amount,
                rate,
                amount,
                month,
                late,
            }));
        }
        if let Some(bounty) = bounty {
            events.push(Event::RewardAccrued(RewardAccrued {
                affiliate_id: affiliate_id.clone(),
                customer_id: line.customer_id.clone(),
                kind: RewardKind::Bounty,
                line: id.clone(),
                product: line.product.clone(),
                line_at: line.at,
                basis: Decimal::ZERO,
                rate: Rate::default(),
                amount: bounty,
                month,
                late,
            }));
        }
        if any_refunds {
            new_rewards.insert(id, (affiliate_id.clone(), rate, amount));
        }
    }
    let mut refunded_now: HashMap<&LineId, (Decimal, Decimal)> = HashMap::default();
    for ((refund_month, _, _), id) in refunds {
        let Some(refund) = pm.refunds.get(id) else {
            continue;
        };
        let Some(line) = pm.lines.get(&refund.line) else {
            continue;
        };
        let (affiliate_id, rate, reward, refunded, clawed) =
            match (&line.reward, new_rewards.get(&refund.line)) {
                (Some(r), _) => (
                    r.affiliate_id.clone(),
                    r.rate,
                    r.amount,
                    r.refunded,
                    r.clawed,
                ),
                (None, Some((a, rate, amount))) => {
                    (a.clone(), *rate, *amount, Decimal::ZERO, Decimal::ZERO)
                }
                (None, None) => continue,
            };
        if only.is_some_and(|only| only != &affiliate_id) {
            continue;
        }
        let (refunded_before, clawed_before) = refunded_now
            .get(&refund.line)
            .map(|(r, c)| (refunded + r, clawed + c))
            .unwrap_or((refunded, clawed));
        let remaining = reward - clawed_before;
        let amount = if refunded_before + refund.amount >= line.amount {
            remaining
        } else {
            rules
                .currency
                .percent_of(refund.amount, rate)
                .min(remaining)
        };
        let entry = refunded_now.entry(&refund.line).or_default();
        entry.0 += refund.amount;
        entry.1 += amount;
        if amount <= Decimal::ZERO {
            continue;
        }
        events.push(Event::RewardClawedBack(Box::new(RewardClawedBack {
            affiliate_id,
            customer_id: line.customer_id.clone(),
            refund: id.clone(),
            line: refund.line.clone(),
            product: line.product.clone(),
            refund_at: refund.at,
            basis: refund.amount,
            rate,
            amount,
            month,
            late: *refund_month < month,
        })));
    }
    events
}

/// The commission an affiliate would get if every open month closed now:
/// the `pending` of the balance. Moves no money.
pub fn pending_estimate(pm: &ProgramModel, affiliate_id: &AffiliateId, now: Timestamp) -> Decimal {
    if pm.current_rules().is_none() {
        return Decimal::ZERO;
    }
    let month = now.month_in(pm.zone());
    let key = pm.pending_memo.key(affiliate_id, month);
    if let Some(entry) = pm.pending_memo.computed().get_mut(affiliate_id) {
        if entry.key == key {
            return entry.pending;
        }
        let (program, epoch, entry_month) = entry.key;
        if let Some(since) = entry.since.take()
            && program == key.0
            && entry_month == month
            && epoch + since.len() as u64 == key.1
            && let Some(added) = extend_pending(pm, affiliate_id, &since, &mut entry.active)
        {
            entry.key = key;
            entry.pending += added;
            entry.since = Some(Vec::new());
            return entry.pending;
        }
    }
    // Computed without the memo's lock: readers of other affiliates go on.
    let (pending, lines) = simulate_pending(pm, affiliate_id, month);
    pm.pending_memo.computed().insert(
        affiliate_id.clone(),
        ComputedPending {
            key,
            pending,
            since: Some(Vec::new()),
            // Extending by a change costs about what computing costs per
            // open line: beyond a quarter of them, computing is as cheap.
            limit: (lines / 4).max(16),
            active: HashMap::default(),
        },
    );
    pending
}

/// What `changes` (noted since an estimate was computed, in log order)
/// add to the affiliate's estimate, or `None` when adding is not exact
/// and the estimate must be computed again. Anything else that concerns
/// the estimate since (see [`PendingMemo::note`]) made it be computed
/// again, so only lines and signups of customers without lines came; and
/// as no close came, the lines are all still open. A new line adds its
/// own reward and maybe a bounty, and changes no other line's reward but
/// through the tier count of its month, so:
/// - a line that makes its customer an active referral of the affiliate
///   in its month adds one to that count, and when that changes a tier's
///   rate under any version of the rules, the estimate is computed again;
/// - the bounty goes to the customer's first open line (in close order)
///   that earns anyone under rules with a bounty: a new line of the
///   affiliate's gets it when there is no such line before it; when there
///   is one after it (a line dated back), or the new line earns someone
///   else while the bounty is unpaid, the estimate is computed again;
/// - a line sets its customer's first line and order only when the
///   customer had none, so that changes no other line's term.
fn extend_pending(
    pm: &ProgramModel,
    affiliate_id: &AffiliateId,
    changes: &[PendingChange],
    active: &mut HashMap<Month, u32>,
) -> Option<Decimal> {
    let tiers = pm.rules.iter().any(|(_, rules)| !rules.tiers.is_empty());
    let mut added = Decimal::ZERO;
    for change in changes {
        let PendingChange::Line(id) = change else {
            continue;
        };
        let line = pm.lines.get(id)?;
        let key = (line.month, line.at, line.seq);
        if line.processed || pm.open_lines.get(&key) != Some(id) {
            return None;
        }
        let customer = pm.customers.get(&line.customer_id)?;
        // The customer's lines recorded before this one.
        let earlier = || {
            customer
                .lines
                .iter()
                .filter_map(|id| pm.lines.get(id))
                .filter(|l| l.seq < line.seq)
        };
        let counts = |l: &Line| l.month == line.month && makes_active(pm, l, affiliate_id);
        let mut tier_counts = TierCounts::Own(HashMap::default());
        if tiers {
            let before = match active.get(&line.month) {
                Some(count) => *count,
                None => active_referrals_of(pm, affiliate_id, line.month, line.seq),
            };
            let after = if counts(line) && !earlier().any(|l| counts(l)) {
                before + 1
            } else {
                before
            };
            if after != before
                && pm
                    .rules
                    .iter()
                    .any(|(_, rules)| tier_rate(rules, before) != tier_rate(rules, after))
            {
                return None;
            }
            active.insert(line.month, after);
            if let TierCounts::Own(counts) = &mut tier_counts {
                counts.insert((line.month, affiliate_id), after);
            }
        }
        let Some(earner) = line_earner(pm, line) else {
            continue;
        };
        let unpaid_bounty = pm
            .rules_at(line.at)
            .and_then(|rules| rules.bounty)
            .filter(|_| customer.bounty.is_none());
        if earner.0 != affiliate_id {
            // It earns someone else, but may take the customer's bounty
            // from a line of the affiliate's dated after it.
            if unpaid_bounty.is_some() {
                return None;
            }
            continue;
        }
        added += line_reward(pm, line, earner, &mut tier_counts).1;
        if let Some(bounty) = unpaid_bounty {
            let mut first = true;
            for l in earlier() {
                let l_key = (l.month, l.at, l.seq);
                let open = !l.processed && pm.open_lines.get(&l_key) == Some(&l.id);
                if open
                    && pm
                        .rules_at(l.at)
                        .is_some_and(|rules| rules.bounty.is_some())
                    // The first earning line takes the bounty, whomever it earns.
                    && line_earner(pm, l).is_some()
                {
                    if l_key > key {
                        return None;
                    }
                    first = false;
                }
            }
            if first {
                added += bounty;
            }
        }
    }
    Some(added)
}

/// Whether a line makes its customer an active referral of the affiliate
/// in the line's month: what [`active_referrals`] counts.
fn makes_active(pm: &ProgramModel, line: &Line, affiliate_id: &AffiliateId) -> bool {
    line_earner(pm, line).is_some_and(|(a, _, _)| a == affiliate_id)
}

/// The affiliate's active referrals in a month, counting only the lines
/// recorded before `before_seq`: [`active_referrals`] for one affiliate,
/// read through its own customers.
fn active_referrals_of(
    pm: &ProgramModel,
    affiliate_id: &AffiliateId,
    month: Month,
    before_seq: Seq,
) -> u32 {
    let mut customers: Vec<&CustomerId> = pm
        .customers_of
        .get(affiliate_id)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter(|id| {
            pm.customers.get(*id).is_some_and(|c| {
                c.lines.iter().filter_map(|l| pm.lines.get(l)).any(|l| {
                    l.month == month && l.seq < before_seq && makes_active(pm, l, affiliate_id)
                })
            })
        })
        .collect();
    customers.sort_unstable();
    customers.dedup();
    customers.len() as u32
}

/// [`pending_estimate`], computed: a close of every open month simulated
/// for the affiliate's open lines; with how many lines it looked at.
fn simulate_pending(
    pm: &ProgramModel,
    affiliate_id: &AffiliateId,
    month: Month,
) -> (Decimal, usize) {
    // Only the open lines of customers whose attribution names the
    // affiliate can earn it something (a line earns whoever had its
    // customer at the line's moment): not every open line of the program,
    // which a busy program has hundreds of thousands of (measured: 0.64 s a
    // balance on a log of a million events with every month open), and
    // found through `customers_of`, not by reading every customer.
    // Claw-backs are few and go to whoever the line rewarded: all of them
    // are looked at.
    let mut lines: Vec<(&(Month, Timestamp, Seq), &LineId, &Line)> = pm
        .customers_of
        .get(affiliate_id)
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .filter_map(|id| pm.customers.get(id))
        .filter(|c| c.attribution.iter().any(|(_, a)| a == affiliate_id))
        .flat_map(|c| &c.lines)
        .filter_map(|id| {
            let line = pm.lines.get(id)?;
            // A line a close took is never open: no search for it (most
            // of a customer's lines, once months are closed).
            if line.processed {
                return None;
            }
            let (key, open) = pm
                .open_lines
                .get_key_value(&(line.month, line.at, line.seq))?;
            (open == id).then_some((key, id, &**line))
        })
        .collect();
    lines.sort_unstable_by_key(|(key, _, _)| **key);
    // A customer listed twice (reassigned away and back) once.
    lines.dedup_by_key(|(key, _, _)| **key);
    let count = lines.len();
    let pending = commission_of(&close_rewards_of(
        pm,
        lines.into_iter(),
        pm.open_refunds.range(..),
        month,
        Some(affiliate_id),
    ));
    (pending, count)
}

/// What the rewards and claw-backs among `events` (a close's) come to.
pub fn commission_of(events: &[Event]) -> Decimal {
    events
        .iter()
        .map(|event| match event {
            Event::RewardAccrued(r) => r.amount,
            Event::RewardClawedBack(c) => -c.amount,
            _ => Decimal::ZERO,
        })
        .sum()
}
