//! What-if replays through the ledger library: the diff, with the money
//! worked out by hand, apply, and the races around it.

use commission_ledger::events::*;
use commission_ledger::ledger::{Receipt, Replay, SubmitError};
use commission_ledger::projections::StatementKind;
use commission_ledger::rules::{Noop, Rejection};

use crate::support::*;

/// alice and bob in a USD program at 20% (Europe/Amsterdam months).
fn program() -> (TestLedger, AffiliateEnrolled, AffiliateEnrolled) {
    let t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let alice = t.enroll("alice");
    let bob = t.enroll("bob");
    (t, alice, bob)
}

fn what_if(t: &TestLedger, overrides: serde_json::Value) -> Result<Replay, SubmitError> {
    let overrides: Overrides = serde_json::from_value(overrides).unwrap();
    t.ledger().what_if(&t.program, overrides, None)
}

fn apply(t: &TestLedger, replay: &Replay, reason: &str) -> Result<Receipt, SubmitError> {
    let submission = t
        .ledger()
        .apply_replay_submission(&t.program, &replay.replay_id, reason, "operator")?
        .expect("the replay is kept");
    t.ledger().submit_blocking(submission)
}

/// Restarts the ledger and reads the replay back.
fn after_restart(t: &mut TestLedger, replay: &Replay) -> Option<Replay> {
    t.reopen();
    t.ledger().replay(&t.program, &replay.replay_id).unwrap()
}

/// (affiliate, month, before, after, change) of every row.
fn rows(replay: &Replay) -> Vec<(String, String, String, String, String)> {
    replay
        .diff
        .rows
        .iter()
        .map(|r| {
            (
                r.affiliate_id.to_string(),
                r.month.to_string(),
                r.before.clone(),
                r.after.clone(),
                r.change.clone(),
            )
        })
        .collect()
}

fn row(
    a: &str,
    m: &str,
    before: &str,
    after: &str,
    change: &str,
) -> (String, String, String, String, String) {
    (
        a.into(),
        m.into(),
        before.into(),
        after.into(),
        change.into(),
    )
}

/// The BILLmanager case: cust-1 came by alice's link, but the ticket shows
/// bob referred them. Three closed months of rewards went to alice.
fn wrongly_attributed() -> (TestLedger, AffiliateEnrolled, AffiliateEnrolled) {
    let (t, alice, _bob) = program();
    t.click("2026-05-02T10:00:00Z", &alice.referral_code, "v-1");
    assert_eq!(
        t.signup("2026-05-02T10:05:00Z", "cust-1", Some("v-1"), None),
        Some("alice".into())
    );
    t.click("2026-05-03T10:00:00Z", &alice.referral_code, "v-2");
    t.signup("2026-05-03T10:05:00Z", "cust-2", Some("v-2"), None);
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00"); // 20.00
    t.close("2026-05");
    t.expense("2026-06-10T12:00:00Z", "jun-1", "cust-1", "50.00"); // 10.00
    t.expense("2026-06-11T12:00:00Z", "jun-2", "cust-2", "40.00"); // 8.00, alice's own
    t.close("2026-06");
    t.expense("2026-07-10T12:00:00Z", "jul-1", "cust-1", "80.00"); // 16.00
    t.close("2026-07");
    t.set_now("2026-08-05T09:00:00Z");
    (t, alice, _bob)
}

/// An applied attribution correction holds for the closes still to come,
/// so the pending estimate of the open month moves with it at once.
#[test]
fn an_applied_attribution_moves_the_pending_estimate_of_the_open_month() {
    let (t, _, _) = wrongly_attributed();
    t.expense("2026-08-10T12:00:00Z", "aug-1", "cust-1", "30.00"); // 6.00
    assert_eq!(t.balance("alice").pending, "6.00");
    assert_eq!(t.balance("bob").pending, "0.00");
    let replay = what_if(
        &t,
        serde_json::json!({"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}),
    )
    .unwrap();
    apply(&t, &replay, "ticket 4411").unwrap();
    assert_eq!(t.balance("alice").pending, "0.00");
    assert_eq!(t.balance("bob").pending, "6.00");
    t.verify_ok();
}

#[test]
fn billmanager_case_a_customer_moved_three_months_back_through_a_replay() {
    let (t, _, _) = wrongly_attributed();
    assert_eq!(t.money("alice").0, "54.00");
    let closed_view = |s: commission_ledger::projections::Statement| {
        (s.opening_balance, s.lines, s.totals, s.closing_balance)
    };
    let may_statement = closed_view(t.statement("alice", "2026-05"));
    let replay = what_if(
        &t,
        serde_json::json!({"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}),
    )
    .unwrap();
    // Exactly cust-1's rewards of May, June and July move; cust-2's 8.00 stays.
    assert_eq!(
        rows(&replay),
        vec![
            row("alice", "2026-05", "20.00", "0.00", "-20.00"),
            row("alice", "2026-06", "18.00", "8.00", "-10.00"),
            row("alice", "2026-07", "16.00", "0.00", "-16.00"),
            row("bob", "2026-05", "0.00", "20.00", "20.00"),
            row("bob", "2026-06", "0.00", "10.00", "10.00"),
            row("bob", "2026-07", "0.00", "16.00", "16.00"),
        ]
    );
    assert_eq!(replay.diff.total_change, "0.00");
    let june = &replay.diff.rows[1].lines;
    assert_eq!(june.len(), 1, "only the changed line is listed: {june:?}");
    assert_eq!(
        (
            june[0].line.as_ref().map(|l| l.to_string()),
            june[0].basis.clone()
        ),
        (Some("jun-1".into()), Some("50.00".into()))
    );
    // Nothing was written by the replay.
    let head = t.head();
    assert_eq!(replay.at_seq, head);

    let receipt = apply(&t, &replay, "ticket 4411: bob referred cust-1").unwrap();
    assert_eq!(
        receipt.events.len(),
        8,
        "ReplayApplied, ReplayCorrected and six adjustments"
    );
    match &receipt.events[0].event {
        Event::ReplayApplied(e) => {
            assert_eq!(e.replay_id, replay.replay_id);
            assert_eq!(e.at_seq, head);
            assert_eq!(e.reason, "ticket 4411: bob referred cust-1");
        }
        other => panic!("expected ReplayApplied, got {other:?}"),
    }
    // The corrected world: cust-1's three rewards are bob's now, and cust-1.
    match &receipt.events[1].event {
        Event::ReplayCorrected(e) => {
            assert_eq!(e.replay_id, replay.replay_id);
            let lines: Vec<(String, CorrectedState)> = e
                .lines
                .iter()
                .map(|l| (l.line.to_string(), l.state.clone()))
                .collect();
            let bob = |amount: &str| CorrectedState::Closed {
                reward: Some(CorrectedReward {
                    affiliate_id: aff("bob"),
                    rate: commission_ledger::money::Rate::parse("20").unwrap(),
                    amount: amount.parse().unwrap(),
                    refunded: Default::default(),
                    clawed: Default::default(),
                }),
            };
            assert_eq!(
                lines,
                vec![
                    ("jul-1".into(), bob("16.00")),
                    ("jun-1".into(), bob("10.00")),
                    ("may-1".into(), bob("20.00")),
                ]
            );
            let customers: Vec<(String, Vec<AttributedFrom>)> = e
                .customers
                .iter()
                .map(|c| (c.customer_id.to_string(), c.attribution.clone()))
                .collect();
            let bobs = AttributedFrom {
                from: None,
                affiliate_id: aff("bob"),
            };
            assert_eq!(customers, vec![("cust-1".into(), vec![bobs])]);
            assert!(e.refunds.is_empty() && e.clicks.is_empty(), "{e:?}");
        }
        other => panic!("expected ReplayCorrected, got {other:?}"),
    }
    for r in &receipt.events[2..] {
        match &r.event {
            Event::AdjustmentPosted(e) => {
                assert_eq!(e.month, month("2026-08"), "posted in the open month");
                assert_eq!(
                    e.cause,
                    Cause::Replay {
                        replay_id: replay.replay_id,
                        at_seq: head
                    }
                );
            }
            other => panic!("expected AdjustmentPosted, got {other:?}"),
        }
    }
    assert_eq!(t.money("alice").0, "8.00");
    assert_eq!(t.money("bob").0, "46.00");
    // cust-1 is bob's referral now, with what it earned him; alice keeps cust-2
    assert_eq!(
        t.referral_list("bob"),
        vec![("cust-1".into(), "46.00".into())]
    );
    assert_eq!(
        t.referral_list("alice"),
        vec![("cust-2".into(), "8.00".into())]
    );
    assert_eq!(
        closed_view(t.statement("alice", "2026-05")),
        may_statement,
        "a closed statement stays exactly as it was"
    );
    let open = t.statement("alice", "2026-08");
    let kinds: Vec<(StatementKind, &str)> = open
        .lines
        .iter()
        .map(|l| (l.kind, l.amount.as_str()))
        .collect();
    let adjustment = StatementKind::Adjustment;
    assert_eq!(
        kinds,
        vec![
            (adjustment, "-20.00"),
            (adjustment, "-10.00"),
            (adjustment, "-16.00")
        ]
    );

    // Applying twice appends nothing; the same overrides again find nothing
    // to change, and so does an empty override set.
    let again = apply(&t, &replay, "again").unwrap();
    assert!(again.events.is_empty());
    assert!(matches!(
        again.noop,
        Some(Noop::ReplayAlreadyApplied { .. })
    ));
    let rerun = what_if(
        &t,
        serde_json::json!({"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}),
    )
    .unwrap();
    assert!(rerun.diff.is_empty(), "{:?}", rerun.diff);
    replays_to_nothing(&t, "the correction is applied");

    // The correction holds for what comes: cust-1's August line earns bob.
    t.expense("2026-08-10T12:00:00Z", "aug-1", "cust-1", "10.00");
    t.close("2026-08");
    assert_eq!(t.money("bob").0, "48.00");
    replays_to_nothing(&t, "August follows the correction");
    // The applied replay can be read back, also after a restart.
    let mut t = t;
    let read = after_restart(&mut t, &replay).unwrap();
    assert_eq!(read.diff, replay.diff);
    assert!(read.applied_seq.is_some());
    t.verify_ok();
}

#[test]
fn a_rate_fix_from_a_date() {
    let (t, alice, _) = program();
    t.click("2026-05-02T10:00:00Z", &alice.referral_code, "v-1");
    t.signup("2026-05-02T10:05:00Z", "cust-1", Some("v-1"), None);
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00"); // 20.00 either way
    t.close("2026-05");
    t.expense("2026-06-10T12:00:00Z", "jun-1", "cust-1", "100.00"); // 20.00 -> 25.00
    t.close("2026-06");
    t.expense("2026-07-10T12:00:00Z", "jul-1", "cust-1", "40.00"); // 8.00 -> 10.00
    t.expense("2026-07-12T12:00:00Z", "jul-2", "cust-1", "0.10"); // 0.02 -> 0.025 -> 0.02 (half-even)
    t.close("2026-07");
    t.set_now("2026-08-05T09:00:00Z");
    let mut corrected = serde_json::to_value(rules("hosting", serde_json::json!({}))).unwrap();
    corrected["default_rate"] = "25".into();
    let replay = what_if(
        &t,
        serde_json::json!({"rules": {"from": "2026-06-01T00:00:00+02:00", "rules": corrected}}),
    )
    .unwrap();
    assert_eq!(
        rows(&replay),
        vec![
            row("alice", "2026-06", "20.00", "25.00", "5.00"),
            row("alice", "2026-07", "8.02", "10.02", "2.00"),
        ]
    );
    let line = &replay.diff.rows[0].lines[0];
    assert_eq!(
        (
            line.rate_before.map(|r| r.to_string()),
            line.rate_after.map(|r| r.to_string())
        ),
        (Some("20".into()), Some("25".into()))
    );
    apply(&t, &replay, "the June deal was 25%").unwrap();
    assert_eq!(t.money("alice").0, "55.02");
    // From now on the corrected rules are the program's rules.
    t.expense("2026-08-10T12:00:00Z", "aug-1", "cust-1", "100.00");
    t.close("2026-08");
    assert_eq!(t.money("alice").0, "80.02");
    // New rules after the correction stand: it corrected the history
    // before it (later replays used to impose it over the new rules).
    t.set_now("2026-09-03T09:00:00Z");
    t.define(rules("hosting", serde_json::json!({"default_rate": "30"})));
    t.expense("2026-09-10T12:00:00Z", "sep-1", "cust-1", "100.00"); // 30.00
    t.close("2026-09");
    assert_eq!(t.money("alice").0, "110.02");
    replays_to_nothing(&t, "September's 30% stands");
    t.verify_ok();
}

#[test]
fn a_fraudulent_click_excluded() {
    let (t, alice, bob) = program();
    t.click("2026-05-01T10:00:00Z", &alice.referral_code, "v-1");
    let fraud = t
        .click("2026-05-03T10:00:00Z", &bob.referral_code, "v-1")
        .events[0]
        .seq;
    assert_eq!(
        t.signup("2026-05-04T10:00:00Z", "cust-1", Some("v-1"), None),
        Some("bob".into()),
        "last click wins"
    );
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00");
    t.close("2026-05");
    t.set_now("2026-06-02T09:00:00Z");
    // Without bob's click, alice's click (inside the 30-day window) wins.
    let replay = what_if(&t, serde_json::json!({"exclude": [fraud]})).unwrap();
    assert_eq!(
        rows(&replay),
        vec![
            row("alice", "2026-05", "0.00", "20.00", "20.00"),
            row("bob", "2026-05", "20.00", "0.00", "-20.00"),
        ]
    );
    // Only clicks, signups, basis lines and refunds can be excluded, and
    // only events of the program.
    let close_seq = t.head();
    let refused = what_if(&t, serde_json::json!({"exclude": [close_seq]})).unwrap_err();
    assert!(
        matches!(refused, SubmitError::Rejected(Rejection::Invalid(_))),
        "{refused:?}"
    );
    let refused = what_if(&t, serde_json::json!({"exclude": [close_seq + 100]})).unwrap_err();
    assert!(
        matches!(refused, SubmitError::Rejected(Rejection::Invalid(_))),
        "{refused:?}"
    );
    let applied = apply(&t, &replay, "click fraud, ticket 77").unwrap();
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("20.00".into(), "0.00".into())
    );
    // Excluding it again is refused, naming the replay that did.
    let applied_at = applied.events[0].seq;
    assert!(matches!(applied.events[0].event, Event::ReplayApplied(_)));
    let refused = what_if(&t, serde_json::json!({"exclude": [fraud]})).unwrap_err();
    let SubmitError::Rejected(Rejection::Invalid(invalid)) = &refused else {
        panic!("{refused:?}");
    };
    assert!(
        invalid.to_string().contains(&format!(
            "seq {fraud} is already excluded, by the replay applied at seq {applied_at}"
        )),
        "{invalid}"
    );
}

#[test]
fn first_click_instead_of_last_click() {
    let (t, alice, bob) = program();
    // The rules changed once before: a model correction holds over every
    // version (it used to hold over the first only, and these signups kept
    // the last click).
    t.set_now("2026-03-20T09:00:00Z");
    t.define(rules("hosting", serde_json::json!({"default_rate": "20"})));
    t.click("2026-05-01T10:00:00Z", &alice.referral_code, "v-1");
    t.click("2026-05-03T10:00:00Z", &bob.referral_code, "v-1");
    t.signup("2026-05-04T10:00:00Z", "cust-1", Some("v-1"), None);
    // A click 40 days before the signup is outside any 30-day window.
    t.click("2026-04-01T10:00:00Z", &bob.referral_code, "v-2");
    t.click("2026-05-05T10:00:00Z", &alice.referral_code, "v-2");
    t.signup("2026-05-11T10:00:00Z", "cust-2", Some("v-2"), None);
    t.expense("2026-05-20T12:00:00Z", "may-1", "cust-1", "100.00"); // 20.00
    t.expense("2026-05-21T12:00:00Z", "may-2", "cust-2", "50.00"); // 10.00
    t.close("2026-05");
    t.set_now("2026-06-02T09:00:00Z");
    let replay = what_if(
        &t,
        serde_json::json!({"model": {"attribution": "first_click"}}),
    )
    .unwrap();
    // cust-1 goes to alice (first click); cust-2 stays with alice: bob's
    // first click is outside the window.
    assert_eq!(
        rows(&replay),
        vec![
            row("alice", "2026-05", "10.00", "30.00", "20.00"),
            row("bob", "2026-05", "20.00", "0.00", "-20.00"),
        ]
    );
    // With a 60-day window as well, bob's April click wins cust-2.
    let wider = what_if(
        &t,
        serde_json::json!({"model": {"attribution": "first_click", "cookie_days": 60}}),
    )
    .unwrap();
    assert_eq!(
        rows(&wider),
        vec![
            row("alice", "2026-05", "10.00", "20.00", "10.00"),
            row("bob", "2026-05", "20.00", "10.00", "-10.00"),
        ]
    );
}

#[test]
fn apply_is_refused_when_the_log_moved_under_the_replay_and_not_otherwise() {
    let (t, alice, _) = wrongly_attributed();
    let overrides =
        serde_json::json!({"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]});
    let replay = what_if(&t, overrides.clone()).unwrap();
    // Events that do not touch it: clicks, a line in the open month, and a
    // close that moves money only of another customer.
    t.click("2026-08-06T10:00:00Z", &alice.referral_code, "v-9");
    t.expense("2026-08-07T12:00:00Z", "aug-2", "cust-2", "10.00");
    t.close("2026-08");
    assert!(apply(&t, &replay, "ticket 4411").is_ok());

    let (t, _, _) = wrongly_attributed();
    let replay = what_if(&t, overrides).unwrap();
    // A refund of cust-1's July line, clawed back from alice at the August
    // close: the diff now moves the claw-back too.
    t.refund("2026-08-06T12:00:00Z", "cn-1", "cust-1", "jul-1", "80.00");
    t.close("2026-08");
    let refused = apply(&t, &replay, "ticket 4411").unwrap_err();
    assert!(
        matches!(
            refused,
            SubmitError::Rejected(Rejection::ReplayStale { .. })
        ),
        "{refused:?}"
    );
    assert_eq!(t.money("alice").0, "38.00", "nothing was appended");
}

/// A diff under review survives a restart (a deploy between computing it
/// and applying it), and applies then as it would have before.
#[test]
fn a_replay_not_yet_applied_is_kept_across_a_restart() {
    let (t, _, _) = wrongly_attributed();
    let replay = what_if(
        &t,
        serde_json::json!({"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]}),
    )
    .unwrap();
    let mut t = t;
    let read = after_restart(&mut t, &replay).expect("kept across the restart");
    assert_eq!(read.diff, replay.diff);
    assert_eq!(
        serde_json::to_value(&read).unwrap(),
        serde_json::to_value(&replay).unwrap()
    );
    assert!(
        t.ledger()
            .replay(&program_id("other"), &replay.replay_id)
            .unwrap()
            .is_none(),
        "a replay answers for its own program only"
    );
    apply(&t, &replay, "ticket 4411").unwrap();
    assert_eq!(t.money("alice").0, "8.00");
    assert_eq!(t.money("bob").0, "46.00");
    t.verify_ok();
}

/// Kept, but not without end: the newest `MAX_KEPT_REPLAYS`, in memory and on disk.
#[test]
fn only_the_newest_replays_are_kept() {
    use commission_ledger::ledger::MAX_KEPT_REPLAYS;
    let (t, _, _) = wrongly_attributed();
    // What a crash in the middle of writing one leaves: cleared away.
    std::fs::create_dir_all(t.dir.path().join("replays")).unwrap();
    std::fs::write(t.dir.path().join("replays/torn.json.tmp"), b"{\"repl").unwrap();
    let ids: Vec<_> = (0..=MAX_KEPT_REPLAYS)
        .map(|_| what_if(&t, serde_json::json!({})).unwrap().replay_id)
        .collect();
    let files = std::fs::read_dir(t.dir.path().join("replays"))
        .unwrap()
        .count();
    assert_eq!(files, MAX_KEPT_REPLAYS);
    let mut t = t;
    t.reopen();
    let kept = |id| t.ledger().replay(&t.program, id).unwrap().is_some();
    assert!(!kept(&ids[0]), "the oldest went");
    assert!(kept(&ids[1]) && kept(&ids[MAX_KEPT_REPLAYS]));
}

/// `replay --what-if` as a process: the table, the CSV, bad input, --apply.
#[test]
fn the_command_line_prints_the_diff_writes_csv_and_applies() {
    let (mut t, _, _) = wrongly_attributed();
    t.ledger = None; // the command line takes the data directory's lock
    let data = t.dir.path().to_path_buf();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_commission-ledger"))
            .args(args)
            .arg("--data")
            .arg(&data)
            .output()
            .unwrap()
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let work = tempfile::tempdir().unwrap();
    let overrides = work.path().join("overrides.json");
    std::fs::write(
        &overrides,
        r#"{"overrides": {"attribution": [{"customer_id": "cust-1", "affiliate_id": "bob"}]},
            "months": {"from": "2026-06", "to": "2026-07"}}"#,
    )
    .unwrap();
    let csv = work.path().join("diff.csv");
    let o = overrides.to_str().unwrap();
    let out = run(&[
        "replay",
        "--what-if",
        o,
        "--program",
        "hosting",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains("4 changed items, total change 0.00 USD"),
        "{table}"
    );
    assert!(
        !table.contains("2026-05"),
        "the months were restricted: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["bob", "2026-07", "0.00", "16.00", "16.00"]),
        "{table}"
    );
    let written = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(
        written.lines().count(),
        5,
        "a header and four lines: {written}"
    );

    // Bad input: a clear error, a non-zero exit, nothing appended.
    let head = commission_ledger::ledger::verify_log(&data.join("log"), None).head_seq;
    std::fs::write(
        work.path().join("bad.json"),
        r#"{"overrides": {"exclude": "x"}}"#,
    )
    .unwrap();
    let bad = work.path().join("bad.json");
    let out = run(&[
        "replay",
        "--what-if",
        bad.to_str().unwrap(),
        "--program",
        "hosting",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not an overrides document"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["replay", "--what-if", o, "--program", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no program `nope`"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["replay", "--what-if", o, "--program", "hosting", "--apply"]);
    assert_eq!(out.status.code(), Some(2), "--apply needs a --reason");
    assert_eq!(
        commission_ledger::ledger::verify_log(&data.join("log"), None).head_seq,
        head
    );

    let out = run(&[
        "replay",
        "--what-if",
        o,
        "--program",
        "hosting",
        "--apply",
        "--reason",
        "ticket 4411",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("4 adjustments in the open month"),
        "{}",
        text(&out.stdout)
    );
    t.reopen();
    // June and July moved; May (outside the months asked for) did not.
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("28.00".into(), "26.00".into())
    );
    t.verify_ok();
}

fn attribute_to(customer: &str, affiliate: &str) -> serde_json::Value {
    serde_json::json!({"attribution": [{"customer_id": customer, "affiliate_id": affiliate}]})
}

/// After a correction, the corrected world is the ledger's: a refund of a
/// corrected line claws back from whom the reward went to, at that
/// affiliate's rate (it used to claw back from the affiliate the
/// correction took the reward from, at its rate).
#[test]
fn a_refund_after_an_applied_correction_claws_back_from_the_corrected_reward() {
    let (t, alice, _) = program();
    t.enroll_with("carol", None, None, Some("30"));
    t.click("2026-05-02T10:00:00Z", &alice.referral_code, "v-1");
    t.signup("2026-05-02T10:05:00Z", "cust-1", Some("v-1"), None);
    t.click("2026-05-03T10:00:00Z", &alice.referral_code, "v-2");
    t.signup("2026-05-03T10:05:00Z", "cust-2", Some("v-2"), None);
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00");
    t.close("2026-05");
    t.expense("2026-06-10T12:00:00Z", "jun-1", "cust-1", "50.00");
    t.expense("2026-06-11T12:00:00Z", "jun-2", "cust-2", "40.00");
    t.close("2026-06");
    t.expense("2026-07-10T12:00:00Z", "jul-1", "cust-1", "80.00");
    t.close("2026-07");
    t.set_now("2026-08-05T09:00:00Z");
    // carol's own 30%: may-1 30.00, jun-1 15.00, jul-1 24.00 (alice had
    // 20.00 + 10.00 + 16.00 of them, and keeps cust-2's 8.00).
    let replay = what_if(&t, attribute_to("cust-1", "carol")).unwrap();
    apply(&t, &replay, "ticket 4411").unwrap();
    assert_eq!(
        (t.money("alice").0, t.money("carol").0),
        ("8.00".into(), "69.00".into())
    );
    // Half of may-1 refunded: 30% of 50.00 = 15.00 back from carol.
    t.refund("2026-08-06T09:00:00Z", "ref-1", "cust-1", "may-1", "50.00");
    t.set_now("2026-09-02T09:00:00Z");
    let closed = t.close("2026-08");
    assert_eq!(closed.total, "-15.00".parse().unwrap());
    assert_eq!(
        (t.money("alice").0, t.money("carol").0),
        ("8.00".into(), "54.00".into())
    );
    // The rest of it: all that is left of carol's 30.00.
    t.refund("2026-09-06T09:00:00Z", "ref-2", "cust-1", "may-1", "50.00");
    t.set_now("2026-10-02T09:00:00Z");
    t.close("2026-09");
    assert_eq!(
        (t.money("alice").0, t.money("carol").0),
        ("8.00".into(), "39.00".into())
    );
    replays_to_nothing(&t, "the ledger is the corrected world");
    t.verify_ok();
}

/// A reassignment after a correction moves what the correction gave (it
/// used to move the rewards the correction had taken away once more,
/// paying them twice), and later replays keep the reassignment, the newer
/// decision, where they used to put the customer back.
#[test]
fn a_reassignment_after_an_applied_correction_moves_what_the_correction_gave() {
    let (t, _, _) = wrongly_attributed();
    let replay = what_if(&t, attribute_to("cust-1", "bob")).unwrap();
    apply(&t, &replay, "ticket 4411").unwrap();
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("8.00".into(), "46.00".into())
    );
    t.enroll("carol");
    t.set_now("2026-08-06T09:00:00Z");
    t.reassign("cust-1", "carol", None, true, "ticket 4412");
    assert_eq!(
        (t.money("alice").0, t.money("bob").0, t.money("carol").0),
        ("8.00".into(), "0.00".into(), "46.00".into())
    );
    t.expense("2026-08-10T12:00:00Z", "aug-1", "cust-1", "30.00"); // carol 6.00
    t.set_now("2026-09-02T09:00:00Z");
    t.close("2026-08");
    assert_eq!(t.money("carol").0, "52.00");
    replays_to_nothing(&t, "a replay of history as recorded");
    // A correction now of cust-1 to bob for all time holds over the
    // reassignment: everything carol has of cust-1 goes to bob.
    let back = what_if(&t, attribute_to("cust-1", "bob")).unwrap();
    assert_eq!(
        rows(&back),
        vec![
            row("bob", "2026-08", "-46.00", "6.00", "52.00"),
            row("carol", "2026-08", "52.00", "0.00", "-52.00"),
        ]
    );
    t.verify_ok();
}

/// A click on `affiliate`'s link at `at`, and five minutes later the
/// signup of `customer` it brings: the signup's seq.
fn signup_by_click(t: &TestLedger, at: &str, affiliate: &AffiliateEnrolled, customer: &str) -> Seq {
    let visitor = format!("v-{customer}");
    t.click(at, &affiliate.referral_code, &visitor);
    let at = Timestamp::from_micros(ts(at).micros() + 300_000_000).to_string();
    let signup = t.submit(
        Some(&at),
        commission_ledger::rules::Command::Signup {
            customer_id: cust(customer),
            visitor: Some(visitor.into()),
            promo_code: None,
            group: None,
        },
    );
    signup.events[0].seq
}

/// A signup excluded as fraud leaves its customer nobody's referral:
/// their later lines earn nobody, and they leave the referral list.
#[test]
fn an_excluded_signup_leaves_the_customer_to_nobody_from_then_on() {
    let (t, _, bob) = program();
    let fraud = signup_by_click(&t, "2026-05-01T10:00:00Z", &bob, "cust-1");
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00"); // 20.00
    t.close("2026-05");
    t.set_now("2026-06-02T09:00:00Z");
    let replay = what_if(&t, serde_json::json!({"exclude": [fraud]})).unwrap();
    assert_eq!(
        rows(&replay),
        vec![row("bob", "2026-05", "20.00", "0.00", "-20.00")]
    );
    apply(&t, &replay, "fake signup, ticket 78").unwrap();
    assert_eq!(t.money("bob").0, "0.00");
    assert_eq!(t.referral_list("bob"), vec![]);
    t.expense("2026-06-10T12:00:00Z", "jun-1", "cust-1", "100.00");
    assert_eq!(t.balance("bob").pending, "0.00");
    t.set_now("2026-07-02T09:00:00Z");
    t.close("2026-06");
    assert_eq!(t.money("bob").0, "0.00");
    replays_to_nothing(&t, "a replay of history as recorded");
    t.verify_ok();
}

/// A correction applied to some months only leaves the other months'
/// rewards where they were: a refund of such a line claws back from the
/// affiliate that kept the reward.
#[test]
fn a_correction_of_some_months_leaves_the_other_months_rewards_where_they_were() {
    let (t, _, _) = wrongly_attributed();
    let overrides: Overrides = serde_json::from_value(attribute_to("cust-1", "bob")).unwrap();
    let months = MonthRange {
        from: month("2026-06"),
        to: month("2026-07"),
    };
    let replay = t
        .ledger()
        .what_if(&t.program, overrides, Some(months))
        .unwrap();
    apply(&t, &replay, "ticket 4411, from June").unwrap();
    // alice keeps May's 20.00 and cust-2's 8.00; bob has June's and July's.
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("28.00".into(), "26.00".into())
    );
    t.refund("2026-08-06T09:00:00Z", "ref-1", "cust-1", "may-1", "100.00");
    t.refund("2026-08-06T09:05:00Z", "ref-2", "cust-1", "jun-1", "50.00");
    t.set_now("2026-09-02T09:00:00Z");
    t.close("2026-08");
    assert_eq!(
        (t.money("alice").0, t.money("bob").0),
        ("8.00".into(), "16.00".into())
    );
    t.verify_ok();
}

/// A replay of history as recorded (no new override) changes nothing:
/// the ledger is already the world its applied corrections make.
fn replays_to_nothing(t: &TestLedger, why: &str) {
    let again = what_if(t, serde_json::json!({})).unwrap();
    assert_eq!(rows(&again), vec![], "{why}");
    assert!(again.diff.is_empty(), "{why}: {:?}", again.diff);
}

/// alice's referral list is `customer`, billed `amount` in all.
fn alice_bills(t: &TestLedger, customer: &str, amount: &str) {
    let billed: Vec<(String, String)> = t
        .referrals("alice")
        .into_iter()
        .map(|r| (r.customer_id.to_string(), r.billed))
        .collect();
    assert_eq!(billed, vec![(customer.to_string(), amount.to_string())]);
}

/// After a correction: a replay of history as recorded changes nothing,
/// and a start from the log alone bills alice's one referral the same.
fn nothing_left_to_correct(mut t: TestLedger, alices: (&str, &str)) {
    replays_to_nothing(&t, "a replay of history as recorded");
    t.rebuild();
    alice_bills(&t, alices.0, alices.1);
    t.verify_ok();
}

/// Excluding a test charge leaves an operator's placement of its customer
/// standing (when the charge was all the ledger knew of the customer, the
/// replay did not know them without it and dropped the reassignment: the
/// customer became nobody's), and the referral list bills only what still
/// counts.
#[test]
fn an_excluded_test_charge_leaves_the_operators_placement_standing() {
    let (t, _, _) = program();
    let test_charge = t.expense("2026-05-10T12:00:00Z", "test-1", "cust-9", "1.00");
    let test_charge = test_charge.events[0].seq;
    t.set_now("2026-05-12T09:00:00Z");
    t.reassign("cust-9", "alice", None, false, "ticket 51");
    alice_bills(&t, "cust-9", "1.00");
    t.set_now("2026-05-20T09:00:00Z");
    let replay = what_if(&t, serde_json::json!({"exclude": [test_charge]})).unwrap();
    assert_eq!(rows(&replay), vec![], "nothing was closed yet");
    apply(&t, &replay, "a test charge, ticket 52").unwrap();
    alice_bills(&t, "cust-9", "0.00");
    // The first real charge: 20% is alice's, the estimate, then the close.
    t.expense("2026-06-10T12:00:00Z", "jun-9", "cust-9", "50.00");
    assert_eq!(t.balance("alice").pending, "10.00");
    t.set_now("2026-07-02T09:00:00Z");
    t.close("2026-06");
    assert_eq!(t.money("alice").0, "10.00");
    nothing_left_to_correct(t, ("cust-9", "50.00"));
}

/// A refund excluded (recorded in error) stays out of every later close:
/// a retroactive reassignment used to open it again with its line, and the
/// next close clawed it back. The customer is billed the whole line again.
#[test]
fn an_excluded_refund_stays_out_of_closes_after_a_retroactive_reassignment() {
    let (t, _, _) = program();
    t.expense("2026-05-10T12:00:00Z", "may-5", "cust-5", "100.00");
    let wrong = t.refund("2026-05-12T12:00:00Z", "ref-5", "cust-5", "may-5", "100.00");
    let wrong = wrong.events[0].seq;
    t.close("2026-05"); // nobody's customer: nothing to reward
    t.set_now("2026-06-02T10:00:00Z");
    let replay = what_if(&t, serde_json::json!({"exclude": [wrong]})).unwrap();
    assert_eq!(rows(&replay), vec![]);
    apply(&t, &replay, "refund recorded twice, ticket 60").unwrap();
    t.set_now("2026-06-03T10:00:00Z");
    t.reassign("cust-5", "alice", None, true, "ticket 61");
    alice_bills(&t, "cust-5", "100.00");
    // may-5 waits for the next close again: 20.00, and nothing back.
    assert_eq!(t.balance("alice").pending, "20.00");
    t.set_now("2026-07-02T09:00:00Z");
    let june = t.close("2026-06");
    assert_eq!(june.total, "20.00".parse().unwrap());
    assert_eq!(t.money("alice").0, "20.00");
    nothing_left_to_correct(t, ("cust-5", "100.00"));
}

/// A signup excluded keeps the group it reported: a later group change
/// then applies from its own moment, as the ledger has it (a replay used to
/// forget the group with the signup, count the customer in the later group
/// from the start, and find money to move in a history that had none).
#[test]
fn an_excluded_signup_keeps_the_customers_group() {
    let (t, _, bob) = program();
    let fraud = signup_by_click(&t, "2026-05-01T10:00:00Z", &bob, "cust-4");
    t.expense("2026-05-10T12:00:00Z", "may-4", "cust-4", "100.00");
    t.set_now("2026-05-20T09:00:00Z");
    let replay = what_if(&t, serde_json::json!({"exclude": [fraud]})).unwrap();
    apply(&t, &replay, "a fake signup, ticket 80").unwrap();
    t.set_now("2026-05-21T09:00:00Z");
    t.reassign("cust-4", "alice", None, false, "ticket 81");
    // Staff from 25 May: may-4, of the 10th, still earns alice 20%.
    t.submit(
        Some("2026-05-25T09:00:00Z"),
        commission_ledger::rules::Command::ChangeCustomerGroup {
            customer_id: cust("cust-4"),
            group: "staff".into(),
        },
    );
    assert_eq!(t.balance("alice").pending, "20.00");
    t.close("2026-05");
    assert_eq!(t.money("alice").0, "20.00");
    replays_to_nothing(&t, "a replay of what was recorded moves nothing");
    t.verify_ok();
}

/// Corrected rules, once applied, are the program's rules: the balance
/// shows their payout threshold, the one withdrawals are decided against
/// (it used to show the threshold recorded before, and offer as available
/// what a withdrawal was then refused for).
#[test]
fn applied_rules_set_the_threshold_balances_show() {
    let (t, alice, _) = program();
    t.click("2026-05-02T10:00:00Z", &alice.referral_code, "v-1");
    t.signup("2026-05-02T10:05:00Z", "cust-1", Some("v-1"), None);
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "300.00"); // 60.00
    t.close("2026-05");
    assert_eq!(
        t.money("alice"),
        ("60.00".into(), "0.00".into(), "60.00".into())
    );
    t.set_now("2026-06-02T09:00:00Z");
    // The terms signed in April: a payout threshold of 100.00.
    let corrected = serde_json::to_value(rules(
        "hosting",
        serde_json::json!({"payout_threshold": "100.00"}),
    ))
    .unwrap();
    let overrides =
        serde_json::json!({"rules": {"from": "2026-04-01T00:00:00Z", "rules": corrected}});
    let replay = what_if(&t, overrides).unwrap();
    assert_eq!(rows(&replay), vec![], "the rates are the same");
    apply(&t, &replay, "terms of April, ticket 90").unwrap();
    let balance = t.balance("alice");
    assert_eq!(
        (balance.threshold, balance.to_threshold, balance.available),
        ("100.00".into(), "40.00".into(), "0.00".into())
    );
    assert!(matches!(
        t.withdraw("alice", "60.00"),
        Err(SubmitError::Rejected(Rejection::BelowThreshold { .. }))
    ));
    let mut t = t;
    t.rebuild();
    assert_eq!(t.balance("alice").threshold, "100.00");
    t.verify_ok();
}

/// Corrected rules that take effect before the program was defined do not
/// make the server close months from before it existed (auto-close owed
/// every month whose close day came after the correction's `from`).
#[test]
fn corrected_rules_from_before_the_program_owe_no_earlier_closes() {
    let t = TestLedger::new_at("hosting", "2026-05-15T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({})));
    t.set_now("2026-05-20T09:00:00Z");
    let corrected = serde_json::to_value(rules(
        "hosting",
        serde_json::json!({"payout_threshold": "100.00"}),
    ))
    .unwrap();
    let overrides =
        serde_json::json!({"rules": {"from": "2026-03-01T00:00:00Z", "rules": corrected}});
    let replay = what_if(&t, overrides).unwrap();
    apply(&t, &replay, "terms of March, ticket 91").unwrap();
    assert_eq!(t.ledger().auto_close_due(), vec![]);
    t.set_now("2026-06-01T09:00:00Z");
    assert_eq!(
        t.ledger().auto_close_due(),
        vec![(t.program.clone(), month("2026-05"))]
    );
}

/// A referral's `billed` counts each line by the basis in force at the
/// line's moment: a program that moves from expenses to payments goes on
/// billing the expenses from before the move, less their later refunds,
/// and bills the payments after it. (Each line and refund was judged by
/// the basis when it was recorded: the refund after the move billed
/// nothing back.)
#[test]
fn billed_counts_each_line_by_the_basis_at_its_moment() {
    let (mut t, alice, _) = program();
    signup_by_click(&t, "2026-05-02T10:00:00Z", &alice, "cust-1");
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00");
    t.payment("2026-05-11T12:00:00Z", "may-p", "cust-1", "100.00"); // not the basis
    t.set_now("2026-06-01T00:00:00Z");
    t.define(rules("hosting", serde_json::json!({"basis": "payments"})));
    t.refund("2026-06-03T12:00:00Z", "ref-1", "cust-1", "may-1", "30.00");
    t.payment("2026-06-05T12:00:00Z", "jun-p", "cust-1", "50.00");
    t.expense("2026-06-05T13:00:00Z", "jun-1", "cust-1", "40.00"); // not the basis now
    alice_bills(&t, "cust-1", "120.00"); // 100.00 - 30.00 + 50.00
    t.rebuild();
    alice_bills(&t, "cust-1", "120.00");
    t.verify_ok();
}

/// Corrected rules that change the basis judge the lines since their
/// `from` again: once applied, the referral bills the payments, as the
/// next close rewards them (the expense stayed in the billed total).
#[test]
fn corrected_rules_bill_by_their_basis() {
    let (t, alice, _) = program();
    signup_by_click(&t, "2026-05-02T10:00:00Z", &alice, "cust-1");
    t.expense("2026-05-10T12:00:00Z", "may-1", "cust-1", "100.00");
    t.payment("2026-05-12T12:00:00Z", "may-p", "cust-1", "80.00");
    alice_bills(&t, "cust-1", "100.00");
    t.set_now("2026-05-20T09:00:00Z");
    // The program was signed as rewarding payments.
    let corrected =
        serde_json::to_value(rules("hosting", serde_json::json!({"basis": "payments"}))).unwrap();
    let overrides =
        serde_json::json!({"rules": {"from": "2026-05-01T00:00:00Z", "rules": corrected}});
    let replay = what_if(&t, overrides).unwrap();
    assert_eq!(
        rows(&replay),
        vec![],
        "May is not closed: nothing was posted"
    );
    apply(&t, &replay, "signed terms, ticket 92").unwrap();
    alice_bills(&t, "cust-1", "80.00");
    t.set_now("2026-06-02T09:00:00Z");
    t.close("2026-05");
    assert_eq!(t.money("alice").0, "16.00"); // 80.00 at 20%
    nothing_left_to_correct(t, ("cust-1", "80.00"));
}
