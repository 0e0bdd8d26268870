//! The single writer and the read model: the only place that joins the log,
//! the rules and the projections.
//!
//! Writes: every [`Submission`] goes through one bounded queue to one writer
//! thread. The writer takes every command waiting (up to a batch limit),
//! decides each in log order against the state left by the one before, and
//! frames the batch's records. A syncer thread writes every framed batch
//! waiting and makes them durable with one `fdatasync` (group commit), then
//! publishes the durable head and answers the callers; meanwhile the writer
//! decides the next batch. The writer decides what comes at once; the
//! syncer, when fewer than half of the active submitters have a command
//! decided, lingers (a bounded moment) for the others, typically those it
//! just answered, so that they share one `fdatasync`; where that carries
//! more (a fast disk, many submitters, idle cores), it syncs them in two
//! alternating halves instead, one half decided while the other syncs
//! (chosen by trying, `GroupCommit`). A failed write or
//! sync stops the process: nothing unacknowledged is ever served, nothing
//! acknowledged is ever lost.
//!
//! Checkpoints: when one is due, the writer asks a checkpoint builder
//! thread for it and goes on; the builder folds the log since the last
//! checkpoint into that one's state, encodes it and saves it.
//!
//! Reads see the state once its head is durable ([`Ledger::state`] waits for
//! the batches in flight), or, `as_of` an earlier seq or time, a replay of
//! the log up to there.
//!
//! This file holds the [`Ledger`] handle, its configuration, errors and
//! state; the rest is in submodules, each a thread or a job of its own:
//! `writer` (the writer, the pipeline to the syncer, group commit),
//! `indexer` (sled behind the syncer), `checkpoint` (encoding, building,
//! saving), `start` (the state at open: checkpoint, then the log in two
//! stages), `history` (reads `as_of` the past, what-if replays),
//! `verify`, and `data_dir` (export, import, repair, backup).

use parking_lot::{RwLock, RwLockReadGuard};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rust_decimal::Decimal;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::events::HashMap;
use crate::events::*;
use crate::log::{self, Head, Log, LogError, Position, ScanMode};
use crate::projections::*;
use crate::rules::{self, Command, Context, Decision, IdSource, Model, Noop, Rejection};
use crate::store::{KeyRow, POSITION_STRIDE, Store, StoreError};

mod checkpoint;
mod data_dir;
mod history;
mod indexer;
mod start;
mod verify;
mod writer;

pub use data_dir::{
    ExportLine, MAX_IMPORT_LINE, RepairReport, backup, export_ndjson, import_ndjson, rebuild_index,
    repair_log,
};
pub use history::{
    HISTORY_KEPT, HISTORY_REPLAYS, HISTORY_WAITING, MAX_KEPT_REPLAYS, Replay, WHOLE_LOG_WAITING,
};
pub use verify::{ProjectionsCheck, VerifyReport, verify_data_dir, verify_log};

use checkpoint::CheckpointPolicy;
use history::{
    Busy, History, Now, REPLAYS_DIR, WHOLE_LOG_BUSY, WholeLogTurns, load_replay, past_state,
    save_replay,
};
use indexer::{INDEX_BACKLOG, INDEX_QUEUE_LEN, IndexInbox, StoreJob, indexer_loop};
use start::{ChunkSender, Loaded, load, two_stages};
use verify::{FreshReplay, VERIFY_CATCH_UP_ROUNDS, VERIFY_LOCKED_CATCH_UP, first_difference};
use writer::{GroupCommitPolicy, writer_loop};

/// The clock the ledger reads; tests drive their own.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The actor of the month closes the server makes by itself
/// (`auto_close_day`).
pub const AUTO_CLOSE_ACTOR: &str = "auto-close";

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(|| Timestamp::from_datetime(chrono::Utc::now()))
}

/// How a ledger is opened. Every limit is here.
#[derive(Clone)]
pub struct LedgerConfig {
    pub data_dir: PathBuf,
    pub segment_bytes: u64,
    /// Commands waiting for the writer; submitters wait when it is full.
    pub queue_len: usize,
    /// Commands decided and made durable together, at most.
    pub max_batch: usize,
    /// Events between checkpoints of the state in the store, at least
    /// (made when the ledger has been quiet a moment, and at shutdown).
    pub checkpoint_every: u64,
    /// Under load that leaves no idle moment, a checkpoint is forced once
    /// this many events and half the log are not in one: a start then
    /// replays at most the larger of the two. A checkpoint is built beside
    /// the writer, but costs CPU and memory in proportion to the state
    /// (measured: 2.4–3.3 s of a second core and a second copy of the state
    /// for a million lines), and replaying a million events takes about a
    /// second, so forcing one for a shorter tail would cost more than it
    /// saves a start.
    pub checkpoint_forced_after: u64,
    /// How long the syncer may wait for active submitters to join a sync.
    pub group_commit_linger: std::time::Duration,
    /// Whether the syncer may sync submitters who wait for their answer in
    /// two alternating halves, one deciding while the other syncs, when
    /// that carries more than one group (a fast disk, many submitters).
    pub group_commit_halves: bool,
    /// Zero-filled space added to the active segment at a time, so that
    /// `fdatasync` need not update the file size.
    pub preallocate_bytes: u64,
    /// Group commits whose index rows (read anchors, idempotency keys) may
    /// wait for sled at once. Beyond it the syncer, and with it every
    /// submitter, waits for the indexer: sled trails the log by at most
    /// this many group commits (at least 1), and memory holds at most
    /// their rows.
    pub index_backlog: usize,
    /// Checkpoints kept for reads of the past besides the last one: the
    /// last of each month (UTC), the newest this many. Each is a whole
    /// state on disk (derived: deleting `index/` drops them); 0 keeps none.
    pub kept_checkpoints: usize,
    pub clock: Clock,
}

impl LedgerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> LedgerConfig {
        LedgerConfig {
            data_dir: data_dir.into(),
            segment_bytes: log::DEFAULT_SEGMENT_BYTES,
            queue_len: 16_384,
            max_batch: 4_096,
            checkpoint_every: 100_000,
            checkpoint_forced_after: 1_000_000,
            group_commit_linger: std::time::Duration::from_micros(250),
            group_commit_halves: true,
            preallocate_bytes: log::PREALLOCATE_BYTES,
            index_backlog: INDEX_BACKLOG,
            kept_checkpoints: 12,
            clock: system_clock(),
        }
    }
}

/// Fail-stop problems: the ledger cannot open or must not go on.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("import line {line}: {message}")]
    Import { line: usize, message: String },
    #[error("the ledger has stopped")]
    Stopped,
    /// Too many reads of the past are waiting for their replay.
    #[error("{HISTORY_WAITING} reads of the past are already waiting; try again shortly")]
    Busy,
    /// Too many verifications and what-if replays are waiting.
    #[error("{WHOLE_LOG_BUSY}")]
    WholeLogBusy,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError {
    let path = path.to_path_buf();
    move |source| LedgerError::Io { path, source }
}

/// Why a submission was not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The rules refused it; nothing was recorded.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The idempotency key was used before with another request.
    #[error("idempotency key `{0}` was used with another request")]
    IdempotencyConflict(String),
    /// The writer is gone (shut down, or stopped on a failed write).
    #[error("the ledger is not accepting writes")]
    Stopped,
    /// Reading the log failed (a what-if replay); logged, answered as 500.
    #[error("{0}")]
    Failed(String),
    /// Too many verifications and what-if replays are waiting.
    #[error("{WHOLE_LOG_BUSY}")]
    Busy,
}

/// A command with everything the log records around it.
#[derive(Clone, Debug)]
pub struct Submission {
    pub program: Option<ProgramId>,
    /// Key id, `cli` or `system`.
    pub actor: Text,
    /// When it happened, if not now.
    pub at: Option<Timestamp>,
    pub idempotency: Option<Idempotency>,
    pub command: Command,
}

impl Submission {
    pub fn new(program: Option<&ProgramId>, actor: &str, command: Command) -> Submission {
        Submission {
            program: program.cloned(),
            actor: Text::new(actor),
            at: None,
            idempotency: None,
            command,
        }
    }

    pub fn at(mut self, at: Timestamp) -> Submission {
        self.at = Some(at);
        self
    }

    /// Sets the idempotency key, with a hash of the request (the API hashes
    /// the request it received; this hashes the command itself).
    pub fn idempotency_key(mut self, key: &str) -> Submission {
        let request = format!("{:?}|{:?}|{:?}", self.program, self.at, self.command);
        self.idempotency = Some(Idempotency {
            key: key.to_string(),
            request_hash: Bytes(*blake3::hash(request.as_bytes()).as_bytes()),
        });
        self
    }
}

/// The answer to an acknowledged submission: its events, now durable, or
/// the no-op it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    pub events: Vec<Recorded>,
    pub noop: Option<Noop>,
    /// The answer of an earlier submission with the same idempotency key.
    pub replayed: bool,
}

struct Job {
    /// When the submitter queued it, for [`WriterStats::queue_wait_us`].
    queued_at: Instant,
    submission: Submission,
    reply: oneshot::Sender<Result<Receipt, SubmitError>>,
}

impl Job {
    /// A job queued now, and where its answer will come.
    fn new(submission: Submission) -> (Job, oneshot::Receiver<Result<Receipt, SubmitError>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            queued_at: Instant::now(),
            submission,
            reply,
        };
        (job, answer)
    }
}

/// Everything derived from the log: what decisions and reads see.
#[derive(Clone, Default)]
pub struct State {
    pub model: Model,
    pub views: Projections,
    pub head: Head,
    pub last_recorded_at: Timestamp,
    /// Idempotency keys the store has not indexed yet (memory serves the tail).
    recent_keys: HashMap<String, KeyRow>,
    /// The indexed seq `recent_keys` was last pruned to.
    pruned: Seq,
}

/// What a checkpoint in the store keeps of the state.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    model: Model,
    views: Projections,
    last_recorded_at: Timestamp,
}

fn is_stride_anchor(seq: Seq) -> bool {
    seq.saturating_sub(1).is_multiple_of(POSITION_STRIDE)
}

impl State {
    /// The state a checkpoint keeps, at the head it was taken at.
    fn from_checkpoint(mut checkpoint: Checkpoint, seq: Seq, hash: log::Hash) -> State {
        checkpoint.model.after_load();
        checkpoint.views.after_load();
        State {
            model: checkpoint.model,
            views: checkpoint.views,
            head: Head { seq, hash },
            last_recorded_at: checkpoint.last_recorded_at,
            ..State::default()
        }
    }

    fn apply(&mut self, recorded: &Recorded) {
        self.fold(recorded);
        note_key(&mut self.recent_keys, recorded);
    }

    /// Folds an event into what a checkpoint keeps.
    fn fold(&mut self, recorded: &Recorded) {
        self.model.apply(recorded);
        self.views.apply(recorded, &ModelLines(&self.model));
        self.last_recorded_at = self.last_recorded_at.max(recorded.recorded_at);
    }

    /// The hash of the log at this state's head, in hex.
    pub fn head_hash(&self) -> String {
        log::hex(&self.head.hash)
    }

    /// Forgets the keys the store has indexed up to `indexed`.
    fn prune(&mut self, indexed: Seq) {
        if indexed > self.pruned {
            self.recent_keys
                .retain(|_, row| row.first_seq + u64::from(row.count) > indexed + 1);
            self.pruned = indexed;
        }
    }
}

/// Adds an event's idempotency key to `keys`: one row per key, covering the
/// consecutive events its command recorded.
fn note_key(keys: &mut HashMap<String, KeyRow>, recorded: &Recorded) {
    let Some(idem) = &recorded.idempotency else {
        return;
    };
    match keys.get_mut(&idem.key) {
        Some(row) if row.first_seq + u64::from(row.count) == recorded.seq => row.count += 1,
        _ => {
            keys.insert(
                idem.key.clone(),
                KeyRow {
                    request_hash: idem.request_hash,
                    first_seq: recorded.seq,
                    count: 1,
                },
            );
        }
    }
}

/// The projections' view of the write model's basis lines and refunds,
/// at the same event.
pub struct ModelLines<'a>(pub &'a rules::Model);

impl crate::projections::BasisLines for ModelLines<'_> {
    fn line(
        &self,
        program: &ProgramId,
        line: &LineId,
    ) -> Option<crate::projections::LineFacts<'_>> {
        let pm = self.0.program(program)?;
        let line = pm.lines.get(line)?;
        Some(crate::projections::LineFacts {
            on_basis: pm.on_basis(line),
            customer_id: &line.customer_id,
            amount: line.amount,
            refunded: line.refunded,
            excluded: line.excluded,
        })
    }

    fn on_basis(&self, program: &ProgramId, kind: LineKind, at: Timestamp) -> bool {
        self.0
            .program(program)
            .is_some_and(|pm| pm.earns_at(kind, at))
    }

    fn billed(&self, program: &ProgramId) -> HashMap<&CustomerId, Decimal> {
        let mut billed: HashMap<&CustomerId, Decimal> = HashMap::default();
        let Some(pm) = self.0.program(program) else {
            return billed;
        };
        for line in pm.lines.values() {
            if pm.on_basis(line) && !line.excluded {
                *billed.entry(&line.customer_id).or_default() += line.amount - line.refunded;
            }
        }
        billed
    }

    fn refund(&self, program: &ProgramId, refund: &LineId) -> Option<(&LineId, Decimal)> {
        let refund = self.0.refund(program, refund)?;
        Some((&refund.line, refund.amount))
    }
}

const CODE_ALPHABET: &[u8; 32] = b"abcdefghijkmnpqrstuvwxyz23456789";

/// `len` characters from an unambiguous alphabet, from the OS's randomness.
pub fn random_code(len: usize) -> String {
    let mut code = String::with_capacity(len);
    while code.len() < len {
        for byte in Uuid::new_v4().as_bytes().iter().take(15) {
            if code.len() == len {
                break;
            }
            code.push(char::from(CODE_ALPHABET[usize::from(byte & 31)]));
        }
    }
    code
}

/// Which past the read is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    Seq(Seq),
    Time(Timestamp),
}

/// The ledger: one per data directory.
pub struct Ledger {
    inner: Arc<Inner>,
    queue: mpsc::Sender<Job>,
    writer: Mutex<Option<JoinHandle<()>>>,
    indexer: Mutex<Option<JoinHandle<()>>>,
}

fn store_error(e: StoreError) -> LedgerError {
    LedgerError::Io {
        path: PathBuf::from("index"),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Opens the store; one that sled cannot open is deleted and made anew.
fn open_store(path: &Path) -> Result<Store, LedgerError> {
    match Store::open(path) {
        Ok(store) => Ok(store),
        Err(first) => {
            eprintln!("warning: {first}; rebuilding the index store from the log");
            Store::destroy(path).map_err(io_error(path))?;
            Store::open(path).map_err(store_error)
        }
    }
}

/// How long opening a data directory waits for its lock before it
/// reports the directory in use. The lock (`flock`) belongs to the open
/// file, not to the process: it is held a moment longer than the ledger
/// that took it wherever that file is still open, as in a process on its
/// way out (a restart right after a stop) or in a child between its fork
/// and its exec, which holds a copy of every open file until the exec
/// closes them. Seen in the test suite under load: a ledger dropped and
/// opened again at once while other tests started processes found its
/// own directory locked.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the data directory's lock (`LOCK`): one ledger or one offline
/// command (import, repair) at a time. Waits up to `wait` for a holder
/// to let it go (see [`LOCK_WAIT`]).
fn lock_dir(dir: &Path, wait: std::time::Duration) -> Result<File, LedgerError> {
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    let started = Instant::now();
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match lock.try_lock() {
            Ok(()) => return Ok(lock),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < wait => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked(dir.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error(&lock_path)(e)),
        }
    }
}

/// Counters of the writer, for `/metrics` and the benchmarks.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Batches made durable (one fdatasync each).
    pub batches: AtomicU64,
    /// Commands decided, accepted or not.
    pub commands: AtomicU64,
    /// Events appended.
    pub events: AtomicU64,
    /// Time spent in write + fdatasync, in microseconds.
    pub sync_us: AtomicU64,
    /// Time spent deciding and folding, in microseconds.
    pub decide_us: AtomicU64,
    /// Time spent answering callers, in microseconds.
    pub reply_us: AtomicU64,
    /// Time commands waited for the writer (from the submitter's call to
    /// the start of their batch), summed over commands, in microseconds:
    /// divided by `commands`, the mean wait.
    pub queue_wait_us: AtomicU64,
    /// Whether submitters sync in two alternating halves now
    /// ([`LedgerConfig::group_commit_halves`]).
    pub group_commit_halves: AtomicBool,
    /// Windows of load the syncer ran in the other mode, to compare.
    pub group_commit_tries: AtomicU64,
    /// Checkpoints written, the time they took (encoding and the store, in
    /// microseconds), and the size of the last one.
    pub checkpoints: AtomicU64,
    pub checkpoint_us: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    /// Whether a checkpoint is being built beside the writer.
    pub checkpoint_building: AtomicBool,
    /// Times the syncer waited for the indexer, sled being
    /// [`LedgerConfig::index_backlog`] group commits behind.
    pub index_waits: AtomicU64,
    /// Events appended, by type name.
    pub events_by_type: Mutex<BTreeMap<&'static str, u64>>,
}

/// Counts a submitter from its call until it has its answer (or gives up).
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> InFlight<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Inner {
    /// What the writer did so far.
    stats: WriterStats,
    /// Submitters waiting for an answer: the syncer lingers for those that
    /// just got one and are about to come back (adaptive group commit).
    in_flight: AtomicUsize,
    /// The indexes and checkpoints (derived, rebuildable).
    store: Store,
    /// The seq the store has indexed up to (the indexer advances it).
    indexed: AtomicU64,
    /// Index jobs on their way from the syncer to the indexer.
    index_inbox: IndexInbox,
    /// The seq of the last checkpoint written.
    checkpointed: AtomicU64,
    dir: PathBuf,
    log_dir: PathBuf,
    clock: Clock,
    /// The state as of the last batch decided; readers wait until it is
    /// durable ([`Inner::wait_durable`]).
    ///
    /// parking_lot's lock, not std's: once the writer waits for it, no new
    /// reader gets in before the writer. std's clears the writer's claim
    /// when the last reader leaves and wakes it, and a reader looping on
    /// another core takes the lock again first, nearly every time: a portal
    /// reading a busy affiliate's referrals (1.3 ms a read) in a loop held
    /// 16 submitters to 173–190 events/s (p99 0.5–0.7 s), where they make
    /// 5,251 with this lock (`ledger-load portal DIR 5 referrals`).
    state: RwLock<State>,
    /// The seq of the last durable record (the syncer advances it).
    durable: AtomicU64,
    durable_lock: Mutex<()>,
    durable_moved: std::sync::Condvar,
    /// Read anchors of the records the store has not indexed yet: every
    /// `POSITION_STRIDE`th seq and the first record of every batch.
    anchors: Mutex<BTreeMap<Seq, Position>>,
    /// The durable head seq, for live tails (server-sent events) to wait on.
    head: watch::Sender<Seq>,
    /// The secret that keys the hash of API keys.
    key_secret: [u8; 32],
    /// What-if replays computed since start, by id.
    replays: Mutex<BTreeMap<Uuid, Replay>>,
    /// Past states for `as_of` reads.
    history: History,
    /// Verifications and what-if replays, one at a time.
    whole_log: WholeLogTurns,
    /// [`LedgerConfig::kept_checkpoints`].
    kept_checkpoints: usize,
    /// Months closed by [`Ledger::auto_close`], and its closes refused.
    auto_closes: AtomicU64,
    auto_close_refusals: AtomicU64,
    /// Held for the ledger's life: one process per data directory.
    _lock: File,
}

impl Inner {
    /// Publishes that every record up to `seq` is on disk.
    fn set_durable(&self, seq: Seq) {
        self.durable.store(seq, Ordering::Release);
        // Taking the lock orders this store before any waiter's check.
        drop(
            self.durable_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.durable_moved.notify_all();
        self.head.send_replace(seq);
    }

    /// Waits until every record up to `seq` is on disk.
    fn wait_durable(&self, seq: Seq) {
        if self.durable.load(Ordering::Acquire) >= seq {
            return;
        }
        let mut guard = self
            .durable_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.durable.load(Ordering::Acquire) < seq {
            guard = self
                .durable_moved
                .wait(guard)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

thread_local! {
    /// Set while [`Ledger::deferring_settle`] runs on this thread: the
    /// highest seq a read saw, which the answer must wait for.
    static DEFERRED: std::cell::Cell<Option<Seq>> = const { std::cell::Cell::new(None) };
}

/// A stable hash of a command's request, for idempotency of API callers.
pub fn request_hash(bytes: &[u8]) -> Bytes<32> {
    Bytes(*blake3::hash(bytes).as_bytes())
}

/// Decodes a record's event and checks it names the seq its frame does.
fn decode_record(seq: Seq, payload: &[u8]) -> Result<Recorded, String> {
    let recorded = decode(payload).map_err(|e| format!("undecodable event: {e}"))?;
    if recorded.seq != seq {
        return Err(format!("event says seq {}, frame says {seq}", recorded.seq));
    }
    Ok(recorded)
}

fn read_or_create_secret(path: &Path) -> Result<[u8; 32], LedgerError> {
    match fs::read(path) {
        Ok(bytes) => bytes.try_into().map_err(|_| LedgerError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("the key secret must be 32 bytes"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            secret[..16].copy_from_slice(Uuid::new_v4().as_bytes());
            secret[16..].copy_from_slice(Uuid::new_v4().as_bytes());
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(io_error(path))?;
            file.write_all(&secret).map_err(io_error(path))?;
            file.sync_all().map_err(io_error(path))?;
            // Its entry too: keys hashed with a secret lost to a power cut
            // would stop working.
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            log::sync_dir(dir)?;
            Ok(secret)
        }
        Err(e) => Err(io_error(path)(e)),
    }
}

impl Ledger {
    /// Opens the ledger in `config.data_dir`: recovers the log (cutting a
    /// torn tail, refusing a corrupt one), replays it, starts the writer.
    pub fn open(config: LedgerConfig) -> Result<Ledger, LedgerError> {
        let dir = config.data_dir.clone();
        log::create_dir_synced(&dir)?;
        let lock = lock_dir(&dir, LOCK_WAIT)?;
        let key_secret = read_or_create_secret(&dir.join("secret"))?;
        let log_dir = dir.join("log");
        let store = open_store(&dir.join("index"))?;
        let loaded = match load(&log_dir, &store, config.segment_bytes)? {
            Some(loaded) => loaded,
            None => {
                // The store disagrees with the log (an old copy, a restored
                // backup): it is derived, so drop it and rebuild it all.
                store.clear().map_err(store_error)?;
                load(&log_dir, &store, config.segment_bytes)?.ok_or_else(|| LedgerError::Io {
                    path: dir.join("index"),
                    source: std::io::Error::other(
                        "the index store disagrees with the log after a rebuild",
                    ),
                })?
            }
        };
        let Loaded {
            log,
            anchors,
            state,
            pending_index,
            indexed,
            checkpointed,
        } = loaded;
        crate::return_free_memory();
        let mut log = log;
        log.set_preallocate(config.preallocate_bytes);
        let (head_tx, _) = watch::channel(state.head.seq);
        let inner = Arc::new(Inner {
            stats: WriterStats::default(),
            in_flight: AtomicUsize::new(0),
            store,
            indexed: AtomicU64::new(indexed),
            index_inbox: IndexInbox::new(config.index_backlog),
            checkpointed: AtomicU64::new(checkpointed),
            dir,
            log_dir,
            clock: config.clock.clone(),
            durable: AtomicU64::new(state.head.seq),
            durable_lock: Mutex::new(()),
            durable_moved: std::sync::Condvar::new(),
            anchors: Mutex::new(anchors),
            state: RwLock::new(state),
            head: head_tx,
            key_secret,
            replays: Mutex::new(BTreeMap::new()),
            history: History::default(),
            whole_log: WholeLogTurns::default(),
            kept_checkpoints: config.kept_checkpoints,
            auto_closes: AtomicU64::new(0),
            auto_close_refusals: AtomicU64::new(0),
            _lock: lock,
        });
        let (index_tx, index_rx) = std::sync::mpsc::sync_channel(INDEX_QUEUE_LEN);
        if let Some(job) = pending_index {
            // The indexer is not running yet: nothing to wait for, and it
            // takes the tail the log holds beyond the index as it starts.
            let _ = inner.index_inbox.put(job);
            let _ = index_tx.send(StoreJob::IndexFull);
        }
        let indexer_inner = inner.clone();
        let indexer = std::thread::Builder::new()
            .name("ledger-indexer".into())
            .spawn(move || indexer_loop(&indexer_inner, index_rx))
            .map_err(|e| LedgerError::Io {
                path: inner.dir.clone(),
                source: e,
            })?;
        let (queue, jobs) = mpsc::channel(config.queue_len.max(1));
        let writer_inner = inner.clone();
        let max_batch = config.max_batch.max(1);
        let checkpoints = CheckpointPolicy {
            every: config.checkpoint_every.max(1),
            forced_after: config.checkpoint_forced_after.max(1),
        };
        let group = GroupCommitPolicy {
            linger: config.group_commit_linger,
            halves: config.group_commit_halves,
        };
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    writer_loop(
                        &writer_inner,
                        log,
                        jobs,
                        index_tx,
                        max_batch,
                        checkpoints,
                        group,
                    )
                });
                if std::panic::catch_unwind(run).is_err() {
                    eprintln!("fatal: the ledger writer panicked; stopping the process");
                    std::process::abort();
                }
            })
            .map_err(|e| LedgerError::Io {
                path: inner.dir.clone(),
                source: e,
            })?;
        Ok(Ledger {
            inner,
            queue,
            writer: Mutex::new(Some(writer)),
            indexer: Mutex::new(Some(indexer)),
        })
    }

    /// The seq the store's indexes reflect, and the seq of its last checkpoint.
    pub fn store_status(&self) -> (Seq, Seq) {
        (
            self.inner.indexed.load(Ordering::Acquire),
            self.inner.checkpointed.load(Ordering::Acquire),
        )
    }

    /// Months [`Self::auto_close`] closed since start, and closes of it
    /// that were refused.
    pub fn auto_closes(&self) -> (u64, u64) {
        (
            self.inner.auto_closes.load(Ordering::Relaxed),
            self.inner.auto_close_refusals.load(Ordering::Relaxed),
        )
    }

    /// Replays of the log run for reads of the past since start.
    pub fn history_replays(&self) -> u64 {
        self.inner.history.replays.load(Ordering::Relaxed)
    }

    /// The seqs of the checkpoints kept for reads of the past (the last of
    /// each month, [`LedgerConfig::kept_checkpoints`]), oldest first.
    pub fn kept_checkpoints(&self) -> Result<Vec<Seq>, LedgerError> {
        self.inner.store.kept_seqs().map_err(store_error)
    }

    /// Events those replays folded: a replay that starts from a checkpoint
    /// folds only the log after it.
    pub fn history_folded(&self) -> u64 {
        self.inner.history.folded.load(Ordering::Relaxed)
    }

    /// Commands waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// What the writer did so far.
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn now(&self) -> Timestamp {
        (self.inner.clock)()
    }

    /// The closes every program's `auto_close_day` owes now
    /// ([`rules::ProgramModel::auto_close_due`]), by program, oldest month
    /// first.
    pub fn auto_close_due(&self) -> Vec<(ProgramId, Month)> {
        let now = self.now();
        let state = self.decided_state();
        let mut due: Vec<(ProgramId, Month)> = state
            .model
            .programs
            .iter()
            .flat_map(|(id, pm)| pm.auto_close_due(now).into_iter().map(|m| (id.clone(), m)))
            .collect();
        due.sort_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        due
    }

    /// Makes the closes [`Self::auto_close_due`] lists, one by one, as the
    /// actor [`AUTO_CLOSE_ACTOR`], and gives each one's result. A month
    /// closed meanwhile by hand is a no-op, as a second close always is.
    pub async fn auto_close(&self) -> Vec<(ProgramId, Month, Result<Receipt, SubmitError>)> {
        let mut closes = Vec::new();
        for (program, month) in self.auto_close_due() {
            let command = Command::CloseMonth { month };
            let submission = Submission::new(Some(&program), AUTO_CLOSE_ACTOR, command);
            let result = self.submit(submission).await;
            let counter = match &result {
                Ok(receipt) if receipt.noop.is_none() => Some(&self.inner.auto_closes),
                // Closed by hand meanwhile.
                Ok(_) => None,
                Err(_) => Some(&self.inner.auto_close_refusals),
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            closes.push((program, month, result));
        }
        closes
    }

    /// Submits a command and waits until it is durable (or refused).
    pub async fn submit(&self, submission: Submission) -> Result<Receipt, SubmitError> {
        let _active = InFlight::enter(&self.inner.in_flight);
        let (job, answer) = Job::new(submission);
        self.queue
            .send(job)
            .await
            .map_err(|_| SubmitError::Stopped)?;
        answer.await.map_err(|_| SubmitError::Stopped)?
    }

    /// Submits many commands at once and waits for all of them: they join
    /// the writer's batches together (a `POST .../batch`). The answers come
    /// in the order of the submissions.
    pub async fn submit_many(
        &self,
        submissions: Vec<Submission>,
    ) -> Vec<Result<Receipt, SubmitError>> {
        let _active = InFlight::enter(&self.inner.in_flight);
        let mut answers = Vec::with_capacity(submissions.len());
        for submission in submissions {
            let (job, answer) = Job::new(submission);
            match self.queue.send(job).await {
                Ok(()) => answers.push(Some(answer)),
                Err(_) => answers.push(None),
            }
        }
        let mut results = Vec::with_capacity(answers.len());
        for answer in answers {
            results.push(match answer {
                Some(answer) => answer.await.unwrap_or(Err(SubmitError::Stopped)),
                None => Err(SubmitError::Stopped),
            });
        }
        results
    }

    /// [`Self::submit`] for callers outside an async runtime.
    pub fn submit_blocking(&self, submission: Submission) -> Result<Receipt, SubmitError> {
        let _active = InFlight::enter(&self.inner.in_flight);
        let (job, answer) = Job::new(submission);
        self.queue
            .blocking_send(job)
            .map_err(|_| SubmitError::Stopped)?;
        answer.blocking_recv().map_err(|_| SubmitError::Stopped)?
    }

    /// Replays `program`'s history under `overrides` (on top of the replays
    /// applied before), without writing, and keeps the result for
    /// [`Self::replay`] and [`Self::apply_replay_submission`].
    pub fn what_if(
        &self,
        program: &ProgramId,
        overrides: Overrides,
        months: Option<MonthRange>,
    ) -> Result<Replay, SubmitError> {
        let (head, applied) = self.durable_read(|state| {
            let pm = state
                .model
                .program(program)
                .ok_or_else(|| Rejection::UnknownProgram(program.clone()))?;
            rules::validate_overrides(pm, program, &overrides)?;
            Ok::<_, SubmitError>((state.head.seq, pm.applied_overrides(None)))
        })?;
        if let Some(range) = months
            && range.from > range.to
        {
            return Err(
                Rejection::Invalid(InvalidValue::new("months", "`from` is after `to`")).into(),
            );
        }
        let diff = self.compute_diff(program, applied, overrides.clone(), months, head)?;
        let replay = Replay {
            replay_id: Uuid::now_v7(),
            program: program.clone(),
            at_seq: head,
            computed_at: self.now(),
            overrides,
            months,
            diff,
            applied_seq: None,
        };
        if let Err(e) = save_replay(&self.inner.dir.join(REPLAYS_DIR), &replay) {
            eprintln!(
                "warning: replay {} not saved: {e}; it is kept in memory until the ledger stops",
                replay.replay_id
            );
        }
        self.keep_replay(&replay);
        Ok(replay)
    }

    fn keep_replay(&self, replay: &Replay) {
        let mut replays = self
            .inner
            .replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while replays.len() >= MAX_KEPT_REPLAYS {
            replays.pop_first();
        }
        replays.insert(replay.replay_id, replay.clone());
    }

    /// Folds the log up to `head` into a what-if replay: reading and
    /// decoding on this thread, folding on another.
    fn compute_diff(
        &self,
        program: &ProgramId,
        applied: Vec<(Seq, Overrides)>,
        overrides: Overrides,
        months: Option<MonthRange>,
        head: Seq,
    ) -> Result<crate::replay::Diff, SubmitError> {
        let _turn = self
            .inner
            .whole_log
            .take()
            .map_err(|Busy| SubmitError::Busy)?;
        let what_if = self.fold_what_if(program, applied, overrides, head)?;
        Ok(what_if.finish(months)?)
    }

    /// A what-if replay of the log up to `head`.
    fn fold_what_if(
        &self,
        program: &ProgramId,
        applied: Vec<(Seq, Overrides)>,
        overrides: Overrides,
        head: Seq,
    ) -> Result<crate::replay::WhatIf, SubmitError> {
        let mut what_if = crate::replay::WhatIf::new(program.clone(), applied, overrides);
        let fold = move |received: std::sync::mpsc::Receiver<Vec<Recorded>>| {
            for chunk in received {
                for recorded in &chunk {
                    what_if.apply(recorded)?;
                }
            }
            Ok::<_, Rejection>(what_if)
        };
        let read = |chunks: &mut ChunkSender<Recorded>| {
            log::scan(&self.inner.log_dir, ScanMode::Read, Some(head), |record| {
                chunks.push(decode_record(record.seq, record.payload)?)
            })
        };
        let (scanned, folded) = two_stages("what-if-fold", read, fold)
            .map_err(|e| SubmitError::Failed(format!("cannot start the replay's thread: {e}")))?;
        let what_if = match (scanned, folded) {
            (_, Err(rejection)) => return Err(rejection.into()),
            (Err(e), _) => return Err(SubmitError::Failed(e.to_string())),
            (Ok(_), Ok(what_if)) => what_if,
        };
        Ok(what_if)
    }

    /// Catches a replay at `head` up with the durable log without the
    /// state's lock, `catch_up` folding it to a seq: each round takes in
    /// what came during the one before (fewer events each time while the
    /// replay outpaces the writer), until at most
    /// [`VERIFY_LOCKED_CATCH_UP`] events are left for the caller to fold
    /// holding the lock, or [`VERIFY_CATCH_UP_ROUNDS`] rounds have run.
    fn catch_up_unlocked<E>(
        &self,
        mut head: Seq,
        mut catch_up: impl FnMut(Seq) -> Result<(), E>,
    ) -> Result<(), E> {
        for _ in 0..VERIFY_CATCH_UP_ROUNDS {
            let durable = self.inner.durable.load(Ordering::Acquire);
            if durable.saturating_sub(head) <= VERIFY_LOCKED_CATCH_UP {
                break;
            }
            catch_up(durable)?;
            head = durable;
        }
        Ok(())
    }

    /// Folds the durable records after the replay's head up to `to` into it.
    fn catch_up_what_if(
        &self,
        what_if: &mut crate::replay::WhatIf,
        to: Seq,
    ) -> Result<(), SubmitError> {
        let mut refused = None;
        visit_records(&self.inner, what_if.head() + 1, to, |seq, _, payload| {
            let recorded = decode_record(seq, payload)?;
            if let Err(rejection) = what_if.apply(&recorded) {
                refused = Some(rejection);
                return Err("refused".into());
            }
            Ok(())
        })
        .map_err(|e| match refused.take() {
            Some(rejection) => SubmitError::Rejected(rejection),
            None => SubmitError::Failed(e.to_string()),
        })
    }

    /// A replay by id: one computed and kept (in memory, or in
    /// `DATA/replays/` from before a restart), or an applied one
    /// (recomputed from the log at the position it was applied at).
    pub fn replay(&self, program: &ProgramId, id: &Uuid) -> Result<Option<Replay>, SubmitError> {
        let applied_seq = self.durable_read(|state| {
            state
                .model
                .program(program)
                .and_then(|pm| pm.applied_replays.iter().find(|(r, _, _)| r == id))
                .map(|(_, seq, _)| *seq)
        });
        let cached = self
            .inner
            .replays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        let kept = cached
            .or_else(|| {
                let loaded = load_replay(&self.inner.dir.join(REPLAYS_DIR), id)?;
                self.keep_replay(&loaded);
                Some(loaded)
            })
            .filter(|r| &r.program == program);
        if let Some(mut replay) = kept {
            replay.applied_seq = applied_seq;
            return Ok(Some(replay));
        }
        let Some(seq) = applied_seq else {
            return Ok(None);
        };
        let recorded = self
            .events_range(seq, seq)
            .map_err(|e| SubmitError::Failed(e.to_string()))?;
        let Some(Event::ReplayApplied(e)) = recorded.first().map(|r| &r.event) else {
            return Ok(None);
        };
        let applied: Vec<(Seq, Overrides)> = self.durable_read(|state| {
            state
                .model
                .program(program)
                .map(|pm| pm.applied_overrides(Some(id)))
                .unwrap_or_default()
        });
        let diff = self.compute_diff(program, applied, e.overrides.clone(), e.months, e.at_seq)?;
        Ok(Some(Replay {
            replay_id: *id,
            program: program.clone(),
            at_seq: e.at_seq,
            computed_at: recorded.first().map(|r| r.recorded_at).unwrap_or_default(),
            overrides: e.overrides.clone(),
            months: e.months,
            diff,
            applied_seq: Some(seq),
        }))
    }

    /// The submission that applies a replay: computed again at the head,
    /// with the corrected world it leaves ([`ReplayCorrected`], compared
    /// with the write model under the state's lock: 73–130 ms on the 1M-event
    /// bench log). A diff other than the one computed before is refused
    /// ([`Rejection::ReplayStale`]), the same one is applied. The writer
    /// checks once more, in log order, that nothing the replay compares or
    /// corrects came in between.
    pub fn apply_replay_submission(
        &self,
        program: &ProgramId,
        id: &Uuid,
        reason: &str,
        actor: &str,
    ) -> Result<Option<Submission>, SubmitError> {
        let Some(replay) = self.replay(program, id)? else {
            return Ok(None);
        };
        let command = |at_seq, corrected| Command::ApplyReplay {
            replay_id: *id,
            at_seq,
            overrides: Box::new(replay.overrides.clone()),
            changes: replay.diff.changes.clone(),
            corrected: Box::new(corrected),
            months: replay.months,
            reason: reason.to_string(),
        };
        if replay.applied_seq.is_some() {
            // The writer answers that it is applied already.
            let command = command(replay.at_seq, ReplayCorrected::default());
            return Ok(Some(Submission::new(Some(program), actor, command)));
        }
        // Computed again at the head, to take the corrected world with it.
        let (head, applied) = self.durable_read(|state| {
            let pm = state
                .model
                .program(program)
                .ok_or_else(|| Rejection::UnknownProgram(program.clone()))?;
            Ok::<_, SubmitError>((state.head.seq, pm.applied_overrides(None)))
        })?;
        let _turn = self
            .inner
            .whole_log
            .take()
            .map_err(|Busy| SubmitError::Busy)?;
        let mut what_if = self.fold_what_if(program, applied, replay.overrides.clone(), head)?;
        // What was appended meanwhile, without the lock; the last few
        // events under it, to compare with the write model at one head.
        let from = what_if.head();
        self.catch_up_unlocked(from, |to| self.catch_up_what_if(&mut what_if, to))?;
        let (at_seq, money_seq, corrected) = {
            let state = self.decided_state();
            self.inner.wait_durable(state.head.seq);
            self.catch_up_what_if(&mut what_if, state.head.seq)?;
            let pm = state
                .model
                .program(program)
                .ok_or_else(|| Rejection::UnknownProgram(program.clone()))?;
            let corrected = what_if.corrections(pm, replay.months);
            (state.head.seq, pm.money_seq, corrected)
        };
        let now = what_if.finish(replay.months)?;
        if now.changes != replay.diff.changes {
            return Err(Rejection::ReplayStale {
                at_seq: replay.at_seq,
                moved_at: money_seq,
            }
            .into());
        }
        Ok(Some(Submission::new(
            Some(program),
            actor,
            command(at_seq, corrected),
        )))
    }

    /// The seq of the last durable event, without waiting: the state as
    /// decided may be ahead of it by the batches in flight.
    pub fn durable_head(&self) -> Seq {
        *self.inner.head.borrow()
    }

    /// Waits for new events: the receiver changes whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.inner.head.subscribe()
    }

    /// The current state, once it is durable: the writer decides the next
    /// batch while the last one is being synced, and a reader must not see
    /// an event that a crash could still lose. So this waits (for at most
    /// the batches in flight) until the state's head is on disk.
    ///
    /// Inside [`Self::deferring_settle`] it does not wait: it notes the seq
    /// the answer must not be given before, for the caller to await.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        let state = self.decided_state();
        self.settle_before_answering(state.head.seq);
        state
    }

    /// Runs `read` on the current state and returns its answer once that
    /// state is durable, as [`Self::state`] does, but waits with the lock
    /// released: a reader waiting with it holds up the writer, whose next
    /// batch needs it, for the `fdatasync` under way. Within
    /// [`Self::deferring_settle`], notes the seq instead of waiting.
    fn durable_read<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        let (answer, seq) = {
            let state = self.decided_state();
            (read(&state), state.head.seq)
        };
        self.settle_before_answering(seq);
        answer
    }

    /// Waits until `seq` is durable, or, within [`Self::deferring_settle`],
    /// notes it for the caller to await.
    fn settle_before_answering(&self, seq: Seq) {
        let deferred = DEFERRED.with(|deferred| match deferred.get() {
            Some(noted) => {
                deferred.set(Some(noted.max(seq)));
                true
            }
            None => false,
        });
        if !deferred {
            self.inner.wait_durable(seq);
        }
    }

    /// Runs reads (`read` and everything built on [`Self::state`]) without
    /// waiting for the batches in flight, and returns their answer with the
    /// seq it must not be given out before: an async caller awaits
    /// [`Self::settled`] with it instead of holding its thread.
    pub fn deferring_settle<T>(&self, read: impl FnOnce() -> T) -> (T, Seq) {
        let outer = DEFERRED.replace(Some(0));
        let value = read();
        let seq = DEFERRED.replace(outer).unwrap_or(0);
        if let Some(noted) = outer {
            // A nested call: the outer one answers after this seq too.
            DEFERRED.set(Some(noted.max(seq)));
        }
        (value, seq)
    }

    /// Waits, without holding a thread, until every event up to `seq` is durable.
    pub async fn settled(&self, seq: Seq) {
        let mut durable = self.inner.head.subscribe();
        // An error means the writer stopped: nothing more becomes durable,
        // and the caller's answer is no longer wanted.
        let _ = durable.wait_for(|head| *head >= seq).await;
    }

    /// The state as decided, which may run ahead of the disk by the batches
    /// in flight; without waiting for them. Only for lookups whose answer
    /// cannot reveal an event that is not durable yet: an API key or a
    /// referral code is known to its holder only once the event that made
    /// it was acknowledged, that is, durable. (A revocation decided and not
    /// yet durable takes effect a moment early: the safe side.) Waiting here
    /// would hold an async worker for up to a sync.
    pub fn decided_state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read()
    }

    /// Runs a read against the current state, or against a replay of the
    /// log up to `as_of`.
    pub fn read<T>(
        &self,
        as_of: Option<AsOf>,
        read: impl FnOnce(&State) -> T,
    ) -> Result<T, LedgerError> {
        // A past already on disk is read without the state's lock.
        let durable = self.inner.durable.load(Ordering::Acquire);
        // A time at or after the last decided event (read without waiting)
        // is the present: it costs no read of the log.
        let past_time = match as_of {
            Some(AsOf::Time(t)) => durable > 0 && t < self.decided_state().last_recorded_at,
            _ => false,
        };
        let target = match as_of {
            Some(AsOf::Seq(seq)) if seq < durable => Some(seq),
            Some(AsOf::Time(t)) if past_time && self.recorded_at(durable)? > t => {
                Some(self.seq_at_time(t, durable)?)
            }
            _ => None,
        };
        let (target, read) = match target {
            Some(target) => (target, read),
            None => {
                // The present, or a point the state knows is past: decided
                // under one lock, and read under it when present.
                let now = self.durable_read(move |state| {
                    let present = match as_of {
                        None => true,
                        Some(AsOf::Seq(seq)) => seq >= state.head.seq,
                        Some(AsOf::Time(t)) => t >= state.last_recorded_at,
                    };
                    if present {
                        Now::Answered(read(state))
                    } else {
                        Now::Past(state.head.seq, read)
                    }
                });
                let (head, read) = match now {
                    Now::Answered(answer) => return Ok(answer),
                    Now::Past(head, read) => (head, read),
                };
                let target = match as_of {
                    // A time names the last event recorded at or before
                    // it: a seq, so that reads of the same point by time
                    // and by seq share a state.
                    Some(AsOf::Time(t)) => self.seq_at_time(t, head)?,
                    Some(AsOf::Seq(seq)) => seq,
                    None => head,
                };
                (target, read)
            }
        };
        let state = self
            .inner
            .history
            .state_at(target, || past_state(&self.inner, target))?;
        Ok(read(&state))
    }

    /// When the event at `seq` (written already) was recorded.
    fn recorded_at(&self, seq: Seq) -> Result<Timestamp, LedgerError> {
        read_events(&self.inner, seq, seq)?
            .first()
            .map(|r| r.recorded_at)
            .ok_or_else(|| {
                let what = "a seq below the head cannot be read".to_string();
                log_short_of(&self.inner.log_dir, seq, what)
            })
    }

    /// The last seq recorded at or before `t` (0: none), given that
    /// `head`'s event is recorded after `t`. Recorded times never go back along
    /// the log (the writer records `max(clock, last)`, and an import refuses
    /// a line that goes back), so a binary search finds it in about twenty
    /// indexed reads, where a scan read the whole log.
    fn seq_at_time(&self, t: Timestamp, head: Seq) -> Result<Seq, LedgerError> {
        // Invariant: seq `low` is recorded at or before `t` (0: before all),
        // and every seq above `high` after it.
        let (mut low, mut high) = (0, head);
        while low < high {
            let middle = low + (high - low).div_ceil(2);
            if self.recorded_at(middle)? <= t {
                low = middle;
            } else {
                high = middle - 1;
            }
        }
        Ok(low)
    }

    /// The balance of an affiliate, with its pending estimate.
    pub fn balance(
        &self,
        program: &ProgramId,
        affiliate: &AffiliateId,
        as_of: Option<AsOf>,
    ) -> Result<Option<Balance>, LedgerError> {
        let now = match as_of {
            Some(AsOf::Time(t)) => Some(t),
            _ => None,
        };
        let clock_now = self.now();
        self.read(as_of, |state| {
            let view = state.views.programs.get(program)?;
            let pm = state.model.program(program)?;
            let now = now.unwrap_or(if as_of.is_some() {
                state.last_recorded_at
            } else {
                clock_now
            });
            let pending = rules::pending_estimate(pm, affiliate, now);
            view.balance(affiliate, pending, state.head.seq)
        })
    }

    /// The statement of one affiliate and month.
    pub fn statement(
        &self,
        program: &ProgramId,
        affiliate: &AffiliateId,
        month: Month,
        as_of: Option<AsOf>,
    ) -> Result<Option<Statement>, LedgerError> {
        self.read(as_of, |state| {
            state.views.programs.get(program)?.statement(
                affiliate,
                month,
                state.head.seq,
                state.head_hash(),
            )
        })
    }

    /// Referral statistics of the days `from..=to` (program time zone).
    pub fn stats(
        &self,
        program: &ProgramId,
        affiliate: &AffiliateId,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        by: StatsBy,
        as_of: Option<AsOf>,
    ) -> Result<Option<Stats>, LedgerError> {
        self.read(as_of, |state| {
            state
                .views
                .programs
                .get(program)?
                .stats(affiliate, from, to, by, state.head.seq)
        })
    }

    /// A page of the customers an affiliate referred.
    pub fn referrals(
        &self,
        program: &ProgramId,
        affiliate: &AffiliateId,
        query: &ReferralQuery,
        as_of: Option<AsOf>,
    ) -> Result<Option<ReferralPage>, LedgerError> {
        self.read(as_of, |state| {
            state
                .views
                .programs
                .get(program)?
                .referrals(affiliate, query, state.head.seq)
        })
    }

    /// Reads events `from..=to` back from the log.
    pub fn events_range(&self, from: Seq, to: Seq) -> Result<Vec<Recorded>, LedgerError> {
        read_events(&self.inner, from, to)
    }

    /// [`Self::events_range`] with each record's chain hash, for auditors.
    pub fn events_with_hashes(
        &self,
        from: Seq,
        to: Seq,
    ) -> Result<Vec<(Recorded, log::Hash)>, LedgerError> {
        read_events_hashed(&self.inner, from, to)
    }

    /// Issues an API key: records its keyed hash, returns the key (shown once).
    pub fn create_key(&self, role: Role, actor: &str) -> Result<(String, String), SubmitError> {
        let key_id = format!("k-{}", random_code(10));
        let key = format!("cl_{key_id}_{}", random_code(40));
        let key_hash = self.key_hash(&key);
        self.submit_blocking(Submission::new(
            None,
            actor,
            Command::IssueKey {
                key_id: key_id.clone(),
                key_hash,
                role,
            },
        ))?;
        Ok((key_id, key))
    }

    /// The keyed hash of an API key, as the log keeps it.
    pub fn key_hash(&self, key: &str) -> Bytes<32> {
        Bytes(*blake3::keyed_hash(&self.inner.key_secret, key.as_bytes()).as_bytes())
    }

    /// The live key a presented key matches, if any.
    pub fn authenticate(&self, key: &str) -> Option<rules::KeyRecord> {
        let hash = self.key_hash(key);
        let state = self.decided_state();
        let key_id = state.model.key_hashes.get(&hash)?;
        state.model.keys.get(key_id).filter(|k| !k.revoked).cloned()
    }

    /// Checks the whole log (frames, CRCs, chain, postings) and that the
    /// live projections equal a fresh replay.
    ///
    /// The replay reads the log without the state's lock, while the writer
    /// goes on; then, holding the read lock (the writer decides nothing
    /// more meanwhile), it waits for the batches in flight to be durable,
    /// folds the events appended since, checking them the same way, and
    /// compares. So the projections are compared at the head, however busy
    /// the ledger, and the report is of that head. The writer waits for
    /// that last part only (measured in `tools/BENCHMARKS.md`, session 15).
    ///
    /// One at a time with what-if replays; [`LedgerError::WholeLogBusy`]
    /// when [`WHOLE_LOG_WAITING`] are already waiting.
    pub fn verify(&self) -> Result<VerifyReport, LedgerError> {
        let _turn = self
            .inner
            .whole_log
            .take()
            .map_err(|Busy| LedgerError::WholeLogBusy)?;
        let head = self.durable_read(|state| state.head.seq);
        // On this thread alone: beside a busy writer, the two-thread replay
        // of the command line's verify took CPU the writer wanted (16
        // submitters: 26-29k events/s during it, against 36-40k).
        let mut fresh = FreshReplay::default();
        let scanned = log::scan(
            &self.inner.log_dir,
            ScanMode::Strict,
            Some(head),
            |record| fresh.check(record.seq, &record.hash, record.payload),
        );
        if let Err(e) = scanned {
            return Ok(fresh.report(Err(e.to_string()), e.bad_seq()));
        }
        // What was appended during the scan, without the lock: little is
        // left to do under it.
        let from = fresh.state.head.seq;
        if let Err((problem, bad_seq)) =
            self.catch_up_unlocked(from, |to| fresh.catch_up(&self.inner, to))
        {
            return Ok(fresh.report(Err(problem), bad_seq));
        }
        let compared = {
            let state = self.decided_state();
            // The syncer never takes the state's lock.
            self.inner.wait_durable(state.head.seq);
            fresh
                .catch_up(&self.inner, state.head.seq)
                .map(|()| first_difference(&state.views, &fresh.state.views))
        };
        Ok(match compared {
            Err((problem, bad_seq)) => fresh.report(Err(problem), bad_seq),
            Ok(Some(difference)) => VerifyReport {
                projections: ProjectionsCheck::Differ,
                projections_detail: Some("the live projections".into()),
                ..fresh.report(
                    Err(format!(
                        "the live projections differ from a fresh replay at seq {}: {difference}",
                        fresh.state.head.seq
                    )),
                    None,
                )
            },
            Ok(None) => VerifyReport {
                projections: ProjectionsCheck::Equal,
                projections_detail: Some("the live projections".into()),
                ..fresh.report(Ok(()), None)
            },
        })
    }

    /// Stops the writer after the commands already queued, and waits for it.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has drained it.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(writer) = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = writer.join();
        }
        // The writer dropped its end of the index queue: the indexer drains it and ends.
        if let Some(indexer) = self
            .indexer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            let _ = indexer.join();
        }
    }
}

/// Reads events `from..=to` (up to the durable head) back from the log,
/// starting at the nearest anchor: the memory tail, the store's sparse
/// index, or the start of the segment.
fn read_events(inner: &Inner, from: Seq, to: Seq) -> Result<Vec<Recorded>, LedgerError> {
    Ok(read_events_hashed(inner, from, to)?
        .into_iter()
        .map(|(r, _)| r)
        .collect())
}

/// [`read_events`] with each record's chain hash.
fn read_events_hashed(
    inner: &Inner,
    from: Seq,
    to: Seq,
) -> Result<Vec<(Recorded, log::Hash)>, LedgerError> {
    let mut events = Vec::with_capacity((to.saturating_sub(from) + 1).min(100_000) as usize);
    visit_events(inner, from, to, |recorded, hash| {
        events.push((recorded, *hash));
        Ok(())
    })?;
    Ok(events)
}

/// Hands events `from..=to` (up to the durable head), with each record's
/// chain hash, to `visit` in log order, starting at the nearest anchor:
/// the memory tail, the store's sparse index, or the start of the segment.
fn visit_events(
    inner: &Inner,
    from: Seq,
    to: Seq,
    mut visit: impl FnMut(Recorded, &log::Hash) -> Result<(), String>,
) -> Result<(), LedgerError> {
    visit_records(inner, from, to, |seq, hash, payload| {
        visit(decode_record(seq, payload)?, hash)
    })
}

/// [`visit_events`] with each record's bytes, undecoded.
fn visit_records(
    inner: &Inner,
    from: Seq,
    to: Seq,
    visit: impl FnMut(Seq, &log::Hash, &[u8]) -> Result<(), String>,
) -> Result<(), LedgerError> {
    // Never the state lock: the syncer reads here (idempotent answers).
    let to = to.min(inner.durable.load(Ordering::Acquire));
    let memory_anchor = inner
        .anchors
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .range(..=from)
        .next_back()
        .map(|(seq, position)| (*seq, *position));
    if from == 0 || from > to {
        return Ok(());
    }
    let stored_anchor = inner.store.anchor(from).map_err(store_error)?;
    let segment_anchor = log::list_segments(&inner.log_dir)?
        .into_iter()
        .rev()
        .find(|(first, _)| *first <= from)
        .map(|(first, _)| {
            (
                first,
                Position {
                    segment_first_seq: first,
                    offset: log::SEGMENT_MAGIC.len() as u64,
                },
            )
        });
    let Some((start_seq, start)) = [memory_anchor, stored_anchor, segment_anchor]
        .into_iter()
        .flatten()
        .max_by_key(|(seq, _)| *seq)
    else {
        return Ok(());
    };
    log::read_range(&inner.log_dir, start_seq, start, from, to, visit)?;
    Ok(())
}

/// A seq the log should hold but does not reach: reported like damage.
fn log_short_of(log_dir: &Path, seq: Seq, what: String) -> LedgerError {
    LedgerError::Log(LogError::Corrupt {
        segment: log_dir.to_path_buf(),
        offset: 0,
        seq,
        what,
    })
}
