//! `verify`: the log's chain, CRCs and postings, and the projections the
//! store and a running ledger hold against a fresh replay of the log.

use super::checkpoint::decode_checkpoint;
use super::start::{ChunkSender, two_stages};
use super::*;

/// `verify` (and applying a replay) catches its replay up with the writer
/// without the lock until at most this many events are left for it to fold
/// holding the lock ...
pub(super) const VERIFY_LOCKED_CATCH_UP: Seq = 1024;

/// ... or for this many rounds.
pub(super) const VERIFY_CATCH_UP_ROUNDS: usize = 8;

/// The result of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub ok: bool,
    /// The events checked: every one up to `head_seq`, or before `bad_seq`.
    pub events: u64,
    pub head_seq: Seq,
    pub head_hash: String,
    pub bad_seq: Option<Seq>,
    pub problem: Option<String>,
    /// Whether projections were compared with the fresh replay, and how
    /// they compared.
    pub projections: ProjectionsCheck,
    /// Which projections were compared, or why none were.
    pub projections_detail: Option<String>,
}

/// How `verify` found the projections against a fresh replay of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionsCheck {
    Equal,
    /// `ok` is false, and `problem` says where they first differ.
    Differ,
    /// The log has a problem, or there were none to compare (see the detail).
    NotCompared,
}

impl ProjectionsCheck {
    /// As the JSON reports give it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionsCheck::Equal => "equal",
            ProjectionsCheck::Differ => "differ",
            ProjectionsCheck::NotCompared => "not_compared",
        }
    }
}

/// Verifies a log directory without opening a ledger on it: every frame and
/// CRC, the hash chain, every event decoded, every event's postings balanced
/// and their running sum zero.
pub fn verify_log(log_dir: &Path, until: Option<Seq>) -> VerifyReport {
    match FreshReplay::scan(log_dir, ScanMode::Strict, until, None) {
        (fresh, _, Ok(())) => fresh.report(Ok(()), None),
        (fresh, _, Err(e)) => fresh.report(Err(e.to_string()), e.bad_seq()),
    }
}

/// `verify` of the command line: the log, as [`verify_log`] checks it, and
/// the projections a start would load (the store's checkpoint, with the
/// log after it folded in) against the fresh replay, when there is a
/// checkpoint and no server holds the data directory (`GET /v1/verify`
/// compares a running server's live projections).
pub fn verify_data_dir(data_dir: &Path) -> VerifyReport {
    // Held while verifying, so that no server starts meanwhile (a copy
    // without one, a backup, gets none). A server holding it may be
    // appending: what it is writing is no torn tail. A server is not waited
    // for: beside one, verify reads what it has made durable.
    let lock = data_dir
        .join("LOCK")
        .exists()
        .then(|| lock_dir(data_dir, std::time::Duration::ZERO));
    let held = matches!(lock, Some(Err(LedgerError::Locked(_))));
    let mode = if held {
        ScanMode::Read
    } else {
        ScanMode::Strict
    };
    let stored = if held {
        Err(
            "a server holds the data directory (GET /v1/verify compares its live projections)"
                .into(),
        )
    } else {
        stored_projections(data_dir)
    };
    let (stored, why_not) = match stored {
        Ok(state) => (Some(state), None),
        Err(why) => (None, Some(why)),
    };
    let checkpoint = stored.as_ref().map(|state| state.head);
    let (fresh, stored, scanned) = FreshReplay::scan(&data_dir.join("log"), mode, None, stored);
    let mut report = match scanned {
        Ok(()) => fresh.report(Ok(()), None),
        Err(e) => return fresh.report(Err(e.to_string()), e.bad_seq()),
    };
    let (state, at) = match (stored, checkpoint) {
        (Some(state), Some(at)) => (state, at.seq),
        (_, Some(at)) => {
            report.projections_detail = Some(format!(
                "not compared: the stored checkpoint (seq {}) is not of this log; the next start rebuilds the index",
                at.seq
            ));
            return report;
        }
        _ => {
            report.projections_detail = why_not.map(|why| format!("not compared: {why}"));
            return report;
        }
    };
    let what = format!("the stored projections (the checkpoint at seq {at}, and the log after it)");
    match first_difference(&state.views, &fresh.state.views) {
        None => report.projections = ProjectionsCheck::Equal,
        Some(difference) => {
            report.ok = false;
            report.projections = ProjectionsCheck::Differ;
            report.problem = Some(format!("{what} differ from a fresh replay: {difference}"));
        }
    }
    report.projections_detail = Some(what);
    report
}

/// The projections a start would load from the store of `data_dir` (its
/// checkpoint, as of the checkpoint's head), or why there are none to
/// compare.
fn stored_projections(data_dir: &Path) -> Result<State, String> {
    let index = data_dir.join("index");
    if !index.exists() {
        return Err("no stored projections (the next start replays the whole log)".into());
    }
    let store = Store::open(&index)
        .map_err(|e| format!("the index store does not open ({e}); the next start rebuilds it"))?;
    match store.load_checkpoint(decode_checkpoint) {
        Ok(Some(Some(state))) if state.head.seq > 0 => Ok(state),
        Ok(Some(None)) => Err(
            "the stored checkpoint does not decode; the next start replays the whole log".into(),
        ),
        Ok(_) => Err("no checkpoint stored (the next start replays the whole log)".into()),
        Err(e) => Err(format!(
            "the stored checkpoint does not read ({e}); the next start replays the whole log"
        )),
    }
}

/// A replay of the log from its start that checks each record as it folds
/// it: the event decodes and names its record's seq, its postings sum to
/// zero, and recorded times never go back.
#[derive(Default)]
pub(super) struct FreshReplay {
    pub(super) state: State,
    events: u64,
}

impl FreshReplay {
    /// Replays the log up to `until` from its start, checking every record
    /// (frame, CRC, chain, and [`check_event`]), on two threads, as a start
    /// does: this one reads, checks and decodes, the other folds (on the
    /// 1M-event bench log, 0.81-0.93 s against 1.31-1.35 s on one). `stored`,
    /// a state as of its head, is folded on beside the replay after the
    /// record at its head, and comes back if the log has that record. The
    /// replay comes back as far as it got, with the first problem.
    fn scan(
        log_dir: &Path,
        mode: ScanMode,
        until: Option<Seq>,
        stored: Option<State>,
    ) -> (FreshReplay, Option<State>, Result<(), LogError>) {
        let fold = move |received: std::sync::mpsc::Receiver<Vec<(Recorded, log::Hash)>>| {
            let mut fresh = FreshReplay::default();
            // The stored state, its head, and whether the log has it.
            let mut stored = stored.map(|state| (state.head, state, false));
            for chunk in received {
                for (recorded, hash) in &chunk {
                    fresh.fold(recorded, hash);
                    let Some((at, state, of_this_log)) = &mut stored else {
                        continue;
                    };
                    if recorded.seq == at.seq {
                        *of_this_log = *hash == at.hash;
                    } else if recorded.seq > at.seq && *of_this_log {
                        state.fold(recorded);
                        state.head = Head {
                            seq: recorded.seq,
                            hash: *hash,
                        };
                    }
                }
            }
            let stored = stored.and_then(|(_, state, of_this_log)| of_this_log.then_some(state));
            (fresh, stored)
        };
        let read = |events: &mut ChunkSender<_>| {
            let mut last_recorded_at = Timestamp::default();
            log::scan(log_dir, mode, until, |record| {
                let recorded = decode_record(record.seq, record.payload)?;
                check_event(&recorded, &mut last_recorded_at)?;
                events.push((recorded, record.hash))
            })
        };
        match two_stages("verify-fold", read, fold) {
            Ok((scanned, (fresh, stored))) => (fresh, stored, scanned.map(drop)),
            Err(e) => {
                let e = LogError::Io {
                    path: log_dir.to_path_buf(),
                    op: "start the folding thread for",
                    source: e,
                };
                (FreshReplay::default(), None, Err(e))
            }
        }
    }

    /// Checks and folds the record after the head (its frame, CRC and
    /// chain hash are the caller's to check).
    pub(super) fn check(
        &mut self,
        seq: Seq,
        hash: &log::Hash,
        payload: &[u8],
    ) -> Result<(), String> {
        let recorded = decode_record(seq, payload)?;
        check_event(&recorded, &mut self.state.last_recorded_at)?;
        self.fold(&recorded, hash);
        Ok(())
    }

    fn fold(&mut self, recorded: &Recorded, hash: &log::Hash) {
        self.state.fold(recorded);
        self.state.head = Head {
            seq: recorded.seq,
            hash: *hash,
        };
        self.events += 1;
    }

    /// Checks and folds the durable records after the head up to `to`,
    /// read from the log beside the writer: frames, CRCs and the chain
    /// too. An error names the problem and, when known, the seq.
    pub(super) fn catch_up(&mut self, inner: &Inner, to: Seq) -> Result<(), (String, Option<Seq>)> {
        let from = self.state.head.seq + 1;
        if to < from {
            return Ok(());
        }
        let visited = visit_records(inner, from, to, |seq, hash, payload| {
            if log::chain_hash(&self.state.head.hash, seq, payload) != *hash {
                return Err("hash chain broken".into());
            }
            self.check(seq, hash, payload)
        });
        match visited {
            Err(LedgerError::Log(e)) => Err((e.to_string(), e.bad_seq())),
            Err(e) => Err((e.to_string(), None)),
            Ok(()) if self.state.head.seq < to => Err((
                format!(
                    "the log ends at seq {}, short of the durable head {to}",
                    self.state.head.seq
                ),
                Some(self.state.head.seq + 1),
            )),
            Ok(()) => Ok(()),
        }
    }

    /// The report of what was checked, `result` being the first problem.
    pub(super) fn report(&self, result: Result<(), String>, bad_seq: Option<Seq>) -> VerifyReport {
        let sum = self.state.views.postings_sum;
        let result = result.and_then(|()| {
            if sum.is_zero() {
                Ok(())
            } else {
                Err(format!("postings sum to {sum}"))
            }
        });
        VerifyReport {
            ok: result.is_ok(),
            events: self.events,
            head_seq: self.state.head.seq,
            head_hash: log::hex(&self.state.head.hash),
            bad_seq,
            problem: result.err(),
            projections: ProjectionsCheck::NotCompared,
            projections_detail: None,
        }
    }
}

/// What `verify` checks of each event beyond its record: its postings sum
/// to zero, and it was not recorded before the event before it (recorded
/// at `last`, which moves to it).
fn check_event(recorded: &Recorded, last: &mut Timestamp) -> Result<(), String> {
    let sum: Decimal = recorded.event.postings().iter().map(|p| p.amount).sum();
    if !sum.is_zero() {
        return Err(format!("postings sum to {sum}, not zero"));
    }
    if recorded.recorded_at < rules::EARLIEST_AT {
        return Err(format!(
            "recorded at {}, before 1970: no ledger records an event then",
            recorded.recorded_at.to_rfc3339()
        ));
    }
    if recorded.recorded_at < *last {
        return Err(format!(
            "recorded at {}, before the event before it ({}): recorded times never go back",
            recorded.recorded_at.to_rfc3339(),
            last.to_rfc3339()
        ));
    }
    *last = recorded.recorded_at;
    Ok(())
}

/// Where two projections first differ, for a person to look at (`None`
/// when they are equal): the program, and in it the affiliate, customer
/// or account, in id order.
pub(super) fn first_difference(live: &Projections, fresh: &Projections) -> Option<String> {
    if live == fresh {
        return None;
    }
    let mut programs: Vec<&ProgramId> = live.programs.keys().chain(fresh.programs.keys()).collect();
    programs.sort_unstable();
    programs.dedup();
    for id in programs {
        let (a, b) = match (live.programs.get(id), fresh.programs.get(id)) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Some(format!("program {id} is live only")),
            (None, _) => return Some(format!("program {id} is missing from the live ones")),
        };
        if a == b {
            continue;
        }
        if a.rules != b.rules {
            return Some(format!("program {id}: its rules"));
        }
        if let Some(affiliate) = first_differing_key(&a.affiliates, &b.affiliates) {
            return Some(format!("program {id}: affiliate {affiliate}"));
        }
        if let Some(customer) = first_differing_key(&a.customers, &b.customers) {
            return Some(format!("program {id}: customer {customer}"));
        }
        if a.commission_expense != b.commission_expense {
            return Some(format!(
                "program {id}: commission expense {} live, {} fresh",
                a.commission_expense, b.commission_expense
            ));
        }
        return Some(format!("program {id}: its closed months"));
    }
    if live.postings_sum != fresh.postings_sum {
        return Some(format!(
            "postings sum {} live, {} fresh",
            live.postings_sum, fresh.postings_sum
        ));
    }
    Some(format!(
        "projected up to seq {} live, {} fresh",
        live.last_seq, fresh.last_seq
    ))
}

/// The smallest key whose value differs between two maps, or that only one has.
fn first_differing_key<
    'a,
    K: Ord + std::hash::Hash + Eq,
    V: PartialEq,
    S: std::hash::BuildHasher,
>(
    a: &'a std::collections::HashMap<K, V, S>,
    b: &'a std::collections::HashMap<K, V, S>,
) -> Option<&'a K> {
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
        .min()
}
