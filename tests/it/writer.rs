//! The writer pipeline: batch N + 1 is decided while batch N is synced.
//! Readers, blocking or async, must still see only what is on disk;
//! acknowledgements must come
//! in log order, and segment rolls in the middle of the pipeline must leave
//! a log that verifies and reopens to the same answers.

use std::sync::atomic::{AtomicBool, Ordering};

use commission_ledger::ledger::{Submission, verify_log};
use commission_ledger::rules::Command;

use crate::support::*;

/// A click through `code` by `visitor`.
fn click(code: &str, visitor: String) -> Command {
    Command::RecordClick {
        referral_code: code.to_string(),
        visitor: Some(visitor.into()),
        creative: None,
        referrer: None,
        landing: None,
        client_hash: None,
    }
}

/// `n` clicks through `code`, one visitor each (named by `round`),
/// submitted at once; every one accepted.
fn click_burst(t: &TestLedger, code: &str, round: usize, n: usize) {
    let clicks = (0..n)
        .map(|i| {
            let command = click(code, format!("v-{round}-{i}"));
            Submission::new(Some(&t.program), "test", command)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let answers = runtime.block_on(t.ledger().submit_many(clicks));
    assert!(answers.iter().all(Result::is_ok));
}

/// A ledger for program `hosting` whose segments roll over at `bytes`.
fn with_segments_of(bytes: u64) -> TestLedger {
    let mut t = TestLedger::new("hosting");
    let mut config = t.config();
    config.segment_bytes = bytes;
    t.ledger = None;
    t.ledger = Some(commission_ledger::ledger::Ledger::open(config).unwrap());
    t
}

#[test]
fn readers_see_only_durable_events_while_the_pipeline_runs() {
    // Small segments: the writer rolls to a new one every few batches.
    let mut t = with_segments_of(8 << 10);
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let done = AtomicBool::new(false);
    let reads_so_far = std::sync::atomic::AtomicU64::new(0);
    let (acked, reads) = std::thread::scope(|scope| {
        let submitters: Vec<_> = (0..24)
            .map(|who| {
                let (t, reads_so_far) = (&t, &reads_so_far);
                let code = code.clone();
                scope.spawn(move || {
                    let mut seqs = Vec::new();
                    // 60 clicks each, and on until the reader has run 10
                    // times (a bound on a machine that starves it).
                    let mut n = 0;
                    while n < 60 || (reads_so_far.load(Ordering::Relaxed) <= 10 && n < 6_000) {
                        n += 1;
                        let command = click(&code, format!("v-{who}-{n}"));
                        let receipt = t
                            .ledger()
                            .submit_blocking(Submission::new(Some(&t.program), "test", command))
                            .unwrap();
                        seqs.push(receipt.events[0].seq);
                    }
                    seqs
                })
            })
            .collect();
        let reader = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // Whatever a reader is shown is already in the log.
            let in_the_log = |head: u64, how: &str| {
                let events = t.ledger().events_range(head, head).unwrap();
                assert_eq!(
                    events.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    vec![head],
                    "{how}: a reader saw seq {head} before it was durable"
                );
            };
            let mut reads = 0;
            while !done.load(Ordering::Acquire) {
                // A blocking reader waits in `state()`.
                in_the_log(t.ledger().state().head.seq, "state()");
                // An async reader (the API's) reads at once and awaits the disk.
                let (head, settle) = t.ledger().deferring_settle(|| t.ledger().state().head.seq);
                assert!(settle >= head);
                runtime.block_on(t.ledger().settled(settle));
                in_the_log(head, "deferring_settle + settled");
                // A blocking read of the present (the CLI's, a what-if's)
                // waits too, with the lock released.
                let head = t.ledger().read(None, |state| state.head.seq).unwrap();
                in_the_log(head, "read");
                reads += 1;
                reads_so_far.store(reads, Ordering::Relaxed);
            }
            reads
        });
        let acked: Vec<Vec<u64>> = submitters.into_iter().map(|s| s.join().unwrap()).collect();
        done.store(true, Ordering::Release);
        (acked, reader.join().unwrap())
    });
    assert!(reads > 10, "the reader ran {reads} times");
    for seqs in &acked {
        // One submitter's events were acknowledged in log order.
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
    let mut all: Vec<u64> = acked.concat();
    all.sort();
    let head = t.head();
    // 60 each at least, more when the reader was slow to run 10 times.
    assert!(acked.iter().all(|seqs| seqs.len() >= 60));
    let acked_count = all.len() as u64;
    assert_eq!(all, (head - acked_count + 1..=head).collect::<Vec<_>>());
    assert!(
        commission_ledger::log::list_segments(&t.dir.path().join("log"))
            .unwrap()
            .len()
            > 5
    );
    let monthly_stats = |t: &TestLedger| {
        let stats = t.stats(
            "alice",
            "2024-01-01",
            "2026-12-31",
            commission_ledger::projections::StatsBy::Month,
        );
        serde_json::to_string(&stats).unwrap()
    };
    let before = monthly_stats(&t);
    t.verify_ok();
    t.reopen();
    assert_eq!(monthly_stats(&t), before);
    assert!(
        before.contains(&format!("\"clicks\":{acked_count}")),
        "{before}"
    );
    assert_eq!(t.head(), head);
}

/// A checkpoint costs in proportion to the state, so it is built beside the
/// writer (from the last one and the log): the writer goes on answering
/// commands while one is built, and the build ends saved. (How long
/// commands wait meanwhile is measured by `ledger-load writer`, not
/// asserted here.)
#[test]
fn the_writer_goes_on_answering_while_a_checkpoint_is_built_beside_it() {
    let mut t = TestLedger::new("hosting");
    {
        let mut config = t.config();
        // Due, and forced, whenever the tail is half the log.
        config.checkpoint_every = 1;
        config.checkpoint_forced_after = 1;
        t.ledger = None;
        t.ledger = Some(commission_ledger::ledger::Ledger::open(config).unwrap());
    }
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let clicked =
        |visitor: String| Submission::new(Some(&t.program), "test", click(&code, visitor));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stats = t.ledger().writer_stats();
    // A state of some megabytes, built up until a checkpoint of it is
    // under way; then one command at a time, each answered while the same
    // build is still running (none saved in between).
    let mut answered_while_building = 0;
    for round in 0..200 {
        if !stats.checkpoint_building.load(Ordering::Acquire) {
            let answers = runtime.block_on(
                t.ledger().submit_many(
                    (0..5_000)
                        .map(|i| clicked(format!("v-{round}-{i}")))
                        .collect(),
                ),
            );
            assert!(answers.iter().all(Result::is_ok));
            continue;
        }
        let saved = stats.checkpoints.load(Ordering::Acquire);
        t.ledger()
            .submit_blocking(clicked(format!("one-{round}")))
            .unwrap();
        if stats.checkpoint_building.load(Ordering::Acquire)
            && stats.checkpoints.load(Ordering::Acquire) == saved
        {
            answered_while_building += 1;
            if answered_while_building == 3 {
                break;
            }
        }
    }
    assert_eq!(
        answered_while_building, 3,
        "commands waited for the checkpoint being built"
    );
    // The build ends and is saved.
    let waited = std::time::Instant::now();
    while stats.checkpoint_building.load(Ordering::Acquire)
        && waited.elapsed() < std::time::Duration::from_secs(120)
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (_, checkpointed) = t.ledger().store_status();
    assert!(checkpointed > 0, "no checkpoint was saved");
    assert!(
        checkpointed < t.head(),
        "the commands after it are not in it"
    );
    // (A start from one built beside the writer is the crash test's: its
    // child is killed before it can save one at shutdown.) The shutdown
    // saves one at the head, and a start from it agrees with the log.
    let head = t.head();
    t.reopen();
    assert_eq!(t.ledger().store_status().1, head);
    assert!(t.ledger().verify().unwrap().ok);
}

/// Group commit for callers who wait for their answer before sending again
/// (the HTTP API's), in one group: when fewer than half of the active
/// submitters have a command decided, the syncer waits for the others, and
/// stops waiting as soon as every active one is in, not at the end of the
/// linger. Groups that fell apart (the submitters start one by one) join
/// again.
#[test]
fn closed_loop_submitters_share_each_fdatasync_and_the_linger_ends_when_all_are_in() {
    // Each round's 24 commands share a sync, but for the first rounds and
    // rounds that split under load (measured: 30-35 syncs alone, 43 in the
    // full suite on 2 cores; syncing without lingering: 63-75). A round splits
    // when its submitters' threads are not scheduled in time (the syncer
    // waits only while fewer than half are in): seen once in 14 runs of the
    // suite beside two busy loops (66 syncs). So up to three attempts, and
    // one that shares as designed passes; a linger that does not gather the
    // group (63-75 syncs) or does not end once all are in (6 s) fails all three.
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let (t, syncs, decided, elapsed) = closed_loop_rounds();
        assert!(
            !t.ledger()
                .writer_stats()
                .group_commit_halves
                .load(Ordering::Relaxed)
        );
        // Had each sync waited out the linger, this would take 6 s.
        let ended = elapsed < CLOSED_LOOP_LINGER * CLOSED_LOOP_ROUNDS as u32 / 2;
        if decided >= 12 * syncs && ended {
            return;
        }
        attempts.push(format!("{decided} commands in {syncs} syncs, {elapsed:?}"));
    }
    panic!(
        "submitters did not share their syncs, or the linger did not end once all were in: {attempts:?}"
    );
}

/// Under steady load from callers who wait for their answers, the syncer
/// tries the other mode now and then (one group, or two alternating halves
/// when a group takes longer to come back than a sync: so in this debug
/// build) and keeps the one that syncs more; whichever runs, the callers
/// still share their syncs and every command is answered once.
#[test]
fn under_steady_load_the_syncer_tries_halves_and_callers_still_share_syncs() {
    let t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    // The first try comes after 3 windows of 100 ms under load (at least
    // 1,000 commands each); a bound on the count in case the machine is
    // very fast. 64 callers: in this debug build a group of them takes
    // about 1 ms to come back (measured alone: 61k clicks/s), more than a
    // third over a sync even on this VM's slowest disk hours (an 8 KiB
    // fdatasync up to 470 µs).
    // On a machine slower still, the callers go on until a window has
    // tried, for 20 s at most.
    let started = std::time::Instant::now();
    let tried = || {
        t.ledger()
            .writer_stats()
            .group_commit_tries
            .load(Ordering::Relaxed)
            >= 1
    };
    let (syncs, decided, _) = clicks_in_closed_loop(&t, &code, 64, |n| {
        let elapsed = started.elapsed().as_millis();
        n < 10_000 && (elapsed < 2_000 || (!tried() && elapsed < 20_000))
    });
    assert!(
        tried(),
        "no window tried the other mode in {decided} commands"
    );
    // 64 a sync in one group, 32 in halves.
    assert!(
        decided >= 8 * syncs,
        "{decided} commands in {syncs} syncs: submitters did not share them"
    );
}

const CLOSED_LOOP_LINGER: std::time::Duration = std::time::Duration::from_millis(200);
const CLOSED_LOOP_ROUNDS: u64 = 30;

/// 24 submitters who each send 30 clicks, one at a time, on a ledger with
/// a long linger, in one group: the syncs and commands they took, and the
/// time.
fn closed_loop_rounds() -> (TestLedger, u64, u64, std::time::Duration) {
    let mut t = TestLedger::new("hosting");
    {
        let mut config = t.config();
        config.group_commit_linger = CLOSED_LOOP_LINGER;
        config.group_commit_halves = false;
        t.ledger = None;
        t.ledger = Some(commission_ledger::ledger::Ledger::open(config).unwrap());
    }
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let (syncs, decided, elapsed) =
        clicks_in_closed_loop(&t, &code, 24, |n| n < CLOSED_LOOP_ROUNDS);
    assert_eq!(decided, 24 * CLOSED_LOOP_ROUNDS);
    (t, syncs, decided, elapsed)
}

/// `submitters` threads that each send clicks one at a time, the `n`th
/// while `more(n)`: the syncs and commands they took (every click
/// answered once), and the time.
fn clicks_in_closed_loop(
    t: &TestLedger,
    code: &str,
    submitters: u64,
    more: impl Fn(u64) -> bool + Sync,
) -> (u64, u64, std::time::Duration) {
    let stats = t.ledger().writer_stats();
    let (batches, commands) = (
        stats.batches.load(Ordering::Relaxed),
        stats.commands.load(Ordering::Relaxed),
    );
    let sent = std::sync::atomic::AtomicU64::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for who in 0..submitters {
            let (sent, more) = (&sent, &more);
            scope.spawn(move || {
                let mut n = 0;
                while more(n) {
                    let command = click(code, format!("v-{who}-{n}"));
                    t.ledger()
                        .submit_blocking(Submission::new(Some(&t.program), "test", command))
                        .unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            });
        }
    });
    let elapsed = started.elapsed();
    let syncs = stats.batches.load(Ordering::Relaxed) - batches;
    let decided = stats.commands.load(Ordering::Relaxed) - commands;
    assert_eq!(decided, sent.load(Ordering::Relaxed));
    (syncs, decided, elapsed)
}

/// A checkpoint that is due is built in a lull, by the checkpoint builder,
/// not when the next command after it comes: a ledger that falls idle
/// right after a burst gets one at its head without another command (so
/// a crash in the lull replays nothing).
#[test]
fn a_ledger_that_falls_idle_checkpoints_its_head_without_another_command() {
    let mut t = TestLedger::new("hosting");
    {
        let mut config = t.config();
        config.checkpoint_every = 1_000;
        config.checkpoint_forced_after = u64::MAX;
        t.ledger = None;
        t.ledger = Some(commission_ledger::ledger::Ledger::open(config).unwrap());
    }
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    // Two bursts back to back: the first makes a checkpoint due, the
    // second makes another due as the ledger falls idle.
    for round in 0..2 {
        click_burst(&t, &code, round, 1_000);
    }
    let head = t.head();
    let waited = std::time::Instant::now();
    while t.ledger().store_status().1 < head
        && waited.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        t.ledger().store_status().1,
        head,
        "no checkpoint of the head while the ledger was idle"
    );
    assert_eq!(t.head(), head, "the test appended nothing meanwhile");
    assert!(t.ledger().verify().unwrap().ok);
}

/// Event and click ids (and withdrawal ids, made alike) are UUID v7 stamped with the millisecond
/// the ledger recorded them at (its clock, here the test's), and sort in
/// log order, within a millisecond's thousands of ids as across
/// milliseconds and restarts.
#[test]
fn ids_are_v7_of_the_recorded_millisecond_and_sort_in_log_order() {
    let mut t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let burst = |t: &TestLedger, round: usize| click_burst(t, &code, round, 2_000);
    // The test's clock stands still: every id of a burst shares a
    // millisecond, and so do those of the bursts before and after a
    // restart, whose ids count on from the log's last.
    burst(&t, 0);
    t.set_now("2026-09-01T10:00:00.001Z");
    burst(&t, 1);
    t.reopen();
    burst(&t, 2);
    t.set_now("2026-09-01T10:00:00.002Z");
    burst(&t, 3);
    let events = t.ledger().events_range(1, t.head()).unwrap();
    let mut ids = Vec::new();
    for r in &events {
        assert_eq!(r.id.get_version_num(), 7, "seq {}", r.seq);
        let (secs, nanos) = r.id.get_timestamp().unwrap().to_unix();
        let millis = secs as i64 * 1_000 + i64::from(nanos) / 1_000_000;
        assert_eq!(millis, r.recorded_at.micros() / 1_000, "seq {}", r.seq);
        if let commission_ledger::events::Event::ClickRecorded(c) = &r.event {
            assert_eq!(c.click_id.get_version_num(), 7);
            ids.push(c.click_id);
        }
        ids.push(r.id);
    }
    assert!(ids.len() > 16_000);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids out of the order they were made in"
    );
}

#[test]
fn events_appended_are_counted_by_type_however_many_a_batch_holds() {
    // A burst is decided many to a batch: each type is tallied per batch
    // and merged into the shared counts (`/metrics`) once.
    let t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    click_burst(&t, &code, 0, 3_000);
    let stats = t.ledger().writer_stats();
    // Most of the burst waited for the batches before its own.
    assert!(stats.queue_wait_us.load(Ordering::Relaxed) > 0);
    let by_type = stats.events_by_type.lock().unwrap().clone();
    assert_eq!(by_type.get("ClickRecorded"), Some(&3_000));
    assert_eq!(by_type.get("ProgramDefined"), Some(&1));
    assert_eq!(by_type.get("AffiliateEnrolled"), Some(&1));
    assert_eq!(by_type.values().sum::<u64>(), t.head());
    let batches = stats.batches.load(Ordering::Relaxed);
    assert!(
        batches < 1_000,
        "the burst shared batches ({batches} for {} events)",
        t.head()
    );
}

/// With room for one group commit's index rows (`index_backlog` 1), the
/// syncer waits for sled after every group commit that appended: every
/// command is still answered, sled catches up to the head, and the keys it
/// holds answer retries after a restart, with nothing appended twice.
#[test]
fn a_syncer_held_to_the_indexer_after_every_group_commit_loses_nothing() {
    let mut t = TestLedger::new("hosting");
    {
        let mut config = t.config();
        config.index_backlog = 1;
        t.ledger = None;
        t.ledger = Some(commission_ledger::ledger::Ledger::open(config).unwrap());
    }
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let program = t.program.clone();
    let keyed = |who: u64, n: u64| {
        Submission::new(Some(&program), "test", click(&code, format!("v-{who}-{n}")))
            .idempotency_key(&format!("click-{who}-{n}"))
    };
    let stats = t.ledger().writer_stats();
    // The syncer hands a group commit to the indexer after it answers:
    // its wait is counted a moment after the answer.
    let settled = |what: &dyn Fn() -> bool| {
        let waited = std::time::Instant::now();
        while !what() && waited.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    let batches = stats.batches.load(Ordering::Relaxed);
    settled(&|| stats.index_waits.load(Ordering::Relaxed) == batches);
    let waits = stats.index_waits.load(Ordering::Relaxed);
    assert_eq!(waits, batches, "the program and the enrolment waited too");
    std::thread::scope(|scope| {
        for who in 0..16 {
            let (t, keyed) = (&t, &keyed);
            scope.spawn(move || {
                for n in 0..40 {
                    let receipt = t.ledger().submit_blocking(keyed(who, n)).unwrap();
                    assert!(!receipt.replayed);
                }
            });
        }
    });
    let syncs = stats.batches.load(Ordering::Relaxed) - batches;
    settled(&|| stats.index_waits.load(Ordering::Relaxed) - waits == syncs);
    let waits = stats.index_waits.load(Ordering::Relaxed) - waits;
    assert_eq!(waits, syncs, "one wait for the indexer per group commit");
    let head = t.head();
    assert_eq!(head, 2 + 16 * 40);
    settled(&|| t.ledger().store_status().0 == head);
    assert_eq!(t.ledger().store_status().0, head, "sled caught up");
    t.reopen();
    for (who, n) in [(0, 0), (7, 21), (15, 39)] {
        let receipt = t.ledger().submit_blocking(keyed(who, n)).unwrap();
        assert!(receipt.replayed, "click-{who}-{n} answered again");
    }
    assert_eq!(t.head(), head, "a retry appended nothing");
    assert!(t.ledger().verify().unwrap().ok);
}

/// A month close that comes with other commands in one take of the queue
/// is decided in a batch of its own (readers go on reading while it is
/// computed): the commands around it keep their log order, the close
/// rewards the line before it, and the line after it waits for the next
/// close, rewarded late.
#[test]
fn a_close_among_other_commands_keeps_their_log_order() {
    use commission_ledger::events::Event;
    use commission_ledger::events::LineKind;
    let t = TestLedger::new_at("hosting", "2026-08-01T09:00:00Z");
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    t.click("2026-08-02T10:00:00Z", &code, "v-1");
    t.signup("2026-08-02T10:05:00Z", "cust-1", Some("v-1"), None);
    t.set_now("2026-09-01T02:00:00Z");
    let line = |id: &str| {
        Submission::new(
            Some(&t.program),
            "test",
            Command::RecordBasisLine {
                kind: LineKind::Expense,
                id: line(id),
                customer_id: cust("cust-1"),
                amount: "100.00".into(),
                currency: "USD".into(),
                product: None,
                order_id: None,
            },
        )
        .at(ts("2026-08-20T12:00:00Z"))
    };
    let close = Submission::new(
        Some(&t.program),
        "test",
        Command::CloseMonth {
            month: month("2026-08"),
        },
    );
    let head = t.head();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let answers = runtime.block_on(t.ledger().submit_many(vec![
        line("before"),
        close,
        line("after"),
        Submission::new(Some(&t.program), "test", click(&code, "v-2".into())),
    ]));
    let seqs: Vec<Vec<u64>> = answers
        .into_iter()
        .map(|a| a.unwrap().events.iter().map(|r| r.seq).collect())
        .collect();
    // before, the close (its reward and MonthClosed), after, the click
    assert_eq!(
        seqs,
        vec![
            vec![head + 1],
            vec![head + 2, head + 3],
            vec![head + 4],
            vec![head + 5]
        ]
    );
    let closed = t.ledger().events_range(head + 2, head + 3).unwrap();
    match (&closed[0].event, &closed[1].event) {
        (Event::RewardAccrued(reward), Event::MonthClosed(_)) => {
            assert_eq!(reward.amount.to_string(), "20.00");
            assert_eq!(reward.line.as_str(), "before");
        }
        other => panic!("not the close of `before`: {other:?}"),
    }
    t.set_now("2026-10-01T02:00:00Z");
    let head = t.head();
    t.close("2026-09");
    let late: Vec<_> = t
        .ledger()
        .events_range(head + 1, t.head())
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.event {
            Event::RewardAccrued(e) => Some((e.amount.to_string(), e.late)),
            _ => None,
        })
        .collect();
    assert_eq!(late, vec![("20.00".to_string(), true)], "`after`, late");
    assert!(t.ledger().verify().unwrap().ok);
}

fn segments_in(log: &std::path::Path) -> usize {
    std::fs::read_dir(log)
        .unwrap()
        .filter(|entry| {
            let name = entry.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".seg")
        })
        .count()
}

/// `backup` copies the log while a running writer appends to it ("safe
/// while the server runs"): however the copy and the appends interleave,
/// each copy must be a whole prefix of the log that verifies, with the
/// log's own hash at its head.
#[test]
fn a_backup_taken_while_the_writer_appends_is_a_prefix_that_verifies() {
    // Small segments: the copies meet rolls too.
    let t = with_segments_of(64 << 10);
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    let backups = tempfile::tempdir().unwrap();
    let done = AtomicBool::new(false);
    let heads = std::thread::scope(|scope| {
        for who in 0..8 {
            let (t, code, done) = (&t, code.clone(), &done);
            scope.spawn(move || {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    let command = click(&code, format!("v-{who}-{n}"));
                    let submission = Submission::new(Some(&t.program), "test", command);
                    t.ledger().submit_blocking(submission).unwrap();
                    n += 1;
                }
            });
        }
        // Copies go on until the writer has rolled into a third segment
        // (on a slow machine 30 copies can take less time than one
        // segment's appends), bounded by a minute.
        let started = std::time::Instant::now();
        let mut heads = Vec::new();
        for round in 0.. {
            let target = backups.path().join(format!("b{round}"));
            let head = commission_ledger::ledger::backup(t.dir.path(), &target)
                .unwrap_or_else(|e| panic!("backup {round}: {e}"));
            heads.push((target, head));
            let segments = segments_in(&t.dir.path().join("log"));
            if (round >= 30 && segments >= 3) || started.elapsed().as_secs() >= 60 {
                break;
            }
        }
        done.store(true, Ordering::Relaxed);
        heads
    });
    let log = t.dir.path().join("log");
    let segments = segments_in(&log);
    assert!(segments >= 3, "the copies met rolls: {segments} segments");
    let mut distinct: Vec<u64> = heads.iter().map(|(_, head)| head.seq).collect();
    distinct.dedup();
    assert!(
        distinct.len() >= 10,
        "the writer appended throughout the copies: {} heads",
        distinct.len()
    );
    let mut last = 0;
    for (target, head) in heads {
        let copy = verify_log(&target.join("log"), None);
        assert!(copy.ok, "{}: {:?}", target.display(), copy.problem);
        assert_eq!(copy.head_seq, head.seq);
        let source = verify_log(&log, Some(head.seq));
        assert_eq!(copy.head_hash, source.head_hash, "{}", target.display());
        assert!(head.seq >= last, "later backups reach at least as far");
        last = head.seq;
    }
}

/// The same meeting, made on purpose: the last segment holds zeros where
/// a record starts, with whole records after them, until the writer
/// fills them 5 ms after `backup` begins. `backup` reads the record again
/// (as every reader beside the writer does) and copies the whole log.
#[test]
fn a_backup_reads_again_a_record_a_write_in_progress_left_unfinished() {
    let mut t = TestLedger::new("hosting");
    t.define(rules("hosting", serde_json::json!({})));
    let code = t.enroll("alice").referral_code;
    click_burst(&t, &code, 0, 20);
    t.ledger = None;
    let log = t.dir.path().join("log");
    let segment = std::fs::read_dir(&log)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let whole = std::fs::read(&segment).unwrap();
    // The 20th record of the log, with records after it: past the magic
    // and 19 frames.
    assert!(verify_log(&log, None).head_seq > 20);
    let mut at = 8;
    for _ in 1..20 {
        at += 8 + u32::from_le_bytes(whole[at..at + 4].try_into().unwrap()) as usize;
    }
    let mut holed = whole.clone();
    holed[at..at + 16].fill(0);
    std::fs::write(&segment, &holed).unwrap();
    let backups = tempfile::tempdir().unwrap();
    let target = backups.path().join("b");
    let head = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&segment)
                .unwrap();
            file.write_all_at(&whole[at..at + 16], at as u64).unwrap();
        });
        commission_ledger::ledger::backup(t.dir.path(), &target)
    })
    .unwrap();
    let (source, copy) = (
        verify_log(&log, None),
        verify_log(&target.join("log"), None),
    );
    assert!(copy.ok, "{:?}", copy.problem);
    assert_eq!(
        (copy.head_seq, &copy.head_hash),
        (head.seq, &source.head_hash)
    );
}
