//! The write model the decisions read: programs, affiliates, customers,
//! their lines, refunds and withdrawals, the idempotency keys, and the
//! memo of pending estimates, folded from recorded events by
//! [`Model::apply`]. Pure.

use super::*;

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
    pub(super) open_lines: BTreeMap<(Month, Timestamp, Seq), LineId>,
    pub(super) open_refunds: BTreeMap<(Month, Timestamp, Seq), LineId>,
    /// Every line of a month, for tier counts.
    pub(super) lines_by_month: HashMap<Month, Vec<LineId>>,
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
    pub(super) rate_overrides: Vec<AffiliateRateOverride>,
    /// The current rules' time zone, parsed once (again after a checkpoint is loaded).
    #[serde(skip)]
    zone: Option<chrono_tz::Tz>,
    /// Pending estimates already computed, and what they depend on.
    #[serde(skip)]
    pub(super) pending_memo: PendingMemo,
    /// The customers whose attribution names each affiliate (with, after
    /// a reassignment away and back, a customer twice, and after one for
    /// all time, one no longer named): the pending estimate reads these
    /// instead of every customer of the program. Derived: rebuilt from
    /// `customers` when a checkpoint is loaded.
    #[serde(skip)]
    pub(super) customers_of: HashMap<AffiliateId, Vec<CustomerId>>,
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
/// read extends the estimate by what they add ([`extend_pending`](super::commission::extend_pending)) when
/// that is exact, and computes it again only when it is not.
#[derive(Default)]
pub(super) struct PendingMemo {
    program: u64,
    affiliates: HashMap<AffiliateId, u64>,
    computed: std::sync::Mutex<PendingComputed>,
}

/// (program epoch, affiliate epoch, month): what an estimate holds for.
type PendingKey = (u64, u64, Month);

type PendingComputed = HashMap<AffiliateId, ComputedPending>;

/// One affiliate's estimate and what happened to it since.
pub(super) struct ComputedPending {
    pub(super) key: PendingKey,
    pub(super) pending: Decimal,
    /// What bumped the affiliate's epoch since `key`, one change per bump,
    /// in log order; `None` once one of them cannot be added to the
    /// estimate, or more than `limit` came (computing the estimate again
    /// is then as cheap, and memory stays bounded).
    pub(super) since: Option<Vec<PendingChange>>,
    pub(super) limit: usize,
    /// The affiliate's active referrals by month (the count that picks a
    /// tier), as of `key`: counted when an extension first needs them.
    pub(super) active: HashMap<Month, u32>,
}

/// A change to an affiliate's estimate that [`extend_pending`](super::commission::extend_pending) may add.
#[derive(Clone)]
pub(super) enum PendingChange {
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

    pub(super) fn key(&self, affiliate: &AffiliateId, month: Month) -> PendingKey {
        let epoch = self.affiliates.get(affiliate).copied().unwrap_or(0);
        (self.program, epoch, month)
    }

    pub(super) fn computed(&self) -> std::sync::MutexGuard<'_, PendingComputed> {
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
    pub(super) fn signup_eligible(
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
