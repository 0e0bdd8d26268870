//! `ledger-load`: drives a ledger from many threads, for the crash test and
//! the benchmarks. Bounded in count and time; writes only to the data
//! directory it is given; no network.
//!
//! - `ledger-load crash DIR SUBMITTERS SECONDS [CHECKPOINT_EVERY]`: appends
//!   mixed events from SUBMITTERS threads for at most SECONDS, printing
//!   `ack SEQ EVENT_ID` for every acknowledged event; the crash test kills it
//!   with SIGKILL (with checkpoints every few hundred events, so restarts
//!   start from checkpoints taken mid-run).
//! - `ledger-load bench DIR [EVENTS]`: durable appends/s through the writer
//!   with 1, 16 and 64 submitters beside a bare write+fdatasync loop of the
//!   same record bytes and a bare group commit behind the same submitters,
//!   then replay events/s and RSS on EVENTS (default 1M) mixed events (80%
//!   clicks).
//! - `ledger-load decide DIR [EVENTS]`: the writer's time per command
//!   deciding EVENTS (default 1M) mixed commands sent in batches of 4,096:
//!   its CPU cost away from the disk and the submitters.
//! - `ledger-load bare-group DIR [SUBMITTERS] [SECONDS]`: the bare group
//!   commit alone: closed-loop submitters, one thread that writes what is
//!   waiting with one `fdatasync` and answers, no ledger.
//! - `ledger-load writer DIR [SUBMITTERS] [SECONDS] [CHECKPOINT_EVERY] [LINGER_US] [PREALLOCATE_KIB] [HALVES]`:
//!   durable appends/s alone (optionally with another checkpoint interval,
//!   group-commit linger, preallocation step, or with HALVES 0 one group
//!   always).
//! - `ledger-load lull DIR [EVENTS] [ROUNDS]`: how long the first commands
//!   after a lull wait, the checkpoint builder having begun a checkpoint in
//!   the lull, on a state of EVENTS (default 300k) mixed events.
//! - `ledger-load replay DIR` / `replay-full DIR`: opens DIR from its
//!   checkpoint / after deleting its index store, reporting events/s and RSS.
//! - `ledger-load what-if DIR`: a what-if replay of DIR's whole log with one
//!   attribution override (the bench's log: program `load`).
//! - `ledger-load as-of DIR [READERS]`: a balance now (twice), as of a past
//!   seq and time, and READERS pasts at once.
//! - `ledger-load customers DIR [CUSTOMERS]`: a program of 1,000 affiliates
//!   and CUSTOMERS (default 200k) customers with a line each (made once),
//!   then how long one affiliate's balance takes when its pending estimate
//!   must be computed: a wide program, where a small affiliate's balance
//!   should not cost a read of every customer.
//! - `ledger-load close DIR [CUSTOMERS]`: a program with a tier and a
//!   bounty, 1,000 affiliates and CUSTOMERS (default 100k) customers with
//!   two lines each in October 2026 (a fresh DIR; the ledger's clock is
//!   held at 5 November 2026), then one affiliate's first pending estimate (and
//!   after a new line of its own), the close computed, and the close
//!   submitted and made durable.
//! - `ledger-load portal DIR [SECONDS] [READ]`: on the bench's log (`bench DIR`
//!   first), 16 submitters append mixed events for SECONDS, once alone and
//!   once while a portal reads `aff-0`'s READ in a loop (`balance`, the
//!   default: a read after a new line of one of its customers may compute
//!   its pending estimate again; `blocking`, the same read waiting on its
//!   thread for the disk, as the command line and what-if do; `past`, as
//!   of seq 500,000; `referrals`, `stats` by day or `statement`): what a
//!   busy affiliate's portal costs the writers.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use commission_ledger::events::*;
use commission_ledger::ledger::{AsOf, Ledger, LedgerConfig, Submission};
use commission_ledger::rules::Command;

fn program() -> ProgramId {
    ProgramId::parse("load").unwrap_or_else(|e| fail(&e.to_string()))
}

fn fail(message: &str) -> ! {
    eprintln!("ledger-load: {message}");
    std::process::exit(2)
}

fn rules() -> ProgramRules {
    serde_json::from_value(serde_json::json!({
        "id": "load", "name": "Load", "currency": "USD", "timezone": "UTC",
        "site_url": "https://provider.example/", "default_rate": "20",
        "payout_threshold": "50.00", "promo_code_template": "LOAD-@ID@"
    }))
    .unwrap_or_else(|e| fail(&e.to_string()))
}

/// Defines the program and enrolls `aff-0..aff-9` unless already there;
/// returns their referral codes.
fn setup(ledger: &Ledger) -> Vec<String> {
    let p = program();
    let exists = ledger.state().model.program(&p).is_some();
    if !exists {
        submit(
            ledger,
            Command::DefineProgram {
                rules: Box::new(rules()),
                reason: None,
            },
        );
        for i in 0..10 {
            submit(
                ledger,
                Command::EnrollAffiliate {
                    affiliate_id: AffiliateId::parse(&format!("aff-{i}"))
                        .unwrap_or_else(|e| fail(&e.to_string())),
                    customer_id: None,
                    group: None,
                    rate: None,
                },
            );
        }
    }
    let state = ledger.state();
    let pm = state
        .model
        .program(&p)
        .unwrap_or_else(|| fail("no program"));
    pm.affiliates
        .values()
        .map(|a| a.referral_code.clone())
        .collect()
}

fn submit(ledger: &Ledger, command: Command) -> Vec<Recorded> {
    match ledger.submit_blocking(Submission::new(Some(&program()), "load", command)) {
        Ok(receipt) => receipt.events,
        Err(e) => fail(&format!("refused: {e}")),
    }
}

/// The `n`th command of submitter `who`: 80% clicks, 5% signups, 10% expenses, 5% payments.
/// Built from few allocations (short texts inline, the referrer shared),
/// so that the load generator leaves the cores to the ledger.
fn mixed(who: usize, n: u64, codes: &[String]) -> Command {
    const CREATIVES: [&str; 3] = ["banner-0", "banner-1", "banner-2"];
    const REFERRER: Text = Text::new_static("https://blog.example/post");
    let visitor = || smol_str::format_smolstr!("v-{who}-{}", n / 20);
    let customer = || {
        CustomerId::parse(&smol_str::format_smolstr!("c-{who}-{}", n / 20))
            .unwrap_or_else(|e| fail(&e.to_string()))
    };
    let line = |kind: &str| {
        LineId::parse(&smol_str::format_smolstr!("{kind}-{who}-{n}"))
            .unwrap_or_else(|e| fail(&e.to_string()))
    };
    match n % 20 {
        0..=15 => Command::RecordClick {
            referral_code: codes[(n as usize + who) % codes.len()].clone(),
            visitor: Some(visitor()),
            creative: Some(Text::new_static(CREATIVES[(n % 3) as usize])),
            referrer: Some(REFERRER),
            landing: None,
            client_hash: None,
        },
        16 => Command::Signup {
            customer_id: customer(),
            visitor: Some(visitor()),
            promo_code: None,
            group: None,
        },
        17 | 18 => Command::RecordBasisLine {
            kind: LineKind::Expense,
            id: line("inv"),
            customer_id: customer(),
            amount: "12.34".into(),
            currency: "USD".into(),
            product: Some("hosting".into()),
            order_id: None,
        },
        _ => Command::RecordBasisLine {
            kind: LineKind::Payment,
            id: line("pay"),
            customer_id: customer(),
            amount: "12.34".into(),
            currency: "USD".into(),
            product: None,
            order_id: None,
        },
    }
}

/// Runs `submitters` concurrent submitters (tasks on a two-thread tokio
/// runtime, as the HTTP server would) until `duration` or `limit` events;
/// calls `on_ack` with each acknowledged event. Returns the count.
fn drive(
    ledger: &Arc<Ledger>,
    codes: &[String],
    submitters: usize,
    duration: Duration,
    limit: u64,
    on_ack: Arc<dyn Fn(&Recorded) + Send + Sync>,
) -> Driven {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let salt = ledger.state().head.seq;
    let latencies = runtime.block_on(async {
        let tasks: Vec<_> = (0..submitters)
            .map(|who| {
                let ledger = ledger.clone();
                let codes = codes.to_vec();
                let done = done.clone();
                let stop = stop.clone();
                let on_ack = on_ack.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    let mut latencies = Vec::new();
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < duration {
                        if done.fetch_add(1, Ordering::Relaxed) >= limit {
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                        let command = mixed(who + salt as usize * 1000, n, &codes);
                        let submission = Submission::new(Some(&program()), "load", command);
                        let sent = Instant::now();
                        match ledger.submit(submission).await {
                            Ok(receipt) => receipt.events.iter().for_each(|r| on_ack(r)),
                            Err(e) => fail(&format!("refused: {e}")),
                        }
                        latencies.push(sent.elapsed());
                        n += 1;
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap_or_default());
        }
        all
    });
    Driven {
        acknowledged: done.load(Ordering::Relaxed).min(limit),
        latencies,
    }
}

/// What [`drive`] got done.
struct Driven {
    acknowledged: u64,
    /// Of every command, from its submission to its answer.
    latencies: Vec<Duration>,
}

impl Driven {
    /// p50, p99, p99.9 and the maximum, in milliseconds.
    fn latency_line(&mut self) -> String {
        self.latencies.sort_unstable();
        let at = |q: f64| {
            let i = ((self.latencies.len() as f64 * q) as usize)
                .min(self.latencies.len().saturating_sub(1));
            self.latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        format!(
            "latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            at(0.5),
            at(0.99),
            at(0.999),
            at(1.0)
        )
    }
}

fn crash(dir: &Path, submitters: usize, seconds: u64, checkpoint_every: u64) {
    let mut config = LedgerConfig::new(dir);
    config.checkpoint_every = checkpoint_every;
    // Under the crash test's load: checkpoints mid-run, not only when quiet.
    config.checkpoint_forced_after = checkpoint_every;
    let ledger = Arc::new(Ledger::open(config).unwrap_or_else(|e| fail(&e.to_string())));
    let codes = setup(&ledger);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let print: Arc<dyn Fn(&Recorded) + Send + Sync> = Arc::new(move |r: &Recorded| {
        let mut out = out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = writeln!(out, "ack {} {}", r.seq, r.id);
        let _ = out.flush();
    });
    drive(
        &ledger,
        &codes,
        submitters,
        Duration::from_secs(seconds),
        u64::MAX,
        print,
    );
}

/// The mean time a command waited for the writer so far, in microseconds.
fn mean_queue_wait_us(stats: &commission_ledger::ledger::WriterStats) -> f64 {
    stats.queue_wait_us.load(Ordering::Relaxed) as f64
        / stats.commands.load(Ordering::Relaxed).max(1) as f64
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// The highest RSS so far.
fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A new file at `path` for a bare loop: empty, or (`preallocated`) 256
/// MiB of zeros made durable first, as the ledger's segments grow.
fn bare_file(path: &Path, preallocated: bool) -> std::fs::File {
    use std::os::unix::fs::FileExt;
    let _ = std::fs::remove_file(path);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| fail(&e.to_string()));
    if preallocated {
        file.write_all_at(&vec![0u8; 256 << 20], 0)
            .unwrap_or_else(|e| fail(&e.to_string()));
        file.sync_all().unwrap_or_else(|e| fail(&e.to_string()));
    }
    file
}

/// The bare ceiling: the same record bytes, `batch` records per
/// fdatasync, appended to a growing file, or (`preallocated`) written into
/// zero-filled space as the ledger does.
fn bare(dir: &Path, record: &[u8], batch: usize, duration: Duration, preallocated: bool) -> f64 {
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("bare-{batch}.bin"));
    let file = bare_file(&path, preallocated);
    let buffer: Vec<u8> = record
        .iter()
        .copied()
        .cycle()
        .take(record.len() * batch)
        .collect();
    let start = Instant::now();
    let mut records = 0u64;
    let mut offset = 0u64;
    while start.elapsed() < duration {
        file.write_all_at(&buffer, offset)
            .unwrap_or_else(|e| fail(&e.to_string()));
        file.sync_data().unwrap_or_else(|e| fail(&e.to_string()));
        offset += buffer.len() as u64;
        records += batch as u64;
    }
    let _ = std::fs::remove_file(&path);
    records as f64 / start.elapsed().as_secs_f64()
}

/// A bare group commit behind the same closed-loop submitters as
/// [`drive`] (tasks on a two-thread tokio runtime, each waiting for its
/// answer before it sends again): one thread takes every record waiting,
/// writes their bytes into zero-filled space with one `pwrite`, calls
/// `fdatasync` once and answers them. No decisions, no model, no
/// encoding: what the closed loop itself allows on this machine, the
/// ceiling of any writer behind these submitters.
fn bare_group(dir: &Path, record: &[u8], submitters: usize, duration: Duration) -> f64 {
    use std::os::unix::fs::FileExt;
    use tokio::sync::{mpsc, oneshot};
    let path = dir.join(format!("bare-group-{submitters}.bin"));
    let file = bare_file(&path, true);
    let (queue, mut jobs) = mpsc::channel::<oneshot::Sender<()>>(4096);
    let record = record.to_vec();
    let syncer = std::thread::spawn(move || {
        let mut offset = 0u64;
        let mut buffer = Vec::new();
        let mut answers = Vec::new();
        while let Some(first) = jobs.blocking_recv() {
            answers.push(first);
            while let Ok(next) = jobs.try_recv() {
                answers.push(next);
            }
            buffer.clear();
            for _ in 0..answers.len() {
                buffer.extend_from_slice(&record);
            }
            file.write_all_at(&buffer, offset)
                .unwrap_or_else(|e| fail(&e.to_string()));
            file.sync_data().unwrap_or_else(|e| fail(&e.to_string()));
            offset += buffer.len() as u64;
            for answer in answers.drain(..) {
                let _ = answer.send(());
            }
        }
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let start = Instant::now();
    let done = runtime.block_on(async {
        let tasks: Vec<_> = (0..submitters)
            .map(|_| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while start.elapsed() < duration {
                        let (reply, answer) = oneshot::channel();
                        if queue.send(reply).await.is_err() || answer.await.is_err() {
                            fail("the bare syncer stopped");
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut all = 0;
        for task in tasks {
            all += task.await.unwrap_or_default();
        }
        all
    });
    let rate = done as f64 / start.elapsed().as_secs_f64();
    drop(queue);
    let _ = syncer.join();
    let _ = std::fs::remove_file(&path);
    rate
}

fn bench(dir: &Path, events: u64) {
    let seconds = Duration::from_secs(3);
    println!(
        "# durable appends through the writer vs the bare write+fdatasync ceiling ({}s each)",
        seconds.as_secs()
    );
    let sample = {
        let d = dir.join("sample");
        let ledger = Ledger::open(LedgerConfig::new(&d)).unwrap_or_else(|e| fail(&e.to_string()));
        let codes = setup(&ledger);
        let r = submit(&ledger, mixed(0, 0, &codes));
        encode(&r[0]).unwrap_or_default().len() + 48
    };
    let record = vec![0x5a; sample];
    for submitters in [1usize, 16, 64] {
        let d = dir.join(format!("writer-{submitters}"));
        let ledger =
            Arc::new(Ledger::open(LedgerConfig::new(&d)).unwrap_or_else(|e| fail(&e.to_string())));
        let codes = setup(&ledger);
        let start = Instant::now();
        let n = drive(
            &ledger,
            &codes,
            submitters,
            seconds,
            u64::MAX,
            Arc::new(|_| {}),
        )
        .acknowledged;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        let waited = mean_queue_wait_us(ledger.writer_stats());
        let appended = bare(dir, &record, submitters, seconds, false);
        let preallocated = bare(dir, &record, submitters, seconds, true);
        let grouped = bare_group(dir, &record, submitters, seconds);
        println!(
            "submitters {submitters:>2}: writer {rate:>7.0} events/s (mean wait for the writer {waited:.0} us) | bare ceiling, batch {submitters}: appending {appended:>7.0}/s (ratio {:.2}), into preallocated space {preallocated:>7.0}/s (ratio {:.2}) | bare group commit behind the same submitters {grouped:>7.0}/s (ratio {:.2})",
            rate / appended,
            rate / preallocated,
            rate / grouped
        );
    }
    let fsync = {
        let path = dir.join("fsync.bin");
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| fail(&e.to_string()));
        let mut samples = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            file.write_all(&[0u8; 8192])
                .unwrap_or_else(|e| fail(&e.to_string()));
            file.sync_data().unwrap_or_else(|e| fail(&e.to_string()));
            samples.push(t.elapsed());
        }
        let _ = std::fs::remove_file(&path);
        samples.sort();
        samples[samples.len() / 2]
    };
    println!(
        "fdatasync of 8 KiB, median of 200: {} us",
        fsync.as_micros()
    );

    println!("# replay of {events} mixed events (80% clicks)");
    let d = dir.join("replay");
    {
        let ledger =
            Arc::new(Ledger::open(LedgerConfig::new(&d)).unwrap_or_else(|e| fail(&e.to_string())));
        let codes = setup(&ledger);
        let start = Instant::now();
        let n = drive(
            &ledger,
            &codes,
            64,
            Duration::from_secs(600),
            events,
            Arc::new(|_| {}),
        )
        .acknowledged;
        println!("wrote {n} events in {:.1}s", start.elapsed().as_secs_f64());
    }
    // Each in a fresh process, so RSS is the ledger's alone.
    let exe = std::env::current_exe().unwrap_or_else(|e| fail(&e.to_string()));
    for mode in ["replay-full", "replay"] {
        let out = std::process::Command::new(&exe)
            .args([mode, d.to_str().unwrap_or_default()])
            .output()
            .unwrap_or_else(|e| fail(&e.to_string()));
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

/// The writer's CPU per command, away from the disk and the submitters:
/// `events` mixed commands submitted in batches of 4,096 (so the writer
/// decides many at a time and syncs rarely), and the writer's time
/// deciding them over their count.
fn decide(dir: &Path, events: u64) {
    let ledger = Ledger::open(LedgerConfig::new(dir)).unwrap_or_else(|e| fail(&e.to_string()));
    let codes = setup(&ledger);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let stats = ledger.writer_stats();
    let (us0, commands0) = (
        stats.decide_us.load(Ordering::Relaxed),
        stats.commands.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    let mut n = 0u64;
    while n < events {
        let submissions: Vec<Submission> = (0..4096u64)
            .map(|i| {
                let who = (i % 64) as usize;
                Submission::new(
                    Some(&program()),
                    "load",
                    mixed(who, n / 64 + i / 64, &codes),
                )
            })
            .collect();
        n += submissions.len() as u64;
        for answer in runtime.block_on(ledger.submit_many(submissions)) {
            if let Err(e) = answer {
                fail(&format!("refused: {e}"));
            }
        }
    }
    let us = stats.decide_us.load(Ordering::Relaxed) - us0;
    let commands = (stats.commands.load(Ordering::Relaxed) - commands0).max(1);
    println!(
        "{commands} commands in {:.1}s; the writer decided them in {} ms: {} ns per command",
        start.elapsed().as_secs_f64(),
        us / 1000,
        us * 1000 / commands
    );
}

/// Opens the ledger in `dir` (after deleting its index store when `full`),
/// reporting the time, events/s and RSS.
/// A burst after a lull: the writer takes a checkpoint when it has been
/// quiet, so the command right after the one that ended the lull is the
/// one a checkpoint could hold up. Builds a state of `events` mixed events,
/// then `rounds` times: 30 ms of quiet, one command, and the next one
/// timed.
fn lull(dir: &Path, events: u64, rounds: u64) {
    let mut config = LedgerConfig::new(dir);
    // Every lull finds a checkpoint due.
    config.checkpoint_every = 1;
    let ledger = Arc::new(Ledger::open(config).unwrap_or_else(|e| fail(&e.to_string())));
    let codes = setup(&ledger);
    let head = ledger.state().head.seq;
    if head < events {
        drive(
            &ledger,
            &codes,
            64,
            Duration::from_secs(120),
            events - head,
            Arc::new(|_| {}),
        );
    }
    let mut latencies = Vec::new();
    let s = ledger.writer_stats();
    let mut building = 0;
    for round in 0..rounds.min(1_000) {
        // Long enough for the builder to find the lull (it looks every 20 ms).
        std::thread::sleep(Duration::from_millis(60));
        building += u64::from(s.checkpoint_building.load(Ordering::Acquire));
        for n in 0..2 {
            let sent = Instant::now();
            submit(&ledger, mixed(7, 2 * round + n, &codes));
            latencies.push(sent.elapsed());
        }
    }
    latencies.sort_unstable();
    println!(
        "{} events, {} rounds: the first two commands after a lull took p50 {:.2} ms, max {:.2} ms; a checkpoint was being built after {building} lulls; checkpoints saved {}",
        ledger.state().head.seq,
        latencies.len() / 2,
        latencies
            .get(latencies.len() / 2)
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0),
        latencies
            .last()
            .map(|d| d.as_secs_f64() * 1e3)
            .unwrap_or(0.0),
        s.checkpoints.load(Ordering::Relaxed)
    );
}

/// Reads of the past on the log in `dir`: one balance as of the middle of
/// the log, the same again, then `readers` at once, each of its own past;
/// with the time each took and the peak RSS.
fn as_of(dir: &Path, readers: usize) {
    use commission_ledger::ledger::AsOf;
    let ledger = Ledger::open(LedgerConfig::new(dir)).unwrap_or_else(|e| fail(&e.to_string()));
    let head = ledger.state().head.seq;
    let affiliate = AffiliateId::parse("aff-0").unwrap_or_else(|e| fail(&e.to_string()));
    let read = |seq: Seq| {
        let start = Instant::now();
        match ledger.balance(&program(), &affiliate, Some(AsOf::Seq(seq))) {
            Ok(_) => format!("{:.2}s", start.elapsed().as_secs_f64()),
            Err(e) => format!("{e}"),
        }
    };
    let start = Instant::now();
    let _ = ledger.balance(&program(), &affiliate, None);
    let first = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let _ = ledger.balance(&program(), &affiliate, None);
    println!(
        "the present: {first:.3}s, again {:.3}s",
        start.elapsed().as_secs_f64()
    );
    println!(
        "{head} events, RSS {} MiB; as of seq {}: {}; the same again: {}",
        rss_kib() / 1024,
        head / 2,
        read(head / 2),
        read(head / 2)
    );
    // By time: the moment of the event at a quarter of the log (a seq is
    // searched for, then the log replayed to it), and a seq near the head
    // (after the last checkpoint, if it was saved at the end).
    let quarter = ledger
        .events_range(head / 4, head / 4)
        .ok()
        .and_then(|events| events.first().map(|r| r.recorded_at));
    if let Some(t) = quarter {
        let start = Instant::now();
        let answer = match ledger.balance(&program(), &affiliate, Some(AsOf::Time(t))) {
            Ok(_) => format!("{:.2}s", start.elapsed().as_secs_f64()),
            Err(e) => format!("{e}"),
        };
        println!(
            "as of the time of seq {}: {answer}; as of seq {}: {}",
            head / 4,
            head.saturating_sub(1000),
            read(head.saturating_sub(1000))
        );
    }
    let start = Instant::now();
    let answers: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..readers)
            .map(|i| scope.spawn(move || read(head / 2 + 1 + i as u64)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    println!(
        "{readers} readers of {readers} pasts at once: all answered in {:.2}s ({}); peak RSS {} MiB",
        start.elapsed().as_secs_f64(),
        answers.join(" "),
        peak_rss_kib() / 1024
    );
}

/// See `customers` in the module's doc.
fn customers(dir: &Path, customers: u64) {
    const AFFILIATES: u64 = 1_000;
    let ledger = Ledger::open(LedgerConfig::new(dir)).unwrap_or_else(|e| fail(&e.to_string()));
    let p = program();
    let affiliate =
        |i: u64| AffiliateId::parse(&format!("aff-{i}")).unwrap_or_else(|e| fail(&e.to_string()));
    let customer =
        |i: u64| CustomerId::parse(&format!("c-{i}")).unwrap_or_else(|e| fail(&e.to_string()));
    let line = |i: u64| LineId::parse(&format!("l-{i}")).unwrap_or_else(|e| fail(&e.to_string()));
    let expense = |id: LineId, customer: CustomerId| Command::RecordBasisLine {
        kind: LineKind::Expense,
        id,
        customer_id: customer,
        amount: "12.34".into(),
        currency: "USD".into(),
        product: None,
        order_id: None,
    };
    if ledger.state().model.program(&p).is_none() {
        let start = Instant::now();
        submit(
            &ledger,
            Command::DefineProgram {
                rules: Box::new(rules()),
                reason: None,
            },
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| fail(&e.to_string()));
        let many = |commands: Vec<Command>| {
            let submissions = commands
                .into_iter()
                .map(|c| Submission::new(Some(&p), "load", c))
                .collect();
            for answer in runtime.block_on(ledger.submit_many(submissions)) {
                if let Err(e) = answer {
                    fail(&format!("refused: {e}"));
                }
            }
        };
        many(
            (0..AFFILIATES)
                .map(|i| Command::EnrollAffiliate {
                    affiliate_id: affiliate(i),
                    customer_id: None,
                    group: None,
                    rate: None,
                })
                .collect(),
        );
        for chunk in (0..customers).collect::<Vec<_>>().chunks(5_000) {
            let mut commands = Vec::with_capacity(chunk.len() * 2);
            for &i in chunk {
                commands.push(Command::Signup {
                    customer_id: customer(i),
                    visitor: None,
                    promo_code: Some(format!("LOAD-aff-{}", i % AFFILIATES)),
                    group: None,
                });
                commands.push(expense(line(i), customer(i)));
            }
            many(commands);
        }
        println!(
            "{customers} customers of {AFFILIATES} affiliates, a line each, in {:.1}s",
            start.elapsed().as_secs_f64()
        );
    }
    let one = affiliate(7);
    let timed = || {
        let start = Instant::now();
        let balance = ledger.balance(&p, &one, None);
        let pending = match balance {
            Ok(Some(b)) => b.pending,
            Ok(None) => fail("no such affiliate"),
            Err(e) => fail(&e.to_string()),
        };
        (start.elapsed().as_secs_f64() * 1000.0, pending)
    };
    let (first, pending) = timed();
    let (again, _) = timed();
    // A new line for one of its customers: the estimate is computed again.
    let next = ledger.state().head.seq;
    submit(&ledger, expense(line(10_000_000 + next), customer(7)));
    let (after_line, after) = timed();
    println!(
        "{} events, RSS {} MiB; aff-7's balance: {first:.2} ms (pending {pending}), again {again:.3} ms, after a line of its own {after_line:.2} ms (pending {after})",
        ledger.state().head.seq,
        rss_kib() / 1024
    );
}

/// `close DIR CUSTOMERS`: see the module's doc.
fn close(dir: &Path, customers: u64) {
    let parse = |text: &str| Timestamp::parse(text).unwrap_or_else(|e| fail(&e.to_string()));
    let now = parse("2026-11-05T00:00:00Z");
    let (signed_up, billed) = (parse("2026-10-01T00:00:00Z"), parse("2026-10-15T00:00:00Z"));
    let month = now.month_in(chrono_tz::UTC).previous();
    let mut config = LedgerConfig::new(dir);
    config.clock = Arc::new(move || now);
    let ledger = Ledger::open(config).unwrap_or_else(|e| fail(&e.to_string()));
    let p = ProgramId::parse("tiered").unwrap_or_else(|e| fail(&e.to_string()));
    if ledger.state().head.seq > 0 {
        fail("close needs a fresh DIR");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let many = |commands: Vec<(Command, Option<Timestamp>)>| {
        let submissions = commands
            .into_iter()
            .map(|(command, at)| {
                let s = Submission::new(Some(&p), "load", command);
                match at {
                    Some(at) => s.at(at),
                    None => s,
                }
            })
            .collect();
        for answer in runtime.block_on(ledger.submit_many(submissions)) {
            if let Err(e) = answer {
                fail(&format!("refused: {e}"));
            }
        }
    };
    let customer =
        |i: u64| CustomerId::parse(&format!("c-{i}")).unwrap_or_else(|e| fail(&e.to_string()));
    let expense = |line: String, customer: CustomerId| Command::RecordBasisLine {
        kind: LineKind::Expense,
        id: LineId::parse(&line).unwrap_or_else(|e| fail(&e.to_string())),
        customer_id: customer,
        amount: "12.34".into(),
        currency: "USD".into(),
        product: None,
        order_id: None,
    };
    let rules: ProgramRules = serde_json::from_value(serde_json::json!({
        "id": "tiered", "name": "Tiered", "currency": "USD", "timezone": "UTC",
        "site_url": "https://provider.example/", "default_rate": "20",
        "payout_threshold": "50.00", "promo_code_template": "T-@ID@",
        "tiers": [{"min_active_referrals": 2, "rate": "25"}], "bounty": "5.00",
        "forbidden_groups": ["staff"]
    }))
    .unwrap_or_else(|e| fail(&e.to_string()));
    let start = Instant::now();
    many(vec![(
        Command::DefineProgram {
            rules: Box::new(rules),
            reason: None,
        },
        None,
    )]);
    many(
        (0..1_000)
            .map(|i| {
                let affiliate_id = AffiliateId::parse(&format!("aff-{i}"))
                    .unwrap_or_else(|e| fail(&e.to_string()));
                let enroll = Command::EnrollAffiliate {
                    affiliate_id,
                    customer_id: None,
                    group: None,
                    rate: None,
                };
                (enroll, None)
            })
            .collect(),
    );
    for chunk in (0..customers).collect::<Vec<_>>().chunks(5_000) {
        let mut commands = Vec::with_capacity(chunk.len() * 3);
        for &i in chunk {
            let signup = Command::Signup {
                customer_id: customer(i),
                visitor: None,
                promo_code: Some(format!("T-aff-{}", i % 1_000)),
                group: None,
            };
            commands.push((signup, Some(signed_up)));
            for k in 0..2 {
                commands.push((expense(format!("l-{i}-{k}"), customer(i)), Some(billed)));
            }
        }
        many(commands);
    }
    println!(
        "{customers} customers of 1,000 affiliates, two lines each in {month}, made in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let one = AffiliateId::parse("aff-7").unwrap_or_else(|e| fail(&e.to_string()));
    let pending = || {
        let start = Instant::now();
        let pending = match ledger.balance(&p, &one, None) {
            Ok(Some(b)) => b.pending,
            Ok(None) => fail("no aff-7"),
            Err(e) => fail(&e.to_string()),
        };
        (start.elapsed().as_secs_f64() * 1000.0, pending)
    };
    let (first, amount) = pending();
    let (again, _) = pending();
    many(vec![(expense("l-new".into(), customer(7)), Some(billed))]);
    let (after_line, _) = pending();
    println!(
        "aff-7's pending estimate {amount}: first {first:.2} ms, again {again:.3} ms, after a line of its own {after_line:.2} ms"
    );
    let start = Instant::now();
    let events = ledger
        .state()
        .model
        .program(&p)
        .map(|pm| commission_ledger::rules::close_rewards(pm, month, month, None).len())
        .unwrap_or(0);
    let computed = start.elapsed().as_secs_f64() * 1000.0;
    let stats = ledger.writer_stats();
    let (decided, synced) = (
        stats.decide_us.load(Ordering::Relaxed),
        stats.sync_us.load(Ordering::Relaxed),
    );
    // A portal reading another affiliate's balance in a loop meanwhile:
    // its longest read is how long the close kept readers out.
    let closing = AtomicBool::new(true);
    let other = AffiliateId::parse("aff-8").unwrap_or_else(|e| fail(&e.to_string()));
    let start = Instant::now();
    let longest_read = std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut longest = Duration::ZERO;
            while closing.load(Ordering::Relaxed) {
                let t = Instant::now();
                if let Err(e) = ledger.balance(&p, &other, None) {
                    fail(&e.to_string());
                }
                longest = longest.max(t.elapsed());
                std::thread::sleep(Duration::from_micros(200));
            }
            longest
        });
        many(vec![(Command::CloseMonth { month }, None)]);
        closing.store(false, Ordering::Relaxed);
        reader.join().unwrap_or_default()
    });
    println!(
        "closing {month}: {events} events computed in {computed:.0} ms; submitted and durable in {:.0} ms (the writer deciding {} ms; write + fdatasync {} ms); a reader's longest balance read meanwhile {:.0} ms",
        start.elapsed().as_secs_f64() * 1000.0,
        (stats.decide_us.load(Ordering::Relaxed) - decided) / 1000,
        (stats.sync_us.load(Ordering::Relaxed) - synced) / 1000,
        longest_read.as_secs_f64() * 1000.0,
    );
}

/// The seq `past` reads as of: the bench's log has a million.
const PAST_SEQ: u64 = 500_000;

/// One read of a portal's page for `aff-0`: `balance`, `blocking` (the
/// same, waiting on its thread for the disk as a blocking caller does),
/// `past` (its balance as of seq 500,000, replayed once and then shared),
/// `referrals` (the
/// first page of 50, by signup), `stats` (by day, a year) or `statement`
/// (the current month).
fn portal_read(ledger: &Ledger, affiliate: &AffiliateId, read: &str) -> Result<bool, String> {
    use commission_ledger::projections::StatsBy;
    let now = ledger.now();
    let today = now.date_in(chrono_tz::UTC);
    let found = match read {
        "balance" => ledger
            .balance(&program(), affiliate, None)
            .map(|b| b.is_some()),
        "past" => ledger
            .balance(&program(), affiliate, Some(AsOf::Seq(PAST_SEQ)))
            .map(|b| b.is_some()),
        // As a blocking caller (the command line, a what-if) reads it.
        "blocking" => ledger
            .balance(&program(), affiliate, None)
            .map(|b| b.is_some()),
        "referrals" => ledger
            .referrals(&program(), affiliate, &newest_referrals(50), None)
            .map(|p| p.is_some()),
        "stats" => {
            let from = today - chrono::Duration::days(365);
            ledger
                .stats(&program(), affiliate, from, today, StatsBy::Day, None)
                .map(|s| s.is_some())
        }
        // An operator's audit, beside the writer.
        "verify" => {
            let report = ledger.verify().map_err(|e| e.to_string())?;
            return match report.problem {
                None => Ok(true),
                Some(problem) => Err(format!("verify failed: {problem}")),
            };
        }
        "statement" => ledger
            .statement(&program(), affiliate, now.month_in(chrono_tz::UTC), None)
            .map(|s| s.is_some()),
        other => {
            return Err(format!(
                "no read `{other}`: balance, blocking, past, referrals, stats, statement or verify"
            ));
        }
    };
    found.map_err(|e| e.to_string())
}

/// The first page of referrals, newest signup first: a portal's default.
fn newest_referrals(limit: usize) -> commission_ledger::projections::ReferralQuery {
    commission_ledger::projections::ReferralQuery {
        status: None,
        q: None,
        sort: commission_ledger::projections::ReferralSort::SignupDesc,
        limit,
        start: Default::default(),
    }
}

fn portal(dir: &Path, seconds: u64, read: &str) {
    let ledger = Ledger::open(LedgerConfig::new(dir)).unwrap_or_else(|e| fail(&e.to_string()));
    let affiliate = AffiliateId::parse("aff-0").unwrap_or_else(|e| fail(&e.to_string()));
    if !portal_read(&ledger, &affiliate, read).unwrap_or_else(|e| fail(&e)) {
        fail("no aff-0 in program `load`: run `bench DIR` first");
    }
    {
        use commission_ledger::projections::StatsBy;
        let referred = ledger.referrals(&program(), &affiliate, &newest_referrals(1), None);
        let (from, to) = (chrono::NaiveDate::MIN, chrono::NaiveDate::MAX);
        let stats = ledger.stats(&program(), &affiliate, from, to, StatsBy::Month, None);
        if let (Ok(Some(referred)), Ok(Some(stats))) = (referred, stats) {
            println!(
                "aff-0: {} customers referred, {} clicks, {} unique visitors",
                referred.total, stats.clicks, stats.unique_visitors
            );
        }
    }
    let ledger = Arc::new(ledger);
    let codes = setup(&ledger);
    let duration = Duration::from_secs(seconds);
    let mut alone = drive(&ledger, &codes, 16, duration, u64::MAX, Arc::new(|_| {}));
    println!(
        "16 submitters alone: {:.0} events/s; {}",
        alone.acknowledged as f64 / seconds as f64,
        alone.latency_line()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (ledger, stop, affiliate) = (ledger.clone(), stop.clone(), affiliate.clone());
        let read = read.to_string();
        std::thread::spawn(move || {
            // As the API reads now: at once, then await (not block on)
            // the moment the state read is durable; a read of the past,
            // on a blocking thread, as is.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap_or_else(|e| fail(&e.to_string()));
            let mut reads = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let (answer, seq) = if ["past", "blocking", "verify"].contains(&read.as_str()) {
                    (portal_read(&ledger, &affiliate, &read), 0)
                } else {
                    ledger.deferring_settle(|| portal_read(&ledger, &affiliate, &read))
                };
                if let Err(e) = answer {
                    fail(&e);
                }
                runtime.block_on(ledger.settled(seq));
                reads.push(start.elapsed());
            }
            reads
        })
    };
    let mut with = drive(&ledger, &codes, 16, duration, u64::MAX, Arc::new(|_| {}));
    stop.store(true, Ordering::Relaxed);
    let mut reads = reader.join().unwrap_or_default();
    reads.sort_unstable();
    let ms = |q: f64| {
        let i = ((reads.len() as f64 * q) as usize).min(reads.len().saturating_sub(1));
        reads.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "16 submitters, aff-0's {read} read in a loop: {:.0} events/s; {}",
        with.acknowledged as f64 / seconds as f64,
        with.latency_line()
    );
    // A read that computed the estimate again takes milliseconds; one
    // that found it computed, microseconds.
    let computed: Vec<f64> = reads
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .filter(|ms| *ms >= 1.0)
        .collect();
    println!(
        "  {} {read} reads ({:.0}/s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} took over 1 ms, {:.1} ms each (median)",
        reads.len(),
        reads.len() as f64 / seconds as f64,
        ms(0.5),
        ms(0.99),
        ms(1.0),
        computed.len(),
        computed.get(computed.len() / 2).copied().unwrap_or(0.0)
    );
}

fn replay(dir: &Path, full: bool) {
    if full {
        let _ = std::fs::remove_dir_all(dir.join("index"));
    }
    let start = Instant::now();
    let ledger = Ledger::open(LedgerConfig::new(dir)).unwrap_or_else(|e| fail(&e.to_string()));
    let elapsed = start.elapsed().as_secs_f64();
    let head = ledger.state().head.seq;
    let what = if full {
        "full replay (index deleted)"
    } else {
        "restart from checkpoint"
    };
    println!(
        "{what}: {head} events in {elapsed:.2}s = {:.0} events/s; RSS {} MiB",
        head as f64 / elapsed,
        rss_kib() / 1024
    );
}

fn main() {
    // Piped into `head`, the tool ends quietly when the pipe closes, as
    // command-line tools do, instead of panicking in `println!`. (Not in
    // the server or `http-load`: a peer closing a socket must not end them.)
    // SAFETY: signal() with a standard signal and SIG_DFL touches no memory
    // of ours, and runs before any other thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| {
        args.get(i).cloned().unwrap_or_else(|| {
            fail("usage: ledger-load crash DIR SUBMITTERS SECONDS | bench DIR [EVENTS]")
        })
    };
    let number = |i: usize, default: u64| {
        args.get(i)
            .map(|s| s.parse().unwrap_or_else(|_| fail("not a number")))
            .unwrap_or(default)
    };
    match arg(1).as_str() {
        "crash" => crash(
            &PathBuf::from(arg(2)),
            number(3, 8) as usize,
            number(4, 30).min(600),
            number(5, LedgerConfig::new(".").checkpoint_every),
        ),
        "bench" => bench(&PathBuf::from(arg(2)), number(3, 1_000_000)),
        "bare-group" => {
            let dir = PathBuf::from(arg(2));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&e.to_string()));
            let submitters = number(3, 64) as usize;
            let rate = bare_group(
                &dir,
                &[0x5a; 230],
                submitters,
                Duration::from_secs(number(4, 4)),
            );
            println!("{submitters} submitters: bare group commit {rate:.0} records/s");
        }
        "writer" => {
            let submitters = number(3, 64) as usize;
            let mut config = LedgerConfig::new(PathBuf::from(arg(2)));
            config.checkpoint_every = number(5, config.checkpoint_every);
            // Under load a checkpoint is forced; with an interval given, one
            // falls due every that many events (and half the log).
            config.checkpoint_forced_after = number(5, config.checkpoint_forced_after);
            config.group_commit_linger =
                Duration::from_micros(number(6, config.group_commit_linger.as_micros() as u64));
            config.preallocate_bytes = number(7, config.preallocate_bytes >> 10) << 10;
            config.group_commit_halves = number(8, 1) != 0;
            let ledger = Arc::new(Ledger::open(config).unwrap_or_else(|e| fail(&e.to_string())));
            let codes = setup(&ledger);
            let start = Instant::now();
            let mut driven = drive(
                &ledger,
                &codes,
                submitters,
                Duration::from_secs(number(4, 5).min(600)),
                u64::MAX,
                Arc::new(|_| {}),
            );
            println!(
                "{submitters} submitters: {:.0} events/s; {}",
                driven.acknowledged as f64 / start.elapsed().as_secs_f64(),
                driven.latency_line()
            );
            let s = ledger.writer_stats();
            let batches = s.batches.load(Ordering::Relaxed).max(1);
            println!(
                "batches {batches}, commands/batch {:.1}, mean wait for the writer {:.1} us, per batch: decide {} us, write+sync {} us, reply {} us; in halves at the end: {}",
                s.commands.load(Ordering::Relaxed) as f64 / batches as f64,
                mean_queue_wait_us(s),
                s.decide_us.load(Ordering::Relaxed) / batches,
                s.sync_us.load(Ordering::Relaxed) / batches,
                s.reply_us.load(Ordering::Relaxed) / batches,
                s.group_commit_halves.load(Ordering::Relaxed)
            );
            println!(
                "checkpoints {} ({} ms in all, the last {} MB)",
                s.checkpoints.load(Ordering::Relaxed),
                s.checkpoint_us.load(Ordering::Relaxed) / 1000,
                s.checkpoint_bytes.load(Ordering::Relaxed) >> 20
            );
        }
        "decide" => decide(&PathBuf::from(arg(2)), number(3, 1_000_000)),
        "lull" => lull(&PathBuf::from(arg(2)), number(3, 300_000), number(4, 20)),
        "replay" => replay(&PathBuf::from(arg(2)), false),
        "as-of" => as_of(&PathBuf::from(arg(2)), number(3, 4) as usize),
        "customers" => customers(&PathBuf::from(arg(2)), number(3, 200_000)),
        "close" => close(&PathBuf::from(arg(2)), number(3, 100_000)),
        "portal" => portal(
            &PathBuf::from(arg(2)),
            number(3, 5).min(600),
            args.get(4).map_or("balance", String::as_str),
        ),
        "fold" => {
            // The folding stage alone, each fold timed on its own.
            let mut events = Vec::new();
            commission_ledger::log::scan(
                &PathBuf::from(arg(2)).join("log"),
                commission_ledger::log::ScanMode::Read,
                None,
                |r| {
                    events.push(decode(r.payload).map_err(|e| e.to_string())?);
                    Ok(())
                },
            )
            .unwrap_or_else(|e| fail(&e.to_string()));
            let rss_events = rss_kib();
            let mut model = commission_ledger::rules::Model::default();
            let mut by_type: std::collections::BTreeMap<&str, (u64, Duration)> = Default::default();
            let start = Instant::now();
            for r in &events {
                let t = Instant::now();
                model.apply(r);
                let entry = by_type.entry(r.event.type_name()).or_default();
                entry.0 += 1;
                entry.1 += t.elapsed();
            }
            let model_s = start.elapsed().as_secs_f64();
            let rss_model = rss_kib();
            for (name, (n, d)) in by_type {
                println!(
                    "  model {name}: {n} events, {:.0} ns each",
                    d.as_nanos() as f64 / n as f64
                );
            }
            let mut views = commission_ledger::projections::Projections::default();
            let start = Instant::now();
            // The model holds every line by now: each kind is the same.
            for r in &events {
                views.apply(r, &commission_ledger::ledger::ModelLines(&model));
            }
            let views_s = start.elapsed().as_secs_f64();
            let rss_views = rss_kib();
            println!(
                "{} events: model fold {model_s:.2}s, projections fold {views_s:.2}s",
                events.len()
            );
            println!(
                "RSS: decoded events {} MiB, + model {} MiB, + projections {} MiB",
                rss_events / 1024,
                // RSS can shrink as the allocator returns pages.
                rss_model.saturating_sub(rss_events) / 1024,
                rss_views.saturating_sub(rss_model) / 1024
            );
        }
        "scan" => {
            // The reading stage alone: frames, CRCs, the chain, and decoding.
            let start = Instant::now();
            let mut n = 0u64;
            let decode_too = args.get(3).is_some();
            commission_ledger::log::scan(
                &PathBuf::from(arg(2)).join("log"),
                commission_ledger::log::ScanMode::Read,
                None,
                |r| {
                    if decode_too {
                        decode(r.payload).map_err(|e| e.to_string())?;
                    }
                    n += 1;
                    Ok(())
                },
            )
            .unwrap_or_else(|e| fail(&e.to_string()));
            let elapsed = start.elapsed().as_secs_f64();
            println!(
                "scanned {n} records (decode: {decode_too}) in {elapsed:.2}s = {:.0}/s",
                n as f64 / elapsed
            );
        }
        "replay-full" => replay(&PathBuf::from(arg(2)), true),
        "what-if" => {
            // A what-if replay of the whole log with one override, beside
            // the time the ledger took to open.
            let start = Instant::now();
            let ledger = Ledger::open(LedgerConfig::new(PathBuf::from(arg(2))))
                .unwrap_or_else(|e| fail(&e.to_string()));
            let opened = start.elapsed().as_secs_f64();
            let head = ledger.state().head.seq;
            let overrides: Overrides = serde_json::from_value(serde_json::json!({
                "attribution": [{"customer_id": "c-0-0", "affiliate_id": "aff-1"}]
            }))
            .unwrap_or_else(|e| fail(&e.to_string()));
            let start = Instant::now();
            let replay = ledger
                .what_if(&program(), overrides, None)
                .unwrap_or_else(|e| fail(&e.to_string()));
            let elapsed = start.elapsed().as_secs_f64();
            println!(
                "what-if replay of {head} events with one override: {elapsed:.2}s = {:.0} events/s ({} changed items); the ledger opened in {opened:.2}s; RSS {} MiB",
                head as f64 / elapsed,
                replay.diff.changes.len(),
                rss_kib() / 1024
            );
            if args.get(3).map(String::as_str) == Some("apply") {
                // Applying it computes it again at the head, with the
                // corrected world (this writes to DIR: use a copy).
                let start = Instant::now();
                let submission = ledger
                    .apply_replay_submission(&program(), &replay.replay_id, "bench", "ledger-load")
                    .unwrap_or_else(|e| fail(&e.to_string()))
                    .unwrap_or_else(|| fail("the replay is gone"));
                let prepared = start.elapsed().as_secs_f64();
                let receipt = ledger
                    .submit_blocking(submission)
                    .unwrap_or_else(|e| fail(&e.to_string()));
                println!(
                    "applied: prepared in {prepared:.2}s, durable {:.3}s later: {} events",
                    start.elapsed().as_secs_f64() - prepared,
                    receipt.events.len()
                );
            }
        }
        other => fail(&format!("unknown mode {other}")),
    }
}
