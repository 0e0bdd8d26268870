//! One test per program rule, each as given / when / then, including every
//! refusal. They run through the real ledger (writer, log, projections).

use commission_ledger::events::*;
use commission_ledger::ledger::SubmitError;
use commission_ledger::money::MoneyError;
use commission_ledger::rules::{Command, Noop, Rejection};
use rust_decimal::Decimal;

use crate::support::*;

fn d(text: &str) -> Decimal {
    text.parse().unwrap()
}

/// given a program with `overrides`, alice and bob enrolled, and cust-1
/// signed up through alice's link on 2026-08-02.
fn given(overrides: serde_json::Value) -> (TestLedger, AffiliateEnrolled, AffiliateEnrolled) {
    let t = TestLedger::new("hosting");
    t.define(rules("hosting", overrides));
    let alice = t.enroll_with("alice", Some("c-alice"), None, None);
    let bob = t.enroll_with("bob", Some("c-bob"), None, None);
    t.click("2026-08-01T12:00:00Z", &alice.referral_code, "v-1");
    assert_eq!(
        t.signup("2026-08-02T12:00:00Z", "cust-1", Some("v-1"), None)
            .as_deref(),
        Some("alice")
    );
    (t, alice, bob)
}

/// `alice`, enrolled, and `cust-1`, who clicks her link at `clicked` (as
/// visitor `v-1`) and signs up at `signed_up`.
fn alice_refers_cust_1(t: &TestLedger, clicked: &str, signed_up: &str) {
    let alice = t.enroll("alice");
    t.click(clicked, &alice.referral_code, "v-1");
    t.signup(signed_up, "cust-1", Some("v-1"), None);
}

/// The (affiliate, kind, amount, late) of each reward event of a close.
fn close_rewards(t: &TestLedger, m: &str) -> Vec<(String, String, String, bool)> {
    let head = t.head();
    t.close(m);
    t.ledger()
        .events_range(head + 1, t.head())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::RewardAccrued(e) => Some((
                e.affiliate_id.to_string(),
                format!("{:?}", e.kind),
                e.amount.to_string(),
                e.late,
            )),
            Event::RewardClawedBack(e) => Some((
                e.affiliate_id.to_string(),
                "Clawback".into(),
                e.amount.to_string(),
                e.late,
            )),
            _ => None,
        })
        .collect()
}

fn r(affiliate: &str, kind: &str, amount: &str) -> (String, String, String, bool) {
    (affiliate.into(), kind.into(), amount.into(), false)
}

#[test]
fn rate_precedence_affiliate_override_then_product_then_tier_then_default() {
    // given: domains at 5%, 25% for affiliates with 2 active referrals, 20% default
    let t = TestLedger::new("hosting");
    t.define(rules(
        "hosting",
        serde_json::json!({
            "product_rates": {"domains": "5"},
            "tiers": [{"min_active_referrals": 2, "rate": "25"}],
        }),
    ));
    let alice = t.enroll("alice");
    let carol = t.enroll_with("carol", None, None, Some("30"));
    t.click("2026-08-01T12:00:00Z", &alice.referral_code, "v-1");
    t.signup("2026-08-02T12:00:00Z", "a-1", Some("v-1"), None);
    t.click("2026-08-01T12:00:00Z", &carol.referral_code, "v-3");
    t.signup("2026-08-02T12:00:00Z", "c-1", Some("v-3"), None);
    // when: alice's one referral buys hosting and a domain; carol's buys a domain
    t.basis(
        LineKind::Expense,
        "2026-08-05T12:00:00Z",
        "l1",
        "a-1",
        "100.00",
        Some("hosting"),
        None,
    );
    t.basis(
        LineKind::Expense,
        "2026-08-05T12:00:00Z",
        "l2",
        "a-1",
        "100.00",
        Some("domains"),
        None,
    );
    t.basis(
        LineKind::Expense,
        "2026-08-05T12:00:00Z",
        "l3",
        "c-1",
        "100.00",
        Some("domains"),
        None,
    );
    // then: default 20, product 5, and carol's own 30 beats the product rate
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![
            r("alice", "Reward", "20.00"),
            r("alice", "Reward", "5.00"),
            r("carol", "Reward", "30.00")
        ]
    );

    // given: alice gets a second referral active in September → the tier applies
    t.click("2026-09-01T12:00:00Z", &alice.referral_code, "v-2");
    t.signup("2026-09-02T12:00:00Z", "a-2", Some("v-2"), None);
    t.basis(
        LineKind::Expense,
        "2026-09-05T12:00:00Z",
        "l4",
        "a-1",
        "100.00",
        Some("hosting"),
        None,
    );
    t.basis(
        LineKind::Expense,
        "2026-09-05T12:00:00Z",
        "l5",
        "a-2",
        "10.00",
        Some("hosting"),
        None,
    );
    t.basis(
        LineKind::Expense,
        "2026-09-05T12:00:00Z",
        "l6",
        "a-2",
        "10.00",
        Some("domains"),
        None,
    );
    // then: 25% tier on hosting, the product rate still wins for domains
    assert_eq!(
        close_rewards(&t, "2026-09"),
        vec![
            r("alice", "Reward", "25.00"),
            r("alice", "Reward", "2.50"),
            r("alice", "Reward", "0.50")
        ]
    );
}

#[test]
fn a_bounty_is_paid_once_per_customer_in_the_month_of_the_first_line() {
    let (t, _, _) = given(serde_json::json!({"bounty": "10.00"}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "50.00");
    t.expense("2026-08-06T12:00:00Z", "l2", "cust-1", "50.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![
            r("alice", "Reward", "10.00"),
            r("alice", "Bounty", "10.00"),
            r("alice", "Reward", "10.00")
        ]
    );
    t.expense("2026-09-05T12:00:00Z", "l3", "cust-1", "50.00");
    assert_eq!(
        close_rewards(&t, "2026-09"),
        vec![r("alice", "Reward", "10.00")]
    );
}

#[test]
fn basis_payments_rewards_payments_only() {
    let (t, _, _) = given(serde_json::json!({"basis": "payments"}));
    t.expense("2026-08-05T12:00:00Z", "inv-1", "cust-1", "100.00");
    t.payment("2026-08-09T12:00:00Z", "pay-1", "cust-1", "80.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "16.00")]
    );
}

#[test]
fn term_months_ends_the_commission_n_months_after_signup() {
    let (t, _, _) = given(serde_json::json!({"term": {"kind": "months", "months": 1}}));
    t.expense("2026-09-01T12:00:00Z", "in", "cust-1", "100.00"); // within a month of 08-02
    t.expense("2026-09-02T12:00:00Z", "out", "cust-1", "100.00"); // a month after: no more
    assert_eq!(
        close_rewards(&t, "2026-09"),
        vec![r("alice", "Reward", "20.00")]
    );
}

#[test]
fn term_first_order_rewards_only_the_first_order() {
    let (t, _, _) = given(serde_json::json!({"term": {"kind": "first_order"}}));
    t.basis(
        LineKind::Expense,
        "2026-08-05T12:00:00Z",
        "l1",
        "cust-1",
        "100.00",
        None,
        Some("o-1"),
    );
    t.basis(
        LineKind::Expense,
        "2026-08-05T12:00:00Z",
        "l2",
        "cust-1",
        "10.00",
        None,
        Some("o-1"),
    );
    t.basis(
        LineKind::Expense,
        "2026-08-20T12:00:00Z",
        "l3",
        "cust-1",
        "100.00",
        None,
        Some("o-2"),
    );
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00"), r("alice", "Reward", "2.00")]
    );
}

#[test]
fn only_eligible_groups_may_join() {
    let t = TestLedger::new("hosting");
    t.define(rules(
        "hosting",
        serde_json::json!({"eligible_groups": ["resellers"]}),
    ));
    t.enroll_with("alice", None, Some("resellers"), None);
    let refused = t.rejected(
        None,
        Command::EnrollAffiliate {
            affiliate_id: aff("bob"),
            customer_id: None,
            group: None,
            rate: None,
        },
    );
    assert_eq!(refused, Rejection::NotEligible("default".into()));
    let again = t.rejected(
        None,
        Command::EnrollAffiliate {
            affiliate_id: aff("alice"),
            customer_id: None,
            group: Some("resellers".into()),
            rate: None,
        },
    );
    assert_eq!(again, Rejection::AffiliateExists(aff("alice")));
}

#[test]
fn forbidden_groups_never_earn_from_the_moment_they_join_it() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "100.00");
    t.submit(
        Some("2026-08-10T00:00:00Z"),
        Command::ChangeCustomerGroup {
            customer_id: cust("cust-1"),
            group: "staff".into(),
        },
    );
    t.expense("2026-08-15T12:00:00Z", "l2", "cust-1", "100.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00")]
    );
}

/// A balance read keeps its pending estimate until something it depends on
/// changes: a change reported late must move it as a new line does.
#[test]
fn pending_follows_a_late_group_change_and_a_reassignment_after_it_was_read() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "100.00");
    t.expense("2026-08-15T12:00:00Z", "l2", "cust-1", "100.00");
    assert_eq!(t.balance("alice").pending, "40.00");
    assert_eq!(t.balance("alice").pending, "40.00");
    // the billing system reports on 20 August that cust-1 joined staff on
    // the 10th: l2 earns nothing
    t.set_now("2026-08-20T00:00:00Z");
    t.submit(
        Some("2026-08-10T00:00:00Z"),
        Command::ChangeCustomerGroup {
            customer_id: cust("cust-1"),
            group: "staff".into(),
        },
    );
    assert_eq!(t.balance("alice").pending, "20.00");
    assert_eq!(t.balance("bob").pending, "0.00");
    // and a reassignment for all time moves what is left to bob
    t.reassign("cust-1", "bob", None, false, "ticket 7");
    assert_eq!(t.balance("alice").pending, "0.00");
    assert_eq!(t.balance("bob").pending, "20.00");
}

/// A refund claws back from whoever the line rewarded, even after its
/// customer moved to another affiliate for all time: that affiliate's
/// estimate moves, though the customer no longer names it.
#[test]
fn pending_follows_a_refund_to_the_affiliate_the_line_rewarded() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "100.00");
    t.set_now("2026-09-01T00:00:00Z");
    t.close("2026-08");
    t.reassign("cust-1", "bob", None, false, "ticket 8");
    assert_eq!(t.balance("alice").pending, "0.00");
    assert_eq!(t.balance("bob").pending, "0.00");
    t.refund("2026-09-02T12:00:00Z", "r1", "cust-1", "l1", "100.00");
    assert_eq!(t.balance("alice").pending, "-20.00");
    assert_eq!(t.balance("bob").pending, "0.00");
}

/// After a read, new lines extend the estimate instead of computing it
/// again; a line dated back before the customer's other lines takes the
/// bounty from them, at the bounty of the rules of its own date.
#[test]
fn pending_extended_by_new_lines_follows_the_bounty_to_a_line_dated_back() {
    let (t, _, _) = given(serde_json::json!({"bounty": "10.00"}));
    // from 20 August, the bounty is 20.00
    t.set_now("2026-08-20T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({"bounty": "20.00"})));
    assert_eq!(t.balance("alice").pending, "0.00");
    t.expense("2026-08-21T12:00:00Z", "l1", "cust-1", "100.00");
    // 20.00 of reward and the bounty of 20.00
    assert_eq!(t.balance("alice").pending, "40.00");
    t.expense("2026-08-22T12:00:00Z", "l2", "cust-1", "100.00");
    assert_eq!(t.balance("alice").pending, "60.00");
    // reported late, a line of 10 August is the customer's first: 10.00 of
    // reward, and the bounty is the first rules' 10.00
    t.expense("2026-08-10T12:00:00Z", "l0", "cust-1", "50.00");
    assert_eq!(t.balance("alice").pending, "60.00");
    t.set_now("2026-09-01T00:00:00Z");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![
            r("alice", "Reward", "10.00"),
            r("alice", "Bounty", "10.00"),
            r("alice", "Reward", "20.00"),
            r("alice", "Reward", "20.00")
        ]
    );
}

#[test]
fn no_self_referral_by_click_promo_code_or_reassignment() {
    let (t, alice, _) = given(serde_json::json!({}));
    // alice clicks her own link and signs up her own account
    t.click("2026-08-03T12:00:00Z", &alice.referral_code, "v-self");
    assert_eq!(
        t.signup(
            "2026-08-03T13:00:00Z",
            "c-alice",
            Some("v-self"),
            Some("HOST-alice")
        ),
        None
    );
    t.expense("2026-08-05T12:00:00Z", "l-self", "c-alice", "100.00");
    let refused = t.rejected(
        None,
        Command::Reassign {
            customer_id: cust("c-alice"),
            to: aff("alice"),
            from: None,
            retroactive: false,
            reason: "x".into(),
        },
    );
    assert_eq!(refused, Rejection::SelfReferral(cust("c-alice")));
}

#[test]
fn a_promo_code_only_counts_at_the_first_order() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-2", "100.00"); // cust-2 already billed
    assert_eq!(
        t.signup("2026-08-06T12:00:00Z", "cust-2", None, Some("HOST-bob")),
        None
    );
    assert_eq!(
        t.signup("2026-08-06T12:00:00Z", "cust-3", None, Some("HOST-bob"))
            .as_deref(),
        Some("bob")
    );
    // a valid promo code wins over the cookie
    assert_eq!(
        t.signup(
            "2026-08-06T12:00:00Z",
            "cust-4",
            Some("v-1"),
            Some("HOST-bob")
        )
        .as_deref(),
        Some("bob")
    );
}

#[test]
fn the_cookie_window_and_last_or_first_click_decide() {
    for (attribution, winner) in [("last_click", "bob"), ("first_click", "alice")] {
        let t = TestLedger::new("hosting");
        t.define(rules(
            "hosting",
            serde_json::json!({"attribution": attribution, "cookie_days": 30}),
        ));
        let alice = t.enroll("alice");
        let bob = t.enroll("bob");
        let carol = t.enroll("carol");
        t.click("2026-06-01T12:00:00Z", &carol.referral_code, "v-1"); // outside the 30 days
        t.click("2026-07-10T12:00:00Z", &alice.referral_code, "v-1");
        t.click("2026-07-20T12:00:00Z", &bob.referral_code, "v-1");
        t.click("2026-08-05T12:00:00Z", &carol.referral_code, "v-1"); // after the signup
        assert_eq!(
            t.signup("2026-08-01T12:00:00Z", "cust-1", Some("v-1"), None)
                .as_deref(),
            Some(winner),
            "{attribution}"
        );
        // once attributed, a customer stays
        assert_eq!(
            t.signup(
                "2026-08-06T12:00:00Z",
                "cust-1",
                Some("v-1"),
                Some("HOST-carol")
            )
            .as_deref(),
            Some(winner)
        );
    }
}

#[test]
fn an_unknown_signup_is_acknowledged_and_ignored() {
    let (t, _, _) = given(serde_json::json!({}));
    let head = t.head();
    let receipt = t.submit(
        Some("2026-08-05T12:00:00Z"),
        Command::Signup {
            customer_id: cust("x"),
            visitor: Some("v-nobody".into()),
            promo_code: Some("NOPE".into()),
            group: None,
        },
    );
    assert_eq!(receipt.noop, Some(Noop::SignupIgnored));
    assert_eq!(t.head(), head);
}

/// Each reward is of one line and within 15 integer digits, but a close
/// adds them up: a total past what an event may carry (±10^18, which keeps
/// every sum the fold makes inside a `Decimal`) is refused, and nothing is
/// appended; the estimate still shows the money.
#[test]
fn a_close_whose_total_no_event_may_carry_is_refused() {
    let (t, _, _) = given(serde_json::json!({"default_rate": "100"}));
    for i in 0..1001 {
        let id = format!("big-{i}");
        t.expense("2026-08-10T12:00:00Z", &id, "cust-1", "999999999999999.99");
    }
    t.set_now("2026-09-02T00:00:00Z");
    let refused = t.rejected(
        None,
        Command::CloseMonth {
            month: month("2026-08"),
        },
    );
    assert!(
        matches!(&refused, Rejection::Invalid(InvalidValue { field: "month", message })
            if message.contains("1000999999999999989.99 is beyond ±1000000000000000000")),
        "{refused:?}"
    );
    assert_eq!(t.money("alice").1, "1000999999999999989.99");
}

#[test]
fn rewards_round_half_to_even_once_per_line() {
    let (t, _, _) = given(serde_json::json!({"default_rate": "10"}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "0.25"); // 0.025 → 0.02
    t.expense("2026-08-05T12:00:00Z", "l2", "cust-1", "0.35"); // 0.035 → 0.04
    t.expense("2026-08-05T12:00:00Z", "l3", "cust-1", "0.15"); // 0.015 → 0.02
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![
            r("alice", "Reward", "0.02"),
            r("alice", "Reward", "0.04"),
            r("alice", "Reward", "0.02")
        ]
    );
}

#[test]
fn a_refund_lowers_the_billed_total_only_for_a_line_of_the_basis_kind_also_after_a_restart() {
    // The program earns on payments; an expense line is recorded too.
    let (mut t, _, _) = given(serde_json::json!({"basis": "payments"}));
    t.payment("2026-08-05T12:00:00Z", "pay-1", "cust-1", "100.00");
    t.expense("2026-08-05T13:00:00Z", "exp-1", "cust-1", "40.00");
    let billed = |t: &TestLedger| {
        let state = t.ledger().state();
        state.views.programs[&t.program].customers[&cust("cust-1")]
            .billed
            .to_string()
    };
    assert_eq!(billed(&t), "100.00");
    t.refund("2026-08-06T12:00:00Z", "cn-1", "cust-1", "exp-1", "10.00");
    assert_eq!(billed(&t), "100.00");
    t.refund("2026-08-06T13:00:00Z", "cn-2", "cust-1", "pay-1", "25.00");
    assert_eq!(billed(&t), "75.00");
    // Started again from the checkpoint taken at shutdown: the kinds of the
    // lines recorded before it still decide.
    t.reopen();
    assert_eq!(billed(&t), "75.00");
    t.refund("2026-08-07T12:00:00Z", "cn-3", "cust-1", "exp-1", "5.00");
    t.refund("2026-08-07T13:00:00Z", "cn-4", "cust-1", "pay-1", "5.00");
    assert_eq!(billed(&t), "70.00");
    let report = t.ledger().verify().unwrap();
    assert!(report.ok, "{:?}", report.problem);
}

#[test]
fn refunds_claw_back_at_the_original_rate_proportionally_and_never_more() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "inv", "cust-1", "10.01");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "2.00")]
    ); // 2.002 → 2.00
    // the rate changes; the claw-back keeps the 20% of the reward
    t.define(rules("hosting", serde_json::json!({"default_rate": "50"})));
    t.refund("2026-09-03T12:00:00Z", "cn-1", "cust-1", "inv", "5.00"); // 20% of 5.00 = 1.00
    t.refund("2026-09-04T12:00:00Z", "cn-2", "cust-1", "inv", "5.01"); // the rest: 2.00 − 1.00
    assert_eq!(
        close_rewards(&t, "2026-09"),
        vec![
            r("alice", "Clawback", "1.00"),
            r("alice", "Clawback", "1.00")
        ]
    );
    let over = t.rejected(
        None,
        Command::RecordRefund {
            id: line("cn-3"),
            customer_id: cust("cust-1"),
            refunds: line("inv"),
            amount: "0.01".into(),
            currency: "USD".into(),
        },
    );
    assert!(matches!(over, Rejection::RefundExceedsLine { .. }));
    let unknown = t.rejected(
        None,
        Command::RecordRefund {
            id: line("cn-4"),
            customer_id: cust("cust-1"),
            refunds: line("nope"),
            amount: "1.00".into(),
            currency: "USD".into(),
        },
    );
    assert_eq!(unknown, Rejection::UnknownLine(line("nope")));
    let (earned, _, _) = t.money("alice");
    assert_eq!(earned, "0.00");
}

#[test]
fn a_line_refunded_in_full_keeps_no_commission_even_when_a_partial_refund_clawed_back_nothing() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "inv", "cust-1", "0.13");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "0.03")]
    ); // 20% of 0.13 = 0.026 → 0.03
    // 20% of 0.02 = 0.004 → 0.00: nothing to claw back yet
    t.refund("2026-09-03T12:00:00Z", "cn-1", "cust-1", "inv", "0.02");
    assert_eq!(close_rewards(&t, "2026-09"), vec![]);
    // the rest: the line is refunded in full, so is its reward (20% of
    // 0.11 would be 0.02, leaving a cent for a refunded line)
    t.refund("2026-10-03T12:00:00Z", "cn-2", "cust-1", "inv", "0.11");
    assert_eq!(
        close_rewards(&t, "2026-10"),
        vec![r("alice", "Clawback", "0.03")]
    );
    let (earned, _, _) = t.money("alice");
    assert_eq!(earned, "0.00");
    t.verify_ok();
}

#[test]
fn a_staff_customer_raises_no_tier() {
    // given: 25% from 2 active referrals; alice's second referral is staff
    let (t, alice, _) = given(serde_json::json!({
        "tiers": [{"min_active_referrals": 2, "rate": "25"}],
    }));
    t.click("2026-08-01T12:00:00Z", &alice.referral_code, "v-2");
    t.signup_group(
        "2026-08-02T12:00:00Z",
        "staffer",
        Some("v-2"),
        None,
        Some("staff"),
    );
    // when: both buy in August
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "100.00");
    t.expense("2026-08-05T12:00:00Z", "l2", "staffer", "100.00");
    // then: the staff customer earns alice nothing, not even a higher rate
    // on cust-1's line (forbidden groups never earn their affiliate anything)
    assert_eq!(t.money("alice").1, "20.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00")]
    );
}

#[test]
fn the_bounty_goes_with_the_first_earning_line_whomever_it_earns_also_in_the_estimate() {
    // given: a bounty; cust-1 is alice's, and bob's from 10 August on
    let (t, _, _) = given(serde_json::json!({"bounty": "5.00"}));
    t.set_now("2026-08-09T12:00:00Z");
    t.reassign(
        "cust-1",
        "bob",
        Some("2026-08-10T00:00:00Z"),
        false,
        "ticket 9",
    );
    // when: a line in bob's time, then one dated back into alice's
    t.expense("2026-08-12T12:00:00Z", "later", "cust-1", "10.00");
    assert_eq!(t.money("bob").1, "7.00"); // 2.00 + the bounty, so far
    t.expense("2026-08-13T12:00:00Z", "earlier", "cust-1", "10.00");
    t.set_now("2026-08-13T12:00:00Z");
    let earlier = Command::RecordBasisLine {
        kind: LineKind::Expense,
        id: line("dated-back"),
        customer_id: cust("cust-1"),
        amount: "10.00".into(),
        currency: "USD".into(),
        product: None,
        order_id: None,
    };
    t.submit(Some("2026-08-05T12:00:00Z"), earlier);
    // then: the line dated back is the first: its bounty is alice's, and
    // neither estimate counts it twice
    assert_eq!(t.money("alice").1, "7.00");
    assert_eq!(t.money("bob").1, "4.00");
    let closed = close_rewards(&t, "2026-08");
    assert_eq!(
        closed,
        vec![
            r("alice", "Reward", "2.00"),
            r("alice", "Bounty", "5.00"),
            r("bob", "Reward", "2.00"),
            r("bob", "Reward", "2.00")
        ]
    );
}

#[test]
fn a_customer_an_operator_placed_stays_theirs_when_a_signup_comes() {
    // given: billed lines of a customer no click brought, placed with bob
    let (t, alice, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "walk-in", "10.00");
    t.set_now("2026-08-06T12:00:00Z");
    t.reassign("walk-in", "bob", None, false, "ticket 12");
    // when: the billing system forwards a signup with alice's cookie
    t.click("2026-08-07T12:00:00Z", &alice.referral_code, "v-9");
    let receipt = t.submit(
        Some("2026-08-07T13:00:00Z"),
        Command::Signup {
            customer_id: cust("walk-in"),
            visitor: Some("v-9".into()),
            promo_code: None,
            group: None,
        },
    );
    // then: still bob's, and no signup brought them
    assert_eq!(
        receipt.noop,
        Some(Noop::AlreadyAttributed {
            affiliate_id: aff("bob"),
            via: None
        })
    );
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("bob", "Reward", "2.00")]
    );
}

#[test]
fn a_retroactive_reassignment_moves_the_bounty_with_the_line_it_was_paid_with() {
    // given: a bounty; cust-1's first line is a payment (it earns nothing
    // under an expenses basis), the bounty comes with the expense after it
    let (t, _, _) = given(serde_json::json!({"bounty": "5.00"}));
    t.payment("2026-08-03T12:00:00Z", "paid", "cust-1", "10.00");
    t.expense("2026-08-20T12:00:00Z", "charged", "cust-1", "10.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "2.00"), r("alice", "Bounty", "5.00")]
    );
    // when: cust-1 moves to bob, retroactively, from a moment between the two
    t.set_now("2026-09-02T12:00:00Z");
    t.reassign(
        "cust-1",
        "bob",
        Some("2026-08-10T00:00:00Z"),
        true,
        "ticket 21",
    );
    // then: the expense's reward and its bounty move, 7.00 in all
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("0.00".into(), "7.00".into())
    );
    t.verify_ok();
}

#[test]
fn a_referral_moved_away_leaves_the_list_and_money_for_earlier_lines_does_not_bring_it_back() {
    // given: cust-1 earned alice 2.00 in August
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "inv", "cust-1", "10.00");
    t.close("2026-08");
    assert_eq!(
        t.referral_list("alice"),
        vec![("cust-1".into(), "2.00".into())]
    );
    // when: cust-1 is bob's from September on, and the August line is refunded
    t.set_now("2026-09-02T12:00:00Z");
    t.reassign(
        "cust-1",
        "bob",
        Some("2026-09-01T00:00:00Z"),
        false,
        "ticket 31",
    );
    t.expense("2026-09-05T12:00:00Z", "sep", "cust-1", "50.00");
    t.refund("2026-09-06T12:00:00Z", "cn", "cust-1", "inv", "10.00");
    t.close("2026-09");
    // then: the claw-back is alice's money (her statement shows it), but
    // cust-1 is bob's referral, with bob's commission, and only his
    assert_eq!(t.money("alice").0, "0.00");
    assert_eq!(t.referral_list("alice"), vec![]);
    assert_eq!(
        t.referral_list("bob"),
        vec![("cust-1".into(), "10.00".into())]
    );
    // when: cust-1 goes back to alice for all time, with bob's posted money
    t.set_now("2026-10-03T12:00:00Z");
    t.reassign("cust-1", "alice", None, true, "ticket 32");
    // then: alice lists cust-1 with all it ever earned her (2.00 - 2.00 +
    // 10.00 moved from bob); bob lists nothing, though he keeps his lines
    assert_eq!(
        t.referral_list("alice"),
        vec![("cust-1".into(), "10.00".into())]
    );
    assert_eq!(t.referral_list("bob"), vec![]);
    t.verify_ok();
}

#[test]
fn a_month_starts_when_its_zone_jumps_over_midnight() {
    // Paraguay began summer time at midnight on 1 October 2023: 00:00 at
    // -04 became 01:00 at -03, so October began at 04:00 UTC.
    let zone = chrono_tz::America::Asuncion;
    assert_eq!(month("2023-10").start_in(zone), ts("2023-10-01T04:00:00Z"));
    assert_eq!(ts("2023-10-01T03:59:59Z").month_in(zone), month("2023-09"));
    assert_eq!(ts("2023-10-01T04:00:00Z").month_in(zone), month("2023-10"));
    let t = TestLedger::new_at("hosting", "2023-09-01T00:00:00Z");
    t.define(rules(
        "hosting",
        serde_json::json!({"timezone": "America/Asuncion"}),
    ));
    alice_refers_cust_1(&t, "2023-09-10T12:00:00Z", "2023-09-11T12:00:00Z");
    t.expense("2023-10-01T03:30:00Z", "sep", "cust-1", "10.00");
    t.set_now("2023-10-01T03:59:00Z");
    let september = Command::CloseMonth {
        month: month("2023-09"),
    };
    assert_eq!(
        t.rejected(None, september.clone()),
        Rejection::MonthNotEnded(month("2023-09"))
    );
    t.set_now("2023-10-01T04:00:00Z");
    let closed = t.submit(None, september);
    assert_eq!(TestLedger::reward_amounts(&closed.events), vec!["2.00"]);
}

#[test]
fn months_close_in_the_program_time_zone_in_order_and_once() {
    let (t, _, _) = given(serde_json::json!({"timezone": "Europe/Amsterdam"}));
    t.expense("2026-08-31T21:30:00Z", "aug", "cust-1", "10.00");
    t.set_now("2026-08-31T21:59:00Z");
    assert_eq!(
        t.rejected(
            None,
            Command::CloseMonth {
                month: month("2026-08")
            }
        ),
        Rejection::MonthNotEnded(month("2026-08"))
    );
    // 22:30 UTC on 31 August is 00:30 on 1 September in Amsterdam
    t.expense("2026-08-31T22:30:00Z", "sep", "cust-1", "100.00");
    let closed = t.submit(
        None,
        Command::CloseMonth {
            month: month("2026-08"),
        },
    );
    assert_eq!(TestLedger::reward_amounts(&closed.events), vec!["2.00"]);
    t.close("2026-09");
    assert_eq!(
        t.rejected(
            None,
            Command::CloseMonth {
                month: month("2026-07")
            }
        ),
        Rejection::MonthOutOfOrder {
            month: month("2026-07"),
            last_closed: month("2026-09")
        }
    );
    let again = t.submit(
        None,
        Command::CloseMonth {
            month: month("2026-08"),
        },
    );
    assert!(matches!(again.noop, Some(Noop::MonthAlreadyClosed(_))));
    assert!(again.events.is_empty());
}

#[test]
fn late_lines_are_rewarded_at_the_next_close_with_their_own_date() {
    let (t, _, _) = given(serde_json::json!({}));
    t.close("2026-08");
    t.expense("2026-08-20T12:00:00Z", "late", "cust-1", "100.00");
    let rewards = close_rewards(&t, "2026-09");
    assert_eq!(
        rewards,
        vec![("alice".into(), "Reward".into(), "20.00".into(), true)]
    );
    let statement = t
        .ledger()
        .statement(&t.program, &aff("alice"), month("2026-08"), None)
        .unwrap()
        .unwrap();
    assert!(
        statement.lines.is_empty(),
        "the closed August statement is never rewritten"
    );
}

/// Makes the closes the ledger owes by `auto_close_day`, as the server's
/// closer does, and returns (program, month, events appended) of each.
fn auto_close(t: &TestLedger) -> Vec<(String, String, usize)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime
        .block_on(t.ledger().auto_close())
        .into_iter()
        .map(|(program, month, result)| {
            let receipt = result.unwrap();
            for recorded in &receipt.events {
                assert_eq!(recorded.actor.as_str(), "auto-close");
            }
            (program.to_string(), month.to_string(), receipt.events.len())
        })
        .collect()
}

fn owed(t: &TestLedger) -> Vec<String> {
    t.ledger()
        .auto_close_due()
        .into_iter()
        .map(|(_, m)| m.to_string())
        .collect()
}

/// Clicks count on the program's local day. One hour of UTC can hold a
/// local midnight (Kolkata is at +05:30), and a program that changes its
/// zone counts the rest of that hour in the new one.
#[test]
fn clicks_count_on_their_local_day_inside_one_utc_hour_and_after_a_zone_change() {
    let t = TestLedger::new("hosting");
    t.define(rules(
        "hosting",
        serde_json::json!({"timezone": "Asia/Kolkata"}),
    ));
    let alice = t.enroll("alice");
    let code = &alice.referral_code;
    t.click("2026-08-01T18:20:00Z", code, "v-1"); // 23:50 on 1 August in Kolkata
    t.click("2026-08-01T18:40:00Z", code, "v-2"); // 00:10 on 2 August
    t.click("2026-08-01T18:50:00Z", code, "v-3"); // 00:20 on 2 August
    t.click("2026-08-01T18:55:00Z", code, "v-1"); // 00:25 on 2 August, seen the day before
    t.define(rules("hosting", serde_json::json!({"timezone": "UTC"})));
    t.click("2026-08-03T20:10:00Z", code, "v-4"); // 20:10 on 3 August in UTC
    t.define(rules(
        "hosting",
        serde_json::json!({"timezone": "Asia/Tokyo"}),
    ));
    t.click("2026-08-03T20:30:00Z", code, "v-5"); // 05:30 on 4 August in Tokyo
    let stats = t.stats(
        "alice",
        "2026-07-31",
        "2026-08-05",
        commission_ledger::projections::StatsBy::Day,
    );
    let days: Vec<_> = stats
        .series
        .iter()
        .filter(|row| row.clicks > 0)
        .map(|row| (row.key.as_str(), row.clicks, row.unique_visitors))
        .collect();
    assert_eq!(
        days,
        vec![
            ("2026-08-01", 1, Some(1)),
            ("2026-08-02", 3, Some(3)),
            ("2026-08-03", 1, Some(1)),
            ("2026-08-04", 1, Some(1)),
        ]
    );
    assert_eq!((stats.clicks, stats.unique_visitors), (6, 5));
}

/// Closed months are never rewritten, also when the program's zone moves
/// back over a close: a withdrawal paid, a credit and a retroactive
/// reassignment made while the new zone's clock still reads the closed
/// month go to the statement of the first open month, with their dates.
#[test]
fn money_moved_after_a_zone_change_back_into_a_closed_month_lands_in_the_next_open_one() {
    let zone = |zone: &str| {
        rules(
            "hosting",
            serde_json::json!({"timezone": zone, "payout_threshold": "0.00", "auto_close_day": null}),
        )
    };
    let t = TestLedger::new_at("hosting", "2026-08-01T00:00:00Z");
    t.define(zone("Pacific/Kiritimati"));
    alice_refers_cust_1(&t, "2026-08-02T12:00:00Z", "2026-08-02T13:00:00Z");
    t.enroll("bob");
    t.expense("2026-08-10T12:00:00Z", "inv-1", "cust-1", "100.00");
    // 2026-08-31T11:00Z: 1 September, 01:00 in Kiritimati (+14)
    t.close("2026-08");
    let closed = t.statement("alice", "2026-08");
    assert_eq!(closed.closing_balance, "20.00");
    // 07:00 on 31 August in Santiago (-04): August there, and closed
    t.define(zone("America/Santiago"));
    let w = t.withdraw("alice", "5.00").unwrap();
    t.submit(
        None,
        Command::PayWithdrawal {
            withdrawal_id: w,
            reference: "wire".into(),
        },
    );
    t.submit(
        None,
        Command::ApplyCredit {
            affiliate_id: aff("alice"),
            amount: "2.00".into(),
            invoice_id: "inv-a".into(),
        },
    );
    t.reassign("cust-1", "bob", None, true, "ticket 7");
    let moved = |s: &commission_ledger::projections::Statement| {
        s.lines
            .iter()
            .map(|l| (l.kind.name(), l.amount.clone(), l.at))
            .collect::<Vec<_>>()
    };
    let now = t.ledger().now();
    let check = |t: &TestLedger| {
        let august = t.statement("alice", "2026-08");
        assert_eq!(
            (august.lines, august.totals, august.closing_balance),
            (
                closed.lines.clone(),
                closed.totals.clone(),
                closed.closing_balance.clone()
            )
        );
        let september = t.statement("alice", "2026-09");
        assert_eq!(
            moved(&september),
            vec![
                ("withdrawal", "-5.00".to_string(), now),
                ("credit", "-2.00".to_string(), now),
                ("adjustment", "-20.00".to_string(), now),
            ]
        );
        assert_eq!(
            (
                september.opening_balance.as_str(),
                september.closing_balance.as_str()
            ),
            ("20.00", "-7.00")
        );
        let bob = t.statement("bob", "2026-09");
        assert_eq!(moved(&bob), vec![("adjustment", "20.00".to_string(), now)]);
    };
    check(&t);
    t.verify_ok();
    let mut t = t;
    t.rebuild();
    check(&t);
}

#[test]
fn auto_close_closes_the_previous_month_on_its_day_in_the_program_zone() {
    // given a program that closes by itself on the 3rd, in Amsterdam,
    // defined on 5 August (so July's day had passed: it is not owed)
    let t = TestLedger::new("hosting");
    t.set_now("2026-08-05T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({"auto_close_day": 3})));
    alice_refers_cust_1(&t, "2026-08-05T12:00:00Z", "2026-08-06T12:00:00Z");
    t.expense("2026-08-10T12:00:00Z", "aug", "cust-1", "100.00");
    t.expense("2026-09-01T12:00:00Z", "sep", "cust-1", "50.00");
    // when the 3rd has not begun in Amsterdam (23:59 on the 2nd, CEST)
    t.set_now("2026-09-02T21:59:59Z");
    // then nothing is owed, and nothing is closed
    assert!(owed(&t).is_empty());
    assert!(auto_close(&t).is_empty());
    // when it has: August closes, as `auto-close`, with its reward
    t.set_now("2026-09-02T22:00:00Z");
    assert_eq!(owed(&t), vec!["2026-08"]);
    assert_eq!(
        auto_close(&t),
        vec![("hosting".into(), "2026-08".into(), 2)]
    );
    assert_eq!(
        t.money("alice"),
        ("20.00".into(), "10.00".into(), "0.00".into())
    );
    // and once closed it is owed no more: a second look appends nothing
    let head = t.head();
    assert!(owed(&t).is_empty());
    assert!(auto_close(&t).is_empty());
    assert_eq!(t.head(), head);
    // nor is September before 3 October
    t.set_now("2026-10-02T12:00:00Z");
    assert!(owed(&t).is_empty());
    t.verify_ok();
}

#[test]
fn auto_close_catches_up_in_order_but_not_on_months_before_it_was_switched_on() {
    // given a program closed by hand only, with lines in June and July
    let t = TestLedger::new("hosting");
    t.set_now("2026-06-01T00:00:00Z");
    t.define(rules(
        "hosting",
        serde_json::json!({"auto_close_day": null}),
    ));
    alice_refers_cust_1(&t, "2026-06-01T12:00:00Z", "2026-06-02T12:00:00Z");
    t.expense("2026-06-10T12:00:00Z", "jun", "cust-1", "100.00");
    t.expense("2026-07-10T12:00:00Z", "jul", "cust-1", "100.00");
    // when auto-close is switched on for the 5th on 10 August
    t.set_now("2026-08-10T12:00:00Z");
    t.define(rules("hosting", serde_json::json!({"auto_close_day": 5})));
    // then the months whose day had passed stay the operator's to close
    assert!(owed(&t).is_empty());
    // when the server comes back on 20 November, down since early September
    t.expense("2026-08-20T12:00:00Z", "aug", "cust-1", "100.00");
    t.set_now("2026-11-20T12:00:00Z");
    // then August, September and October close, in order; June's and
    // July's lines are rewarded late at the August close, none is lost
    assert_eq!(owed(&t), vec!["2026-08", "2026-09", "2026-10"]);
    assert_eq!(
        auto_close(&t),
        vec![
            ("hosting".into(), "2026-08".into(), 4),
            ("hosting".into(), "2026-09".into(), 1),
            ("hosting".into(), "2026-10".into(), 1),
        ]
    );
    {
        let state = t.ledger().state();
        let pm = state.model.program(&t.program).unwrap();
        let august = &pm.closed[&month("2026-08")];
        assert_eq!(
            (august.rewards, august.total.to_string()),
            (3, "60.00".into())
        );
        assert!(!pm.closed.contains_key(&month("2026-07")));
    }
    t.verify_ok();
}

#[test]
fn auto_close_skips_months_before_a_later_close_and_stops_when_switched_off() {
    let t = TestLedger::new("hosting");
    t.set_now("2026-08-01T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({"auto_close_day": 1})));
    // an operator closed September by hand while August was open
    t.close("2026-09");
    t.set_now("2026-10-01T12:00:00Z");
    assert!(owed(&t).is_empty(), "August would be out of order");
    t.set_now("2026-11-01T12:00:00Z");
    assert_eq!(owed(&t), vec!["2026-10"]);
    // switched off, nothing is owed; switched on again, only from then on
    t.define(rules(
        "hosting",
        serde_json::json!({"auto_close_day": null}),
    ));
    assert!(owed(&t).is_empty());
    t.set_now("2026-11-15T12:00:00Z");
    t.define(rules("hosting", serde_json::json!({"auto_close_day": 1})));
    assert!(owed(&t).is_empty());
    t.set_now("2026-12-01T00:00:00Z");
    assert_eq!(owed(&t), vec!["2026-11"]);
}

#[test]
fn pending_is_an_estimate_that_moves_no_money() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "100.00");
    t.refund("2026-08-06T12:00:00Z", "r1", "cust-1", "l1", "25.00");
    let b = t.balance("alice");
    assert_eq!(
        (
            b.pending.as_str(),
            b.earned.as_str(),
            b.lifetime_earned.as_str()
        ),
        ("15.00", "0.00", "0.00")
    );
}

/// Pending looks only at the affiliate's own customers' open lines: a
/// customer reassigned from a date still counts for the one who had them
/// before it, for the lines before it.
#[test]
fn pending_follows_each_line_to_whoever_had_its_customer_then() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "before", "cust-1", "100.00"); // alice 20.00
    t.expense("2026-08-20T12:00:00Z", "after", "cust-1", "50.00"); // bob 10.00
    t.reassign(
        "cust-1",
        "bob",
        Some("2026-08-10T00:00:00Z"),
        false,
        "ticket 2",
    );
    assert_eq!(t.balance("alice").pending, "20.00");
    assert_eq!(t.balance("bob").pending, "10.00");
    // What a close then gives each.
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00"), r("bob", "Reward", "10.00")]
    );
    assert_eq!(t.balance("alice").pending, "0.00");
    assert_eq!(t.balance("bob").pending, "0.00");
}

#[test]
fn withdrawals_respect_threshold_available_and_negative_earned() {
    let (t, _, _) = given(serde_json::json!({"payout_threshold": "50.00"}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "300.00"); // 60.00
    t.close("2026-08");
    let w = t.withdraw("alice", "40.00").unwrap();
    // 60 earned, 40 in withdrawal: 20 available
    assert_eq!(
        t.money("alice"),
        ("60.00".into(), "0.00".into(), "20.00".into())
    );
    assert_eq!(
        t.withdraw("alice", "20.01").unwrap_err(),
        SubmitError::Rejected(Rejection::InsufficientBalance {
            requested: d("20.01"),
            available: d("20.00")
        })
    );
    // rejection returns the money; paying it out leaves earned below the threshold
    t.submit(
        None,
        Command::RejectWithdrawal {
            withdrawal_id: w,
            reason: "bank details".into(),
        },
    );
    assert_eq!(t.money("alice").2, "60.00");
    let w2 = t.withdraw("alice", "40.00").unwrap();
    t.submit(
        None,
        Command::PayWithdrawal {
            withdrawal_id: w2,
            reference: "wire".into(),
        },
    );
    let b = t.balance("alice");
    assert_eq!(
        (
            b.earned.as_str(),
            b.available.as_str(),
            b.withdrawn_total.as_str(),
            b.to_threshold.as_str()
        ),
        ("20.00", "0.00", "40.00", "30.00")
    );
    assert_eq!(
        t.rejected(
            None,
            Command::PayWithdrawal {
                withdrawal_id: w2,
                reference: "again".into()
            }
        ),
        Rejection::WithdrawalSettled(w2)
    );
    // a claw-back makes earned negative: nothing can be withdrawn or credited
    t.refund("2026-09-05T12:00:00Z", "r1", "cust-1", "l1", "300.00"); // −60.00
    t.close("2026-09");
    assert_eq!(t.money("alice").0, "-40.00");
    assert_eq!(
        t.withdraw("alice", "1.00").unwrap_err(),
        SubmitError::Rejected(Rejection::NegativeEarned(d("-40.00")))
    );
    assert_eq!(
        t.rejected(
            None,
            Command::ApplyCredit {
                affiliate_id: aff("alice"),
                amount: "1.00".into(),
                invoice_id: "i".into()
            }
        ),
        Rejection::NegativeEarned(d("-40.00"))
    );
}

#[test]
fn credits_need_no_threshold_but_never_exceed_what_is_free() {
    let (t, _, _) = given(serde_json::json!({"payout_threshold": "50.00"}));
    t.expense("2026-08-05T12:00:00Z", "l1", "cust-1", "50.00"); // 10.00
    t.close("2026-08");
    t.submit(
        None,
        Command::ApplyCredit {
            affiliate_id: aff("alice"),
            amount: "7.50".into(),
            invoice_id: "inv-12".into(),
        },
    );
    let b = t.balance("alice");
    assert_eq!(
        (
            b.earned.as_str(),
            b.credited_total.as_str(),
            b.lifetime_earned.as_str()
        ),
        ("2.50", "7.50", "10.00")
    );
    assert!(matches!(
        t.rejected(
            None,
            Command::ApplyCredit {
                affiliate_id: aff("alice"),
                amount: "2.51".into(),
                invoice_id: "inv-13".into()
            }
        ),
        Rejection::InsufficientBalance { .. }
    ));
}

#[test]
fn amounts_are_refused_in_another_currency_too_precise_or_not_positive() {
    let (t, _, _) = given(serde_json::json!({}));
    let line = |amount: &str, currency: &str| Command::RecordBasisLine {
        kind: LineKind::Expense,
        id: crate::support::line("x"),
        customer_id: cust("cust-1"),
        amount: amount.into(),
        currency: currency.into(),
        product: None,
        order_id: None,
    };
    assert!(matches!(
        t.rejected(None, line("10.00", "EUR")),
        Rejection::CurrencyMismatch { .. }
    ));
    assert!(matches!(
        t.rejected(None, line("10.001", "USD")),
        Rejection::Money(MoneyError::TooPrecise { .. })
    ));
    assert!(matches!(
        t.rejected(None, line("0.00", "USD")),
        Rejection::Money(MoneyError::NotPositive(_))
    ));
    assert!(matches!(
        t.rejected(None, line("-5", "USD")),
        Rejection::Money(MoneyError::NotPositive(_))
    ));
    assert!(matches!(
        t.rejected(None, line("1e3", "USD")),
        Rejection::Money(MoneyError::NotAnAmount(_))
    ));
    assert!(matches!(
        t.rejected(
            None,
            Command::RequestWithdrawal {
                affiliate_id: aff("alice"),
                amount: "0".into()
            }
        ),
        Rejection::Money(_)
    ));
}

#[test]
fn basis_lines_are_idempotent_by_their_id() {
    let (t, _, _) = given(serde_json::json!({}));
    let first = t.expense("2026-08-05T12:00:00Z", "inv-1", "cust-1", "100.00");
    let head = t.head();
    let again = t.expense("2026-08-05T12:00:00Z", "inv-1", "cust-1", "100.00");
    assert_eq!(
        again.noop,
        Some(Noop::Duplicate {
            seq: first.events[0].seq
        })
    );
    assert_eq!(t.head(), head);
    let other = t.rejected(
        None,
        Command::RecordBasisLine {
            kind: LineKind::Expense,
            id: line("inv-1"),
            customer_id: cust("cust-1"),
            amount: "99.00".into(),
            currency: "USD".into(),
            product: None,
            order_id: None,
        },
    );
    assert_eq!(other, Rejection::LineConflict(line("inv-1")));
}

#[test]
fn an_idempotency_key_gives_the_same_answer_and_one_event() {
    let (t, _, _) = given(serde_json::json!({}));
    let program = t.program.clone();
    let submission = || {
        commission_ledger::ledger::Submission::new(
            Some(&program),
            "test",
            Command::EnrollAffiliate {
                affiliate_id: aff("dave"),
                customer_id: None,
                group: None,
                rate: None,
            },
        )
        .idempotency_key("enroll-dave")
    };
    let first = t.ledger().submit_blocking(submission()).unwrap();
    let head = t.head();
    let second = t.ledger().submit_blocking(submission()).unwrap();
    assert_eq!(
        (second.events.clone(), second.replayed),
        (first.events.clone(), true)
    );
    assert_eq!(t.head(), head);
    let other = commission_ledger::ledger::Submission::new(
        Some(&t.program),
        "test",
        Command::EnrollAffiliate {
            affiliate_id: aff("erin"),
            customer_id: None,
            group: None,
            rate: None,
        },
    )
    .idempotency_key("enroll-dave");
    assert_eq!(
        t.ledger().submit_blocking(other).unwrap_err(),
        SubmitError::IdempotencyConflict("enroll-dave".into())
    );
    // and after a restart, from the log alone
    let mut t = t;
    t.reopen();
    let third = t.ledger().submit_blocking(submission()).unwrap();
    assert_eq!(third.events, first.events);
}

#[test]
fn suspended_affiliates_get_no_new_clicks_or_rewards() {
    let (t, alice, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "before", "cust-1", "100.00");
    t.submit(
        Some("2026-08-10T00:00:00Z"),
        Command::SuspendAffiliate {
            affiliate_id: aff("alice"),
            reason: "fraud".into(),
        },
    );
    t.expense("2026-08-15T12:00:00Z", "after", "cust-1", "100.00");
    let refused = t.rejected(
        Some("2026-08-16T00:00:00Z"),
        Command::RecordClick {
            referral_code: alice.referral_code.clone(),
            visitor: None,
            creative: None,
            referrer: None,
            landing: None,
            client_hash: None,
        },
    );
    assert_eq!(refused, Rejection::AffiliateSuspended(aff("alice")));
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00")]
    );
}

#[test]
fn program_rules_are_checked_and_keep_their_currency() {
    let t = TestLedger::new("hosting");
    let mismatch = t.rejected(
        None,
        Command::DefineProgram {
            rules: Box::new(rules("other", serde_json::json!({}))),
            reason: None,
        },
    );
    assert!(matches!(mismatch, Rejection::ProgramMismatch { .. }));
    let zone = t.rejected(
        None,
        Command::DefineProgram {
            rules: Box::new(rules(
                "hosting",
                serde_json::json!({"timezone": "Mars/Olympus"}),
            )),
            reason: None,
        },
    );
    assert!(matches!(
        zone,
        Rejection::Invalid(InvalidValue {
            field: "timezone",
            ..
        })
    ));
    let bounty = t.rejected(
        None,
        Command::DefineProgram {
            rules: Box::new(rules("hosting", serde_json::json!({"bounty": "1.005"}))),
            reason: None,
        },
    );
    assert!(matches!(
        bounty,
        Rejection::Invalid(InvalidValue {
            field: "bounty",
            ..
        })
    ));
    // A bounty or threshold as large as a decimal goes passed the checks of
    // scale and sign; with two customers, adding their bounties overflowed
    // (`Addition overflowed`, in a balance read's pending estimate, and in
    // a close). Amounts given as numbers are now held to what amounts given
    // as text are.
    for field in ["bounty", "payout_threshold"] {
        for amount in [d("1000000000000000"), Decimal::MAX] {
            let mut too_large = rules("hosting", serde_json::json!({}));
            match field {
                "bounty" => too_large.bounty = Some(amount),
                _ => too_large.payout_threshold = amount,
            }
            let refused = t.rejected(
                None,
                Command::DefineProgram {
                    rules: Box::new(too_large),
                    reason: None,
                },
            );
            assert!(
                matches!(&refused, Rejection::Invalid(InvalidValue { field: f, message })
                    if *f == field && message.contains("at most 15 integer digits")),
                "{refused:?}"
            );
        }
        t.define(rules(
            "hosting",
            serde_json::json!({ field: "999999999999999.99" }),
        ));
    }
    t.define(rules("hosting", serde_json::json!({})));
    let currency = t.rejected(
        None,
        Command::DefineProgram {
            rules: Box::new(rules("hosting", serde_json::json!({"currency": "EUR"}))),
            reason: None,
        },
    );
    assert!(matches!(currency, Rejection::CurrencyChange { .. }));
    let unknown = commission_ledger::ledger::Submission::new(
        Some(&program_id("nope")),
        "test",
        Command::CloseMonth {
            month: month("2026-01"),
        },
    );
    assert_eq!(
        t.ledger().submit_blocking(unknown).unwrap_err(),
        SubmitError::Rejected(Rejection::UnknownProgram(program_id("nope")))
    );
}

#[test]
fn history_is_replayed_with_the_rules_in_force_at_each_line() {
    let (t, _, _) = given(serde_json::json!({"default_rate": "20"}));
    t.expense("2026-08-05T12:00:00Z", "old", "cust-1", "100.00");
    t.set_now("2026-08-10T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({"default_rate": "10"})));
    t.expense("2026-08-15T12:00:00Z", "new", "cust-1", "100.00");
    assert_eq!(
        close_rewards(&t, "2026-08"),
        vec![r("alice", "Reward", "20.00"), r("alice", "Reward", "10.00")]
    );
}

#[test]
fn reassignment_from_a_date_moves_future_lines_and_retroactive_moves_posted_money() {
    let (t, _, _) = given(serde_json::json!({}));
    t.expense("2026-08-05T12:00:00Z", "aug", "cust-1", "100.00"); // alice 20.00
    t.close("2026-08");
    t.expense("2026-09-05T12:00:00Z", "sep", "cust-1", "50.00");
    // without retroactive: September follows bob, August stays with alice
    t.reassign(
        "cust-1",
        "bob",
        Some("2026-09-01T00:00:00Z"),
        false,
        "ticket 1",
    );
    assert_eq!(
        close_rewards(&t, "2026-09"),
        vec![r("bob", "Reward", "10.00")]
    );
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("20.00".into(), "10.00".into())
    );
    // retroactive for all time: alice's posted 20.00 moves to bob in the open month
    t.set_now("2026-10-03T00:00:00Z");
    let receipt = t.reassign("cust-1", "bob", None, true, "ticket 2");
    let adjustments: Vec<(String, String, Month)> = receipt
        .events
        .iter()
        .filter_map(|r| match &r.event {
            Event::AdjustmentPosted(e) => {
                Some((e.affiliate_id.to_string(), e.amount.to_string(), e.month))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        adjustments,
        vec![
            ("alice".into(), "-20.00".into(), month("2026-10")),
            ("bob".into(), "20.00".into(), month("2026-10"))
        ]
    );
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("0.00".into(), "30.00".into())
    );
    let closed = t
        .ledger()
        .statement(&t.program, &aff("alice"), month("2026-08"), None)
        .unwrap()
        .unwrap();
    assert_eq!(
        closed.closing_balance, "20.00",
        "closed statements stay as they were"
    );
    let open = t
        .ledger()
        .statement(&t.program, &aff("alice"), month("2026-10"), None)
        .unwrap()
        .unwrap();
    assert_eq!(
        (open.lines.len(), open.closing_balance.as_str()),
        (1, "0.00")
    );
    let reason = t.rejected(
        None,
        Command::Reassign {
            customer_id: cust("cust-1"),
            to: aff("alice"),
            from: None,
            retroactive: true,
            reason: " ".into(),
        },
    );
    assert!(matches!(
        reason,
        Rejection::Invalid(InvalidValue {
            field: "reason",
            ..
        })
    ));
    t.verify_ok();
}

#[test]
fn a_visitor_keeps_only_its_newest_clicks_for_attribution() {
    use commission_ledger::rules::MAX_CLICKS_PER_VISITOR;
    let t = TestLedger::new("hosting");
    t.define(rules(
        "hosting",
        serde_json::json!({"attribution": "first_click", "cookie_days": 3650}),
    ));
    let alice = t.enroll("alice");
    let bob = t.enroll("bob");
    t.click("2026-01-01T00:00:00Z", &alice.referral_code, "v-bot");
    for i in 0..MAX_CLICKS_PER_VISITOR {
        t.click(
            &format!("2026-01-02T00:{:02}:00Z", i % 60),
            &bob.referral_code,
            "v-bot",
        );
    }
    // alice's first click fell out of the bounded list: the first kept is bob's
    assert_eq!(
        t.signup("2026-01-03T00:00:00Z", "c-1", Some("v-bot"), None)
            .as_deref(),
        Some("bob")
    );
}

#[test]
fn a_click_keeps_only_the_origin_and_path_of_its_referrer_and_landing() {
    let (t, alice, _) = given(serde_json::json!({}));
    let kept = |url: &str| {
        let receipt = t.submit(
            None,
            Command::RecordClick {
                referral_code: alice.referral_code.clone(),
                visitor: Some("v-9".into()),
                creative: None,
                referrer: Some(url.into()),
                landing: Some(url.into()),
                client_hash: None,
            },
        );
        match &receipt.events[0].event {
            Event::ClickRecorded(c) => {
                assert_eq!(c.referrer, c.landing);
                c.referrer.clone().unwrap()
            }
            other => panic!("not a click: {other:?}"),
        }
    };
    for (url, expected) in [
        (
            "https://blog.example/post?utm=x&email=a@b.example#top",
            "https://blog.example/post",
        ),
        (
            "https://user:secret@blog.example:8443/a/b",
            "https://blog.example:8443/a/b",
        ),
        // An `@` in the path is not user info.
        (
            "https://medium.example/@someone/hosting-review",
            "https://medium.example/@someone/hosting-review",
        ),
        (
            "https://me@blog.example/@someone",
            "https://blog.example/@someone",
        ),
        ("https://blog.example", "https://blog.example"),
        (
            "android-app://com.example.app/",
            "android-app://com.example.app/",
        ),
        ("blog.example/post?x=1", "blog.example/post"),
        // Cut between characters, whatever the bytes around.
        (
            "https://ü:ß@bücher.example/straße?ö=1",
            "https://bücher.example/straße",
        ),
    ] {
        assert_eq!(kept(url), expected, "{url}");
    }
}
