//! Reads of the past and what-if replays: the bounded replays behind
//! `as_of` (and the checkpoints they start from), the what-if replays kept
//! on disk, and the turns the whole-log readers (verifications, what-if
//! replays) take one at a time.

use super::checkpoint::{fold_log, kept_state, stored_state};
use super::*;

/// A what-if replay: what was asked, where in the log, and its diff.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Replay {
    pub replay_id: Uuid,
    pub program: ProgramId,
    /// The log position the diff was computed at.
    pub at_seq: Seq,
    pub computed_at: Timestamp,
    pub overrides: Overrides,
    pub months: Option<MonthRange>,
    pub diff: crate::replay::Diff,
    /// The seq of its `ReplayApplied` once applied.
    pub applied_seq: Option<Seq>,
}

/// Replays kept for `GET` and apply, in memory and in `DATA/replays/`
/// (so that a diff under review survives a restart); the oldest go first.
/// Applied ones are recomputed from the log when asked for again.
pub const MAX_KEPT_REPLAYS: usize = 256;

/// Replays of the log for `as_of` reads that run at once. Each folds the
/// log, from the newest checkpoint before its past or else from the start,
/// into a state of its own (about a second and a whole state's memory per
/// million events), so they take turns.
pub const HISTORY_REPLAYS: usize = 1;

/// Past states kept after their replay, the most recently read last: a
/// portal reading every affiliate's balance at one month's end replays
/// the log once.
pub const HISTORY_KEPT: usize = 2;

/// Reads of the past that may wait for a replay; one more is refused
/// ([`LedgerError::Busy`]) rather than hold a thread and, later, a state.
pub const HISTORY_WAITING: usize = 32;

/// Verifications (`GET /v1/verify`) and what-if replays (computing one,
/// reading back an applied one, applying one) that may wait for their
/// turn; one more is refused as busy. Each reads the whole log into a
/// state of its own, so they run one at a time (`WholeLogTurns`).
pub const WHOLE_LOG_WAITING: usize = 8;

/// One whole-log job at a time, and at most [`WHOLE_LOG_WAITING`] waiting.
#[derive(Default)]
pub(super) struct WholeLogTurns {
    /// Whether one runs, and how many wait.
    slots: Mutex<(bool, usize)>,
    changed: std::sync::Condvar,
}

/// A whole-log job's turn; dropping it (however the job ends) lets the
/// next one go.
pub(super) struct WholeLogTurn<'a>(&'a WholeLogTurns);

impl WholeLogTurns {
    pub(super) fn take(&self) -> Result<WholeLogTurn<'_>, Busy> {
        let lock = || {
            self.slots
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        let mut slots = lock();
        if slots.0 {
            if slots.1 >= WHOLE_LOG_WAITING {
                return Err(Busy);
            }
            slots.1 += 1;
            while slots.0 {
                slots = self
                    .changed
                    .wait(slots)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            slots.1 -= 1;
        }
        slots.0 = true;
        Ok(WholeLogTurn(self))
    }
}

impl Drop for WholeLogTurn<'_> {
    fn drop(&mut self) {
        self.0
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0 = false;
        self.0.changed.notify_one();
    }
}

/// Too many whole-log jobs are waiting.
#[derive(Debug)]
pub(super) struct Busy;

pub(super) const WHOLE_LOG_BUSY: &str = "verifications and what-if replays run one at a time, and enough are waiting; try again shortly";

/// The past states `as_of` reads are answered from. A past state never
/// changes: a seq names a fixed prefix of the log, and a time before the
/// last event's names a seq (the last event recorded at or before it,
/// which is already there). So a state is kept by the seq it answers for,
/// and a read of the same past, by seq or by time, waits for the replay
/// under way instead of starting its own.
#[derive(Default)]
pub(super) struct History {
    slots: Mutex<HistorySlots>,
    changed: std::sync::Condvar,
    /// Replays run so far.
    pub(super) replays: AtomicU64,
    /// Events those replays folded (from a checkpoint, only the tail).
    pub(super) folded: AtomicU64,
}

#[derive(Default)]
struct HistorySlots {
    kept: std::collections::VecDeque<(Seq, Arc<State>)>,
    replaying: Vec<Seq>,
    waiting: usize,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, HistorySlots> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state as of seq `key`: kept, replayed by another read meanwhile,
    /// or replayed here by `replay` (once a turn is free).
    pub(super) fn state_at(
        &self,
        key: Seq,
        replay: impl FnOnce() -> Result<State, LedgerError>,
    ) -> Result<Arc<State>, LedgerError> {
        let mut slots = self.lock();
        let mut waited = false;
        loop {
            if let Some(i) = slots.kept.iter().position(|(k, _)| *k == key)
                && let Some(entry) = slots.kept.remove(i)
            {
                let state = entry.1.clone();
                slots.kept.push_back(entry);
                if waited {
                    slots.waiting -= 1;
                }
                return Ok(state);
            }
            if !slots.replaying.contains(&key) && slots.replaying.len() < HISTORY_REPLAYS {
                break;
            }
            if !waited {
                if slots.waiting >= HISTORY_WAITING {
                    return Err(LedgerError::Busy);
                }
                slots.waiting += 1;
                waited = true;
            }
            slots = self
                .changed
                .wait(slots)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if waited {
            slots.waiting -= 1;
        }
        slots.replaying.push(key);
        drop(slots);
        // Ends the turn however the replay ends (a panic included).
        struct Turn<'a>(&'a History, Seq, Option<Arc<State>>);
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                let mut slots = self.0.lock();
                slots.replaying.retain(|k| *k != self.1);
                if let Some(state) = self.2.take() {
                    while slots.kept.len() >= HISTORY_KEPT {
                        slots.kept.pop_front();
                    }
                    slots.kept.push_back((self.1, state));
                }
                self.0.changed.notify_all();
            }
        }
        let mut turn = Turn(self, key, None);
        self.replays.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(replay()?);
        turn.2 = Some(state.clone());
        Ok(state)
    }
}

/// Where computed replays are kept across restarts: one JSON file each,
/// `{replay_id}.json`, as `GET .../replays/{id}` shows it.
pub(super) const REPLAYS_DIR: &str = "replays";

/// Where the replay `id` is kept in `dir`.
fn replay_file(dir: &Path, id: &Uuid) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Keeps a computed replay on disk: written whole under a temporary name,
/// synced, then renamed, so a crash leaves it whole or absent. Then drops
/// the oldest beyond [`MAX_KEPT_REPLAYS`] (ids are UUID v7: they sort by time).
pub(super) fn save_replay(dir: &Path, replay: &Replay) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let path = replay_file(dir, &replay.replay_id);
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(replay).map_err(std::io::Error::other)?;
    {
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, &path)?;
    File::open(dir)?.sync_all()?;
    let mut kept: Vec<Uuid> = Vec::new();
    for entry in fs::read_dir(dir)?.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(".json.tmp") {
            // Left by a crash mid-write (this one's was renamed above).
            fs::remove_file(entry.path())?;
        } else if let Some(id) = name.strip_suffix(".json").and_then(|id| id.parse().ok()) {
            kept.push(id);
        }
    }
    kept.sort_unstable();
    let excess = kept.len().saturating_sub(MAX_KEPT_REPLAYS);
    for id in &kept[..excess] {
        fs::remove_file(replay_file(dir, id))?;
    }
    Ok(())
}

/// A replay kept on disk, if there is one; a file that cannot be read is
/// reported and treated as absent (the replay can be computed again).
pub(super) fn load_replay(dir: &Path, id: &Uuid) -> Option<Replay> {
    let path = replay_file(dir, id);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            eprintln!("warning: {}: {e}", path.display());
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(replay) => Some(replay),
        Err(e) => {
            eprintln!("warning: {}: not a replay: {e}", path.display());
            None
        }
    }
}

/// What [`Ledger::read`] finds under the state's lock: the answer, when
/// the read is of the present, or the head and the read not yet made.
pub(super) enum Now<T, F> {
    Answered(T),
    Past(Seq, F),
}

/// The state after `target` (a durable seq), for a read of the past: from
/// the newest checkpoint not past `target`, the last one or one kept (the
/// last of a month), since decoding one costs in proportion to the state
/// and a replay in proportion to the log before it; else from the start;
/// then the log up to `target`.
pub(super) fn past_state(inner: &Inner, target: Seq) -> Result<State, LedgerError> {
    let checkpointed = inner.checkpointed.load(Ordering::Acquire);
    let kept = inner
        .store
        .kept_seqs()
        .map_err(store_error)?
        .into_iter()
        .filter(|seq| *seq <= target)
        .max()
        .unwrap_or(0);
    let mut state = if checkpointed > 0 && checkpointed <= target && checkpointed >= kept {
        stored_state(&inner.store).map_err(store_error)?
    } else if kept > 0 {
        kept_state(inner, kept)?
    } else {
        State::default()
    };
    if state.head.seq > target {
        // A newer checkpoint was saved meanwhile.
        state = State::default();
    }
    let folded = fold_log(inner, &mut state, target, |_| false)?;
    inner.history.folded.fetch_add(folded, Ordering::Relaxed);
    if state.head.seq != target {
        let what = format!("the log ends at seq {} before seq {target}", state.head.seq);
        return Err(log_short_of(&inner.log_dir, state.head.seq + 1, what));
    }
    Ok(state)
}
