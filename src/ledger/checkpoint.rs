//! Checkpoints of the state: encoding one (cancellable), decoding one,
//! building one beside the writer and saving it, and the policy and the
//! thread that decide when.

use super::*;

/// A checkpoint encoded (by the builder, or by the writer at shutdown), on
/// its way to the indexer, which saves it in the store.
pub(super) struct EncodedCheckpoint {
    seq: Seq,
    hash: log::Hash,
    /// The UTC month of its last event, `YYYYMM`.
    month: u32,
    bytes: Vec<u8>,
    /// When the writer started encoding it, for the statistics.
    started: Instant,
}

/// The checkpoint's bytes as postcard writes them; one built beside the
/// writer stops as soon as `cancel` is set (the ledger is closing).
struct CheckpointOutput<'a> {
    bytes: Vec<u8>,
    cancel: Option<&'a AtomicBool>,
    checked_at: usize,
}

/// How often (in bytes written) a checkpoint being built looks at `cancel`.
const CANCEL_CHECK_BYTES: usize = 64 << 10;

impl postcard::ser_flavors::Flavor for &mut CheckpointOutput<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.bytes.push(byte);
        self.check()
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.bytes.extend_from_slice(data);
        self.check()
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

impl CheckpointOutput<'_> {
    fn check(&mut self) -> postcard::Result<()> {
        if self.bytes.len() - self.checked_at < CANCEL_CHECK_BYTES {
            return Ok(());
        }
        self.checked_at = self.bytes.len();
        match self.cancel {
            Some(cancel) if cancel.load(Ordering::Relaxed) => {
                Err(postcard::Error::SerializeBufferFull)
            }
            _ => Ok(()),
        }
    }
}

/// Encodes `state` as a checkpoint; `None` when cancelled or when it
/// cannot be encoded (reported).
fn encode_state(
    inner: &Inner,
    state: &State,
    cancel: Option<&AtomicBool>,
    started: Instant,
) -> Option<EncodedCheckpoint> {
    let checkpoint = CheckpointRef {
        model: &state.model,
        views: &state.views,
        last_recorded_at: state.last_recorded_at,
    };
    // Sized like the last one (plus growth): growing a 100 MB buffer by
    // doubling copied it about twice over.
    let last = inner.stats.checkpoint_bytes.load(Ordering::Relaxed) as usize;
    let mut output = CheckpointOutput {
        bytes: Vec::with_capacity(last + last / 4),
        cancel,
        checked_at: 0,
    };
    match postcard::serialize_with_flavor(&checkpoint, &mut output) {
        Ok(()) => Some(EncodedCheckpoint {
            seq: state.head.seq,
            hash: state.head.hash,
            month: {
                let month = state.last_recorded_at.month_in(chrono_tz::UTC);
                month.year().max(0) as u32 * 100 + month.month()
            },
            bytes: output.bytes,
            started,
        }),
        Err(_) if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) => None,
        Err(e) => {
            eprintln!(
                "warning: checkpoint at seq {} not encoded: {e}",
                state.head.seq
            );
            None
        }
    }
}

/// Encodes a checkpoint of the live state, once every decided batch is
/// durable (at shutdown: the writer has stopped).
pub(super) fn encode_checkpoint(inner: &Inner) -> Option<EncodedCheckpoint> {
    let started = Instant::now();
    let state = inner.state.read();
    if state.head.seq == 0 || state.head.seq > inner.durable.load(Ordering::Acquire) {
        return None;
    }
    encode_state(inner, &state, None, started)
}

/// The state a stored checkpoint's bytes encode, at its head; `None` when
/// they do not decode.
pub(super) fn decode_checkpoint(seq: Seq, hash: log::Hash, bytes: &[u8]) -> Option<State> {
    let checkpoint: Checkpoint =
        crate::events::decode_shared(|| postcard::from_bytes(bytes)).ok()?;
    Some(State::from_checkpoint(checkpoint, seq, hash))
}

/// Builds a checkpoint at `target` (a durable seq) beside the writer, as a
/// start would: the last checkpoint in the store, then the log from there
/// to `target`, folded into a state of its own, which is encoded. So the
/// writer never waits for a checkpoint, however large the state; the cost
/// is this thread's CPU and, while it runs, a second copy of the state.
/// `None` when there is nothing newer to save, when `cancel` is set, or on
/// a problem (reported: a checkpoint is derived, and the next start
/// replays more of the log).
fn build_checkpoint(inner: &Inner, target: Seq, cancel: &AtomicBool) -> Option<EncodedCheckpoint> {
    let started = Instant::now();
    let mut state = match stored_state(&inner.store) {
        Ok(state) => state,
        Err(e) => {
            eprintln!("warning: checkpoint at seq {target} not built: {e}");
            return None;
        }
    };
    if state.head.seq >= target || cancel.load(Ordering::Relaxed) {
        return None;
    }
    let mut cancelled = false;
    let folded = fold_log(inner, &mut state, target, |seq| {
        cancelled = seq % 4096 == 0 && cancel.load(Ordering::Relaxed);
        cancelled
    });
    if cancelled {
        return None;
    }
    if let Err(e) = folded {
        eprintln!("warning: checkpoint at seq {target} not built: {e}");
        return None;
    }
    if state.head.seq != target {
        eprintln!(
            "warning: checkpoint at seq {target} not built: the log ends at seq {}",
            state.head.seq
        );
        return None;
    }
    encode_state(inner, &state, Some(cancel), started)
}

/// Saves an encoded checkpoint to the store (derived data: a failure is
/// reported and the next start replays more of the log).
pub(super) fn save_checkpoint(inner: &Inner, checkpoint: EncodedCheckpoint) {
    let EncodedCheckpoint {
        seq,
        hash,
        month,
        bytes,
        started,
    } = checkpoint;
    match inner
        .store
        .save_checkpoint(seq, &hash, month, &bytes, inner.kept_checkpoints)
    {
        Ok(()) => {
            inner.checkpointed.fetch_max(seq, Ordering::AcqRel);
            let stats = &inner.stats;
            stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            stats
                .checkpoint_bytes
                .store(bytes.len() as u64, Ordering::Relaxed);
            stats
                .checkpoint_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        Err(e) => eprintln!("warning: checkpoint at seq {seq} not written: {e}"),
    }
}

/// Borrows the state for a checkpoint; encodes exactly as [`Checkpoint`].
#[derive(serde::Serialize)]
struct CheckpointRef<'a> {
    model: &'a Model,
    views: &'a Projections,
    last_recorded_at: Timestamp,
}

/// How long the ledger must have been quiet (no event made durable, no
/// submitter waiting) before the checkpoint builder makes a checkpoint that
/// is due but not yet forced; also how often it looks while one is due.
const QUIET: std::time::Duration = std::time::Duration::from_millis(20);

/// While no checkpoint would be due even in a lull, the checkpoint builder
/// looks half as often each time, down to once per this: an idle server
/// wakes it about once a second, not 50 times.
const LOOK_AT_MOST_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The nice value of the checkpoint builder: when the cores are busy
/// (batch ingest), the threads that answer requests come first, and a
/// checkpoint takes longer (measured with `http-load 10 64 batch`, 2 pairs
/// each way: 265–308k events/s at nice 10, 221–266k at the writer's 0).
pub(super) const CHECKPOINT_NICE: i32 = 10;

/// Sets the calling thread's nice value (Linux: per thread). Best effort:
/// a failure leaves the thread at the process's priority.
pub(super) fn lower_this_threads_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours; on Linux, `who` 0 with PRIO_PROCESS is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, nice);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// When the writer asks for a checkpoint ([`LedgerConfig::checkpoint_every`],
/// [`LedgerConfig::checkpoint_forced_after`]).
#[derive(Clone, Copy)]
pub(super) struct CheckpointPolicy {
    pub(super) every: u64,
    pub(super) forced_after: u64,
}

impl CheckpointPolicy {
    /// A checkpoint costs CPU and memory in proportion to the state (it is
    /// built beside the writer, from the last one and the log since): it
    /// waits for a quiet moment once `every` events are due, and is forced
    /// only when the tail since the last one is both `forced_after` events
    /// and half the log, so that under steady load the work of building
    /// them stays in proportion to the events appended.
    pub(super) fn due(self, head: Seq, checkpointed: Seq, quiet: bool) -> bool {
        let since = head.saturating_sub(checkpointed);
        since >= self.every && (quiet || since >= self.forced_after.max(head / 2))
    }
}

/// Claims the one checkpoint build; false when one is under way.
pub(super) fn start_building(building: &AtomicBool) -> bool {
    building
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// The checkpoint builder: builds the checkpoints the writer forces, and
/// by itself one that is due once the ledger has been quiet for [`QUIET`]
/// (nothing made durable over a whole look, no submitter waiting), so that
/// a lull's checkpoint is built in the lull, not when the next burst
/// begins, and a ledger that falls idle gets one without another command.
pub(super) fn checkpoint_builder_loop(
    inner: &Inner,
    asked: std::sync::mpsc::Receiver<Seq>,
    policy: CheckpointPolicy,
    cancel: &AtomicBool,
) {
    let building = &inner.stats.checkpoint_building;
    let mut seen = inner.durable.load(Ordering::Acquire);
    let mut look = QUIET;
    loop {
        let target = match asked.recv_timeout(look) {
            Ok(target) => target,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let head = inner.durable.load(Ordering::Acquire);
                let quiet = head == seen && inner.in_flight.load(Ordering::Acquire) == 0;
                seen = head;
                let checkpointed = inner.checkpointed.load(Ordering::Acquire);
                // Until one would be due in a lull, look less and less often.
                look = if policy.due(head, checkpointed, true) {
                    QUIET
                } else {
                    (look * 2).min(LOOK_AT_MOST_EVERY)
                };
                if !(quiet && policy.due(head, checkpointed, true) && start_building(building)) {
                    continue;
                }
                head
            }
        };
        look = QUIET;
        inner.wait_durable(target);
        if let Some(built) = build_checkpoint(inner, target, cancel) {
            save_checkpoint(inner, built);
        }
        building.store(false, Ordering::Release);
        seen = inner.durable.load(Ordering::Acquire);
    }
}

/// The checkpoint kept at `seq` ([`Store::save_checkpoint`]), if it reads
/// and its hash is the log's at that seq (else, warned about, an empty
/// state: it is derived, and the read replays from the start).
pub(super) fn kept_state(inner: &Inner, seq: Seq) -> Result<State, LedgerError> {
    let kept = inner
        .store
        .load_kept_checkpoint(seq, decode_checkpoint)
        .unwrap_or_else(|e| {
            eprintln!("warning: {e}");
            None
        })
        .flatten();
    let mut logged = None;
    visit_events(inner, seq, seq, |_, hash| {
        logged = Some(*hash);
        Ok(())
    })?;
    match kept {
        Some(state) if Some(state.head.hash) == logged => Ok(state),
        _ => {
            eprintln!("warning: the checkpoint kept at seq {seq} does not match the log; not used");
            Ok(State::default())
        }
    }
}

/// The state of the store's last checkpoint, at its head; the empty state
/// when there is none, or none of this format, or it does not decode.
pub(super) fn stored_state(store: &Store) -> Result<State, StoreError> {
    Ok(store
        .load_checkpoint(decode_checkpoint)?
        .flatten()
        .unwrap_or_default())
}

/// Folds the log after `state`'s head up to `target` into it; `stop`,
/// asked before each event, ends the fold early (with an error). Returns
/// the events folded.
pub(super) fn fold_log(
    inner: &Inner,
    state: &mut State,
    target: Seq,
    mut stop: impl FnMut(Seq) -> bool,
) -> Result<u64, LedgerError> {
    let mut folded = 0u64;
    visit_events(inner, state.head.seq + 1, target, |recorded, hash| {
        if stop(recorded.seq) {
            return Err("stopped".into());
        }
        // A state folded here takes no command: no idempotency keys.
        state.fold(&recorded);
        state.head = Head {
            seq: recorded.seq,
            hash: *hash,
        };
        folded += 1;
        Ok(())
    })?;
    Ok(folded)
}
