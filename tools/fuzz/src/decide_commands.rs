//! Commands built from arbitrary bytes, decided by the rules against the
//! model and folded as the writer folds them, with the reads of the API
//! after each: every command must be appended, answered as a no-op, or
//! refused, never panic. The values come from small pools (so that
//! commands meet the same affiliates, customers and lines) and from
//! tables of edge cases: amounts at and past every limit, rates, zones
//! whose clocks jump, times from year 0 to the ledger's clock.

use std::collections::HashMap;

use commission_ledger::events::{
    AffiliateId, AffiliateRateOverride, Attribution, AttributionOverride, Bytes, CustomerId, Event,
    LineId, LineKind, ModelOverride, Month, Overrides, ProgramId, ProgramRules, Recorded, Role,
    RulesOverride, Text, Timestamp,
};
use commission_ledger::ledger::ModelLines;
use commission_ledger::money::Rate;
use commission_ledger::projections::{
    Projections, ReferralQuery, ReferralSort, ReferralStart, StatementKind, StatementLine, StatsBy,
};
use commission_ledger::replay::WhatIf;
use commission_ledger::rules::{
    Command, Context, Decision, IdSource, Model, close_rewards, commission_of, decide,
    pending_estimate,
};
use rust_decimal::Decimal;
use uuid::Uuid;

const AMOUNTS: [&str; 16] = [
    "0",
    "0.01",
    "1",
    "10.00",
    "12.345",
    "-5",
    "100.5",
    "999999999999999.99",
    "999999999999999",
    "1000000000000000",
    "79228162514264337593543950335",
    "0.0000000001",
    "1e3",
    "",
    "7.5",
    "250",
];
const RATES: [&str; 6] = ["0", "5", "20", "33.333", "100", "12.5"];
const ZONES: [&str; 5] = [
    "UTC",
    "Europe/Amsterdam",
    "Pacific/Kiritimati",
    "America/Santiago",
    "Mars/Olympus",
];
const CURRENCIES: [&str; 4] = ["USD", "JPY", "BHD", "EUR"];
const AFFILIATES: [&str; 4] = ["a0", "a1", "a2", "a3"];
const CUSTOMERS: [&str; 6] = ["c0", "c1", "c2", "c3", "a0", "c5"];
const LINES: [&str; 8] = ["l0", "l1", "l2", "l3", "l4", "l5", "l6", "l7"];
const VISITORS: [&str; 4] = ["v0", "v1", "v2", "v3"];
const GROUPS: [&str; 3] = ["staff", "vip", ""];
const DAY_US: i64 = 86_400_000_000;
/// How far before the ledger's clock a command may be dated.
const BACK_US: [i64; 8] = [
    0,
    1,
    DAY_US,
    40 * DAY_US,
    400 * DAY_US,
    3650 * DAY_US,
    // the first moment of year 0, as far back as RFC 3339 goes
    i64::MAX,
    -4 * 60 * 1_000_000,
];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::from(self.byte()) % items.len()]
    }
    fn maybe<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        let b = self.byte();
        (b & 1 == 1).then(|| items[usize::from(b >> 1) % items.len()])
    }
}

struct Ids(u128);

impl IdSource for Ids {
    fn uuid(&mut self) -> Uuid {
        self.0 += 1;
        Uuid::from_u128(self.0)
    }
    fn code(&mut self) -> String {
        self.0 += 1;
        format!("code{:06}", self.0)
    }
}

fn rules(input: &mut Input<'_>) -> Option<ProgramRules> {
    let term = match input.byte() % 3 {
        0 => serde_json::json!({"kind": "lifetime"}),
        1 => serde_json::json!({"kind": "months", "months": input.byte() % 4}),
        _ => serde_json::json!({"kind": "first_order"}),
    };
    let doc = serde_json::json!({
        "id": "p", "name": "Fuzz", "currency": input.pick(&CURRENCIES),
        "timezone": input.pick(&ZONES), "site_url": "https://provider.example/",
        "cookie_days": input.pick(&[1u32, 30, 3650, 0]),
        "attribution": if input.byte() & 1 == 0 { "last_click" } else { "first_click" },
        "basis": if input.byte() & 1 == 0 { "expenses" } else { "payments" },
        "default_rate": input.pick(&RATES),
        "product_rates": {"domains": input.pick(&RATES)},
        "tiers": [{"min_active_referrals": input.byte() % 3, "rate": input.pick(&RATES)}],
        "bounty": input.maybe(&AMOUNTS),
        "payout_threshold": input.pick(&AMOUNTS),
        "promo_code_template": "P-@ID@",
        "forbidden_groups": ["staff"],
        "auto_close_day": input.maybe(&[1u8, 15, 28, 29]),
        "term": term,
    });
    serde_json::from_value(doc).ok()
}

/// The moment of one of the events recorded so far (a moment that
/// splits history somewhere meaningful).
fn moment(input: &mut Input<'_>, log: &[Recorded]) -> Option<Timestamp> {
    match log.len() {
        0 => None,
        n => Some(log[usize::from(input.byte()) % n].occurred_at),
    }
}

/// A what-if replay under one override, computed over `log` as the
/// ledger computes one, and the command that applies it.
fn apply_replay(
    input: &mut Input<'_>,
    model: &Model,
    program: &ProgramId,
    log: &[Recorded],
) -> Option<Command> {
    let pm = model.program(program)?;
    let affiliate = |input: &mut Input<'_>| AffiliateId::parse(input.pick(&AFFILIATES)).ok();
    let mut overrides = Overrides::default();
    match input.byte() % 5 {
        0 => overrides.attribution.push(AttributionOverride {
            customer_id: CustomerId::parse(input.pick(&CUSTOMERS)).ok()?,
            affiliate_id: affiliate(input)?,
            from: if input.byte() & 1 == 0 {
                None
            } else {
                moment(input, log)
            },
        }),
        1 => {
            overrides.model = Some(ModelOverride {
                attribution: Some(if input.byte() & 1 == 0 {
                    Attribution::LastClick
                } else {
                    Attribution::FirstClick
                }),
                cookie_days: input.maybe(&[0u32, 1, 30]),
            })
        }
        2 => {
            overrides.rules = Some(RulesOverride {
                from: moment(input, log)?,
                rules: rules(input)?,
            })
        }
        3 => overrides.affiliate_rates.push(AffiliateRateOverride {
            affiliate_id: affiliate(input)?,
            rate: Rate::parse(input.pick(&RATES)).ok()?,
            from: moment(input, log)?,
        }),
        _ => {
            let n = log.len().max(1);
            overrides
                .exclude
                .push(log.get(usize::from(input.byte()) % n)?.seq);
        }
    }
    let mut what_if = WhatIf::new(
        program.clone(),
        pm.applied_overrides(None),
        overrides.clone(),
    );
    for recorded in log {
        what_if.apply(recorded).ok()?;
    }
    let corrected = what_if.corrections(pm, None);
    let diff = what_if.finish(None).ok()?;
    Some(Command::ApplyReplay {
        replay_id: Uuid::from_u128((1 << 100) + log.len() as u128),
        at_seq: log.last().map_or(0, |r| r.seq),
        overrides: Box::new(overrides),
        changes: diff.changes,
        corrected: Box::new(corrected),
        months: None,
        reason: "fuzz".into(),
    })
}

fn command(
    input: &mut Input<'_>,
    model: &Model,
    program: &ProgramId,
    log: &[Recorded],
) -> Option<Command> {
    let affiliate = |input: &mut Input<'_>| {
        commission_ledger::events::AffiliateId::parse(input.pick(&AFFILIATES)).ok()
    };
    let customer = |input: &mut Input<'_>| CustomerId::parse(input.pick(&CUSTOMERS)).ok();
    let line = |input: &mut Input<'_>| LineId::parse(input.pick(&LINES)).ok();
    let visitor = |input: &mut Input<'_>| input.maybe(&VISITORS).map(Text::from);
    let currency = |input: &mut Input<'_>| input.pick(&CURRENCIES).to_string();
    let pm = model.program(program);
    Some(match input.byte() % 18 {
        17 => return apply_replay(input, model, program, log),
        0 => Command::DefineProgram {
            rules: Box::new(rules(input)?),
            reason: None,
        },
        1 => Command::EnrollAffiliate {
            affiliate_id: affiliate(input)?,
            customer_id: input
                .maybe(&CUSTOMERS)
                .and_then(|c| CustomerId::parse(c).ok()),
            group: input.maybe(&GROUPS).map(str::to_string),
            rate: input.maybe(&RATES).and_then(|r| Rate::parse(r).ok()),
        },
        2 => Command::SuspendAffiliate {
            affiliate_id: affiliate(input)?,
            reason: "fuzz".into(),
        },
        3 | 4 => {
            // a click on a real code most of the time
            let code = match pm.map(|pm| pm.affiliates.values().collect::<Vec<_>>()) {
                Some(all) if !all.is_empty() && input.byte() & 3 != 0 => all
                    [usize::from(input.byte()) % all.len()]
                .referral_code
                .clone(),
                _ => "nope".to_string(),
            };
            Command::RecordClick {
                referral_code: code,
                visitor: visitor(input),
                creative: input.maybe(&["banner", ""]).map(Text::from),
                referrer: input
                    .maybe(&["https://blog.example/a?b=c", "not a url"])
                    .map(Text::from),
                landing: None,
                client_hash: None,
            }
        }
        5 => Command::Signup {
            customer_id: customer(input)?,
            visitor: visitor(input),
            promo_code: input.maybe(&["P-a0", "P-a1", "nope"]).map(str::to_string),
            group: input.maybe(&GROUPS).map(str::to_string),
        },
        6 | 7 => Command::RecordBasisLine {
            kind: if input.byte() & 1 == 0 {
                LineKind::Expense
            } else {
                LineKind::Payment
            },
            id: line(input)?,
            customer_id: customer(input)?,
            amount: input.pick(&AMOUNTS).to_string(),
            currency: currency(input),
            product: input.maybe(&["domains", "hosting"]).map(str::to_string),
            order_id: input.maybe(&["o1", "o2"]).map(str::to_string),
        },
        8 => Command::RecordRefund {
            id: LineId::parse(&format!("r{}", input.byte() % 4)).ok()?,
            customer_id: customer(input)?,
            refunds: line(input)?,
            amount: input.pick(&AMOUNTS).to_string(),
            currency: currency(input),
        },
        9 => Command::CloseCustomer {
            customer_id: customer(input)?,
            reason: None,
        },
        10 => Command::ChangeCustomerGroup {
            customer_id: customer(input)?,
            group: input.pick(&GROUPS).to_string(),
        },
        11 => Command::Reassign {
            customer_id: customer(input)?,
            to: affiliate(input)?,
            from: match input.byte() & 1 {
                0 => None,
                _ => moment(input, log),
            },
            retroactive: input.byte() & 1 == 1,
            reason: "fuzz".into(),
        },
        12 | 13 => {
            let month = Month::new(
                2025 + i32::from(input.byte() % 3),
                1 + u32::from(input.byte() % 12),
            )?;
            Command::CloseMonth { month }
        }
        14 => Command::RequestWithdrawal {
            affiliate_id: affiliate(input)?,
            amount: input.pick(&AMOUNTS).to_string(),
        },
        15 => {
            let id = Uuid::from_u128(u128::from(input.byte()));
            if input.byte() & 1 == 0 {
                Command::PayWithdrawal {
                    withdrawal_id: id,
                    reference: "wire".into(),
                }
            } else {
                Command::RejectWithdrawal {
                    withdrawal_id: id,
                    reason: "fuzz".into(),
                }
            }
        }
        _ => {
            if input.byte() & 1 == 0 {
                Command::ApplyCredit {
                    affiliate_id: affiliate(input)?,
                    amount: input.pick(&AMOUNTS).to_string(),
                    invoice_id: "inv".into(),
                }
            } else {
                Command::IssueKey {
                    key_id: format!("k{}", input.byte() % 3),
                    key_hash: Bytes([input.byte(); 32]),
                    role: Role::Portal,
                }
            }
        }
    })
}

fn read_everything(model: &Model, views: &Projections, now: Timestamp, head: u64) {
    for (program, view) in &views.programs {
        let Some(pm) = model.program(program) else {
            continue;
        };
        let _ = pm.auto_close_due(now);
        let zone = view.rules.zone();
        for affiliate in view.affiliates.keys() {
            let pending = pending_estimate(pm, affiliate, now);
            let _ = view.balance(affiliate, pending, head);
            let month = now.month_in(zone);
            for m in [month.previous(), month] {
                let _ = view.statement(affiliate, m, head, String::new());
            }
            let today = now.date_in(zone);
            let _ = view.stats(affiliate, today, today, StatsBy::Day, head);
            let _ = view.stats(affiliate, today, today, StatsBy::Month, head);
            let query = ReferralQuery {
                status: None,
                q: None,
                sort: ReferralSort::CommissionDesc,
                limit: 10,
                start: ReferralStart::First,
            };
            let _ = view.referrals(affiliate, &query, head);
        }
    }
}

/// What finance relies on, after every command: postings sum to zero,
/// each affiliate's statement lines sum to its `earned` (and its
/// commission lines to its statistics' commission), no account of
/// withdrawals, payouts or credits runs negative, a closed month's
/// statement never changes again, and the pending estimate is what a
/// close of every open line would give.
fn check_money(
    model: &Model,
    views: &Projections,
    now: Timestamp,
    closed: &mut HashMap<(AffiliateId, Month), Vec<StatementLine>>,
) {
    assert!(
        views.postings_sum.is_zero(),
        "postings sum to {}",
        views.postings_sum
    );
    for (program, view) in &views.programs {
        let pm = model.program(program);
        for (affiliate, a) in &view.affiliates {
            let lines: Decimal = a.statements.values().flatten().map(|l| l.amount).sum();
            assert_eq!(
                lines,
                a.accounts.earned(),
                "{affiliate}: statement lines against earned"
            );
            // the statistics' commission, day by day, is the statements' commission
            let commission: Decimal = a
                .statements
                .values()
                .flatten()
                .filter(|l| !matches!(l.kind, StatementKind::Withdrawal | StatementKind::Credit))
                .map(|l| l.amount)
                .sum();
            let by_day: Decimal = a.days.values().map(|d| d.commission).sum();
            assert_eq!(
                by_day, commission,
                "{affiliate}: statistics against statements"
            );
            for (name, value) in [
                ("in_withdrawal", a.accounts.in_withdrawal),
                ("paid_out", a.accounts.paid_out),
                ("credited", a.accounts.credited),
            ] {
                assert!(value >= Decimal::ZERO, "{affiliate}: {name} is {value}");
            }
            for month in view.closed_months.keys() {
                let now_lines = a.statements.get(month).cloned().unwrap_or_default();
                let key = (affiliate.clone(), *month);
                match closed.get(&key) {
                    Some(then) => assert_eq!(
                        then, &now_lines,
                        "{affiliate}: the statement of closed {month} changed"
                    ),
                    None => {
                        closed.insert(key, now_lines);
                    }
                }
            }
            if let Some(pm) = pm {
                let month = now.month_in(pm.zone());
                let upto = Month::new(9999, 12).expect("a month");
                let closing = commission_of(&close_rewards(pm, upto, month, Some(affiliate)));
                assert_eq!(
                    pending_estimate(pm, affiliate, now),
                    closing,
                    "{affiliate}: the pending estimate against a close"
                );
            }
        }
    }
}

/// What an affiliate could take out just before a command: (available
/// for a withdrawal, free for a credit).
fn takeable(views: &Projections, program: &ProgramId) -> HashMap<AffiliateId, (Decimal, Decimal)> {
    let Some(view) = views.programs.get(program) else {
        return HashMap::new();
    };
    view.affiliates
        .iter()
        .map(|(id, a)| {
            let threshold = view.rules.payout_threshold;
            (
                id.clone(),
                (a.accounts.available(threshold), a.accounts.free),
            )
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let mut input = Input(data);
    let program = ProgramId::parse("p").expect("a valid id");
    let mut model = Model::default();
    let mut views = Projections::default();
    let mut ids = Ids(0);
    let mut seq = 0u64;
    // 2026-03-01T00:00:00Z, and on by the hours and days the input says
    let mut now = Timestamp::from_micros(1_772_323_200_000_000);
    let mut closed = HashMap::new();
    let mut log = Vec::new();
    while !input.0.is_empty() {
        now = Timestamp::from_micros(now.micros() + i64::from(input.byte() % 64) * 3_600_000_000);
        let back = input.pick(&BACK_US);
        let at = match back {
            i64::MAX => Timestamp::parse("0000-01-01T00:00:00Z").expect("RFC 3339"),
            back => Timestamp::from_micros(now.micros().saturating_sub(back)),
        };
        let Some(command) = command(&mut input, &model, &program, &log) else {
            continue;
        };
        let ctx = Context {
            program: Some(&program),
            now,
            at,
            next_seq: seq + 1,
            actor: "fuzz",
        };
        let Ok(Decision::Append(events)) = decide(&model, &ctx, &command, &mut ids) else {
            continue;
        };
        let before = takeable(&views, &program);
        for event in &events {
            match event {
                Event::WithdrawalRequested(w) => {
                    let (available, _) = before[&w.affiliate_id];
                    assert!(
                        w.amount <= available,
                        "withdrew {} of {available}",
                        w.amount
                    );
                }
                Event::CreditApplied(c) => {
                    let (_, free) = before[&c.affiliate_id];
                    assert!(c.amount <= free, "credited {} of {free}", c.amount);
                }
                _ => {}
            }
        }
        let close_again = matches!(command, Command::CloseMonth { .. });
        for event in events {
            seq += 1;
            let recorded = Recorded {
                seq,
                id: ids.uuid(),
                recorded_at: now,
                occurred_at: at,
                actor: Text::from("fuzz"),
                program: command.needs_program().then(|| program.clone()),
                idempotency: None,
                event,
            };
            // what the writer appends must decode again
            let bytes = commission_ledger::events::encode(&recorded).expect("encodes");
            assert_eq!(
                commission_ledger::events::decode(&bytes).ok().as_ref(),
                Some(&recorded)
            );
            model.apply(&recorded);
            views.apply(&recorded, &ModelLines(&model));
            log.push(recorded);
        }
        read_everything(&model, &views, now, seq);
        check_money(&model, &views, now, &mut closed);
        if close_again {
            // closing a month again changes nothing
            let again = decide(&model, &ctx, &command, &mut ids);
            assert!(
                !matches!(again, Ok(Decision::Append(_))),
                "a second close appended {again:?}"
            );
        }
    }
    // a what-if replay that overrides nothing finds nothing to change: the
    // money the rules decided again over the log is the money they posted
    if model.program(&program).is_none() {
        return;
    }
    let applied = model
        .program(&program)
        .map(|pm| pm.applied_overrides(None))
        .unwrap_or_default();
    let mut replay = WhatIf::new(program, applied, Overrides::default());
    for recorded in &log {
        replay.apply(recorded).expect("the log replays");
    }
    let diff = replay.finish(None).expect("the replay finishes");
    assert!(diff.is_empty(), "a replay that overrides nothing: {diff:?}");
}
