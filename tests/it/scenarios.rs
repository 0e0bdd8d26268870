//! One story per seed program (`../shared/seeds/`), with the money worked
//! out by hand in the comments.

use commission_ledger::events::LineKind;
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

/// H-Sphere (seed 000): the billing system sends every signup to every
/// affiliate server; only the one holding the visitor's cookie acts. Clicks
/// remember the creative (text link, banner) they came through.
#[test]
fn h_sphere_only_the_server_holding_the_cookie_acts() {
    let mut servers = Vec::new();
    for name in ["server-a", "server-b"] {
        let t = TestLedger::new(name);
        t.define(rules(name, serde_json::json!({"default_rate": "15", "cookie_days": 45, "attribution": "first_click", "timezone": "America/Chicago"})));
        t.enroll("webmaster");
        servers.push(t);
    }
    let code = servers[0].referral_code("webmaster");
    // The visitor clicked only server A's links: the banner twice, then a text link.
    servers[0].click_creative(
        "2026-03-10T15:00:00Z",
        &code,
        "cookie-1",
        Some("banner-468x60"),
    );
    servers[0].click_creative(
        "2026-03-11T15:00:00Z",
        &code,
        "cookie-1",
        Some("banner-468x60"),
    );
    servers[0].click_creative("2026-03-11T16:00:00Z", &code, "cookie-2", Some("text-link"));
    // H-Sphere forwards the signup to both servers.
    let a = servers[0].signup("2026-03-12T10:00:00Z", "h-1", Some("cookie-1"), None);
    let b_head = servers[1].head();
    let b = servers[1].signup("2026-03-12T10:00:00Z", "h-1", Some("cookie-1"), None);
    assert_eq!((a.as_deref(), b), (Some("webmaster"), None));
    assert_eq!(
        servers[1].head(),
        b_head,
        "the other server records nothing"
    );

    let t = &servers[0];
    t.basis(
        LineKind::Expense,
        "2026-03-15T12:00:00Z",
        "hs-1",
        "h-1",
        "39.95",
        Some("hosting"),
        None,
    ); // 15% = 5.9925 → 5.99
    t.basis(
        LineKind::Expense,
        "2026-03-15T12:00:00Z",
        "hs-2",
        "h-1",
        "89.95",
        Some("ssl-128"),
        None,
    ); // 15% = 13.4925 → 13.49
    let closed = t.close("2026-03");
    assert_eq!(
        (closed.rewards, closed.total.to_string()),
        (2, "19.48".to_string())
    );

    let march = |by| t.stats("webmaster", "2026-03-01", "2026-03-31", by);
    let stats = march(commission_ledger::projections::StatsBy::Month);
    assert_eq!(
        (
            stats.clicks,
            stats.unique_visitors,
            stats.signups,
            stats.conversions,
            stats.commission.as_str()
        ),
        (3, 2, 1, 1, "19.48")
    );
    let creatives = march(commission_ledger::projections::StatsBy::Creative);
    let by_creative: Vec<(String, u64)> = creatives
        .series
        .iter()
        .map(|r| (r.key.clone(), r.clicks))
        .collect();
    assert_eq!(
        by_creative,
        vec![
            ("banner-468x60".to_string(), 2),
            ("text-link".to_string(), 1)
        ]
    );
    t.snapshot_statement("statement_h_sphere_2026_03", "webmaster", "2026-03");
    t.verify_ok();
}

/// WHMCS (seed 001): commission on payments, a $50.00 withdrawal threshold,
/// clicks / signups / conversions counters, "Request Withdrawal", and the
/// referral list with filters (closed accounts).
#[test]
fn whmcs_threshold_withdrawal_and_referral_list() {
    use commission_ledger::projections::{ReferralQuery, ReferralSort};
    let t = TestLedger::new("whmcs");
    t.define(rules("whmcs", serde_json::json!({"basis": "payments", "default_rate": "10", "cookie_days": 90, "timezone": "America/New_York", "payout_threshold": "50.00"})));
    let pat = t.enroll("pat");
    for (i, visitor) in ["w-v1", "w-v2", "w-v3", "w-v4", "w-v1"].iter().enumerate() {
        t.click(
            &format!("2026-01-0{}T15:00:00Z", i + 2),
            &pat.referral_code,
            visitor,
        );
    }
    for (customer, visitor) in [("w-1", "w-v1"), ("w-2", "w-v2"), ("w-3", "w-v3")] {
        assert_eq!(
            t.signup("2026-01-08T15:00:00Z", customer, Some(visitor), None)
                .as_deref(),
            Some("pat")
        );
    }
    t.expense("2026-01-09T15:00:00Z", "inv-1", "w-1", "300.00"); // an invoice earns nothing until paid
    t.payment("2026-01-10T15:00:00Z", "pay-1", "w-1", "300.00"); // 10% → 30.00
    t.payment("2026-01-12T15:00:00Z", "pay-2", "w-2", "150.00"); // 10% → 15.00
    t.close("2026-01");
    // 45.00 is below the $50.00 mark: 5.00 to go, nothing to withdraw.
    let b = t.balance("pat");
    assert_eq!(
        (
            b.earned.as_str(),
            b.to_threshold.as_str(),
            b.available.as_str()
        ),
        ("45.00", "5.00", "0.00")
    );
    assert!(matches!(
        t.withdraw("pat", "45.00"),
        Err(SubmitError::Rejected(Rejection::BelowThreshold { .. }))
    ));
    t.payment("2026-02-03T15:00:00Z", "pay-3", "w-1", "100.00"); // 10.00 → 55.00 in February
    t.close("2026-02");
    let w = t.withdraw("pat", "55.00").unwrap();
    t.submit(
        None,
        commission_ledger::rules::Command::PayWithdrawal {
            withdrawal_id: w,
            reference: "PayPal 2026-03-02".into(),
        },
    );
    let b = t.balance("pat");
    assert_eq!(
        (
            b.earned.as_str(),
            b.withdrawn_total.as_str(),
            b.lifetime_earned.as_str()
        ),
        ("0.00", "55.00", "55.00")
    );
    t.submit(
        Some("2026-02-20T00:00:00Z"),
        commission_ledger::rules::Command::CloseCustomer {
            customer_id: cust("w-2"),
            reason: Some("cancelled".into()),
        },
    );

    let program = t.ledger().state().views.programs[&t.program].clone();
    let all = |status: Option<&str>, sort| {
        let query = ReferralQuery {
            status: status.map(str::to_string),
            q: None,
            sort,
            limit: 10,
            start: Default::default(),
        };
        program
            .referrals(&aff("pat"), &query, t.head())
            .unwrap()
            .referrals
            .iter()
            .map(|r| (r.customer_id.to_string(), r.commission.clone(), r.status))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        all(None, ReferralSort::CommissionDesc),
        vec![
            ("w-1".to_string(), "40.00".to_string(), "active"),
            ("w-2".to_string(), "15.00".to_string(), "closed"),
            ("w-3".to_string(), "0.00".to_string(), "active"),
        ]
    );
    assert_eq!(
        all(Some("closed"), ReferralSort::CommissionDesc),
        vec![("w-2".to_string(), "15.00".to_string(), "closed")]
    );
    let page = program
        .referrals(
            &aff("pat"),
            &ReferralQuery {
                status: None,
                q: Some("w-".into()),
                sort: ReferralSort::CommissionAsc,
                limit: 2,
                start: Default::default(),
            },
            t.head(),
        )
        .unwrap();
    assert_eq!(
        (
            page.referrals.len(),
            page.total,
            page.next.map(|c| c.to_string())
        ),
        (2, 3, Some("commission~15.00~w-2".to_string()))
    );

    let jan = |by| {
        program
            .stats(
                &aff("pat"),
                chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
                chrono::NaiveDate::from_ymd_opt(2026, 2, 28).unwrap(),
                by,
                t.head(),
            )
            .unwrap()
    };
    let stats = jan(commission_ledger::projections::StatsBy::Day);
    assert_eq!(
        (
            stats.clicks,
            stats.unique_visitors,
            stats.signups,
            stats.conversions,
            stats.commission.as_str()
        ),
        (5, 4, 3, 2, "55.00")
    );
    t.snapshot_statement("statement_whmcs_2026_02", "pat", "2026-02");
    t.verify_ok();
}

/// Host.bg (seed 002), in leva: the affiliate URL pays a one-time commission
/// on the first order; the partner program pays "forever"; commission can
/// pay the partner's own invoices with no threshold.
#[test]
fn host_bg_one_time_and_forever_commission_and_credit_to_own_invoice() {
    // The affiliate URL https://host.bg/partners/Partner_Number: one-time.
    let t = TestLedger::new("hostbg-link");
    t.define(rules("hostbg-link", serde_json::json!({"currency": "BGN", "timezone": "Europe/Sofia", "default_rate": "10", "term": {"kind": "first_order"}, "payout_threshold": "100.00"})));
    let partner = t.enroll_with("p-1007", Some("c-1007"), None, None);
    t.click("2026-04-01T08:00:00Z", &partner.referral_code, "v-b1");
    t.signup("2026-04-01T09:00:00Z", "b-1", Some("v-b1"), None);
    t.basis(
        LineKind::Expense,
        "2026-04-01T10:00:00Z",
        "f-1",
        "b-1",
        "120.00",
        Some("hosting"),
        Some("o-1"),
    ); // 12.00
    t.basis(
        LineKind::Expense,
        "2026-04-01T10:00:00Z",
        "f-2",
        "b-1",
        "20.00",
        Some("domain"),
        Some("o-1"),
    ); //   2.00
    t.basis(
        LineKind::Expense,
        "2026-04-20T10:00:00Z",
        "f-3",
        "b-1",
        "120.00",
        Some("hosting"),
        Some("o-2"),
    ); // renewal: none
    assert_eq!(t.close("2026-04").total.to_string(), "14.00");
    // 14.00 is far below the 100.00 payout threshold, but pays the partner's own invoice.
    assert!(matches!(
        t.withdraw("p-1007", "14.00"),
        Err(SubmitError::Rejected(Rejection::BelowThreshold { .. }))
    ));
    t.submit(
        None,
        commission_ledger::rules::Command::ApplyCredit {
            affiliate_id: aff("p-1007"),
            amount: "14.00".into(),
            invoice_id: "inv-p-1007-05".into(),
        },
    );
    let b = t.balance("p-1007");
    assert_eq!(
        (
            b.currency.code(),
            b.earned.as_str(),
            b.credited_total.as_str(),
            b.lifetime_earned.as_str()
        ),
        ("BGN", "0.00", "14.00", "14.00")
    );
    t.snapshot_statement("statement_host_bg_2026_05", "p-1007", "2026-05");

    // The partner program: commission "forever" on the subscriptions of the partner's clients.
    let t = TestLedger::new("hostbg-partner");
    t.define(rules("hostbg-partner", serde_json::json!({"currency": "BGN", "timezone": "Europe/Sofia", "default_rate": "15", "promo_code_template": "P@ID@"})));
    t.enroll("1007");
    assert_eq!(
        t.signup("2026-01-05T09:00:00Z", "r-1", None, Some("P1007"))
            .as_deref(),
        Some("1007")
    );
    t.expense("2026-01-05T10:00:00Z", "y1", "r-1", "99.99"); // 14.9985 → 15.00
    t.expense("2029-01-05T10:00:00Z", "y4", "r-1", "99.99"); // three years on: still 15.00
    t.close("2026-01");
    t.close("2029-01");
    assert_eq!(t.balance("1007").earned, "30.00");
    t.verify_ok();
}

/// Yourhosting (seed 003), in euro: a kickback percentage per participating
/// product, earned once the new customer has paid, paid out once a month.
#[test]
fn yourhosting_per_product_kickback_on_payments_paid_monthly() {
    let t = TestLedger::new("yourhosting");
    t.define(rules("yourhosting", serde_json::json!({
        "currency": "EUR", "timezone": "Europe/Amsterdam", "basis": "payments",
        "default_rate": "0", "product_rates": {"webhosting": "15", "domains": "5", "email": "10"},
        "payout_threshold": "0.00", "promo_code_template": null
    })));
    let friend = t.enroll("klant-42");
    assert_eq!(friend.promo_code, None, "no template, no promo codes");
    t.click("2026-05-03T18:00:00Z", &friend.referral_code, "v-y1");
    t.signup("2026-05-03T18:10:00Z", "y-1", Some("v-y1"), None);
    t.basis(
        LineKind::Expense,
        "2026-05-03T18:15:00Z",
        "f-1",
        "y-1",
        "60.00",
        Some("webhosting"),
        None,
    ); // ordered, not paid
    t.set_now("2026-05-31T12:00:00Z");
    assert_eq!(
        t.balance("klant-42").pending,
        "0.00",
        "nothing until the customer has paid"
    );
    t.basis(
        LineKind::Payment,
        "2026-05-04T09:00:00Z",
        "p-1",
        "y-1",
        "60.00",
        Some("webhosting"),
        None,
    ); // 15% → 9.00
    t.basis(
        LineKind::Payment,
        "2026-05-04T09:00:00Z",
        "p-2",
        "y-1",
        "10.00",
        Some("domains"),
        None,
    ); //    5% → 0.50
    t.basis(
        LineKind::Payment,
        "2026-05-04T09:00:00Z",
        "p-3",
        "y-1",
        "100.00",
        Some("vps"),
        None,
    ); //  not participating
    assert_eq!(t.balance("klant-42").pending, "9.50");
    assert_eq!(t.close("2026-05").total.to_string(), "9.50");
    // Once a month Yourhosting pays it to the known account.
    t.set_now("2026-06-02T09:00:00Z");
    let w = t.withdraw("klant-42", "9.50").unwrap();
    t.submit(
        None,
        commission_ledger::rules::Command::PayWithdrawal {
            withdrawal_id: w,
            reference: "SEPA NL91ABNA0417164300".into(),
        },
    );
    let b = t.balance("klant-42");
    assert_eq!(
        (b.earned.as_str(), b.withdrawn_total.as_str()),
        ("0.00", "9.50")
    );
    t.snapshot_statement("statement_yourhosting_2026_05", "klant-42", "2026-05");
    t.snapshot_statement("statement_yourhosting_2026_06", "klant-42", "2026-06");
    t.verify_ok();
}

/// `serve --demo`: three months of seeded activity, the same every time.
#[test]
fn the_demo_loads_the_same_numbers_every_time_and_only_once() {
    let balances = |t: &TestLedger| {
        ["alice", "bob", "carol"].map(|a| {
            t.ledger()
                .balance(
                    &program_id(commission_ledger::demo::DEMO_PROGRAM),
                    &aff(a),
                    None,
                )
                .unwrap()
                .unwrap()
        })
    };
    let load = |now: &str| {
        let t = TestLedger::new(commission_ledger::demo::DEMO_PROGRAM);
        t.set_now(now);
        let demo = commission_ledger::demo::load(t.ledger()).unwrap();
        assert!(demo.loaded);
        assert_eq!(demo.affiliates.len(), 3);
        t
    };
    // What a portal shows by default: the last 30 days, up to today.
    let recent_clicks = |t: &TestLedger, today: &str| -> [u64; 3] {
        let to = chrono::NaiveDate::parse_from_str(today, "%Y-%m-%d").unwrap();
        ["alice", "bob", "carol"].map(|a| {
            t.ledger()
                .stats(
                    &program_id(commission_ledger::demo::DEMO_PROGRAM),
                    &aff(a),
                    to - chrono::Duration::days(29),
                    to,
                    commission_ledger::projections::StatsBy::Day,
                    None,
                )
                .unwrap()
                .unwrap()
                .clicks
        })
    };
    for (now, today) in [
        ("2026-11-21T12:00:00Z", "2026-11-21"),
        ("2026-12-01T00:30:00Z", "2026-12-01"),
    ] {
        let t = load(now);
        // This month's 40 clicks at least, for every affiliate.
        let clicks = recent_clicks(&t, today);
        assert!(
            clicks.iter().all(|c| *c > 0) && clicks.iter().sum::<u64>() >= 40,
            "on {now} the last 30 days show activity: {clicks:?}"
        );
        let events = t.ledger().events_range(1, t.head()).unwrap();
        assert!(
            events.iter().all(|r| r.occurred_at <= ts(now)),
            "nothing happened after now"
        );
        t.verify_ok();
    }
    let (a, b) = (load("2026-11-21T12:00:00Z"), load("2026-11-21T12:00:00Z"));
    let (first, second) = (balances(&a), balances(&b));
    for (x, y) in first.iter().zip(&second) {
        assert_eq!(
            (&x.earned, &x.pending, &x.withdrawn_total),
            (&y.earned, &y.pending, &y.withdrawn_total)
        );
    }
    assert!(
        first.iter().all(|b| b.lifetime_earned != "0.00"),
        "every affiliate earned something"
    );
    assert!(
        first.iter().any(|b| b.withdrawn_total == "50.00"),
        "someone was paid out"
    );
    let head = a.head();
    assert!(!commission_ledger::demo::load(a.ledger()).unwrap().loaded);
    assert_eq!(a.head(), head, "loading twice adds nothing");
    a.verify_ok();
}
