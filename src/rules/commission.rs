//! What a line earns and when: the rate by precedence (affiliate override,
//! product, tier, default) and the term, the rewards a month close records,
//! and the pending estimates of open months. Pure.

use super::model::{ComputedPending, PendingChange};
use super::*;

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
/// the estimate since (see [`PendingMemo::note`](super::model::PendingMemo::note)) made it be computed
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
pub(super) fn extend_pending(
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
