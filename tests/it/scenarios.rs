//! One story per seed program (`../shared/seeds/`), with the money worked
//! out by hand in the comments.

use commission_ledger::ledger::SubmitError;
use commission_ledger::rules::Rejection;
use rust_decimal::Decimal;

use crate::support::*;

/// BILLmanager (seed 004): promo codes from `HOST-@ID@`, N% of the client's
/// expenses, a forbidden group, rewards on the 1st for the previous month,
/// late lines rewarded at the next close, re-running a month changes nothing.
#[test]
fn billmanager_month_close_on_expenses() {
    let t = TestLedger::new("billmgr");
    t.define(rules("billmgr", serde_json::json!({})));
    let alice = t.enroll_with("alice", Some("c-alice"), None, None);
    t.enroll("bob");
    assert_eq!(alice.promo_code.as_deref(), Some("HOST-alice"));

    // A click on alice's link, then the signup carrying its cookie.
    t.click("2026-08-03T10:00:00Z", &alice.referral_code, "v-1");
    assert_eq!(
        t.signup("2026-08-04T09:00:00Z", "cust-1", Some("v-1"), None)
            .as_deref(),
        Some("alice")
    );
    // bob's promo code typed at the first order (case does not matter).
    assert_eq!(
        t.signup("2026-08-05T09:00:00Z", "cust-2", None, Some("host-BOB"))
            .as_deref(),
        Some("bob")
    );
    // alice's own account with her own promo code: no self-referral.
    assert_eq!(
        t.signup("2026-08-06T09:00:00Z", "c-alice", None, Some("HOST-alice")),
        None
    );
    // A staff member clicked alice's link: attributed, but never earns.
    t.click("2026-08-06T10:00:00Z", &alice.referral_code, "v-4");
    t.signup_group(
        "2026-08-06T11:00:00Z",
        "cust-4",
        Some("v-4"),
        None,
        Some("staff"),
    );

    t.expense("2026-08-10T12:00:00Z", "inv-1", "cust-1", "100.00"); // alice 20% → 20.00
    t.expense("2026-08-20T12:00:00Z", "inv-2", "cust-1", "3.85"); //   alice 20% → 0.77
    t.expense("2026-08-15T12:00:00Z", "inv-3", "cust-2", "200.00"); // bob 20% → 40.00
    t.expense("2026-08-16T12:00:00Z", "inv-4", "cust-4", "50.00"); //  staff → nothing
    t.payment("2026-08-17T12:00:00Z", "pay-1", "cust-1", "103.85"); // payments earn nothing here
    t.refund("2026-08-25T12:00:00Z", "cn-1", "cust-2", "inv-3", "50.00"); // bob −10.00

    // Before the close, the commission is only an estimate.
    t.set_now("2026-08-31T12:00:00Z");
    assert_eq!(
        t.money("alice"),
        ("0.00".into(), "20.77".into(), "0.00".into())
    );
    assert_eq!(
        t.money("bob"),
        ("0.00".into(), "30.00".into(), "0.00".into())
    );

    // Closing a month that has not ended in Amsterdam is refused.
    let early = t.rejected(
        None,
        commission_ledger::rules::Command::CloseMonth {
            month: month("2026-08"),
        },
    );
    assert_eq!(early, Rejection::MonthNotEnded(month("2026-08")));

    // The close on the 1st: 20.00 + 0.77 + 40.00 − 10.00 = 50.77 in 3 rewards.
    let closed = t.close("2026-08");
    assert_eq!(
        (closed.rewards, closed.total.to_string()),
        (3, "50.77".to_string())
    );
    assert_eq!(
        t.money("alice"),
        ("20.77".into(), "0.00".into(), "0.00".into())
    );
    assert_eq!(
        t.money("bob"),
        ("30.00".into(), "0.00".into(), "0.00".into())
    );
    let b = t.balance("alice");
    assert_eq!(
        (b.to_threshold.as_str(), b.lifetime_earned.as_str()),
        ("29.23", "20.77")
    );

    // Closing August again changes nothing.
    let head = t.head();
    let again = t.close("2026-08");
    assert_eq!(again, closed);
    assert_eq!(t.head(), head);

    // A line of August that arrives on 2 September: rewarded late at the September close.
    t.set_now("2026-09-02T08:00:00Z");
    t.expense("2026-08-30T12:00:00Z", "inv-5", "cust-1", "10.00"); // alice → 2.00, late
    t.expense("2026-09-10T12:00:00Z", "inv-6", "cust-2", "100.00"); // bob → 20.00
    let september = t.close("2026-09");
    assert_eq!(
        (september.rewards, september.total.to_string()),
        (2, "22.00".to_string())
    );
    let statement = t
        .ledger()
        .statement(&t.program, &aff("alice"), month("2026-09"), None)
        .unwrap()
        .unwrap();
    assert_eq!(statement.lines.len(), 1);
    assert!(statement.lines[0].late);
    assert_eq!(statement.lines[0].at, ts("2026-08-30T12:00:00Z"));
    assert_eq!(
        (
            statement.opening_balance.as_str(),
            statement.closing_balance.as_str()
        ),
        ("20.77", "22.77")
    );

    // bob: 30.00 + 20.00 = 50.00, exactly the threshold.
    assert_eq!(
        t.money("bob"),
        ("50.00".into(), "0.00".into(), "50.00".into())
    );
    let too_much = t.withdraw("bob", "60.00").unwrap_err();
    assert_eq!(
        too_much,
        SubmitError::Rejected(Rejection::InsufficientBalance {
            requested: Decimal::new(6000, 2),
            available: Decimal::new(5000, 2)
        })
    );
    let below = t.withdraw("alice", "10.00").unwrap_err();
    assert!(matches!(
        below,
        SubmitError::Rejected(Rejection::BelowThreshold { .. })
    ));
    t.withdraw("bob", "50.00").unwrap();
    let b = t.balance("bob");
    assert_eq!(
        (
            b.earned.as_str(),
            b.in_withdrawal.as_str(),
            b.available.as_str()
        ),
        ("50.00", "50.00", "0.00")
    );

    t.verify_ok();
    let before = (t.balance("alice"), t.balance("bob"));
    let mut t = t;
    t.reopen();
    assert_eq!((t.balance("alice"), t.balance("bob")), before);
    t.verify_ok();
}
