//! The read models: balances, monthly statements, referral statistics and
//! referral lists, as infallible folds over recorded events.
//!
//! Pure: no I/O, no clock, and no rules. Every amount shown here was decided
//! once and recorded in an event, so a rule change can never alter a replay.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::events::*;
use crate::events::{HashMap, HashSet};
use crate::money::{Currency, Rate};

/// Every projection of the ledger, and the log position it reflects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projections {
    pub programs: HashMap<ProgramId, ProgramView>,
    pub last_seq: Seq,
    /// The sum of every posting ever made: zero, always.
    pub postings_sum: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramView {
    pub rules: ProgramRules,
    pub affiliates: HashMap<AffiliateId, AffiliateView>,
    /// Who each customer belongs to now.
    pub customers: HashMap<CustomerId, CustomerView>,
    /// The program's commission expense account.
    pub commission_expense: Decimal,
    pub closed_months: BTreeMap<Month, MonthClosed>,
    /// The rules' time zone, parsed once (again after a checkpoint is loaded).
    #[serde(skip, default = "utc")]
    pub zone: chrono_tz::Tz,
    /// The local day of the last hour a click or line fell in.
    #[serde(skip)]
    day: DayMemo,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerView {
    pub affiliate_id: Option<AffiliateId>,
    pub signup_at: Option<Timestamp>,
    pub closed: bool,
    /// Basis lines of the program's basis kind, less refunds.
    pub billed: Decimal,
}

impl CustomerView {
    /// `active` or `closed`, as the referral list shows and filters it.
    pub fn status(&self) -> &'static str {
        if self.closed { "closed" } else { "active" }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffiliateView {
    pub profile: AffiliateEnrolled,
    pub enrolled_at: Timestamp,
    pub suspended: bool,
    pub accounts: AffiliateAccounts,
    pub statements: BTreeMap<Month, Vec<StatementLine>>,
    pub days: BTreeMap<NaiveDate, Counters>,
    pub creatives: BTreeMap<String, Counters>,
    /// Visitors seen per day (a 64-bit hash each: unique counts, no ids kept twice).
    pub visitors_by_day: BTreeMap<NaiveDate, HashSet<u64>>,
    /// Customers that earned the affiliate a reward at least once.
    pub converted: HashSet<CustomerId>,
    /// Commission per referred customer (rewards, bounties, claw-backs, adjustments).
    pub commission_by_customer: HashMap<CustomerId, Decimal>,
}

/// The counters of one day or one creative.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub clicks: u64,
    pub signups: u64,
    pub conversions: u64,
    pub commission: Decimal,
}

impl Counters {
    fn add(&mut self, other: &Counters) {
        self.clicks += other.clicks;
        self.signups += other.signups;
        self.conversions += other.conversions;
        self.commission += other.commission;
    }
}

/// How many values the sets hold in all, each counted once.
fn distinct(sets: &[&HashSet<u64>]) -> usize {
    let Some(largest) = sets.iter().copied().max_by_key(|set| set.len()) else {
        return 0;
    };
    let mut others: HashSet<u64> = HashSet::default();
    for set in sets {
        if !std::ptr::eq(*set, largest) {
            others.extend(set.iter().filter(|v| !largest.contains(*v)));
        }
    }
    largest.len() + others.len()
}

/// The kind of a statement line, as DESIGN.md names them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum StatementKind {
    Reward,
    Bounty,
    Clawback,
    Adjustment,
    Withdrawal,
    WithdrawalReturned,
    Credit,
}

impl StatementKind {
    pub fn name(&self) -> &'static str {
        match self {
            StatementKind::Reward => "reward",
            StatementKind::Bounty => "bounty",
            StatementKind::Clawback => "clawback",
            StatementKind::Adjustment => "adjustment",
            StatementKind::Withdrawal => "withdrawal",
            StatementKind::WithdrawalReturned => "withdrawal_returned",
            StatementKind::Credit => "credit",
        }
    }
}

/// One line of a monthly statement: a signed movement of `earned`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub seq: Seq,
    pub at: Timestamp,
    pub kind: StatementKind,
    pub customer_id: Option<CustomerId>,
    pub product: Option<String>,
    pub basis: Option<Decimal>,
    pub rate: Option<Rate>,
    pub amount: Decimal,
    pub late: bool,
    pub reference: String,
}

fn utc() -> chrono_tz::Tz {
    chrono_tz::UTC
}

/// The hash a day's unique visitors are counted by (kept in checkpoints).
pub fn visitor_hash(visitor: &str) -> u64 {
    // SipHash-1-3 with zero keys, named rather than std's `DefaultHasher`
    // (the same function today, but std may change it between releases):
    // checkpoints keep these hashes, so a visitor must hash the same in
    // every build, or a day's unique visitors would count one twice.
    let mut hasher = siphasher::sip::SipHasher13::new_with_keys(0, 0);
    visitor.hash(&mut hasher);
    hasher.finish()
}

impl Projections {
    /// Restores what a checkpoint does not keep (parsed time zones).
    pub fn after_load(&mut self) {
        for view in self.programs.values_mut() {
            view.zone = view.rules.zone();
            view.day.clear();
        }
    }

    /// Folds one recorded event in. `lines` are the write model's basis
    /// lines and refunds, with this event folded: a line counts in its
    /// customer's billed total (and its refunds lower it) only when it is
    /// of the basis the rules in force at its moment reward; a change of
    /// basis judges every line again, and a replay's exclusions take their
    /// amounts out of it. The write model keeps every line, so the
    /// projections do not keep them again (a map of every line's kind was a
    /// tenth of the writer's time in batch ingest, and of a checkpoint).
    pub fn apply(&mut self, recorded: &Recorded, lines: &impl BasisLines) {
        self.last_seq = recorded.seq;
        let postings = recorded.event.postings();
        for posting in &postings {
            self.postings_sum += posting.amount;
        }
        let Some(program) = &recorded.program else {
            return;
        };
        if let Event::ProgramDefined(e) = &recorded.event {
            match self.programs.get_mut(program) {
                Some(view) => {
                    let basis_changed = view.rules.basis != e.rules.basis;
                    view.rules = e.rules.clone();
                    view.zone = e.rules.zone();
                    view.day.clear();
                    // Lines dated from the change on earn under its basis
                    // (a line may be dated ahead of when it is recorded).
                    if basis_changed {
                        view.rebill(lines.billed(program));
                    }
                }
                None => {
                    self.programs.insert(
                        program.clone(),
                        ProgramView {
                            rules: e.rules.clone(),
                            affiliates: HashMap::default(),
                            customers: HashMap::default(),
                            commission_expense: Decimal::ZERO,
                            closed_months: BTreeMap::new(),
                            zone: e.rules.zone(),
                            day: DayMemo::default(),
                        },
                    );
                }
            }
            return;
        }
        let Some(view) = self.programs.get_mut(program) else {
            return;
        };
        for posting in &postings {
            match &posting.account {
                Account::CommissionExpense => view.commission_expense += posting.amount,
                Account::Earned(a)
                | Account::InWithdrawal(a)
                | Account::PaidOut(a)
                | Account::Credited(a) => {
                    if let Some(affiliate) = view.affiliates.get_mut(a) {
                        affiliate.accounts.apply(posting);
                    }
                }
            }
        }
        view.apply(recorded, program, lines);
    }
}

/// What the projections ask of a basis line.
pub struct LineFacts<'a> {
    /// Of the basis (expenses or payments) the rules in force at its
    /// moment reward.
    pub on_basis: bool,
    pub customer_id: &'a CustomerId,
    pub amount: Decimal,
    /// Its refunds recorded, less those excluded.
    pub refunded: Decimal,
    pub excluded: bool,
}

/// The basis lines and refunds recorded so far, as the write model keeps
/// them.
pub trait BasisLines {
    fn line(&self, program: &ProgramId, line: &LineId) -> Option<LineFacts<'_>>;
    /// A refund: the line it refunds, and its amount.
    fn refund(&self, program: &ProgramId, refund: &LineId) -> Option<(&LineId, Decimal)>;
    /// Whether a line of `kind` dated `at` is of the basis in force then
    /// (what [`LineFacts::on_basis`] says of it, without looking it up).
    fn on_basis(&self, program: &ProgramId, kind: LineKind, at: Timestamp) -> bool;
    /// Each customer's billed total: their lines of the basis at the
    /// line's moment and not excluded, less what was refunded of them.
    fn billed(&self, program: &ProgramId) -> HashMap<&CustomerId, Decimal>;
}

impl ProgramView {
    /// States a withdrawal paid or a credit: in its own month, or in the
    /// first open one when that is closed ([`Month::open_after`], as the
    /// rules place adjustments).
    fn state_payout(&mut self, affiliate_id: &AffiliateId, line: StatementLine) {
        let last_closed = self.closed_months.keys().next_back().copied();
        let month = line.at.month_in(self.zone).open_after(last_closed);
        if let Some(a) = self.affiliates.get_mut(affiliate_id) {
            a.statements.entry(month).or_default().push(line);
        }
    }

    /// Sets every customer's billed total to `billed`'s.
    fn rebill(&mut self, billed: HashMap<&CustomerId, Decimal>) {
        for (id, customer) in &mut self.customers {
            customer.billed = billed.get(id).copied().unwrap_or_default();
        }
    }

    fn apply(&mut self, recorded: &Recorded, program: &ProgramId, lines: &impl BasisLines) {
        let zone = self.zone;
        let at = recorded.occurred_at;
        match &recorded.event {
            Event::AffiliateEnrolled(e) => {
                self.affiliates.insert(
                    e.affiliate_id.clone(),
                    AffiliateView {
                        profile: e.clone(),
                        enrolled_at: at,
                        suspended: false,
                        accounts: AffiliateAccounts::default(),
                        statements: BTreeMap::new(),
                        days: BTreeMap::new(),
                        creatives: BTreeMap::new(),
                        visitors_by_day: BTreeMap::new(),
                        converted: HashSet::default(),
                        commission_by_customer: HashMap::default(),
                    },
                );
            }
            Event::AffiliateSuspended(e) => {
                if let Some(a) = self.affiliates.get_mut(&e.affiliate_id) {
                    a.suspended = true;
                }
            }
            Event::ClickRecorded(e) => {
                if let Some(a) = self.affiliates.get_mut(&e.affiliate_id) {
                    let day = self.day.date_in(at, zone);
                    a.days.entry(day).or_default().clicks += 1;
                    a.visitors_by_day
                        .entry(day)
                        .or_default()
                        .insert(visitor_hash(&e.visitor));
                    let creative = e.creative.as_deref().unwrap_or_default();
                    match a.creatives.get_mut(creative) {
                        Some(counters) => counters.clicks += 1,
                        None => {
                            let counters = Counters {
                                clicks: 1,
                                ..Counters::default()
                            };
                            a.creatives.insert(creative.to_string(), counters);
                        }
                    }
                }
            }
            Event::SignupAttributed(e) => {
                let customer = self.customers.entry(e.customer_id.clone()).or_default();
                customer.affiliate_id = Some(e.affiliate_id.clone());
                customer.signup_at = Some(at);
                if let Some(a) = self.affiliates.get_mut(&e.affiliate_id) {
                    a.days
                        .entry(self.day.date_in(at, zone))
                        .or_default()
                        .signups += 1;
                    a.commission_by_customer
                        .entry(e.customer_id.clone())
                        .or_default();
                }
            }
            Event::BasisLineRecorded(e) => {
                let on_basis = lines.on_basis(program, e.kind, at);
                let customer = self.customers.entry(e.customer_id.clone()).or_default();
                if on_basis {
                    customer.billed += e.amount;
                }
            }
            Event::RefundRecorded(e) => {
                // A refund of an excluded line bills nothing back.
                if lines
                    .line(program, &e.refunds)
                    .is_some_and(|l| l.on_basis && !l.excluded)
                {
                    let customer = self.customers.entry(e.customer_id.clone()).or_default();
                    customer.billed -= e.amount;
                }
            }
            Event::CustomerClosed(e) => {
                self.customers
                    .entry(e.customer_id.clone())
                    .or_default()
                    .closed = true;
            }
            Event::CustomerGroupChanged(_) => {}
            Event::ReferralReassigned(e) => self.place(&e.customer_id, &e.to, at),
            Event::RewardAccrued(e) => {
                let Some(a) = self.affiliates.get_mut(&e.affiliate_id) else {
                    return;
                };
                let kind = match e.kind {
                    RewardKind::Reward => StatementKind::Reward,
                    RewardKind::Bounty => StatementKind::Bounty,
                };
                let day = self.day.date_in(e.line_at, zone);
                let counters = a.days.entry(day).or_default();
                counters.commission += e.amount;
                if a.converted.insert(e.customer_id.clone()) {
                    counters.conversions += 1;
                }
                *a.commission_by_customer
                    .entry(e.customer_id.clone())
                    .or_default() += e.amount;
                a.statements
                    .entry(e.month)
                    .or_default()
                    .push(StatementLine {
                        seq: recorded.seq,
                        at: e.line_at,
                        kind,
                        customer_id: Some(e.customer_id.clone()),
                        product: e.product.clone(),
                        basis: (e.kind == RewardKind::Reward).then_some(e.basis),
                        rate: (e.kind == RewardKind::Reward).then_some(e.rate),
                        amount: e.amount,
                        late: e.late,
                        reference: e.line.to_string(),
                    });
            }
            Event::RewardClawedBack(e) => {
                let Some(a) = self.affiliates.get_mut(&e.affiliate_id) else {
                    return;
                };
                a.days
                    .entry(self.day.date_in(e.refund_at, zone))
                    .or_default()
                    .commission -= e.amount;
                *a.commission_by_customer
                    .entry(e.customer_id.clone())
                    .or_default() -= e.amount;
                a.statements
                    .entry(e.month)
                    .or_default()
                    .push(StatementLine {
                        seq: recorded.seq,
                        at: e.refund_at,
                        kind: StatementKind::Clawback,
                        customer_id: Some(e.customer_id.clone()),
                        product: e.product.clone(),
                        basis: Some(e.basis),
                        rate: Some(e.rate),
                        amount: -e.amount,
                        late: e.late,
                        reference: e.refund.to_string(),
                    });
            }
            Event::AdjustmentPosted(e) => {
                let Some(a) = self.affiliates.get_mut(&e.affiliate_id) else {
                    return;
                };
                a.days
                    .entry(self.day.date_in(at, zone))
                    .or_default()
                    .commission += e.amount;
                if let Some(customer) = &e.customer_id {
                    *a.commission_by_customer
                        .entry(customer.clone())
                        .or_default() += e.amount;
                }
                let reference = match &e.cause {
                    Cause::Reassignment { seq } => format!("reassignment@{seq}"),
                    Cause::Replay { replay_id, .. } => format!("replay:{replay_id}"),
                };
                a.statements
                    .entry(e.month)
                    .or_default()
                    .push(StatementLine {
                        seq: recorded.seq,
                        at,
                        kind: StatementKind::Adjustment,
                        customer_id: e.customer_id.clone(),
                        product: None,
                        basis: None,
                        rate: None,
                        amount: e.amount,
                        late: false,
                        reference,
                    });
            }
            Event::WithdrawalPaid(e) => self.state_payout(
                &e.affiliate_id,
                payout_line(
                    recorded.seq,
                    at,
                    StatementKind::Withdrawal,
                    -e.amount,
                    e.withdrawal_id.to_string(),
                ),
            ),
            Event::CreditApplied(e) => self.state_payout(
                &e.affiliate_id,
                payout_line(
                    recorded.seq,
                    at,
                    StatementKind::Credit,
                    -e.amount,
                    e.invoice_id.clone(),
                ),
            ),
            Event::MonthClosed(e) => {
                self.closed_months.insert(e.month, e.clone());
            }
            // An applied replay's attribution corrections hold from now
            // on: each customer is the corrected affiliate's referral.
            Event::ReplayApplied(e) => {
                for o in &e.overrides.attribution {
                    self.place(&o.customer_id, &o.affiliate_id, at);
                }
                // Corrected rules are the program's rules now (its payout
                // threshold), as the write model imposes them.
                if let Some(o) = &e.overrides.rules {
                    self.rules = o.rules.clone();
                    self.zone = self.rules.zone();
                    // Lines are judged by the basis at their moment again.
                    self.rebill(lines.billed(program));
                }
                if let Some(model) = &e.overrides.model {
                    self.rules.attribution = model.attribution.unwrap_or(self.rules.attribution);
                    self.rules.cookie_days = model.cookie_days.unwrap_or(self.rules.cookie_days);
                }
            }
            Event::ReplayCorrected(e) => {
                // What a replay excluded was never billed: a line, less
                // what is left of its refunds; a refund, given back unless
                // its line went before.
                let excluded = |state: &CorrectedState| *state == CorrectedState::Excluded;
                let lines_now: Vec<&LineId> = e
                    .lines
                    .iter()
                    .filter(|c| excluded(&c.state))
                    .map(|c| &c.line)
                    .collect();
                for c in e.refunds.iter().filter(|c| excluded(&c.state)) {
                    let Some((line_id, amount)) = lines.refund(program, &c.refund) else {
                        continue;
                    };
                    let Some(line) = lines.line(program, line_id) else {
                        continue;
                    };
                    let counted = !line.excluded || lines_now.contains(&line_id);
                    if counted
                        && line.on_basis
                        && let Some(customer) = self.customers.get_mut(line.customer_id)
                    {
                        customer.billed += amount;
                    }
                }
                for id in lines_now {
                    let Some(line) = lines.line(program, id) else {
                        continue;
                    };
                    if line.on_basis
                        && let Some(customer) = self.customers.get_mut(line.customer_id)
                    {
                        customer.billed -= line.amount - line.refunded;
                    }
                }
                for c in &e.customers {
                    match c.attribution.last() {
                        Some(a) => self.place(&c.customer_id, &a.affiliate_id, at),
                        None => self.unplace(&c.customer_id),
                    }
                }
            }
            Event::ProgramDefined(_)
            | Event::WithdrawalRequested(_)
            | Event::WithdrawalRejected(_)
            | Event::ApiKeyIssued(_)
            | Event::ApiKeyRevoked(_) => {}
        }
    }

    /// Makes a customer nobody's referral (its signup no longer counts).
    fn unplace(&mut self, customer_id: &CustomerId) {
        if let Some(customer) = self.customers.get_mut(customer_id) {
            customer.affiliate_id = None;
        }
    }

    /// Makes a customer `to`'s referral (an operator's correction). The
    /// affiliate it leaves keeps what it earned from the customer, but no
    /// longer lists it: the referral list shows current referrals, each
    /// with all its affiliate ever earned from it.
    fn place(&mut self, customer_id: &CustomerId, to: &AffiliateId, at: Timestamp) {
        let customer = self.customers.entry(customer_id.clone()).or_default();
        customer.affiliate_id = Some(to.clone());
        if customer.signup_at.is_none() {
            customer.signup_at = Some(at);
        }
        if let Some(a) = self.affiliates.get_mut(to) {
            a.commission_by_customer
                .entry(customer_id.clone())
                .or_default();
        }
    }
}

/// A statement line of money that left `earned` at `at`.
fn payout_line(
    seq: Seq,
    at: Timestamp,
    kind: StatementKind,
    amount: Decimal,
    reference: String,
) -> StatementLine {
    StatementLine {
        seq,
        at,
        kind,
        customer_id: None,
        product: None,
        basis: None,
        rate: None,
        amount,
        late: false,
        reference,
    }
}

// ---------------------------------------------------------------------------
// Read shapes, with amounts written in the currency's minor unit.

/// The balance of an affiliate, every field of DESIGN.md "Money".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Balance {
    pub affiliate_id: AffiliateId,
    pub currency: Currency,
    pub pending: String,
    pub earned: String,
    pub threshold: String,
    pub to_threshold: String,
    pub available: String,
    pub in_withdrawal: String,
    pub withdrawn_total: String,
    pub credited_total: String,
    pub lifetime_earned: String,
    pub as_of_seq: Seq,
}

impl ProgramView {
    /// The balance, given the pending estimate (which only the rules can make).
    pub fn balance(
        &self,
        affiliate_id: &AffiliateId,
        pending: Decimal,
        as_of_seq: Seq,
    ) -> Option<Balance> {
        let a = self.affiliates.get(affiliate_id)?;
        let currency = self.rules.currency;
        let threshold = self.rules.payout_threshold;
        let earned = a.accounts.earned();
        let f = |amount: Decimal| currency.format(amount);
        Some(Balance {
            affiliate_id: affiliate_id.clone(),
            currency,
            pending: f(pending),
            earned: f(earned),
            threshold: f(threshold),
            to_threshold: f((threshold - earned).max(Decimal::ZERO)),
            available: f(a.accounts.available(threshold)),
            in_withdrawal: f(a.accounts.in_withdrawal),
            withdrawn_total: f(a.accounts.paid_out),
            credited_total: f(a.accounts.credited),
            lifetime_earned: f(a.accounts.lifetime_earned()),
            as_of_seq,
        })
    }

    /// The statement of one month: `earned` at its start and end, and every
    /// movement between.
    pub fn statement(
        &self,
        affiliate_id: &AffiliateId,
        month: Month,
        as_of_seq: Seq,
        log_hash: String,
    ) -> Option<Statement> {
        let a = self.affiliates.get(affiliate_id)?;
        let currency = self.rules.currency;
        let opening: Decimal = a
            .statements
            .range(..month)
            .flat_map(|(_, lines)| lines)
            .map(|line| line.amount)
            .sum();
        let lines = a.statements.get(&month).map(Vec::as_slice).unwrap_or(&[]);
        let mut totals: BTreeMap<&'static str, Decimal> = BTreeMap::new();
        for line in lines {
            *totals.entry(line.kind.name()).or_default() += line.amount;
        }
        let closing = opening + lines.iter().map(|l| l.amount).sum::<Decimal>();
        Some(Statement {
            affiliate_id: affiliate_id.clone(),
            month,
            currency,
            opening_balance: currency.format(opening),
            lines: lines
                .iter()
                .map(|line| StatementLineView {
                    at: line.at,
                    kind: line.kind,
                    customer_id: line.customer_id.clone(),
                    product: line.product.clone(),
                    basis: line.basis.map(|b| currency.format(b)),
                    rate: line.rate,
                    amount: currency.format(line.amount),
                    late: line.late,
                    r#ref: line.reference.clone(),
                })
                .collect(),
            totals: totals
                .into_iter()
                .map(|(kind, total)| (kind.to_string(), currency.format(total)))
                .collect(),
            closing_balance: currency.format(closing),
            closed: self.closed_months.contains_key(&month),
            as_of_seq,
            log_hash,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Statement {
    pub affiliate_id: AffiliateId,
    pub month: Month,
    pub currency: Currency,
    pub opening_balance: String,
    pub lines: Vec<StatementLineView>,
    pub totals: BTreeMap<String, String>,
    pub closing_balance: String,
    /// Whether the month is closed: an open month's statement still grows.
    pub closed: bool,
    pub as_of_seq: Seq,
    pub log_hash: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct StatementLineView {
    pub at: Timestamp,
    pub kind: StatementKind,
    pub customer_id: Option<CustomerId>,
    pub product: Option<String>,
    pub basis: Option<String>,
    pub rate: Option<Rate>,
    pub amount: String,
    pub late: bool,
    pub r#ref: String,
}

/// How statistics are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsBy {
    Day,
    Month,
    Creative,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Stats {
    pub clicks: u64,
    pub unique_visitors: u64,
    pub signups: u64,
    pub conversions: u64,
    pub commission: String,
    pub series: Vec<StatsRow>,
    /// The log position the statistics were read at.
    pub as_of_seq: Seq,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct StatsRow {
    pub key: String,
    pub clicks: u64,
    pub unique_visitors: Option<u64>,
    pub signups: u64,
    pub conversions: u64,
    pub commission: String,
}

impl ProgramView {
    /// Statistics of the days `from..=to` (program time zone), grouped by day,
    /// month or creative. Creatives count clicks over all time.
    pub fn stats(
        &self,
        affiliate_id: &AffiliateId,
        from: NaiveDate,
        to: NaiveDate,
        by: StatsBy,
        as_of_seq: Seq,
    ) -> Option<Stats> {
        let a = self.affiliates.get(affiliate_id)?;
        let currency = self.rules.currency;
        let mut total = Counters::default();
        // The visitor sets of the days, borrowed: each is counted where
        // it lies, and only the visitors outside a group's largest set are
        // copied (a busy affiliate's day holds tens of thousands, and the
        // state's read lock is held meanwhile).
        let mut visitors: Vec<&HashSet<u64>> = Vec::new();
        let mut groups: BTreeMap<String, (Counters, Vec<&HashSet<u64>>)> = BTreeMap::new();
        for (day, counters) in a.days.range(from..=to) {
            total.add(counters);
            let day_visitors = a.visitors_by_day.get(day);
            visitors.extend(day_visitors);
            let key = match by {
                StatsBy::Day => day.to_string(),
                StatsBy::Month => day.format("%Y-%m").to_string(),
                StatsBy::Creative => continue,
            };
            let (group, group_visitors) = groups.entry(key).or_default();
            group.add(counters);
            group_visitors.extend(day_visitors);
        }
        let series = if by == StatsBy::Creative {
            a.creatives
                .iter()
                .map(|(creative, c)| StatsRow {
                    key: creative.clone(),
                    clicks: c.clicks,
                    unique_visitors: None,
                    signups: c.signups,
                    conversions: c.conversions,
                    commission: currency.format(c.commission),
                })
                .collect()
        } else {
            groups
                .into_iter()
                .map(|(key, (c, v))| StatsRow {
                    key,
                    clicks: c.clicks,
                    unique_visitors: Some(distinct(&v) as u64),
                    signups: c.signups,
                    conversions: c.conversions,
                    commission: currency.format(c.commission),
                })
                .collect()
        };
        Some(Stats {
            clicks: total.clicks,
            unique_visitors: distinct(&visitors) as u64,
            signups: total.signups,
            conversions: total.conversions,
            commission: currency.format(total.commission),
            series,
            as_of_seq,
        })
    }
}

/// The most rows one page of a list returns, whatever the query asks.
pub const MAX_PAGE_SIZE: usize = 500;

/// How the referral list is sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferralSort {
    SignupDesc,
    SignupAsc,
    CommissionDesc,
    CommissionAsc,
    BilledDesc,
}

impl ReferralSort {
    const ALL: [ReferralSort; 5] = [
        ReferralSort::SignupDesc,
        ReferralSort::SignupAsc,
        ReferralSort::CommissionDesc,
        ReferralSort::CommissionAsc,
        ReferralSort::BilledDesc,
    ];

    /// The API's name of the sort (`-` for descending).
    pub fn as_str(self) -> &'static str {
        match self {
            ReferralSort::SignupDesc => "-signup",
            ReferralSort::SignupAsc => "signup",
            ReferralSort::CommissionDesc => "-commission",
            ReferralSort::CommissionAsc => "commission",
            ReferralSort::BilledDesc => "-billed",
        }
    }

    /// The sort the API's `sort` names.
    pub fn parse(text: &str) -> Option<ReferralSort> {
        ReferralSort::ALL.into_iter().find(|s| s.as_str() == text)
    }

    fn by_signup(self) -> bool {
        matches!(self, ReferralSort::SignupDesc | ReferralSort::SignupAsc)
    }

    fn key(self, customer: &CustomerView, commission: Decimal) -> SortKey {
        match self {
            ReferralSort::SignupDesc | ReferralSort::SignupAsc => {
                SortKey::Signup(customer.signup_at)
            }
            ReferralSort::CommissionDesc | ReferralSort::CommissionAsc => {
                SortKey::Amount(commission)
            }
            ReferralSort::BilledDesc => SortKey::Amount(customer.billed),
        }
    }

    /// The list's order: the sort's key, then the customer id (so that
    /// every row has one place, and a cursor one row to follow).
    fn order(self, x: (&SortKey, &CustomerId), y: (&SortKey, &CustomerId)) -> std::cmp::Ordering {
        let by_key = match self {
            ReferralSort::SignupAsc | ReferralSort::CommissionAsc => x.0.cmp(y.0),
            _ => y.0.cmp(x.0),
        };
        by_key.then_with(|| x.1.cmp(y.1))
    }
}

/// What a referral list is sorted by, for one customer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Signup(Option<Timestamp>),
    Amount(Decimal),
}

/// Where the next page of a referral list starts: just after the last row
/// of the page before, by that row's sort key and customer id, not by a
/// count of rows. So a referral that arrives between two pages (at the
/// top, with the default sort) does not push a row of the first page onto
/// the second, nor one row past the other. A row whose key changes
/// meanwhile (its commission, sorted by commission) may move across it,
/// unless the pages after the first are read `as_of` its `as_of_seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferralCursor {
    sort: ReferralSort,
    key: SortKey,
    customer: CustomerId,
}

impl ReferralCursor {
    /// The sort the cursor's page was listed by.
    pub fn sort(&self) -> ReferralSort {
        self.sort
    }

    /// Reads a cursor its `Display` form wrote; `None` when it is not one.
    pub fn parse(text: &str) -> Option<ReferralCursor> {
        let mut parts = text.splitn(3, '~');
        let (sort, key, customer) = (parts.next()?, parts.next()?, parts.next()?);
        let sort = ReferralSort::parse(sort)?;
        let key = match key {
            "" if sort.by_signup() => SortKey::Signup(None),
            micros if sort.by_signup() => {
                SortKey::Signup(Some(Timestamp::from_micros(micros.parse().ok()?)))
            }
            amount => SortKey::Amount(amount.parse().ok()?),
        };
        let customer = CustomerId::parse(customer).ok()?;
        Some(ReferralCursor {
            sort,
            key,
            customer,
        })
    }
}

/// `SORT~KEY~CUSTOMER`: opaque to callers, who hand it back as it is.
impl std::fmt::Display for ReferralCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sort = self.sort.as_str();
        match &self.key {
            SortKey::Signup(Some(at)) => write!(f, "{sort}~{}~{}", at.micros(), self.customer),
            SortKey::Signup(None) => write!(f, "{sort}~~{}", self.customer),
            SortKey::Amount(amount) => write!(f, "{sort}~{amount}~{}", self.customer),
        }
    }
}

impl Serialize for ReferralCursor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where a page of referrals starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReferralStart {
    #[default]
    First,
    /// After skipping this many rows (the cursors of earlier versions).
    Offset(usize),
    /// After this row, the last of the page before. Made for another sort,
    /// it is read by the query's sort, comparing keys of one kind only
    /// (the API refuses such a cursor).
    After(ReferralCursor),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferralQuery {
    /// `active` or `closed`.
    pub status: Option<String>,
    /// A substring of the customer id.
    pub q: Option<String>,
    pub sort: ReferralSort,
    pub limit: usize,
    pub start: ReferralStart,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Referral {
    pub customer_id: CustomerId,
    pub signup_at: Option<Timestamp>,
    pub status: &'static str,
    pub billed: String,
    pub commission: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferralPage {
    pub referrals: Vec<Referral>,
    /// The rows the filters match, on every page.
    pub total: usize,
    /// Where the next page starts; `None` on the last.
    pub next: Option<ReferralCursor>,
    /// The log position the page was read at: the pages after it read
    /// `as_of` it show the list as it was then.
    pub as_of_seq: Seq,
}

impl ProgramView {
    pub fn referrals(
        &self,
        affiliate_id: &AffiliateId,
        query: &ReferralQuery,
        as_of_seq: Seq,
    ) -> Option<ReferralPage> {
        let a = self.affiliates.get(affiliate_id)?;
        let currency = self.rules.currency;
        let sort = query.sort;
        let after = match &query.start {
            ReferralStart::After(cursor) => Some((&cursor.key, &cursor.customer)),
            _ => None,
        };
        let mut total = 0;
        let mut rows: Vec<(SortKey, &CustomerId, &CustomerView, Decimal)> = Vec::new();
        for (id, commission) in &a.commission_by_customer {
            // Customers moved to another affiliate since are not listed.
            let Some(c) = self
                .customers
                .get(id)
                .filter(|c| c.affiliate_id.as_ref() == Some(affiliate_id))
            else {
                continue;
            };
            if query.status.as_deref().is_some_and(|s| s != c.status())
                || query.q.as_deref().is_some_and(|q| !id.as_str().contains(q))
            {
                continue;
            }
            total += 1;
            let key = sort.key(c, *commission);
            if after.is_some_and(|after| sort.order((&key, id), after).is_le()) {
                continue;
            }
            rows.push((key, id, c, *commission));
        }
        // Only the rows up to the page's end are sorted: a portal's first
        // page of a busy affiliate's thousands of referrals picks 50 in
        // one pass (the state's read lock is held meanwhile).
        let skip = match query.start {
            ReferralStart::Offset(skip) => skip,
            _ => 0,
        };
        let end = skip.saturating_add(query.limit.min(MAX_PAGE_SIZE));
        let order = |x: &(SortKey, &CustomerId, &CustomerView, Decimal),
                     y: &(SortKey, &CustomerId, &CustomerView, Decimal)| {
            sort.order((&x.0, x.1), (&y.0, y.1))
        };
        let more = rows.len() > end;
        if more {
            rows.select_nth_unstable_by(end, order);
            rows.truncate(end);
        }
        rows.sort_unstable_by(order);
        let page: Vec<_> = rows.into_iter().skip(skip).collect();
        let next = page
            .last()
            .filter(|_| more)
            .map(|(key, id, _, _)| ReferralCursor {
                sort,
                key: key.clone(),
                customer: (*id).clone(),
            });
        Some(ReferralPage {
            referrals: page
                .into_iter()
                .map(|(_, id, c, commission)| Referral {
                    customer_id: id.clone(),
                    signup_at: c.signup_at,
                    status: c.status(),
                    billed: currency.format(c.billed),
                    commission: currency.format(commission),
                })
                .collect(),
            total,
            next,
            as_of_seq,
        })
    }
}
