//! The sled store: indexes and checkpoints are derived from the log, may
//! trail it, never disagree with it, and are rebuilt when deleted or stale.

use commission_ledger::events::{Event, Timestamp};
use commission_ledger::ledger::{Ledger, LedgerConfig, ProjectionsCheck, verify_log};
use commission_ledger::log::ScanMode;
use commission_ledger::store::Store;

use crate::support::*;

/// A program with some history: `n` clicks and a closed month with rewards.
fn history(t: &TestLedger, n: usize) {
    t.define(rules("hosting", serde_json::json!({})));
    let alice = t.enroll("alice");
    for i in 0..n {
        t.click(
            "2026-01-02T10:00:00Z",
            &alice.referral_code,
            &format!("v-{}", i % 7),
        );
    }
    t.signup("2026-01-03T10:00:00Z", "c-1", Some("v-1"), None);
    t.expense("2026-01-04T10:00:00Z", "l-1", "c-1", "123.45");
    t.close("2026-01");
}

fn answers(t: &TestLedger) -> (String, String, Vec<Event>) {
    let balance = serde_json::to_string(&t.balance("alice")).unwrap();
    let statement = serde_json::to_string(&t.statement("alice", "2026-01")).unwrap();
    let head = t.head();
    let events = t
        .ledger()
        .events_range(1, head)
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .collect();
    (balance, statement, events)
}

#[test]
fn deleting_the_store_rebuilds_the_same_answers() {
    let mut t = TestLedger::new("hosting");
    history(&t, 300);
    let before = answers(&t);
    t.ledger = None;
    std::fs::remove_dir_all(t.dir.path().join("index")).unwrap();
    t.reopen();
    assert_eq!(answers(&t), before);
    t.verify_ok();
    assert!(
        t.dir.path().join("index").exists(),
        "the store is made anew"
    );
}

#[test]
fn a_restart_starts_from_the_checkpoint_and_the_tail_and_agrees_with_a_fresh_replay() {
    let mut t = TestLedger::new("hosting");
    history(&t, 200);
    let head = t.head();
    t.reopen(); // shutdown wrote a checkpoint at the head
    assert_eq!(
        t.ledger().store_status(),
        (head, head),
        "indexed and checkpointed at the head"
    );
    let alice = t.referral_code("alice");
    for i in 0..50 {
        t.click("2026-02-02T10:00:00Z", &alice, &format!("w-{i}"));
    }
    t.expense("2026-02-04T10:00:00Z", "l-2", "c-1", "10.00");
    let before = answers(&t);
    t.reopen();
    assert_eq!(answers(&t), before);
    t.verify_ok();
}

#[test]
fn a_store_that_disagrees_with_the_log_is_rebuilt() {
    // A log restored from an older copy, under the index of a newer one.
    let mut t = TestLedger::new("hosting");
    history(&t, 100);
    let old_log = tempfile::tempdir().unwrap();
    t.ledger = None;
    for entry in std::fs::read_dir(t.dir.path().join("log")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), old_log.path().join(entry.file_name())).unwrap();
    }
    t.reopen();
    let old = answers(&t);
    let alice = t.referral_code("alice");
    for i in 0..100 {
        t.click("2026-02-02T10:00:00Z", &alice, &format!("x-{i}"));
    }
    t.expense("2026-02-04T10:00:00Z", "l-9", "c-1", "999.00");
    t.ledger = None;
    let log_dir = t.dir.path().join("log");
    std::fs::remove_dir_all(&log_dir).unwrap();
    std::fs::create_dir(&log_dir).unwrap();
    for entry in std::fs::read_dir(old_log.path()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), log_dir.join(entry.file_name())).unwrap();
    }
    t.reopen();
    assert_eq!(
        answers(&t),
        old,
        "the answers of the log, not of the newer index"
    );
    t.verify_ok();
}

#[test]
fn events_are_read_back_across_segments_through_the_sparse_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = LedgerConfig::new(dir.path());
    config.segment_bytes = 8 << 10;
    let ids: Vec<_> = {
        let ledger = Ledger::open(config.clone()).unwrap();
        (0..500)
            .map(|i| {
                let role =
                    commission_ledger::events::Role::parse(["admin", "ingest", "portal"][i % 3])
                        .unwrap();
                ledger.create_key(role, "test").unwrap().0
            })
            .collect()
    };
    assert!(
        commission_ledger::log::list_segments(&dir.path().join("log"))
            .unwrap()
            .len()
            > 3
    );
    let ledger = Ledger::open(config).unwrap();
    for (from, to) in [
        (1, 1),
        (63, 66),
        (64, 64),
        (65, 65),
        (200, 330),
        (499, 500),
        (1, 500),
    ] {
        let events = ledger.events_range(from, to).unwrap();
        let seqs: Vec<u64> = events.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (from..=to).collect::<Vec<_>>());
        for r in events {
            match r.event {
                Event::ApiKeyIssued(e) => assert_eq!(e.key_id, ids[(r.seq - 1) as usize]),
                other => panic!("{other:?}"),
            }
        }
    }
    assert!(ledger.events_range(501, 600).unwrap().is_empty());
}

#[test]
fn reads_as_of_a_time_answer_what_was_served_then() {
    use commission_ledger::ledger::AsOf;
    let t = TestLedger::new("hosting");
    history(&t, 10); // January closed: alice earned 24.69
    let january = (t.balance("alice"), t.head());
    let mid = Timestamp::from_micros(t.clock.load(std::sync::atomic::Ordering::SeqCst));
    t.set_now("2026-02-10T00:00:00Z");
    t.expense("2026-02-10T00:00:00Z", "l-2", "c-1", "100.00");
    t.close("2026-02");
    assert_eq!(t.balance("alice").earned, "44.69");
    let then = t
        .ledger()
        .balance(&t.program, &aff("alice"), Some(AsOf::Time(mid)))
        .unwrap()
        .unwrap();
    assert_eq!(then, january.0);
    assert_eq!(then.as_of_seq, january.1);
    let by_seq = t
        .ledger()
        .balance(&t.program, &aff("alice"), Some(AsOf::Seq(january.1)))
        .unwrap()
        .unwrap();
    assert_eq!(by_seq, january.0);
    // before the program existed, there is nothing to read
    let before = t
        .ledger()
        .balance(
            &t.program,
            &aff("alice"),
            Some(AsOf::Time(ts("2020-01-01T00:00:00Z"))),
        )
        .unwrap();
    assert_eq!(before, None);
    // statements as of then carry the hash of the log then
    let statement = t
        .ledger()
        .statement(
            &t.program,
            &aff("alice"),
            month("2026-01"),
            Some(AsOf::Seq(january.1)),
        )
        .unwrap()
        .unwrap();
    assert_eq!(statement.as_of_seq, january.1);
    assert_ne!(statement.log_hash, t.statement("alice", "2026-01").log_hash);
}

/// Within one process, a store just closed may still hold sled's lock for a
/// moment (its background flush): a start waits for it, and keeps the
/// checkpoint, instead of deleting the store and replaying the whole log.
#[test]
fn a_start_waits_for_a_store_lock_held_a_moment() {
    let mut t = TestLedger::new("hosting");
    history(&t, 20);
    let head = t.head();
    t.ledger = None; // the shutdown saved a checkpoint at the head
    let held = commission_ledger::store::Store::open(&t.dir.path().join("index")).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(held);
    });
    t.reopen();
    release.join().unwrap();
    assert_eq!(
        t.ledger().store_status(),
        (head, head),
        "the store and its checkpoint were kept"
    );
}

#[test]
fn ids_of_every_length_come_back_the_same_from_a_checkpoint() {
    // Ids and visitors up to 23 bytes are held inline, longer ones
    // shared: both must survive the checkpoint's encoding, alone and
    // repeated.
    let mut t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let alice = t.enroll("alice");
    t.click("2026-01-02T10:00:00Z", &alice.referral_code, "v-1");
    let lengths = [1, 22, 23, 24, 25, 64, 128];
    for len in lengths {
        // Clicked before the checkpoint, signed up after it (below).
        t.click(
            "2026-01-02T11:00:00Z",
            &alice.referral_code,
            &"w".repeat(len),
        );
    }
    for (i, len) in lengths.into_iter().enumerate() {
        let customer = "c".repeat(len);
        t.signup("2026-01-03T10:00:00Z", &customer, Some("v-1"), None);
        let amount = format!("{}.00", 10 + i);
        t.expense("2026-01-04T10:00:00Z", &"l".repeat(len), &customer, &amount);
        t.expense("2026-01-05T10:00:00Z", &format!("x{i}"), &customer, "1.00");
    }
    t.close("2026-01");
    let before = answers(&t);
    for len in lengths {
        let (customer, line) = ("c".repeat(len), "l".repeat(len));
        assert!(
            before.1.contains(&format!("\"{customer}\"")),
            "{len}: customer"
        );
        assert!(before.1.contains(&format!("\"{line}\"")), "{len}: line");
    }
    t.reopen(); // from the checkpoint written at shutdown
    assert_eq!(t.ledger().store_status().1, t.head(), "from the checkpoint");
    assert_eq!(answers(&t), before);
    for len in lengths {
        let visitor = "w".repeat(len);
        let customer = format!("late-{len}");
        let attributed = t.signup("2026-02-01T10:00:00Z", &customer, Some(&visitor), None);
        assert_eq!(attributed.as_deref(), Some("alice"), "{len}: visitor");
    }
    t.verify_ok();
}

/// alice's balance as of a past.
fn alice_as_of(
    t: &TestLedger,
    as_of: commission_ledger::ledger::AsOf,
) -> commission_ledger::projections::Balance {
    t.ledger()
        .balance(&t.program, &aff("alice"), Some(as_of))
        .unwrap()
        .unwrap()
}

/// The last checkpoint of each month is kept (the newest `kept_checkpoints`
/// of them): a read of the past starts from the newest kept at or before
/// it, so a month-end balance replays at most the month after it.
#[test]
fn the_last_checkpoint_of_each_month_is_kept_for_reads_of_the_past() {
    use commission_ledger::ledger::{AsOf, Ledger};
    let reopen_keeping = |t: &mut TestLedger, keep: usize| {
        t.ledger = None;
        let mut config = t.config();
        config.kept_checkpoints = keep;
        t.ledger = Some(Ledger::open(config).unwrap());
    };
    let months = |keep: usize| {
        let mut t = TestLedger::new("hosting");
        let reopen = |t: &mut TestLedger| reopen_keeping(t, keep);
        reopen(&mut t);
        t.define(rules("hosting", serde_json::json!({})));
        t.set_now("2026-01-05T00:00:00Z");
        let alice = t.enroll("alice");
        t.click("2026-01-05T10:00:00Z", &alice.referral_code, "v-1");
        t.signup("2026-01-06T10:00:00Z", "c-1", Some("v-1"), None);
        let mut ends = Vec::new();
        for (at, id) in [
            ("2026-01-10T10:00:00Z", "jan"),
            ("2026-02-10T10:00:00Z", "feb"),
            ("2026-03-10T10:00:00Z", "mar"),
        ] {
            t.expense(at, id, "c-1", "100.00");
            ends.push((t.balance("alice"), t.head()));
            // The shutdown saves a checkpoint of the month.
            reopen(&mut t);
        }
        t.expense("2026-04-02T10:00:00Z", "apr", "c-1", "100.00");
        (t, ends)
    };
    let (t, ends) = months(12);
    let [jan, feb, _] = &ends[..] else {
        panic!("three months")
    };
    // March's is the last checkpoint; January's and February's are kept.
    assert_eq!(t.ledger().kept_checkpoints().unwrap(), vec![jan.1, feb.1]);
    let ledger = t.ledger();
    let folded = || ledger.history_folded();
    assert_eq!(alice_as_of(&t, AsOf::Seq(jan.1)), jan.0);
    assert_eq!(folded(), 0, "January's end is January's checkpoint");
    assert_eq!(alice_as_of(&t, AsOf::Seq(feb.1)), feb.0);
    assert_eq!(folded(), 0);
    assert_eq!(alice_as_of(&t, AsOf::Seq(feb.1 - 1)).earned, jan.0.earned);
    assert_eq!(folded(), feb.1 - 1 - jan.1, "from January's");
    t.verify_ok();
    // A kept checkpoint that is not the log's state at its seq (a damaged
    // store, or one copied beside another log) is not used: with January's
    // state put where February's end was kept, a read of February's end
    // replays from the start and answers right.
    let mut t = t;
    t.ledger = None; // the shutdown saves April's checkpoint and keeps March's
    {
        use commission_ledger::store::Store;
        let store = Store::open(&t.dir.path().join("index")).unwrap();
        let (jan_hash, jan_state) = store
            .load_kept_checkpoint(jan.1, |_, hash, state| (hash, state.to_vec()))
            .unwrap()
            .unwrap();
        let (last, last_hash, last_state) = store
            .load_checkpoint(|seq, hash, state| (seq, hash, state.to_vec()))
            .unwrap()
            .unwrap();
        // Saved as the last of February, then replaced (and so kept) by
        // April's again.
        store
            .save_checkpoint(feb.1, &jan_hash, 202602, &jan_state, 12)
            .unwrap();
        store
            .save_checkpoint(last, &last_hash, 202604, &last_state, 12)
            .unwrap();
    }
    reopen_keeping(&mut t, 12);
    assert!(t.ledger().kept_checkpoints().unwrap().contains(&feb.1));
    assert_eq!(alice_as_of(&t, AsOf::Seq(feb.1)), feb.0);
    assert_eq!(t.ledger().history_folded(), feb.1, "from the start");
    assert_eq!(alice_as_of(&t, AsOf::Seq(jan.1)), jan.0);
    // Keeping one: February's only; January's end replays from the start.
    let (t, ends) = months(1);
    let (jan, feb) = (&ends[0], &ends[1]);
    assert_eq!(t.ledger().kept_checkpoints().unwrap(), vec![feb.1]);
    assert_eq!(alice_as_of(&t, AsOf::Seq(jan.1)), jan.0);
    assert_eq!(t.ledger().history_folded(), jan.1);
}

/// A read of the past at or after the last checkpoint starts from it and
/// folds only the log since; before it, from the start. A time names the
/// last event recorded at or before it, found by a search, not a scan.
#[test]
fn a_read_of_the_past_after_the_checkpoint_starts_from_it() {
    use commission_ledger::ledger::AsOf;
    let mut t = TestLedger::new("hosting");
    history(&t, 10);
    let january = (t.balance("alice"), t.head());
    t.set_now("2026-02-05T00:00:00Z");
    t.expense("2026-02-05T00:00:00Z", "l-2", "c-1", "100.00");
    t.close("2026-02");
    let february = (t.balance("alice"), t.head());
    // The shutdown saves a checkpoint at February's head.
    t.reopen();
    let checkpoint = t.head();
    assert_eq!(checkpoint, february.1);
    t.set_now("2026-03-05T00:00:00Z");
    t.expense("2026-03-05T00:00:00Z", "l-3", "c-1", "10.00");
    let between = Timestamp::from_micros(t.clock.load(std::sync::atomic::Ordering::SeqCst));
    t.close("2026-03");
    let march = (t.balance("alice"), t.head());
    t.set_now("2026-04-05T00:00:00Z");
    t.expense("2026-04-05T00:00:00Z", "l-4", "c-1", "10.00");
    t.close("2026-04");
    let ledger = t.ledger();
    let read = |as_of: AsOf| alice_as_of(&t, as_of);
    // After the checkpoint: only the events since it are folded.
    assert_eq!(read(AsOf::Seq(march.1)), march.0);
    assert_eq!(ledger.history_folded(), march.1 - checkpoint);
    // At it: nothing to fold.
    assert_eq!(read(AsOf::Seq(checkpoint)), february.0);
    assert_eq!(ledger.history_folded(), march.1 - checkpoint);
    // Before it: from the start.
    assert_eq!(read(AsOf::Seq(january.1)), january.0);
    assert_eq!(ledger.history_folded(), march.1 - checkpoint + january.1);
    // A time between two events names the earlier one; before the first,
    // nothing.
    let at_l3 = read(AsOf::Time(between));
    assert_eq!(at_l3.earned, february.0.earned);
    assert_eq!(at_l3.as_of_seq, checkpoint + 1);
    let before_all = AsOf::Time(ts("2000-01-01T00:00:00Z"));
    let nothing = ledger.balance(&t.program, &aff("alice"), Some(before_all));
    assert_eq!(nothing.unwrap(), None, "no program yet");
    t.verify_ok();
}

/// A read of the past replays the log from its start, so reads of the
/// same past share one replay, the last two pasts read are kept, and a
/// past pushed out is replayed again when asked for.
#[test]
fn reads_of_the_same_past_share_one_replay_and_the_last_two_are_kept() {
    use commission_ledger::ledger::AsOf;
    let t = TestLedger::new("hosting");
    history(&t, 10);
    let january = (t.balance("alice"), t.head());
    let mid = Timestamp::from_micros(t.clock.load(std::sync::atomic::Ordering::SeqCst));
    t.set_now("2026-02-10T00:00:00Z");
    t.expense("2026-02-10T00:00:00Z", "l-2", "c-1", "100.00");
    t.close("2026-02");
    let ledger = t.ledger();
    let read = |as_of: AsOf| alice_as_of(&t, as_of);
    assert_eq!(ledger.history_replays(), 0);
    // Eight readers of one past at once: one replay, eight right answers.
    let barrier = std::sync::Barrier::new(8);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    read(AsOf::Seq(january.1))
                })
            })
            .collect();
        for reader in readers {
            assert_eq!(reader.join().unwrap(), january.0);
        }
    });
    assert_eq!(ledger.history_replays(), 1);
    // The same point by time (January's last event's moment): the same
    // past, no replay of its own.
    assert_eq!(read(AsOf::Time(mid)), january.0);
    assert_eq!(ledger.history_replays(), 1);
    // Another past: its own replay; both are kept.
    assert_eq!(read(AsOf::Seq(2)).earned, "0.00");
    assert_eq!(ledger.history_replays(), 2);
    assert_eq!(read(AsOf::Time(mid)), january.0);
    assert_eq!(read(AsOf::Seq(2)).earned, "0.00");
    assert_eq!(ledger.history_replays(), 2);
    // A third pushes out the one read longest ago (January), not seq 2.
    assert_eq!(read(AsOf::Seq(3)).earned, "0.00");
    assert_eq!(ledger.history_replays(), 3);
    assert_eq!(read(AsOf::Seq(2)).earned, "0.00");
    assert_eq!(ledger.history_replays(), 3);
    assert_eq!(read(AsOf::Time(mid)), january.0);
    assert_eq!(ledger.history_replays(), 4);
    // The present is never a replay.
    assert_eq!(read(AsOf::Seq(t.head())), t.balance("alice"));
    assert_eq!(ledger.history_replays(), 4);
}

/// Each replay holds a whole state: they take turns, and beyond
/// HISTORY_WAITING readers waiting for one, a read is refused as busy,
/// not queued without bound.
#[test]
fn reads_of_the_past_beyond_the_waiting_limit_are_refused_as_busy() {
    use commission_ledger::ledger::{AsOf, HISTORY_WAITING, LedgerError};
    let t = TestLedger::new("hosting");
    history(&t, 10);
    let january = (t.balance("alice"), t.head());
    // A log long enough that one replay outlasts the readers' arrival.
    let code = t.enroll("bob").referral_code;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let clicks = (0..20_000)
        .map(|i| {
            commission_ledger::ledger::Submission::new(
                Some(&t.program),
                "test",
                commission_ledger::rules::Command::RecordClick {
                    referral_code: code.clone(),
                    visitor: Some(format!("v-{i}").into()),
                    creative: None,
                    referrer: None,
                    landing: None,
                    client_hash: None,
                },
            )
        })
        .collect();
    assert!(
        runtime
            .block_on(t.ledger().submit_many(clicks))
            .iter()
            .all(Result::is_ok)
    );
    // The readers are released together; a round whose replays all end
    // before they arrive (a loaded machine) proves nothing, so another
    // round reads two new pasts, up to five rounds.
    let readers = HISTORY_WAITING + 16;
    let mut busy = 0;
    let mut rounds = 0u64;
    while busy == 0 && rounds < 5 {
        // Near the head: a replay of the whole log each.
        let head = t.head();
        let pasts = [head - 1 - 2 * rounds, head - 2 - 2 * rounds];
        rounds += 1;
        let barrier = std::sync::Barrier::new(readers);
        let answers: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..readers)
                .map(|i| {
                    let (t, barrier) = (&t, &barrier);
                    scope.spawn(move || {
                        barrier.wait();
                        // Two pasts: the readers of each share its replay.
                        let seq = pasts[i % 2];
                        t.ledger()
                            .balance(&t.program, &aff("alice"), Some(AsOf::Seq(seq)))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        busy = answers
            .iter()
            .filter(|a| matches!(a, Err(LedgerError::Busy)))
            .count();
        assert!(
            busy < readers - HISTORY_WAITING,
            "{busy} refused: the waiting limit is {HISTORY_WAITING}"
        );
        for answer in answers.into_iter().filter_map(Result::ok) {
            let answer = answer.unwrap();
            assert_eq!(answer.earned, january.0.earned);
            assert!(pasts.contains(&answer.as_of_seq));
        }
        assert_eq!(
            t.ledger().history_replays(),
            2 * rounds,
            "one replay per past"
        );
    }
    assert!(busy > 0, "every reader waited, in {rounds} rounds");
    // The refusal says what to do.
    let message = LedgerError::Busy.to_string();
    assert!(message.contains("try again"), "{message}");
}

/// Stored projections that are wrong but read (a checkpoint written by a
/// faulty build, or swapped in from another ledger at the same seq and
/// hash): the restart serves them, and `verify` must say so, even while
/// events keep coming, which moves the head during its replay.
#[test]
fn verify_finds_wrong_stored_projections_while_events_keep_coming() {
    let story = |amount: &str| {
        let mut t = TestLedger::new("hosting");
        t.define(rules("hosting", serde_json::json!({})));
        t.enroll("alice");
        t.signup("2026-01-03T10:00:00Z", "c-1", None, Some("HOST-alice"));
        t.expense("2026-01-04T10:00:00Z", "l-1", "c-1", amount);
        t.close("2026-01");
        let money = t.money("alice");
        t.ledger = None; // the shutdown saves a checkpoint at the head
        (t, money)
    };
    let (mut t, right) = story("100.00");
    let (other, wrong) = story("200.00");
    assert_eq!((right.0.as_str(), wrong.0.as_str()), ("20.00", "40.00"));
    let read = |t: &TestLedger| {
        let store = Store::open(&t.dir.path().join("index")).unwrap();
        store
            .load_checkpoint(|seq, hash, bytes| (seq, hash, bytes.to_vec()))
            .unwrap()
            .unwrap()
    };
    let (seq, hash, _) = read(&t);
    let (other_seq, _, other_state) = read(&other);
    assert_eq!(seq, other_seq, "the same number of events");
    Store::open(&t.dir.path().join("index"))
        .unwrap()
        .save_checkpoint(seq, &hash, 202601, &other_state, 0)
        .unwrap();
    t.reopen();
    assert_eq!(
        t.money("alice"),
        wrong,
        "the restart serves the swapped state"
    );
    // A fresh replay of the log alone finds nothing wrong.
    assert!(verify_log(&t.dir.path().join("log"), None).ok);

    let code = t.referral_code("alice");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|scope| {
        let clicker = scope.spawn(|| {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                t.click("2026-02-02T10:00:00Z", &code, &format!("v-{n}"));
                n += 1;
            }
            n
        });
        while t.head() < seq + 20 && !clicker.is_finished() {
            std::thread::yield_now();
        }
        let report = t.ledger().verify().unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(clicker.join().unwrap() >= 20);
        report
    });
    assert!(!report.ok, "verify passed wrong projections: {report:?}");
    let problem = report.problem.clone().unwrap_or_default();
    assert!(
        problem.contains("differ from a fresh replay") && problem.contains("affiliate alice"),
        "{problem}"
    );
    // (At least the clicks seen before it began: one may not land while
    // a short replay runs.)
    assert!(
        report.head_seq >= seq + 20,
        "compared at the head, after the clicks: {report:?}"
    );
    assert_eq!(report.events, report.head_seq);
    assert_eq!(report.bad_seq, None);
    assert_eq!(report.projections, ProjectionsCheck::Differ);

    // Stopped, the ledger saves its (wrong) state as the checkpoint at the
    // head; the command line compares what the next start would load.
    t.ledger = None;
    let (code, report) = cli_verify(t.dir.path());
    assert_eq!(code, Some(1), "{report}");
    assert_eq!(report["projections"], "differ");
    let problem = report["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("the stored projections (the checkpoint at seq")
            && problem.contains("affiliate alice"),
        "{problem}"
    );
}

/// `commission-ledger verify --data DIR`: its exit code and JSON report.
fn cli_verify(data: &std::path::Path) -> (Option<i32>, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_commission-ledger"))
        .args(["verify", "--data"])
        .arg(data)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.code(), report)
}

/// The command line compares the projections a start would load (the
/// stored checkpoint and the log after it) when it can: not those of a
/// running server, which `GET /v1/verify` compares, and none where no
/// store is.
#[test]
fn verify_on_the_command_line_compares_the_stored_projections_when_it_can() {
    let mut t = TestLedger::new("hosting");
    history(&t, 50);
    t.reopen(); // a checkpoint at the head
    let checkpointed = t.head();
    t.expense("2026-01-05T10:00:00Z", "l-2", "c-1", "10.00"); // after it

    // A record the server is writing, half there, after the last one.
    let log_dir = t.dir.path().join("log");
    let scanned = commission_ledger::log::scan(&log_dir, ScanMode::Read, None, |_| Ok(())).unwrap();
    let (_, segment) = scanned.segments.last().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .unwrap();
    let half = [100u8, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9];
    std::os::unix::fs::FileExt::write_at(&file, &half, scanned.end).unwrap();
    let (code, held) = cli_verify(t.dir.path());
    assert_eq!(code, Some(0), "{held}");
    assert_eq!(held["events"], t.head(), "{held}");
    assert_eq!(held["projections"], "not_compared");
    let detail = held["projections_detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("a server holds the data directory"),
        "{detail}"
    );

    // With no server, it is a torn tail, which the next start cuts off.
    t.ledger = None;
    let (code, torn) = cli_verify(t.dir.path());
    assert_eq!(code, Some(1), "{torn}");
    let problem = torn["problem"].as_str().unwrap_or_default();
    assert!(
        problem.contains("torn record at the end of the log"),
        "{problem}"
    );
    t.reopen();
    t.ledger = None;
    std::fs::remove_dir_all(t.dir.path().join("index")).unwrap();
    let (code, none) = cli_verify(t.dir.path());
    assert_eq!(
        (code, &none["projections"]),
        (Some(0), &"not_compared".into())
    );
    let detail = none["projections_detail"].as_str().unwrap_or_default();
    assert!(detail.contains("no stored projections"), "{detail}");

    // Started again: a replay, and at shutdown a checkpoint at the head.
    t.reopen();
    let head = t.head();
    assert!(head > checkpointed);
    t.ledger = None;
    let (code, equal) = cli_verify(t.dir.path());
    assert_eq!(code, Some(0), "{equal}");
    assert_eq!(equal["projections"], "equal");
    assert_eq!(equal["events"], head);
    let detail = equal["projections_detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("the checkpoint at seq {head}")),
        "{detail}"
    );
}
