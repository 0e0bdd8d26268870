//! The indexer: the thread that writes what the syncer made durable into
//! the store (sparse seq → position anchors, idempotency keys, saved
//! checkpoints), off the acknowledgement path, with a bounded inbox.

use super::checkpoint::{EncodedCheckpoint, save_checkpoint};
use super::*;

/// The default [`LedgerConfig::index_backlog`]: at the 5–7k group commits
/// a second this disk allows, sled may trail by a sixth of a second.
pub(super) const INDEX_BACKLOG: usize = 1024;

/// Messages waiting for the indexer: one per take of the inbox, and the
/// checkpoints.
pub(super) const INDEX_QUEUE_LEN: usize = 1024;

/// What the indexer thread is told.
pub(super) enum StoreJob {
    /// Index jobs wait in the [`IndexInbox`]: take them once
    /// [`INDEX_INTERVAL`] has passed.
    IndexWaiting,
    /// [`LedgerConfig::index_backlog`] group commits wait in the inbox,
    /// and the syncer with them: take them now.
    IndexFull,
    /// A checkpoint the writer encoded: saving it (sled, about a third of
    /// its cost) stays off the writer thread.
    Checkpoint(EncodedCheckpoint),
}

/// What the indexer writes to the store for a stretch of the log.
pub(super) struct IndexJob {
    pub(super) anchors: Vec<(Seq, Position)>,
    pub(super) keys: Vec<(String, KeyRow)>,
    pub(super) seq: Seq,
    pub(super) hash: log::Hash,
}

/// The syncer's index jobs, merged as they come until the indexer takes
/// them. The syncer tells the indexer only of the first job after a take;
/// it used to send every group commit's job, which woke the indexer about
/// 7,000 times a second under load, only for it to merge them.
pub(super) struct IndexInbox {
    /// The merged job and how many group commits it holds.
    waiting: Mutex<Option<(IndexJob, usize)>>,
    taken: std::sync::Condvar,
    /// The indexer has stopped: nobody takes any more.
    closed: AtomicBool,
    /// [`LedgerConfig::index_backlog`], at least 1.
    limit: usize,
}

/// What [`IndexInbox::put`] found.
pub(super) enum Put {
    /// The inbox was empty: the indexer must be told.
    First,
    Merged,
    /// `limit` group commits wait.
    Full,
}

impl IndexInbox {
    pub(super) fn new(limit: usize) -> IndexInbox {
        IndexInbox {
            waiting: Mutex::new(None),
            taken: std::sync::Condvar::new(),
            closed: AtomicBool::new(false),
            limit: limit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(IndexJob, usize)>> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn put(&self, job: IndexJob) -> Put {
        let mut waiting = self.lock();
        let (first, count) = match waiting.as_mut() {
            None => (true, &mut waiting.insert((job, 0)).1),
            Some((merged, count)) => {
                merged.absorb(job);
                (false, count)
            }
        };
        *count += 1;
        if *count >= self.limit {
            Put::Full
        } else if first {
            Put::First
        } else {
            Put::Merged
        }
    }

    fn take(&self) -> Option<IndexJob> {
        let taken = self.lock().take().map(|(job, _)| job);
        self.taken.notify_all();
        taken
    }

    /// Waits until the indexer has taken a full inbox (or has stopped).
    fn wait_for_room(&self) {
        let mut waiting = self.lock();
        while waiting.as_ref().is_some_and(|(_, n)| *n >= self.limit)
            && !self.closed.load(Ordering::Acquire)
        {
            waiting = self
                .taken
                .wait_timeout(waiting, std::time::Duration::from_millis(100))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// Hands a job to the indexer: tells it when it is the first since a
    /// take, and waits while the inbox is full (counted in `waits`).
    pub(super) fn hand_over(
        &self,
        job: IndexJob,
        indexer: &std::sync::mpsc::SyncSender<StoreJob>,
        waits: &AtomicU64,
    ) {
        match self.put(job) {
            Put::First => {
                let _ = indexer.send(StoreJob::IndexWaiting);
            }
            Put::Merged => {}
            Put::Full => {
                if indexer.send(StoreJob::IndexFull).is_ok() {
                    waits.fetch_add(1, Ordering::Relaxed);
                    self.wait_for_room();
                }
            }
        }
    }
}

/// Marks the inbox closed when the indexer stops, however it stops.
struct CloseInbox<'a>(&'a IndexInbox);

impl Drop for CloseInbox<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.taken.notify_all();
    }
}

impl IndexJob {
    /// Takes in the next job: one sled write for both.
    pub(super) fn absorb(&mut self, next: IndexJob) {
        self.anchors.extend(next.anchors);
        self.keys.extend(next.keys);
        self.seq = next.seq;
        self.hash = next.hash;
    }
}

/// How long the indexer gathers the writer's batches into one sled write.
/// sled costs per write (measured: one sled write per group commit took a
/// quarter of the CPU under write load, in sled's own I/O threads); the
/// memory tail answers for what it has not written yet.
const INDEX_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

pub(super) fn indexer_loop(inner: &Inner, jobs: std::sync::mpsc::Receiver<StoreJob>) {
    use std::sync::mpsc::RecvTimeoutError;
    let _closed = CloseInbox(&inner.index_inbox);
    let mut failed = false;
    let mut deadline: Option<Instant> = None;
    let mut write_index = || {
        let Some(job) = inner.index_inbox.take() else {
            return;
        };
        match inner
            .store
            .index(&job.anchors, &job.keys, job.seq, &job.hash)
        {
            Ok(()) => inner.indexed.store(job.seq, Ordering::Release),
            Err(e) if !failed => {
                failed = true;
                eprintln!(
                    "error: {e}; the tail stays in memory until the next start rebuilds the index"
                );
            }
            Err(_) => {}
        }
    };
    loop {
        // Let the inbox gather what comes within the interval: one sled
        // batch for many log batches. The syncer keeps going meanwhile.
        let received = match deadline {
            None => jobs.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => jobs.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match received {
            Ok(StoreJob::IndexWaiting) => {
                deadline.get_or_insert_with(|| Instant::now() + INDEX_INTERVAL);
            }
            Ok(StoreJob::IndexFull) | Err(RecvTimeoutError::Timeout) => {
                write_index();
                deadline = None;
            }
            Ok(StoreJob::Checkpoint(checkpoint)) => {
                write_index();
                deadline = None;
                save_checkpoint(inner, checkpoint);
            }
            Err(RecvTimeoutError::Disconnected) => {
                write_index();
                break;
            }
        }
    }
    let _ = inner.store.flush();
}
