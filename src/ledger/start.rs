//! The start: the state from the newest checkpoint the store holds, and the
//! log after it folded in two stages (read, check and decode on one thread,
//! fold on another).

use super::checkpoint::stored_state;
use super::indexer::IndexJob;
use super::*;

/// Decoded events handed from the reading thread to the folding one at a time.
const REPLAY_CHUNK: usize = 1024;

/// Chunks in flight between the two replay threads: a bound on memory.
const REPLAY_QUEUE_LEN: usize = 16;

/// The reading end of a two-thread replay: hands items to the folding
/// thread [`REPLAY_CHUNK`] at a time over a queue of [`REPLAY_QUEUE_LEN`].
pub(super) struct ChunkSender<T> {
    chunk: Vec<T>,
    to: std::sync::mpsc::SyncSender<Vec<T>>,
}

impl<T> ChunkSender<T> {
    /// The sender, and the receiver for the folding thread.
    fn channel() -> (ChunkSender<T>, std::sync::mpsc::Receiver<Vec<T>>) {
        let (to, received) = std::sync::mpsc::sync_channel(REPLAY_QUEUE_LEN);
        let chunk = Vec::with_capacity(REPLAY_CHUNK);
        (ChunkSender { chunk, to }, received)
    }

    pub(super) fn push(&mut self, item: T) -> Result<(), String> {
        self.chunk.push(item);
        if self.chunk.len() == REPLAY_CHUNK {
            let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(REPLAY_CHUNK));
            self.to
                .send(full)
                .map_err(|_| "the replay stopped".to_string())?;
        }
        Ok(())
    }

    /// Sends what is left; the folding thread's loop then ends.
    fn finish(self) {
        if !self.chunk.is_empty() {
            let _ = self.to.send(self.chunk);
        }
    }
}

/// Runs a replay in two stages on two threads, as a start does: `read`,
/// on this one, reads, checks and decodes the log and hands items through
/// its [`ChunkSender`] to `fold`, on a thread named `name`. Returns what
/// each stage returned; an error only when that thread does not start.
pub(super) fn two_stages<T: Send, R, S: Send>(
    name: &str,
    read: impl FnOnce(&mut ChunkSender<T>) -> R,
    fold: impl FnOnce(std::sync::mpsc::Receiver<Vec<T>>) -> S + Send,
) -> std::io::Result<(R, S)> {
    std::thread::scope(|scope| {
        let (mut sender, received) = ChunkSender::channel();
        let folder = std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, move || fold(received))?;
        let read = read(&mut sender);
        sender.finish();
        let folded = folder
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((read, folded))
    })
}

/// The state rebuilt at open, and what the store still has to index.
pub(super) struct Loaded {
    pub(super) log: Log,
    /// Read anchors of the records the store has not indexed.
    pub(super) anchors: BTreeMap<Seq, Position>,
    pub(super) state: State,
    pub(super) pending_index: Option<IndexJob>,
    pub(super) indexed: Seq,
    pub(super) checkpointed: Seq,
}

/// Opens the log (repairing a torn tail) and rebuilds the state: from the
/// store's checkpoint and the log after it when the store agrees with the
/// log (same hash at the seqs it names), else `None`.
pub(super) fn load(
    log_dir: &Path,
    store: &Store,
    segment_bytes: u64,
) -> Result<Option<Loaded>, LedgerError> {
    let (indexed_seq, indexed_hash) = store.indexed().unwrap_or((0, [0; 32]));
    let state = stored_state(store).ok().unwrap_or_default();
    let (checkpoint_seq, checkpoint_hash) = (state.head.seq, state.head.hash);
    let skip_upto = checkpoint_seq.min(indexed_seq);
    let (mut seen_indexed, mut seen_checkpoint) = (indexed_seq == 0, checkpoint_seq == 0);
    let mut anchors = Vec::new();
    let mut keys = HashMap::default();
    // Two stages on two threads: this one reads, checks and decodes the
    // log; the other folds the events into the state, in order.
    let fold = move |received: std::sync::mpsc::Receiver<Vec<(Recorded, log::Hash)>>| {
        let mut state = state;
        for chunk in received {
            // By reference: moving each event out of the chunk was a copy
            // of its bytes for nothing.
            for (recorded, hash) in &chunk {
                state.apply(recorded);
                state.head = Head {
                    seq: recorded.seq,
                    hash: *hash,
                };
            }
        }
        state
    };
    let read = |events: &mut ChunkSender<_>| {
        Log::open(log_dir, segment_bytes, |record| {
            if record.seq == indexed_seq {
                seen_indexed = record.hash == indexed_hash;
            }
            if record.seq == checkpoint_seq {
                seen_checkpoint = record.hash == checkpoint_hash;
            }
            if record.seq <= skip_upto {
                return Ok(());
            }
            let recorded = decode_record(record.seq, record.payload)?;
            if record.seq > indexed_seq {
                if is_stride_anchor(record.seq) {
                    anchors.push((record.seq, record.position));
                }
                note_key(&mut keys, &recorded);
            }
            if record.seq > checkpoint_seq {
                events.push((recorded, record.hash))?;
            }
            Ok(())
        })
    };
    let (opened, state) = two_stages("ledger-fold", read, fold).map_err(|e| LedgerError::Io {
        path: log_dir.to_path_buf(),
        source: e,
    })?;
    let (log, report) = opened?;
    let mut state = state;
    if !seen_indexed || !seen_checkpoint || report.head.seq < checkpoint_seq.max(indexed_seq) {
        return Ok(None);
    }
    state
        .recent_keys
        .extend(keys.iter().map(|(k, v)| (k.clone(), *v)));
    let recent_anchors = anchors.iter().copied().collect();
    let pending_index = (report.head.seq > indexed_seq).then(|| IndexJob {
        anchors,
        keys: keys.into_iter().collect(),
        seq: report.head.seq,
        hash: report.head.hash,
    });
    Ok(Some(Loaded {
        log,
        anchors: recent_anchors,
        state,
        pending_index,
        indexed: indexed_seq,
        checkpointed: checkpoint_seq,
    }))
}
