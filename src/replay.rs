//! What-if replays: one program's history folded again, in memory, under
//! corrected assumptions ([`Overrides`]), and the money diff against what
//! was recorded.
//!
//! The replayed ("after") world is a second [`ProgramModel`] fed the same
//! events in log order, with three differences: excluded events are left
//! out; overrides are imposed over what the events say (attribution, rules,
//! rates, the click model for signups); and the money events the ledger
//! derived (rewards, claw-backs, reassignment adjustments) are not taken
//! from the log but decided again, at the same points of the log (each
//! `MonthClosed`, each retroactive `ReferralReassigned`), by the same
//! functions that decided them ([`rules::close_rewards`],
//! `rules::reassignment_adjustments`). There is no second implementation
//! of the rules.
//!
//! Replays already applied are part of history: their overrides hold in
//! every later replay over the history recorded before them, and their
//! changes count as recorded in the month they corrected. What was
//! recorded after one (a rule change, a reassignment) is a newer decision
//! and stands. The write model takes the corrected world when a replay is
//! applied ([`WhatIf::corrections`]). So an empty override set gives an
//! empty diff, and running an applied replay again finds nothing left to
//! change, whatever came after it.
//!
//! Pure: no I/O, no clock.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::events::*;
use crate::money::{Currency, Rate};
use crate::rules::{self, Customer, ProgramModel, Rejection};

/// One money item: whose, which statement month, what, behind which line.
type Item = (
    AffiliateId,
    Month,
    ChangeKind,
    Option<LineId>,
    Option<CustomerId>,
);

/// What is known of an item's amount on one side: the sum, and the basis
/// and rate of the reward or claw-back behind it.
#[derive(Clone, Debug, Default)]
struct Side {
    amount: Decimal,
    basis: Option<Decimal>,
    rate: Option<Rate>,
}

/// A what-if replay in progress: feed it the log with [`WhatIf::apply`],
/// then take the [`Diff`] with [`WhatIf::finish`].
pub struct WhatIf {
    program: ProgramId,
    /// Applied replays' overrides, in order, with the seq of their
    /// `ReplayApplied` (they hold over the events before it), then the new
    /// ones (over every event).
    layers: Vec<(Option<Seq>, Overrides)>,
    excluded: HashSet<Seq>,
    excluded_seen: HashSet<Seq>,
    /// Visitors with an excluded click: their signups are attributed again.
    visitors_with_excluded_clicks: HashSet<Text>,
    /// The new layer's excluded clicks, as they were recorded.
    excluded_clicks: Vec<ExcludedClick>,
    /// Whether the layers were installed (at the program's definition).
    installed: bool,
    shadow: ProgramModel,
    before: BTreeMap<Item, Side>,
    after: BTreeMap<Item, Side>,
    head: Seq,
}

impl WhatIf {
    /// A replay of `program` under `overrides`, on top of the replays
    /// `applied` before (the seq of their `ReplayApplied` and their
    /// overrides, in order).
    pub fn new(program: ProgramId, applied: Vec<(Seq, Overrides)>, overrides: Overrides) -> WhatIf {
        let mut layers: Vec<(Option<Seq>, Overrides)> = applied
            .into_iter()
            .map(|(seq, layer)| (Some(seq), layer))
            .collect();
        layers.push((None, overrides));
        let excluded = layers
            .iter()
            .flat_map(|(_, l)| l.exclude.iter().copied())
            .collect();
        WhatIf {
            program,
            layers,
            excluded,
            excluded_seen: HashSet::default(),
            visitors_with_excluded_clicks: HashSet::default(),
            excluded_clicks: Vec::new(),
            installed: false,
            shadow: ProgramModel::default(),
            before: BTreeMap::new(),
            after: BTreeMap::new(),
            head: 0,
        }
    }

    /// The seq of the last event folded.
    pub fn head(&self) -> Seq {
        self.head
    }

    /// The layers that hold over the event at `seq`.
    fn active(&self, seq: Seq) -> impl Iterator<Item = &Overrides> {
        self.layers
            .iter()
            .filter(move |(until, _)| until.is_none_or(|until| seq < until))
            .map(|(_, layer)| layer)
    }

    /// Folds the next event of the log (events of other programs are
    /// skipped). Refuses an excluded seq that is not a click, signup,
    /// basis line or refund.
    pub fn apply(&mut self, recorded: &Recorded) -> Result<(), Rejection> {
        self.head = recorded.seq;
        if recorded.program.as_ref() != Some(&self.program) {
            return Ok(());
        }
        if self.excluded.contains(&recorded.seq) {
            self.excluded_seen.insert(recorded.seq);
            return match &recorded.event {
                Event::ClickRecorded(e) => {
                    self.visitors_with_excluded_clicks.insert(e.visitor.clone());
                    let new = self.layers.last().map(|(_, l)| l);
                    if new.is_some_and(|l| l.exclude.contains(&recorded.seq)) {
                        self.excluded_clicks.push(ExcludedClick {
                            visitor: e.visitor.clone(),
                            at: recorded.occurred_at,
                            affiliate_id: e.affiliate_id.clone(),
                        });
                    }
                    Ok(())
                }
                Event::SignupAttributed(e) => {
                    rules::signed_up(&mut self.shadow, e, recorded.occurred_at);
                    Ok(())
                }
                Event::BasisLineRecorded(_) | Event::RefundRecorded(_) => Ok(()),
                other => Err(InvalidValue::new(
                    "exclude",
                    format!(
                        "seq {} is a {}: only clicks, signups, basis lines and refunds can be excluded",
                        recorded.seq,
                        other.type_name()
                    ),
                )
                .into()),
            };
        }
        match &recorded.event {
            Event::RewardAccrued(_) | Event::RewardClawedBack(_) => {
                count(&mut self.before, &recorded.event);
            }
            Event::AdjustmentPosted(e) => {
                // Replays' own adjustments count through their ReplayApplied.
                if let Cause::Reassignment { .. } = e.cause {
                    count(&mut self.before, &recorded.event);
                }
            }
            Event::ReplayApplied(e) => {
                for c in &e.changes {
                    let item = (
                        c.affiliate_id.clone(),
                        c.month,
                        c.kind,
                        c.line.clone(),
                        c.customer_id.clone(),
                    );
                    add(&mut self.before, item, c.amount, None);
                }
            }
            Event::MonthClosed(e) => {
                let derived = rules::close_rewards(&self.shadow, e.month, e.month, None);
                for event in derived {
                    self.fold_derived(recorded, event);
                }
                self.fold(recorded);
            }
            Event::ReferralReassigned(e) => {
                let adjustments = match (e.retroactive, self.shadow.customers.get(&e.customer_id)) {
                    (true, Some(customer)) => rules::reassignment_adjustments(
                        &self.shadow,
                        customer,
                        &e.customer_id,
                        &self.moved(recorded.seq, customer, e),
                        e.from,
                        self.shadow.open_month(recorded.recorded_at),
                        recorded.seq,
                        &e.reason,
                    ),
                    _ => Vec::new(),
                };
                self.fold(recorded);
                self.impose_attribution(recorded.seq, &e.customer_id);
                if e.retroactive {
                    self.shadow.reown_since(&e.customer_id, e.from);
                }
                for event in adjustments {
                    self.fold_derived(recorded, event);
                }
            }
            // The write model's copy of a corrected world: this replay
            // decides its own.
            Event::ReplayCorrected(_) => {}
            Event::SignupAttributed(e) => {
                // Corrected rules may change the attribution model or the
                // cookie window: signups that came by a click are then
                // attributed again.
                let click_model_changed = self
                    .active(recorded.seq)
                    .any(|l| l.model.is_some() || l.rules.is_some());
                let redecide = e.via == Via::Click
                    && (click_model_changed
                        || e.visitor
                            .as_ref()
                            .is_some_and(|v| self.visitors_with_excluded_clicks.contains(v)));
                if !redecide {
                    self.fold(recorded);
                } else {
                    let chosen = e.visitor.as_ref().and_then(|visitor| {
                        let rules = self.shadow.rules_at(recorded.occurred_at)?;
                        self.shadow
                            .click_attribution(rules, visitor, recorded.occurred_at, &e.customer_id)
                            .cloned()
                    });
                    match chosen {
                        Some(affiliate_id) => {
                            let mut changed = recorded.clone();
                            changed.event = Event::SignupAttributed(SignupAttributed {
                                affiliate_id,
                                ..e.clone()
                            });
                            self.fold(&changed);
                        }
                        None => {
                            rules::signed_up(&mut self.shadow, e, recorded.occurred_at);
                        }
                    }
                }
                self.impose_attribution(recorded.seq, &e.customer_id);
            }
            Event::ProgramDefined(_) => {
                self.fold(recorded);
                if !self.installed {
                    // The program exists now: install every layer.
                    self.installed = true;
                    for (_, layer) in &self.layers {
                        self.shadow.install_overrides(layer, true);
                    }
                } else {
                    let layers: Vec<Overrides> = self.active(recorded.seq).cloned().collect();
                    for layer in &layers {
                        self.shadow.impose_rules(layer);
                    }
                }
            }
            Event::BasisLineRecorded(e) => {
                self.fold(recorded);
                self.impose_attribution(recorded.seq, &e.customer_id);
            }
            _ => self.fold(recorded),
        }
        Ok(())
    }

    fn fold(&mut self, recorded: &Recorded) {
        rules::apply_program_event(&mut self.shadow, recorded);
    }

    /// Folds an event the replay decided (at the position of `at`), and
    /// counts its money on the after side.
    fn fold_derived(&mut self, at: &Recorded, event: Event) {
        count(&mut self.after, &event);
        let derived = Recorded {
            event,
            ..at.clone()
        };
        rules::apply_program_event(&mut self.shadow, &derived);
    }

    /// The customer as a reassignment leaves it, the corrections that
    /// hold over it imposed.
    fn moved(&self, seq: Seq, customer: &Customer, e: &ReferralReassigned) -> Customer {
        let mut moved = customer.clone();
        moved.move_to(e.from, &e.to);
        for layer in self.active(seq) {
            for o in layer
                .attribution
                .iter()
                .filter(|o| o.customer_id == e.customer_id)
            {
                moved.move_to(o.from, &o.affiliate_id);
            }
        }
        moved
    }

    fn impose_attribution(&mut self, seq: Seq, customer_id: &CustomerId) {
        for (until, layer) in &self.layers {
            if until.is_none_or(|until| seq < until) {
                self.shadow.impose_attribution(layer, customer_id);
            }
        }
    }

    /// What the write model `live` (the program at the same head) must
    /// take of the corrected world when this replay is applied: every line,
    /// refund and customer whose state differs, and the clicks excluded.
    /// With `months`, only the lines and refunds whose money this diff
    /// changes in those months, and bounties likewise (the rest was not
    /// applied, and keeps what was recorded); exclusions and attribution
    /// always (they hold from now on).
    pub fn corrections(&self, live: &ProgramModel, months: Option<MonthRange>) -> ReplayCorrected {
        let new = self.layers.last().map(|(_, l)| l);
        let excluded_now = |seq: Seq| new.is_some_and(|l| l.exclude.contains(&seq));
        // The lines (refunds for claw-backs) and customers (bounties) whose
        // money the diff changes in the months.
        let mut in_range_lines: HashSet<&LineId> = HashSet::default();
        let mut in_range_bounties: HashSet<&CustomerId> = HashSet::default();
        if let Some(range) = months {
            for (_, month, kind, line, customer) in self.before.keys().chain(self.after.keys()) {
                if *month < range.from || *month > range.to {
                    continue;
                }
                match (kind, line, customer) {
                    (ChangeKind::Bounty, _, Some(customer)) => {
                        in_range_bounties.insert(customer);
                    }
                    (_, Some(line), _) => {
                        in_range_lines.insert(line);
                    }
                    _ => {}
                }
            }
        }
        let applies = |line: &LineId| months.is_none() || in_range_lines.contains(line);
        let state = |processed: bool, reward: Option<&rules::LineReward>, excluded: bool| {
            if excluded {
                return CorrectedState::Excluded;
            }
            if !processed {
                return CorrectedState::Open;
            }
            CorrectedState::Closed {
                reward: reward.cloned(),
            }
        };
        let mut lines = Vec::new();
        for (id, line) in &live.lines {
            let was = state(line.processed, line.reward.as_deref(), line.excluded);
            let corrected = match self.shadow.lines.get(id) {
                None if excluded_now(line.seq) => CorrectedState::Excluded,
                None => continue,
                Some(l) => state(l.processed, l.reward.as_deref(), false),
            };
            if corrected != was && (corrected == CorrectedState::Excluded || applies(id)) {
                lines.push(LineCorrection {
                    line: id.clone(),
                    state: corrected,
                });
            }
        }
        lines.sort_by(|a, b| a.line.cmp(&b.line));
        let mut refunds = Vec::new();
        for (id, refund) in &live.refunds {
            let was = state(refund.processed, None, refund.excluded);
            let corrected = match self.shadow.refunds.get(id) {
                None if excluded_now(refund.seq) => CorrectedState::Excluded,
                None => continue,
                Some(r) => state(r.processed, None, false),
            };
            let applies = applies(id) || applies(&refund.line);
            if corrected != was && (corrected == CorrectedState::Excluded || applies) {
                refunds.push(RefundCorrection {
                    refund: id.clone(),
                    state: corrected,
                });
            }
        }
        refunds.sort_by(|a, b| a.refund.cmp(&b.refund));
        let nobody = Customer::default();
        let mut customers = Vec::new();
        let ids: std::collections::BTreeSet<&CustomerId> = live
            .customers
            .keys()
            .chain(self.shadow.customers.keys())
            .collect();
        for id in ids {
            let was = live.customers.get(id).unwrap_or(&nobody);
            let now = self.shadow.customers.get(id).unwrap_or(&nobody);
            let bounty_applies = months.is_none() || in_range_bounties.contains(id);
            let bounty = if bounty_applies {
                &now.bounty
            } else {
                &was.bounty
            };
            if now.attribution == was.attribution
                && now.signup_at == was.signup_at
                && now.via == was.via
                && *bounty == was.bounty
            {
                continue;
            }
            customers.push(CustomerCorrection {
                customer_id: id.clone(),
                attribution: now
                    .attribution
                    .iter()
                    .map(|(from, affiliate_id)| AttributedFrom {
                        from: *from,
                        affiliate_id: affiliate_id.clone(),
                    })
                    .collect(),
                signup_at: now.signup_at,
                via: now.via,
                bounty: bounty.clone(),
            });
        }
        ReplayCorrected {
            // The writer names the replay when it records this.
            replay_id: Uuid::nil(),
            lines,
            refunds,
            customers,
            clicks: self.excluded_clicks.clone(),
        }
    }

    /// The diff, restricted to statement months `from..=to` when given.
    /// Refuses excluded seqs that are not events of the program, or that
    /// an applied replay excluded already.
    pub fn finish(self, months: Option<MonthRange>) -> Result<Diff, Rejection> {
        let new = self
            .layers
            .last()
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        for (applied_at, layer) in &self.layers[..self.layers.len().saturating_sub(1)] {
            if let (Some(applied_at), Some(seq)) = (
                applied_at,
                new.exclude.iter().find(|seq| layer.exclude.contains(seq)),
            ) {
                return Err(InvalidValue::new(
                    "exclude",
                    format!(
                        "seq {seq} is already excluded, by the replay applied at seq {applied_at}"
                    ),
                )
                .into());
            }
        }
        if let Some(missing) = new
            .exclude
            .iter()
            .find(|seq| !self.excluded_seen.contains(seq))
        {
            return Err(InvalidValue::new(
                "exclude",
                format!(
                    "seq {missing} is not an event of program `{}` up to seq {}",
                    self.program, self.head
                ),
            )
            .into());
        }
        let Some(currency) = self.shadow.current_rules().map(|r| r.currency) else {
            return Err(Rejection::UnknownProgram(self.program));
        };
        let in_range = |month: Month| months.is_none_or(|r| month >= r.from && month <= r.to);
        let mut rows: BTreeMap<(AffiliateId, Month), DiffRow> = BTreeMap::new();
        let mut changes = Vec::new();
        let keys: std::collections::BTreeSet<&Item> =
            self.before.keys().chain(self.after.keys()).collect();
        for item in keys {
            let (affiliate_id, month, kind, line, customer_id) = item;
            if !in_range(*month) {
                continue;
            }
            let empty = Side::default();
            let before = self.before.get(item).unwrap_or(&empty);
            let after = self.after.get(item).unwrap_or(&empty);
            let row = rows
                .entry((affiliate_id.clone(), *month))
                .or_insert_with(|| DiffRow::new(affiliate_id.clone(), *month));
            row.before_amount += before.amount;
            row.after_amount += after.amount;
            let change = after.amount - before.amount;
            if change.is_zero() {
                continue;
            }
            changes.push(ReplayChange {
                affiliate_id: affiliate_id.clone(),
                month: *month,
                kind: *kind,
                customer_id: customer_id.clone(),
                line: line.clone(),
                amount: change,
            });
            row.lines.push(DiffLine {
                kind: *kind,
                customer_id: customer_id.clone(),
                line: line.clone(),
                basis: before.basis.or(after.basis).map(|b| currency.format(b)),
                rate_before: before.rate,
                rate_after: after.rate,
                before: currency.format(before.amount),
                after: currency.format(after.amount),
                change: currency.format(change),
            });
        }
        let mut total = Decimal::ZERO;
        let rows: Vec<DiffRow> = rows
            .into_values()
            .filter(|row| !row.lines.is_empty())
            .map(|mut row| {
                // Taken out: a finished row holds only what it shows, so it
                // reads back from its JSON (`DATA/replays/`) equal.
                let before = std::mem::take(&mut row.before_amount);
                let after = std::mem::take(&mut row.after_amount);
                let change = after - before;
                total += change;
                row.before = currency.format(before);
                row.after = currency.format(after);
                row.change = currency.format(change);
                row
            })
            .collect();
        Ok(Diff {
            currency,
            rows,
            total_change: currency.format(total),
            changes,
        })
    }
}

/// Adds a money event's amount to its item on one side.
fn count(map: &mut BTreeMap<Item, Side>, event: &Event) {
    match event {
        Event::RewardAccrued(e) => {
            let basis = (e.kind == RewardKind::Reward).then_some((e.basis, e.rate));
            add(map, reward_item(e), e.amount, basis);
        }
        Event::RewardClawedBack(e) => {
            add(map, clawback_item(e), -e.amount, Some((e.basis, e.rate)));
        }
        Event::AdjustmentPosted(e) => add(map, adjustment_item(e), e.amount, None),
        _ => {}
    }
}

fn add(
    map: &mut BTreeMap<Item, Side>,
    item: Item,
    amount: Decimal,
    basis: Option<(Decimal, Rate)>,
) {
    let side = map.entry(item).or_default();
    side.amount += amount;
    if let Some((basis, rate)) = basis {
        side.basis = Some(basis);
        side.rate = Some(rate);
    }
}

fn reward_item(e: &RewardAccrued) -> Item {
    let kind = match e.kind {
        RewardKind::Reward => ChangeKind::Reward,
        RewardKind::Bounty => ChangeKind::Bounty,
    };
    let line = (kind == ChangeKind::Reward).then(|| e.line.clone());
    (
        e.affiliate_id.clone(),
        e.month,
        kind,
        line,
        Some(e.customer_id.clone()),
    )
}

fn clawback_item(e: &RewardClawedBack) -> Item {
    (
        e.affiliate_id.clone(),
        e.month,
        ChangeKind::Clawback,
        Some(e.refund.clone()),
        Some(e.customer_id.clone()),
    )
}

fn adjustment_item(e: &AdjustmentPosted) -> Item {
    (
        e.affiliate_id.clone(),
        e.month,
        ChangeKind::Adjustment,
        e.line.clone(),
        e.customer_id.clone(),
    )
}

/// The money a replay would move: per affiliate and statement month, what
/// was posted (with applied replays), what the replay posts, and the
/// lines behind every changed amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Diff {
    pub currency: Currency,
    /// Only the affiliate-months with a changed item, by affiliate and month.
    pub rows: Vec<DiffRow>,
    /// The sum of every row's change: what the program's commission moves by.
    pub total_change: String,
    /// Every changed item: what applying appends, one adjustment each.
    pub changes: Vec<ReplayChange>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiffRow {
    pub affiliate_id: AffiliateId,
    pub month: Month,
    /// The month's commission as posted (rewards, bounties, claw-backs,
    /// reassignment adjustments, and applied replays' corrections).
    pub before: String,
    /// The month's commission under the overrides.
    pub after: String,
    pub change: String,
    pub lines: Vec<DiffLine>,
    #[serde(skip)]
    before_amount: Decimal,
    #[serde(skip)]
    after_amount: Decimal,
}

impl DiffRow {
    fn new(affiliate_id: AffiliateId, month: Month) -> DiffRow {
        DiffRow {
            affiliate_id,
            month,
            before: String::new(),
            after: String::new(),
            change: String::new(),
            lines: Vec::new(),
            before_amount: Decimal::ZERO,
            after_amount: Decimal::ZERO,
        }
    }
}

/// One changed item of a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiffLine {
    pub kind: ChangeKind,
    pub customer_id: Option<CustomerId>,
    /// The basis line (for a claw-back, the refund) behind the amount.
    pub line: Option<LineId>,
    /// The billed (or refunded) amount the commission was computed on.
    pub basis: Option<String>,
    pub rate_before: Option<Rate>,
    pub rate_after: Option<Rate>,
    pub before: String,
    pub after: String,
    pub change: String,
}
