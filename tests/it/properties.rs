//! Properties over random histories: postings sum to zero, balances equal
//! their statements, projections equal a fresh replay, nothing is withdrawn
//! beyond `available`, idempotency keys append nothing twice, reads `as_of`
//! a seq answer what was served then, and any flipped byte fails `verify`
//! at its record.

use commission_ledger::events::*;
use commission_ledger::ledger::{AsOf, Submission, SubmitError, verify_log};
use commission_ledger::log;
use commission_ledger::rules::{Command, Rejection};
use proptest::prelude::*;
use rust_decimal::Decimal;

use crate::support::*;

const AFFILIATES: [&str; 3] = ["alice", "bob", "carol"];

#[derive(Clone, Debug)]
enum Op {
    Click {
        affiliate: usize,
        visitor: u8,
    },
    Signup {
        customer: u8,
        visitor: u8,
        promo: Option<usize>,
    },
    Line {
        payment: bool,
        customer: u8,
        cents: u32,
        /// Dated this many days before the op (maybe in a closed month).
        days_back: Option<u8>,
    },
    Refund {
        line: usize,
        cents: u32,
    },
    Close,
    Withdraw {
        affiliate: usize,
        cents: u32,
    },
    Settle {
        withdrawal: usize,
        pay: bool,
    },
    Credit {
        affiliate: usize,
        cents: u32,
    },
    Reassign {
        customer: u8,
        affiliate: usize,
        retroactive: bool,
        /// From this many days before the op (splitting the customer's
        /// lines between two affiliates); `None`: for all time.
        days_back: Option<u8>,
    },
    Group {
        customer: u8,
        staff: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..6u8).prop_map(|(affiliate, visitor)| Op::Click { affiliate, visitor }),
        4 => (0..8u8, 0..6u8, proptest::option::weighted(0.7, 0..3usize)).prop_map(|(customer, visitor, promo)| Op::Signup { customer, visitor, promo }),
        6 => (any::<bool>(), 0..8u8, 1..50_000u32, proptest::option::weighted(0.2, 1..40u8)).prop_map(|(payment, customer, cents, days_back)| Op::Line { payment, customer, cents, days_back }),
        2 => (0..40usize, 1..20_000u32).prop_map(|(line, cents)| Op::Refund { line, cents }),
        3 => Just(Op::Close),
        3 => (0..3usize, 1..10_000u32).prop_map(|(affiliate, cents)| Op::Withdraw { affiliate, cents }),
        2 => (0..10usize, any::<bool>()).prop_map(|(withdrawal, pay)| Op::Settle { withdrawal, pay }),
        1 => (0..3usize, 1..5_000u32).prop_map(|(affiliate, cents)| Op::Credit { affiliate, cents }),
        1 => (0..8u8, 0..3usize, any::<bool>(), proptest::option::of(0..30u8)).prop_map(|(customer, affiliate, retroactive, days_back)| Op::Reassign { customer, affiliate, retroactive, days_back }),
        1 => (0..8u8, any::<bool>()).prop_map(|(customer, staff)| Op::Group { customer, staff }),
    ]
}

/// The pending estimate looks only at the open lines of the affiliate's
/// own customers (present and past): it must be what a close of every
/// open month would give the affiliate now.
fn assert_pending_is_what_a_close_would_give(t: &TestLedger) {
    use commission_ledger::rules::{close_rewards, commission_of, pending_estimate};
    let state = t.ledger().state();
    let Some(pm) = state.model.program(&t.program) else {
        return;
    };
    let now = t.ledger().now();
    let month = now.month_in(pm.zone());
    let upto = Month::new(9999, 12).unwrap();
    for a in AFFILIATES {
        let closed = commission_of(&close_rewards(pm, upto, month, Some(&aff(a))));
        assert_eq!(pending_estimate(pm, &aff(a), now), closed, "{a}");
    }
}

fn cents(c: u32) -> String {
    format!("{}.{:02}", c / 100, c % 100)
}

/// What was served after each op: at which head, each affiliate's balance,
/// statement of the op's month, and monthly statistics.
type Served = Vec<(
    Seq,
    Vec<commission_ledger::projections::Balance>,
    Month,
    Vec<Reads>,
)>;
type Reads = (
    commission_ledger::projections::Statement,
    commission_ledger::projections::Stats,
);

fn reads(t: &TestLedger, a: &str, m: Month, as_of: Option<AsOf>) -> Reads {
    let ledger = t.ledger();
    let statement = ledger
        .statement(&t.program, &aff(a), m, as_of)
        .unwrap()
        .unwrap();
    let (from, to) = (
        chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        chrono::NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(),
    );
    let by = commission_ledger::projections::StatsBy::Month;
    let stats = ledger
        .stats(&t.program, &aff(a), from, to, by, as_of)
        .unwrap()
        .unwrap();
    (statement, stats)
}

/// Runs a history; returns the ledger, the balances served after each op,
/// and the submissions that appended events, with their receipts' events.
fn run(ops: &[Op]) -> (TestLedger, Served, Vec<(Submission, Vec<Recorded>)>) {
    let t = TestLedger::new("prop");
    t.define(rules(
        "prop",
        serde_json::json!({
            "timezone": "UTC", "payout_threshold": "5.00", "bounty": "5.00",
            "tiers": [{"min_active_referrals": 2, "rate": "25"}], "product_rates": {"domains": "5"},
        }),
    ));
    let codes: Vec<String> = AFFILIATES
        .iter()
        .map(|a| t.enroll(a).referral_code)
        .collect();
    // Half of the customers arrive through promo codes before anything else happens.
    for c in 0..4 {
        t.signup(
            "2026-01-01T00:00:00Z",
            &format!("c-{c}"),
            None,
            Some(&format!("HOST-{}", AFFILIATES[c % 3])),
        );
    }
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut withdrawals = Vec::new();
    let mut day = 0i64;
    let mut served = Vec::new();
    let mut appended = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        day += 1;
        let at = Timestamp::from_micros(
            ts("2026-01-01T12:00:00Z").micros() + day * 86_400_000_000 * 3 / 2,
        );
        let at_text = at.to_rfc3339();
        let at = Some(at_text.as_str());
        let customer = |c: u8| cust(&format!("c-{c}"));
        let days_before = |days: u8| {
            Timestamp::from_micros(ts(&at_text).micros() - i64::from(days) * 86_400_000_000)
        };
        let line_at = match op {
            Op::Line {
                days_back: Some(days),
                ..
            } => Some(days_before(*days).to_rfc3339()),
            _ => None,
        };
        let (at, command) = match op {
            Op::Click { affiliate, visitor } => (
                at,
                Command::RecordClick {
                    referral_code: codes[*affiliate].clone(),
                    visitor: Some(format!("v-{visitor}").into()),
                    creative: None,
                    referrer: None,
                    landing: None,
                    client_hash: None,
                },
            ),
            Op::Signup {
                customer: c,
                visitor,
                promo,
            } => (
                at,
                Command::Signup {
                    customer_id: customer(*c),
                    visitor: Some(format!("v-{visitor}").into()),
                    promo_code: promo.map(|a| format!("HOST-{}", AFFILIATES[a])),
                    group: None,
                },
            ),
            Op::Line {
                payment,
                customer: c,
                cents: amount,
                ..
            } => {
                let id = format!("l-{i}");
                lines.push((id.clone(), format!("c-{c}")));
                (
                    line_at.as_deref().or(at),
                    Command::RecordBasisLine {
                        kind: if *payment {
                            LineKind::Payment
                        } else {
                            LineKind::Expense
                        },
                        id: line(&id),
                        customer_id: customer(*c),
                        amount: cents(*amount),
                        currency: "USD".into(),
                        product: (amount % 3 == 0).then(|| "domains".to_string()),
                        order_id: None,
                    },
                )
            }
            Op::Refund {
                line: l,
                cents: amount,
            } => {
                let Some((id, owner)) = lines.get(*l) else {
                    continue;
                };
                (
                    at,
                    Command::RecordRefund {
                        id: line(&format!("r-{i}")),
                        customer_id: cust(owner),
                        refunds: line(id),
                        amount: cents(*amount),
                        currency: "USD".into(),
                    },
                )
            }
            Op::Close => {
                let zone = chrono_tz::UTC;
                let now = Timestamp::from_micros(t.clock.load(std::sync::atomic::Ordering::SeqCst));
                let previous = now.month_in(zone).previous();
                (None, Command::CloseMonth { month: previous })
            }
            Op::Withdraw {
                affiliate,
                cents: amount,
            } => (
                None,
                Command::RequestWithdrawal {
                    affiliate_id: aff(AFFILIATES[*affiliate]),
                    amount: cents(*amount),
                },
            ),
            Op::Settle { withdrawal, pay } => {
                let Some(id) = withdrawals.get(*withdrawal) else {
                    continue;
                };
                let id = *id;
                if *pay {
                    (
                        None,
                        Command::PayWithdrawal {
                            withdrawal_id: id,
                            reference: "wire".into(),
                        },
                    )
                } else {
                    (
                        None,
                        Command::RejectWithdrawal {
                            withdrawal_id: id,
                            reason: "no".into(),
                        },
                    )
                }
            }
            Op::Credit {
                affiliate,
                cents: amount,
            } => (
                None,
                Command::ApplyCredit {
                    affiliate_id: aff(AFFILIATES[*affiliate]),
                    amount: cents(*amount),
                    invoice_id: format!("i-{i}"),
                },
            ),
            Op::Reassign {
                customer: c,
                affiliate,
                retroactive,
                days_back,
            } => (
                None,
                Command::Reassign {
                    customer_id: customer(*c),
                    to: aff(AFFILIATES[*affiliate]),
                    from: days_back.map(days_before),
                    retroactive: *retroactive,
                    reason: "ticket".into(),
                },
            ),
            Op::Group { customer: c, staff } => (
                at,
                Command::ChangeCustomerGroup {
                    customer_id: customer(*c),
                    group: if *staff { "staff" } else { "default" }.into(),
                },
            ),
        };
        let before: Vec<_> = AFFILIATES.iter().map(|a| t.balance(a)).collect();
        let head = t.head();
        let mut submission =
            Submission::new(Some(&t.program), "prop", command).idempotency_key(&format!("op-{i}"));
        if let Some(at) = at {
            t.clock
                .fetch_max(ts(at).micros(), std::sync::atomic::Ordering::SeqCst);
            submission = submission.at(ts(at));
        }
        match t.ledger().submit_blocking(submission.clone()) {
            Ok(receipt) => {
                if !receipt.events.is_empty() {
                    appended.push((submission, receipt.events.clone()));
                }
                for r in &receipt.events {
                    if let Event::WithdrawalRequested(w) = &r.event {
                        // never beyond what was available just before
                        let index = AFFILIATES
                            .iter()
                            .position(|a| *a == w.affiliate_id.as_str())
                            .unwrap();
                        let available: Decimal = before[index].available.parse().unwrap();
                        assert!(
                            w.amount <= available,
                            "withdrew {} with {} available",
                            w.amount,
                            available
                        );
                        withdrawals.push(w.withdrawal_id);
                    }
                }
            }
            Err(SubmitError::Rejected(r)) => {
                assert_eq!(t.head(), head, "a rejection ({r}) appended events");
                if let Rejection::Money(_) | Rejection::Invalid(_) = r {
                    panic!("the generator made an invalid command: {r}");
                }
            }
            Err(e) => panic!("{e}"),
        }
        assert_pending_is_what_a_close_would_give(&t);
        let m = Timestamp::parse(&at_text).unwrap().month_in(chrono_tz::UTC);
        served.push((
            t.head(),
            AFFILIATES.iter().map(|a| t.balance(a)).collect(),
            m,
            AFFILIATES.iter().map(|a| reads(&t, a, m, None)).collect(),
        ));
    }
    if std::env::var_os("PROP_STATS").is_some() {
        let kinds: Vec<&str> = appended
            .iter()
            .flat_map(|(_, e)| e.iter().map(|r| r.event.type_name()))
            .collect();
        let count = |k: &str| kinds.iter().filter(|x| **x == k).count();
        eprintln!(
            "rewards {} clawbacks {} withdrawals {} paid {} credits {} adjustments {} closes {}",
            count("RewardAccrued"),
            count("RewardClawedBack"),
            count("WithdrawalRequested"),
            count("WithdrawalPaid"),
            count("CreditApplied"),
            count("AdjustmentPosted"),
            count("MonthClosed")
        );
    }
    (t, served, appended)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_every_money_invariant(ops in proptest::collection::vec(op(), 1..120)) {
        let (t, served, appended) = run(&ops);
        // postings sum to zero and the projections equal a fresh replay
        let report = t.ledger().verify().unwrap();
        prop_assert!(report.ok, "{:?}", report.problem);
        prop_assert!(t.ledger().state().views.postings_sum.is_zero());
        // each balance equals the sum of its statement lines
        {
            let state = t.ledger().state();
            let view = &state.views.programs[&t.program];
            for a in AFFILIATES {
                let affiliate = &view.affiliates[&aff(a)];
                let lines: Decimal = affiliate.statements.values().flatten().map(|l| l.amount).sum();
                prop_assert_eq!(lines, affiliate.accounts.earned(), "{}", a);
            }
        }
        // reads as of an earlier seq answer what was served then: balances,
        // statements (with their as_of_seq and log hash) and statistics
        for (seq, balances, m, served_reads) in served.iter().step_by(7) {
            for ((a, served), served_reads) in AFFILIATES.iter().zip(balances).zip(served_reads) {
                let then = t.ledger().balance(&t.program, &aff(a), Some(AsOf::Seq(*seq))).unwrap().unwrap();
                prop_assert_eq!(&then, served);
                let then = reads(&t, a, *m, Some(AsOf::Seq(*seq)));
                prop_assert_eq!(&then, served_reads);
            }
        }
        // resubmitting an idempotency key appends nothing
        let head = t.head();
        for (submission, events) in appended.iter().rev().take(10) {
            let again = t.ledger().submit_blocking(submission.clone()).unwrap();
            prop_assert!(again.replayed);
            prop_assert_eq!(&again.events, events);
        }
        if let Some((submission, _)) = appended.first() {
            let key = submission.idempotency.as_ref().unwrap().key.clone();
            let other = Submission::new(Some(&t.program), "prop", Command::CloseMonth { month: month("2020-01") }).idempotency_key(&key);
            let conflict = t.ledger().submit_blocking(other).unwrap_err();
            prop_assert!(matches!(conflict, SubmitError::IdempotencyConflict(_)));
        }
        prop_assert_eq!(t.head(), head);
        // a restart gives the same balances
        let before: Vec<_> = AFFILIATES.iter().map(|a| t.balance(a)).collect();
        let mut t = t;
        t.reopen();
        let after: Vec<_> = AFFILIATES.iter().map(|a| t.balance(a)).collect();
        prop_assert_eq!(before, after);
    }
}

/// The (first byte, end, seq) of every record of a segment.
fn record_spans(bytes: &[u8]) -> Vec<(usize, usize, u64)> {
    let mut spans = Vec::new();
    let mut offset = log::SEGMENT_MAGIC.len();
    let mut seq = 1;
    while offset + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        spans.push((offset, offset + 8 + len, seq));
        offset += 8 + len;
        seq += 1;
    }
    spans
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn flipping_any_byte_fails_verify_at_that_record(position in any::<prop::sample::Index>(), bit in 0..8u8) {
        let t = TestLedger::new("flip");
        t.define(rules("flip", serde_json::json!({})));
        let alice = t.enroll("alice");
        t.click("2026-01-02T10:00:00Z", &alice.referral_code, "v-1");
        t.signup("2026-01-02T11:00:00Z", "c-1", Some("v-1"), None);
        t.expense("2026-01-03T10:00:00Z", "l-1", "c-1", "10.00");
        let log_dir = t.dir.path().join("log");
        let segment = log::list_segments(&log_dir).unwrap()[0].1.clone();
        let mut bytes = std::fs::read(&segment).unwrap();
        let spans = record_spans(&bytes);
        // Any byte of the records (the preallocated zeros after them are no record).
        let end = spans.last().unwrap().1;
        let index = log::SEGMENT_MAGIC.len() + position.index(end - log::SEGMENT_MAGIC.len());
        bytes[index] ^= 1 << bit;
        std::fs::write(&segment, &bytes).unwrap();
        let (_, _, seq) = spans.iter().find(|(start, end, _)| (*start..*end).contains(&index)).copied().unwrap();
        let report = verify_log(&log_dir, None);
        prop_assert!(!report.ok);
        prop_assert_eq!(report.bad_seq, Some(seq), "{:?}", report.problem);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 100, .. ProptestConfig::default() })]

    /// A what-if replay under random overrides, applied: the ledger's
    /// balances become the replay's (each moves by exactly its changes),
    /// and replaying with no overrides then finds nothing to change. An
    /// empty override set never finds anything either.
    #[test]
    fn applying_a_replay_makes_the_ledger_agree_with_it(
        ops in proptest::collection::vec(op(), 30..100),
        // customers c-0..c-3 signed up by promo code before anything else
        moves in proptest::collection::vec((0..4u8, 0..3usize, proptest::option::of(0..60i64)), 0..3),
        rate in proptest::option::of((0..3usize, 1..60u32, 0..60i64)),
        excluded in proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
    ) {
        let (t, _, appended) = run(&ops);
        let empty = t.ledger().what_if(&t.program, Overrides::default(), None).unwrap();
        prop_assert!(empty.diff.is_empty(), "{:?}", empty.diff);

        let day = |d: i64| Timestamp::from_micros(ts("2026-01-01T00:00:00Z").micros() + d * 3 * 86_400_000_000);
        let excludable: Vec<Seq> = appended
            .iter()
            .flat_map(|(_, events)| events.iter())
            .filter(|r| matches!(r.event, Event::ClickRecorded(_) | Event::SignupAttributed(_) | Event::BasisLineRecorded(_) | Event::RefundRecorded(_)))
            .map(|r| r.seq)
            .collect();
        let mut exclude: Vec<Seq> = if excludable.is_empty() {
            Vec::new()
        } else {
            excluded.iter().map(|i| excludable[i.index(excludable.len())]).collect()
        };
        exclude.sort();
        exclude.dedup();
        let overrides = Overrides {
            attribution: moves
                .iter()
                .map(|(c, a, from)| AttributionOverride {
                    customer_id: cust(&format!("c-{c}")),
                    affiliate_id: aff(AFFILIATES[*a]),
                    from: from.map(day),
                })
                .collect(),
            affiliate_rates: rate
                .iter()
                .map(|(a, r, from)| AffiliateRateOverride {
                    affiliate_id: aff(AFFILIATES[*a]),
                    rate: commission_ledger::money::Rate::parse(&r.to_string()).unwrap(),
                    from: day(*from),
                })
                .collect(),
            exclude,
            ..Overrides::default()
        };
        let replay = t.ledger().what_if(&t.program, overrides, None).unwrap();
        let before: Vec<Decimal> = AFFILIATES
            .iter()
            .map(|a| t.balance(a).earned.parse().unwrap())
            .collect();
        let submission = t
            .ledger()
            .apply_replay_submission(&t.program, &replay.replay_id, "property", "prop")
            .unwrap()
            .unwrap();
        t.ledger().submit_blocking(submission).unwrap();
        for (a, before) in AFFILIATES.iter().zip(before) {
            let moved: Decimal = replay
                .diff
                .changes
                .iter()
                .filter(|c| c.affiliate_id.as_str() == *a)
                .map(|c| c.amount)
                .sum();
            let earned: Decimal = t.balance(a).earned.parse().unwrap();
            prop_assert_eq!(earned, before + moved, "{}", a);
        }
        let again = t.ledger().what_if(&t.program, Overrides::default(), None).unwrap();
        prop_assert!(again.diff.is_empty(), "{:?}", again.diff);
        let report = t.ledger().verify().unwrap();
        prop_assert!(report.ok, "{:?}", report.problem);
    }
}
