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
struct WholeLogTurns {
    /// Whether one runs, and how many wait.
    slots: Mutex<(bool, usize)>,
    changed: std::sync::Condvar,
}

/// A whole-log job's turn; dropping it (however the job ends) lets the
/// next one go.
struct WholeLogTurn<'a>(&'a WholeLogTurns);

impl WholeLogTurns {
    fn take(&self) -> Result<WholeLogTurn<'_>, Busy> {
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
struct Busy;

const WHOLE_LOG_BUSY: &str = "verifications and what-if replays run one at a time, and enough are waiting; try again shortly";

/// The past states `as_of` reads are answered from. A past state never
/// changes: a seq names a fixed prefix of the log, and a time before the
/// last event's names a seq (the last event recorded at or before it,
/// which is already there). So a state is kept by the seq it answers for,
/// and a read of the same past, by seq or by time, waits for the replay
/// under way instead of starting its own.
#[derive(Default)]
struct History {
    slots: Mutex<HistorySlots>,
    changed: std::sync::Condvar,
    /// Replays run so far.
    replays: AtomicU64,
    /// Events those replays folded (from a checkpoint, only the tail).
    folded: AtomicU64,
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
    fn state_at(
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
const REPLAYS_DIR: &str = "replays";

/// Where the replay `id` is kept in `dir`.
fn replay_file(dir: &Path, id: &Uuid) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Keeps a computed replay on disk: written whole under a temporary name,
/// synced, then renamed, so a crash leaves it whole or absent. Then drops
/// the oldest beyond [`MAX_KEPT_REPLAYS`] (ids are UUID v7: they sort by time).
fn save_replay(dir: &Path, replay: &Replay) -> std::io::Result<()> {
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
fn load_replay(dir: &Path, id: &Uuid) -> Option<Replay> {
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

/// The writer's fresh ids: UUID v7 (RFC 9562) for events, clicks and
/// withdrawals, random codes for links. A v7 id is a Unix millisecond and
/// 74 more bits. Here the millisecond is the batch's recorded-at time (an
/// event's id and its `recorded_at` agree, under a test clock too), and
/// the 74 bits are random at the first id of a millisecond and counted up
/// from there (RFC 9562's monotonic random, method 3), and a start counts
/// on from the log's last id: ids sort in log order, at the cost of one
/// random draw per batch, not a clock read and a draw per id
/// (`Uuid::now_v7` took 680 of the 8,900 instructions the writer spent per
/// command of the bench's mix, SHA-256 aside; callgrind).
#[derive(Default)]
struct WriterIds {
    /// The millisecond of the batch being decided.
    batch_millis: u64,
    /// The millisecond of the last id, and its 74 bits as one number.
    millis: u64,
    counter: u128,
}

impl WriterIds {
    const COUNTER_BITS: u32 = 74;

    /// Ids that follow the log's last event (so they sort after it even
    /// in its millisecond, as after a restart within one, or with the
    /// clock set back): its id's millisecond and bits, when it is a v7 id.
    fn after(last: Option<Uuid>) -> WriterIds {
        let mut ids = WriterIds::default();
        if let Some(last) = last.filter(|id| id.get_version_num() == 7) {
            let value = last.as_u128();
            ids.millis = (value >> 80) as u64;
            ids.counter = Self::free_bits(value);
        }
        ids
    }

    /// Sets the time of the ids of the batch about to be decided.
    fn stamp(&mut self, now: Timestamp) {
        self.batch_millis = u64::try_from(now.micros()).unwrap_or(0) / 1_000;
    }

    /// 73 random bits: a counter that starts there has room to count.
    fn random_start() -> u128 {
        // A v4 id's random bits are those outside its version and variant.
        Self::free_bits(Uuid::new_v4().as_u128()) & ((1 << (Self::COUNTER_BITS - 1)) - 1)
    }

    /// The 74 bits of a v4 or v7 id outside its timestamp, version and
    /// variant (rand_a and rand_b of v7), as one number.
    fn free_bits(id: u128) -> u128 {
        ((id >> 64) & 0xfff) << 62 | (id & ((1 << 62) - 1))
    }
}

impl IdSource for WriterIds {
    fn uuid(&mut self) -> Uuid {
        if self.batch_millis > self.millis {
            self.millis = self.batch_millis;
            self.counter = Self::random_start();
        } else if self.counter + 1 < 1 << Self::COUNTER_BITS {
            self.counter += 1;
        } else {
            // 2^73 ids in one millisecond: borrow the next one.
            self.millis += 1;
            self.counter = Self::random_start();
        }
        let millis = u128::from(self.millis) & ((1 << 48) - 1);
        let rand_a = self.counter >> 62;
        let rand_b = self.counter & ((1 << 62) - 1);
        Uuid::from_u128(millis << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)
    }
    fn code(&mut self) -> String {
        random_code(10)
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

/// The default [`LedgerConfig::index_backlog`]: at the 5–7k group commits
/// a second this disk allows, sled may trail by a sixth of a second.
const INDEX_BACKLOG: usize = 1024;

/// Messages waiting for the indexer: one per take of the inbox, and the
/// checkpoints.
const INDEX_QUEUE_LEN: usize = 1024;

/// What the indexer thread is told.
enum StoreJob {
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

struct EncodedCheckpoint {
    seq: Seq,
    hash: log::Hash,
    /// The UTC month of its last event, `YYYYMM`.
    month: u32,
    bytes: Vec<u8>,
    /// When the writer started encoding it, for the statistics.
    started: Instant,
}

/// What the indexer writes to the store for a stretch of the log.
struct IndexJob {
    anchors: Vec<(Seq, Position)>,
    keys: Vec<(String, KeyRow)>,
    seq: Seq,
    hash: log::Hash,
}

/// The syncer's index jobs, merged as they come until the indexer takes
/// them. The syncer tells the indexer only of the first job after a take;
/// it used to send every group commit's job, which woke the indexer about
/// 7,000 times a second under load, only for it to merge them.
struct IndexInbox {
    /// The merged job and how many group commits it holds.
    waiting: Mutex<Option<(IndexJob, usize)>>,
    taken: std::sync::Condvar,
    /// The indexer has stopped: nobody takes any more.
    closed: AtomicBool,
    /// [`LedgerConfig::index_backlog`], at least 1.
    limit: usize,
}

/// What [`IndexInbox::put`] found.
enum Put {
    /// The inbox was empty: the indexer must be told.
    First,
    Merged,
    /// `limit` group commits wait.
    Full,
}

impl IndexInbox {
    fn new(limit: usize) -> IndexInbox {
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

    fn put(&self, job: IndexJob) -> Put {
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
    fn hand_over(
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
    fn absorb(&mut self, next: IndexJob) {
        self.anchors.extend(next.anchors);
        self.keys.extend(next.keys);
        self.seq = next.seq;
        self.hash = next.hash;
    }
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

/// Decoded events handed from the reading thread to the folding one at a time.
const REPLAY_CHUNK: usize = 1024;
/// Chunks in flight between the two replay threads: a bound on memory.
const REPLAY_QUEUE_LEN: usize = 16;

/// The reading end of a two-thread replay: hands items to the folding
/// thread [`REPLAY_CHUNK`] at a time over a queue of [`REPLAY_QUEUE_LEN`].
struct ChunkSender<T> {
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

    fn push(&mut self, item: T) -> Result<(), String> {
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
fn two_stages<T: Send, R, S: Send>(
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
struct Loaded {
    log: Log,
    /// Read anchors of the records the store has not indexed.
    anchors: BTreeMap<Seq, Position>,
    state: State,
    pending_index: Option<IndexJob>,
    indexed: Seq,
    checkpointed: Seq,
}

/// Opens the log (repairing a torn tail) and rebuilds the state: from the
/// store's checkpoint and the log after it when the store agrees with the
/// log (same hash at the seqs it names), else `None`.
fn load(log_dir: &Path, store: &Store, segment_bytes: u64) -> Result<Option<Loaded>, LedgerError> {
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

/// How long the indexer gathers the writer's batches into one sled write.
/// sled costs per write (measured: one sled write per group commit took a
/// quarter of the CPU under write load, in sled's own I/O threads); the
/// memory tail answers for what it has not written yet.
const INDEX_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

fn indexer_loop(inner: &Inner, jobs: std::sync::mpsc::Receiver<StoreJob>) {
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
fn encode_checkpoint(inner: &Inner) -> Option<EncodedCheckpoint> {
    let started = Instant::now();
    let state = inner.state.read();
    if state.head.seq == 0 || state.head.seq > inner.durable.load(Ordering::Acquire) {
        return None;
    }
    encode_state(inner, &state, None, started)
}

/// The state a stored checkpoint's bytes encode, at its head; `None` when
/// they do not decode.
fn decode_checkpoint(seq: Seq, hash: log::Hash, bytes: &[u8]) -> Option<State> {
    let checkpoint: Checkpoint =
        crate::events::decode_shared(|| postcard::from_bytes(bytes)).ok()?;
    Some(State::from_checkpoint(checkpoint, seq, hash))
}

/// The checkpoint kept at `seq` ([`Store::save_checkpoint`]), if it reads
/// and its hash is the log's at that seq (else, warned about, an empty
/// state: it is derived, and the read replays from the start).
fn kept_state(inner: &Inner, seq: Seq) -> Result<State, LedgerError> {
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
fn stored_state(store: &Store) -> Result<State, StoreError> {
    Ok(store
        .load_checkpoint(decode_checkpoint)?
        .flatten()
        .unwrap_or_default())
}

/// Folds the log after `state`'s head up to `target` into it; `stop`,
/// asked before each event, ends the fold early (with an error). Returns
/// the events folded.
fn fold_log(
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

/// A seq the log should hold but does not reach: reported like damage.
fn log_short_of(log_dir: &Path, seq: Seq, what: String) -> LedgerError {
    LedgerError::Log(LogError::Corrupt {
        segment: log_dir.to_path_buf(),
        offset: 0,
        seq,
        what,
    })
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
fn save_checkpoint(inner: &Inner, checkpoint: EncodedCheckpoint) {
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

/// What [`Ledger::read`] finds under the state's lock: the answer, when
/// the read is of the present, or the head and the read not yet made.
enum Now<T, F> {
    Answered(T),
    Past(Seq, F),
}

/// The state after `target` (a durable seq), for a read of the past: from
/// the newest checkpoint not past `target`, the last one or one kept (the
/// last of a month), since decoding one costs in proportion to the state
/// and a replay in proportion to the log before it; else from the start;
/// then the log up to `target`.
fn past_state(inner: &Inner, target: Seq) -> Result<State, LedgerError> {
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
        let lock = lock_dir(&dir)?;
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

/// `verify` (and applying a replay) catches its replay up with the writer
/// without the lock until at most this many events are left for it to fold
/// holding the lock ...
const VERIFY_LOCKED_CATCH_UP: Seq = 1024;
/// ... or for this many rounds.
const VERIFY_CATCH_UP_ROUNDS: usize = 8;

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
    // appending: what it is writing is no torn tail.
    let lock = data_dir.join("LOCK").exists().then(|| lock_dir(data_dir));
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
struct FreshReplay {
    state: State,
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
    fn check(&mut self, seq: Seq, hash: &log::Hash, payload: &[u8]) -> Result<(), String> {
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
    fn catch_up(&mut self, inner: &Inner, to: Seq) -> Result<(), (String, Option<Seq>)> {
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
    fn report(&self, result: Result<(), String>, bad_seq: Option<Seq>) -> VerifyReport {
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
fn first_difference(live: &Projections, fresh: &Projections) -> Option<String> {
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

/// The most commands the writer decides in one go. When the submitters
/// sync in halves: a quarter of the active ones (at least 8), so that the
/// syncer can start on one half while the writer decides the rest of the
/// other. Measured with 64 submitters (`ledger-load writer`, 3 runs each,
/// taken in turn): a half 195–213k events/s, a quarter 226–242k, an eighth
/// 217–250k. More commands waiting than submitters means a batch
/// (`submit_many`) is among them: it is decided whole, as in one group.
fn writer_chunk(halves: bool, active: usize, waiting: usize, max_batch: usize) -> usize {
    if halves && waiting <= active {
        (active / 4).clamp(8, max_batch.max(8))
    } else {
        max_batch
    }
}

/// How the syncer groups commands into syncs ([`LedgerConfig`]).
#[derive(Clone, Copy)]
struct GroupCommitPolicy {
    linger: std::time::Duration,
    halves: bool,
}

/// Chooses between one group and two alternating halves for closed-loop
/// submitters (who send again only once answered), by trying. In one
/// group, the syncer waits between syncs for the group to come back (the
/// gap: answers, wake-ups, the submitters' work, the writer deciding each
/// command as it comes); a cycle is `sync + gap`. Halves alternate, one
/// decided while the other syncs, and carry the group in two syncs once a
/// half comes back within a sync. They can carry more only when
/// `gap > sync` (a fast disk, many submitters), and do only when cores are
/// idle during a sync to do a half's work; where the submitters' own work
/// fills the cores, halves just add a sync and its wake-ups per group
/// (`http-load` expenses, 64 clients: 37.5–39.2k requests/s in halves,
/// 43.9–44.6k in one group), and the gap alone cannot tell the two apart.
///
/// So, once the gap measured in one group exceeds a sync by a third, every
/// [`Self::PROBE_EVERY`] windows of [`Self::WINDOW`] one window runs in the
/// other mode ([`Probe`]), and the mode that synced more commands (halves
/// by [`Self::MARGIN_PERCENT`]) goes on. Under a load that does not wait
/// for its answers both carry the same, and one group stays.
#[derive(Default)]
struct GroupCommit {
    /// Moving average (7/8 old) of the gap in one group, in nanoseconds.
    gap_ns: u64,
    sync_ns: u64,
    split: bool,
    /// The window under way: its start and the commands synced in it.
    window: Option<(Instant, u64)>,
    /// Windows since the last try.
    windows: u32,
    /// A try under way.
    probe: Probe,
    /// Tries so far.
    tries: u64,
}

/// A try of the other mode ([`GroupCommit`]): the window before it, the
/// window in the other mode, and one after it in the chosen mode again, so
/// that a disk that grows slower or faster meanwhile is not taken for the
/// mode's doing.
#[derive(Default)]
enum Probe {
    #[default]
    None,
    /// The window in the other mode, and the rate before it.
    Trying { before: u64 },
    /// The window after it, back in the chosen mode.
    Checking { before: u64, tried: u64 },
}

impl GroupCommit {
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
    const PROBE_EVERY: u32 = 10;
    /// Windows before the first try.
    const FIRST_PROBE: u32 = 2;
    const MARGIN_PERCENT: u64 = 5;
    /// A window with fewer commands is a lull: it proves nothing.
    const WINDOW_COMMANDS: u64 = 1_000;

    fn average(old: u64, sample: u64) -> u64 {
        if old == 0 {
            sample
        } else {
            old.saturating_mul(7).saturating_add(sample) / 8
        }
    }

    /// Takes in one cycle, ended `now` (the syncer's wait before it, its
    /// sync, the commands it answered); returns whether to sync in halves.
    fn next(&mut self, now: Instant, gap_ns: u64, sync_ns: u64, commands: u64) -> bool {
        self.sync_ns = Self::average(self.sync_ns, sync_ns);
        if !self.split {
            self.gap_ns = Self::average(self.gap_ns, gap_ns);
        }
        let (started, synced) = self.window.get_or_insert((now, 0));
        *synced += commands;
        let elapsed = now.duration_since(*started);
        if elapsed < Self::WINDOW {
            return self.split;
        }
        let rate = (*synced).saturating_mul(1_000_000) / (elapsed.as_micros() as u64).max(1);
        let busy = *synced >= Self::WINDOW_COMMANDS;
        self.window = None;
        let rate = if busy { rate } else { 0 };
        self.probe = match std::mem::take(&mut self.probe) {
            Probe::Trying { before } => {
                self.split = !self.split;
                Probe::Checking {
                    before,
                    tried: rate,
                }
            }
            Probe::Checking { before, tried } => {
                // Halves must win by a margin; one group by anything.
                let margin = if self.split {
                    100
                } else {
                    100 + Self::MARGIN_PERCENT
                };
                let chosen = (before + rate) / 2;
                if before > 0 && rate > 0 && tried * 100 > chosen * margin {
                    self.split = !self.split;
                }
                Probe::None
            }
            Probe::None => {
                self.windows += 1;
                let worth_trying = self.split || self.gap_ns * 3 > self.sync_ns * 4;
                let due = if self.tries == 0 {
                    Self::FIRST_PROBE
                } else {
                    Self::PROBE_EVERY
                };
                if busy && worth_trying && self.windows >= due {
                    self.windows = 0;
                    self.tries += 1;
                    self.split = !self.split;
                    Probe::Trying { before: rate }
                } else {
                    Probe::None
                }
            }
        };
        self.split
    }
}

/// Moves the commands waiting in the queue into `batch`, up to `max_batch`,
/// without waiting. One `poll_recv_many` frees their places in the queue
/// at once, where a `try_recv` each locked the queue's waiter list once
/// per command.
fn take_waiting(jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>, max_batch: usize) {
    let room = max_batch.saturating_sub(batch.len());
    if room > 0 {
        // Nothing to wake: when the queue is empty the writer goes on to
        // `blocking_recv`, which registers itself.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = jobs.poll_recv_many(&mut cx, batch, room);
    }
}

/// How often a lingering syncer looks at how many submitters are active.
const LINGER_LOOK_AGAIN: std::time::Duration = std::time::Duration::from_micros(50);

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
const CHECKPOINT_NICE: i32 = 10;

/// Sets the calling thread's nice value (Linux: per thread). Best effort:
/// a failure leaves the thread at the process's priority.
fn lower_this_threads_priority(nice: i32) {
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
struct CheckpointPolicy {
    every: u64,
    forced_after: u64,
}

impl CheckpointPolicy {
    /// A checkpoint costs CPU and memory in proportion to the state (it is
    /// built beside the writer, from the last one and the log since): it
    /// waits for a quiet moment once `every` events are due, and is forced
    /// only when the tail since the last one is both `forced_after` events
    /// and half the log, so that under steady load the work of building
    /// them stays in proportion to the events appended.
    fn due(self, head: Seq, checkpointed: Seq, quiet: bool) -> bool {
        let since = head.saturating_sub(checkpointed);
        since >= self.every && (quiet || since >= self.forced_after.max(head / 2))
    }
}

/// A batch the writer decided and framed, on its way to the syncer.
struct Decided {
    /// The records to write; none when every command was refused or a no-op.
    framed: Option<log::FramedBatch>,
    answers: Vec<(oneshot::Sender<Result<Receipt, SubmitError>>, Answer)>,
    index: Option<IndexJob>,
    commands: usize,
    events: usize,
}

/// The hand-off between the writer, which decides batch N + 1 while the
/// syncer writes and syncs batch N (and answers it), and the syncer. The
/// syncer takes every batch waiting at once: one `fdatasync` for them all.
#[derive(Default)]
struct Pipeline {
    queue: Mutex<PipelineQueue>,
    /// Signalled when a batch is queued, answered, or the writer stops.
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct PipelineQueue {
    batches: std::collections::VecDeque<Decided>,
    /// Commands decided and not answered yet, queued or being synced.
    commands: usize,
    /// Commands in `batches`.
    waiting: usize,
    /// The syncer waits until `waiting` reaches this (0: it is not waiting).
    wanted: usize,
    closed: bool,
}

impl Pipeline {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipelineQueue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wait<'a>(
        &self,
        queue: std::sync::MutexGuard<'a, PipelineQueue>,
    ) -> std::sync::MutexGuard<'a, PipelineQueue> {
        self.changed
            .wait(queue)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a decided batch; waits while `limit` commands are already
    /// decided and unanswered (a bound on memory and on how far the state
    /// runs ahead of the disk).
    fn push(&self, decided: Decided, limit: usize) {
        let mut queue = self.lock();
        while queue.commands > 0 && queue.commands + decided.commands > limit {
            queue = self.wait(queue);
        }
        queue.commands += decided.commands;
        queue.waiting += decided.commands;
        queue.batches.push_back(decided);
        if queue.wanted > 0 && queue.waiting >= queue.wanted {
            self.changed.notify_all();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// For the syncer: every batch waiting, once there is one; `None` once
    /// the writer has stopped and nothing is left. When fewer than half of
    /// the active submitters have a command waiting, waits (up to `linger`)
    /// until all of them do; split in halves, until half of them do, and
    /// takes at once what was decided while the last batch was syncing.
    fn take(
        &self,
        inner: &Inner,
        linger: std::time::Duration,
        max_batch: usize,
    ) -> Option<Vec<Decided>> {
        let split = inner.stats.group_commit_halves.load(Ordering::Relaxed);
        let mut queue = self.lock();
        if split && !queue.batches.is_empty() {
            queue.waiting = 0;
            return Some(queue.batches.drain(..).collect());
        }
        while queue.batches.is_empty() {
            if queue.closed {
                return None;
            }
            queue.wanted = 1;
            queue = self.wait(queue);
        }
        let active = || inner.in_flight.load(Ordering::Acquire).min(max_batch);
        if queue.waiting * 2 <= active() {
            let deadline = Instant::now() + linger;
            loop {
                let active = active();
                let wanted = if split { active.div_ceil(2) } else { active };
                let now = Instant::now();
                if queue.waiting >= wanted || queue.closed || now >= deadline {
                    break;
                }
                queue.wanted = wanted;
                // A push that completes the count wakes the syncer; a
                // submitter that gives up or leaves lowers it unseen, so the
                // count is looked at again now and then.
                queue = self
                    .changed
                    .wait_timeout(queue, (deadline - now).min(LINGER_LOOK_AGAIN))
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .0;
            }
        }
        queue.wanted = 0;
        queue.waiting = 0;
        Some(queue.batches.drain(..).collect())
    }

    /// For the syncer: `commands` are answered.
    fn answered(&self, commands: usize) {
        let mut queue = self.lock();
        queue.commands = queue.commands.saturating_sub(commands);
        self.changed.notify_all();
    }
}

/// The writer: gathers commands, decides them in log order against the
/// state (the state write lock held only while deciding), frames their
/// records, and hands them to the syncer on another thread. So batch N + 1
/// is decided while batch N is on its way to the disk. Readers see the
/// state only once it is durable ([`Ledger::state`] waits). When a
/// checkpoint must be forced, it asks the checkpoint builder for one and
/// goes on (the builder makes those of lulls by itself).
fn writer_loop(
    inner: &Inner,
    log: Log,
    mut jobs: mpsc::Receiver<Job>,
    index: std::sync::mpsc::SyncSender<StoreJob>,
    max_batch: usize,
    policy: CheckpointPolicy,
    group: GroupCommitPolicy,
) {
    let (mut framer, segments) = log.split();
    let pipeline = Pipeline::default();
    let checkpoints = index.clone();
    let cancel = AtomicBool::new(false);
    let building = &inner.stats.checkpoint_building;
    std::thread::scope(|scope| {
        let syncer = std::thread::Builder::new()
            .name("ledger-syncer".into())
            .spawn_scoped(scope, || {
                let run = std::panic::AssertUnwindSafe(|| {
                    syncer_loop(inner, segments, &pipeline, index, group, max_batch);
                });
                if std::panic::catch_unwind(run).is_err() {
                    eprintln!("fatal: the ledger syncer panicked; stopping the process");
                    std::process::abort();
                }
            });
        if let Err(e) = syncer {
            eprintln!("fatal: cannot start the ledger syncer: {e}; stopping the process");
            std::process::abort();
        }
        // One checkpoint at a time: `building` is set by whoever starts one
        // (the writer forcing one, or the builder in a lull) and cleared by
        // the builder once it is saved (or given up).
        let (ask, asked) = std::sync::mpsc::sync_channel::<Seq>(1);
        let builder = std::thread::Builder::new()
            .name("ledger-checkpoint".into())
            .spawn_scoped(scope, || {
                lower_this_threads_priority(CHECKPOINT_NICE);
                checkpoint_builder_loop(inner, asked, policy, &cancel);
            });
        let ask = match builder {
            Ok(_) => Some(ask),
            Err(e) => {
                // Derived data: the ledger runs on, and the next start
                // replays the whole log.
                eprintln!(
                    "error: cannot start the checkpoint builder: {e}; no checkpoints until restart"
                );
                None
            }
        };
        let head = inner.state.read().head.seq;
        let last_id = (head > 0)
            .then(|| read_events(inner, head, head).ok()?.pop())
            .flatten()
            .map(|r| r.id);
        let mut ids = WriterIds::after(last_id);
        let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
        loop {
            let Some(first) = jobs.blocking_recv() else {
                break;
            };
            batch.push(first);
            let most = writer_chunk(
                inner.stats.group_commit_halves.load(Ordering::Relaxed),
                inner.in_flight.load(Ordering::Relaxed),
                jobs.len(),
                max_batch,
            );
            take_waiting(&mut jobs, &mut batch, most);
            // A month close is decided in a batch of its own (see
            // `decide_batch`): the commands taken may make several.
            while !batch.is_empty() {
                let decided = decide_batch(inner, &mut framer, &mut batch, &mut ids);
                // Only a batch that appended something can make one due.
                let head = decided.framed.as_ref().map(|f| f.head.seq);
                pipeline.push(decided, 2 * max_batch);
                let (Some(head), Some(ask)) = (head, &ask) else {
                    continue;
                };
                // Under load that leaves no lull: forced.
                let checkpointed = inner.checkpointed.load(Ordering::Acquire);
                if policy.due(head, checkpointed, false)
                    && start_building(building)
                    && ask.try_send(head).is_err()
                {
                    building.store(false, Ordering::Release);
                }
            }
        }
        pipeline.close();
        // A checkpoint being built is given up: the one below is cheaper.
        cancel.store(true, Ordering::Relaxed);
        drop(ask);
    });
    // The syncer has written and answered everything, the builder stopped.
    let head = inner.state.read().head.seq;
    if head > inner.checkpointed.load(Ordering::Acquire)
        && let Some(encoded) = encode_checkpoint(inner)
    {
        // Waits only when the indexer is INDEX_QUEUE_LEN jobs behind.
        let _ = checkpoints.send(StoreJob::Checkpoint(encoded));
    }
}

/// Claims the one checkpoint build; false when one is under way.
fn start_building(building: &AtomicBool) -> bool {
    building
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// The checkpoint builder: builds the checkpoints the writer forces, and
/// by itself one that is due once the ledger has been quiet for [`QUIET`]
/// (nothing made durable over a whole look, no submitter waiting), so that
/// a lull's checkpoint is built in the lull, not when the next burst
/// begins, and a ledger that falls idle gets one without another command.
fn checkpoint_builder_loop(
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

/// A command whose decision reads much of the state (a month close: every
/// line of the month), decided in a batch of its own.
fn decided_alone(command: &Command) -> bool {
    matches!(command, Command::CloseMonth { .. })
}

/// Decides the commands at the front of `batch` under the state's write
/// lock and frames the records of those accepted: every command before the
/// first month close, or that close alone. A close is decided and encoded
/// under an upgradable read lock, which lets readers go on reading the
/// state before it, and applied once the lock is upgraded: a close of
/// 100,000 customers' lines (300,001 events) spends about half of its
/// time there (`ledger-load close`).
fn decide_batch(
    inner: &Inner,
    framer: &mut log::Framer,
    batch: &mut Vec<Job>,
    ids: &mut WriterIds,
) -> Decided {
    let started = Instant::now();
    let alone = batch
        .first()
        .is_some_and(|job| decided_alone(&job.submission.command));
    let commands = if alone {
        1
    } else {
        batch
            .iter()
            .position(|job| decided_alone(&job.submission.command))
            .unwrap_or(batch.len())
    };
    // Events appended, by type: a batch holds a few types, so a short list
    // searched by the name's address, merged into the shared map once.
    let mut appended_types: Vec<(&'static str, u64)> = Vec::new();
    let mut unframed = log::Unframed::with_capacity(commands);
    let mut decided_first = None;
    let (mut state, now) = if alone {
        let read = inner.state.upgradable_read();
        let now = (inner.clock)().max(read.last_recorded_at);
        ids.stamp(now);
        if let Some(job) = batch.first() {
            decided_first = Some(decide_events(
                inner,
                &read,
                &job.submission,
                now,
                ids,
                &mut unframed,
            ));
        }
        (parking_lot::RwLockUpgradableReadGuard::upgrade(read), now)
    } else {
        let state = inner.state.write();
        let now = (inner.clock)().max(state.last_recorded_at);
        ids.stamp(now);
        (state, now)
    };
    let indexed = inner.indexed.load(Ordering::Acquire);
    state.prune(indexed);
    let mut answers = Vec::with_capacity(commands);
    let waited: std::time::Duration = batch[..commands]
        .iter()
        .map(|job| started.saturating_duration_since(job.queued_at))
        .sum();
    inner
        .stats
        .queue_wait_us
        .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
    for job in batch.drain(..commands) {
        let answer = match decided_first.take() {
            Some(decided) => apply_decided(&mut state, decided),
            None => decide_one(inner, &mut state, &job.submission, now, ids, &mut unframed),
        };
        if let Answer::Done(Ok(receipt)) = &answer {
            for name in receipt.events.iter().map(|r| r.event.type_name()) {
                match appended_types
                    .iter_mut()
                    .find(|(seen, _)| std::ptr::eq(*seen, name))
                {
                    Some((_, count)) => *count += 1,
                    None => appended_types.push((name, 1)),
                }
            }
        }
        answers.push((job.reply, answer));
    }
    let mut framed = None;
    let mut index = None;
    let events = unframed.len();
    if !unframed.is_empty() {
        let first_seq = state.head.seq + 1;
        let batch = framer.frame_laid_out(unframed);
        let mut anchors = Vec::new();
        {
            let mut recent = inner
                .anchors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *recent = recent.split_off(&(indexed + 1));
            for (i, (position, _)) in batch.placed.iter().enumerate() {
                let seq = first_seq + i as u64;
                if i == 0 || is_stride_anchor(seq) {
                    recent.insert(seq, *position);
                }
                if is_stride_anchor(seq) {
                    anchors.push((seq, *position));
                }
            }
        }
        state.head = batch.head;
        // The keys of this batch's commands (a command's events share one).
        let keys = answers
            .iter()
            .filter_map(|(_, answer)| match answer {
                Answer::Done(Ok(receipt)) => receipt.events.first()?.idempotency.as_ref(),
                _ => None,
            })
            .filter_map(|idem| {
                let row = state.recent_keys.get(&idem.key)?;
                (row.first_seq >= first_seq).then(|| (idem.key.clone(), *row))
            })
            .collect();
        index = Some(IndexJob {
            anchors,
            keys,
            seq: batch.head.seq,
            hash: batch.head.hash,
        });
        framed = Some(batch);
    }
    drop(state);
    if !appended_types.is_empty() {
        let mut by_type = inner
            .stats
            .events_by_type
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (name, count) in appended_types {
            *by_type.entry(name).or_default() += count;
        }
    }
    inner
        .stats
        .decide_us
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    Decided {
        framed,
        answers,
        index,
        commands,
        events,
    }
}

/// The syncer: writes every decided batch waiting, makes them durable with
/// one `fdatasync`, publishes the durable head, answers the submitters, and
/// hands the new records to the indexer. It never takes the state lock:
/// readers holding it wait for the durable head this thread moves.
///
/// When fewer than half of the active submitters have a command decided
/// (closed-loop callers, who wait for their answer before sending again,
/// have just been answered), it waits up to `linger` until every active
/// submitter's command is decided (PostgreSQL's commit_delay, adaptive).
/// The writer decides them as they come meanwhile: measured with 64
/// submitters, 87–97k events/s when the writer lingered and then decided,
/// 101–126k now. The half rule, not "linger only when idle", lets groups
/// that fell apart join again (with "when idle", 24 submitters of 30
/// rounds each sometimes took 41 or 42 syncs where 30 do).
///
/// In halves ([`GroupCommit`] chooses by trying), it lingers only
/// until half of the active submitters are in, and takes what was decided
/// while it synced at once; the writer decides at most a quarter of them
/// at a time, so that a half is ready before the other has all come back.
fn syncer_loop(
    inner: &Inner,
    mut segments: log::SegmentWriter,
    pipeline: &Pipeline,
    index: std::sync::mpsc::SyncSender<StoreJob>,
    group: GroupCommitPolicy,
    max_batch: usize,
) {
    let fail = |e: LogError| -> ! {
        // PostgreSQL's lesson: after a failed write or fsync the page
        // cache cannot be trusted. Stop; recovery replays the log.
        eprintln!("fatal: {e}; stopping the process");
        std::process::abort();
    };
    let mut group_commit = GroupCommit::default();
    let mut last_answered = Instant::now();
    while let Some(batches) = pipeline.take(inner, group.linger, max_batch) {
        let started = Instant::now();
        let framed: Vec<&log::FramedBatch> =
            batches.iter().filter_map(|d| d.framed.as_ref()).collect();
        let head = framed.last().map(|f| f.head);
        if head.is_some() {
            segments.put_all(&framed).unwrap_or_else(|e| fail(e));
            segments.sync().unwrap_or_else(|e| fail(e));
        }
        let synced = Instant::now();
        if let Some(head) = head {
            inner.set_durable(head.seq);
        }
        // Counted before the answers go out: a caller who has its answer
        // and then reads the counters (`/metrics`) finds its command there.
        let stats = &inner.stats;
        let commands: usize = batches.iter().map(|d| d.commands).sum();
        let events: usize = batches.iter().map(|d| d.events).sum();
        if head.is_some() {
            stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        stats.commands.fetch_add(commands as u64, Ordering::Relaxed);
        stats.events.fetch_add(events as u64, Ordering::Relaxed);
        let mut index_job: Option<IndexJob> = None;
        for decided in batches {
            for (reply, answer) in decided.answers {
                let _ = reply.send(answer_of(inner, answer));
            }
            if let Some(job) = decided.index {
                match &mut index_job {
                    None => index_job = Some(job),
                    Some(merged) => merged.absorb(job),
                }
            }
        }
        pipeline.answered(commands);
        let answered = Instant::now();
        if head.is_some() && group.halves {
            let nanos = |a: Instant, b: Instant| b.duration_since(a).as_nanos() as u64;
            let (gap, sync) = (nanos(last_answered, started), nanos(started, synced));
            let halves = group_commit.next(answered, gap, sync, commands as u64);
            stats.group_commit_halves.store(halves, Ordering::Relaxed);
            stats
                .group_commit_tries
                .store(group_commit.tries, Ordering::Relaxed);
        }
        last_answered = answered;
        let micros = |a: Instant, b: Instant| b.duration_since(a).as_micros() as u64;
        stats
            .sync_us
            .fetch_add(micros(started, synced), Ordering::Relaxed);
        stats
            .reply_us
            .fetch_add(micros(synced, answered), Ordering::Relaxed);
        if let Some(job) = index_job {
            // Waits only when the indexer is `index_backlog` group commits
            // behind.
            inner.index_inbox.hand_over(job, &index, &stats.index_waits);
        }
    }
}

/// The answer a submitter gets once its batch is durable.
fn answer_of(inner: &Inner, answer: Answer) -> Result<Receipt, SubmitError> {
    match answer {
        Answer::Done(result) => result,
        Answer::Replay { first_seq, count } => {
            match read_events(inner, first_seq, first_seq + u64::from(count) - 1) {
                Ok(events) => Ok(Receipt {
                    events,
                    noop: None,
                    replayed: true,
                }),
                Err(e) => {
                    eprintln!("error: reading back an idempotent answer: {e}");
                    Err(SubmitError::Stopped)
                }
            }
        }
    }
}

enum Answer {
    Done(Result<Receipt, SubmitError>),
    /// An idempotent retry: answer with the events the key recorded.
    Replay {
        first_seq: Seq,
        count: u32,
    },
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

fn decide_one(
    inner: &Inner,
    state: &mut State,
    submission: &Submission,
    now: Timestamp,
    ids: &mut WriterIds,
    unframed: &mut log::Unframed,
) -> Answer {
    let decided = decide_events(inner, state, submission, now, ids, unframed);
    apply_decided(state, decided)
}

/// Applies the events a command was decided to append, or gives the
/// answer it was decided to get instead.
fn apply_decided(state: &mut State, decided: Result<Vec<Recorded>, Answer>) -> Answer {
    let recorded = match decided {
        Ok(recorded) => recorded,
        Err(answer) => return answer,
    };
    for r in &recorded {
        state.apply(r);
    }
    // The head seq moves when the batch is durable; decisions later in this
    // batch see the events through the model and count them via `unframed`.
    Answer::Done(Ok(Receipt {
        events: recorded,
        noop: None,
        replayed: false,
    }))
}

/// Decides a command against `state` without changing it: the events to
/// append, laid out in `unframed`, or the answer it gets instead.
fn decide_events(
    inner: &Inner,
    state: &State,
    submission: &Submission,
    now: Timestamp,
    ids: &mut WriterIds,
    unframed: &mut log::Unframed,
) -> Result<Vec<Recorded>, Answer> {
    let known = submission.idempotency.as_ref().and_then(|idem| {
        let row = state.recent_keys.get(&idem.key).copied();
        row.or_else(|| inner.store.idempotency_key(&idem.key).ok().flatten())
            .map(|row| (idem, row))
    });
    if let Some((idem, entry)) = known {
        return Err(if entry.request_hash == idem.request_hash {
            Answer::Replay {
                first_seq: entry.first_seq,
                count: entry.count,
            }
        } else {
            Answer::Done(Err(SubmitError::IdempotencyConflict(idem.key.clone())))
        });
    }
    let at = submission.at.unwrap_or(now);
    let next_seq = state.head.seq + unframed.len() as u64 + 1;
    let ctx = Context {
        program: submission.program.as_ref(),
        now,
        at,
        next_seq,
        actor: &submission.actor,
    };
    let events = match rules::decide(&state.model, &ctx, &submission.command, ids) {
        Ok(Decision::Append(events)) => events,
        Ok(Decision::Noop(noop)) => {
            return Err(Answer::Done(Ok(Receipt {
                events: Vec::new(),
                noop: Some(noop),
                replayed: false,
            })));
        }
        Err(rejection) => return Err(Answer::Done(Err(SubmitError::Rejected(rejection)))),
    };
    let program = if submission.command.needs_program() {
        submission.program.clone()
    } else {
        None
    };
    let recorded: Vec<Recorded> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Recorded {
            seq: next_seq + i as u64,
            id: ids.uuid(),
            recorded_at: now,
            occurred_at: at,
            actor: submission.actor.clone(),
            program: program.clone(),
            idempotency: submission.idempotency.clone(),
            event,
        })
        .collect();
    let mark = unframed.mark();
    for r in &recorded {
        match unframed.push(|out| encode_into(r, out)) {
            Some(len) if len + 64 <= log::MAX_RECORD_LEN => {}
            _ => {
                unframed.cut_to(mark);
                return Err(Answer::Done(Err(SubmitError::Rejected(
                    Rejection::Invalid(InvalidValue::new(
                        "body",
                        "the event is too large to record",
                    )),
                ))));
            }
        }
    }
    Ok(recorded)
}

// ---------------------------------------------------------------------------
// Export, import, backup: whole-log operations for auditors and operators.

/// One line of the NDJSON export: the envelope, the event as `type` and
/// `data`, and the chain hash of the record.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    pub seq: Seq,
    pub id: Uuid,
    pub recorded_at: Timestamp,
    pub occurred_at: Timestamp,
    pub actor: Text,
    pub program: Option<ProgramId>,
    pub idempotency: Option<Idempotency>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: serde_json::Value,
    pub hash: String,
}

impl ExportLine {
    pub fn new(recorded: &Recorded, hash: &log::Hash) -> ExportLine {
        let data = match serde_json::to_value(&recorded.event) {
            Ok(serde_json::Value::Object(mut map)) => map
                .remove(recorded.event.type_name())
                .unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::Null,
        };
        ExportLine {
            seq: recorded.seq,
            id: recorded.id,
            recorded_at: recorded.recorded_at,
            occurred_at: recorded.occurred_at,
            actor: recorded.actor.clone(),
            program: recorded.program.clone(),
            idempotency: recorded.idempotency.clone(),
            event_type: recorded.event.type_name().to_string(),
            data,
            hash: log::hex(hash),
        }
    }

    pub fn into_recorded(self) -> Result<Recorded, String> {
        let mut tagged = serde_json::Map::new();
        tagged.insert(self.event_type.clone(), self.data);
        let event: Event = serde_json::from_value(serde_json::Value::Object(tagged))
            .map_err(|e| format!("`{}` event: {e}", self.event_type))?;
        Ok(Recorded {
            seq: self.seq,
            id: self.id,
            recorded_at: self.recorded_at,
            occurred_at: self.occurred_at,
            actor: self.actor,
            program: self.program,
            idempotency: self.idempotency,
            event,
        })
    }
}

/// Writes every event (of one program, if given) as NDJSON; returns the
/// count. Beside a running server it exports the log as far as it was
/// written, and returns only once all of that is on disk.
pub fn export_ndjson(
    data_dir: &Path,
    program: Option<&ProgramId>,
    out: &mut dyn Write,
) -> Result<u64, LedgerError> {
    let mut count = 0;
    let mut write_error = None;
    let log_dir = data_dir.join("log");
    let report = log::scan(&log_dir, ScanMode::Read, None, |record| {
        let recorded = decode_record(record.seq, record.payload)?;
        if program.is_some() && recorded.program.as_ref() != program {
            return Ok(());
        }
        let line = ExportLine::new(&recorded, &record.hash);
        let written = serde_json::to_writer(&mut *out, &line)
            .map_err(std::io::Error::other)
            .and_then(|()| out.write_all(b"\n"));
        if let Err(e) = written {
            write_error.get_or_insert(e);
            return Err("the output could not be written".into());
        }
        count += 1;
        Ok(())
    })
    .map_err(|e| match write_error.take() {
        Some(source) => LedgerError::Io {
            path: PathBuf::from("-"),
            source,
        },
        None => LedgerError::Log(e),
    })?;
    // Exported lines a running writer had not yet synced: made durable
    // before the export says it is whole.
    log::make_read_durable(&log_dir, &report)?;
    Ok(count)
}

/// Deletes the index store and rebuilds it, with a checkpoint, from the
/// log alone: the `replay` verb. Returns the head it reflects.
pub fn rebuild_index(data_dir: &Path) -> Result<Head, LedgerError> {
    {
        let _lock = lock_dir(data_dir)?;
        let index = data_dir.join("index");
        Store::destroy(&index).map_err(io_error(&index))?;
    }
    let ledger = Ledger::open(LedgerConfig::new(data_dir))?;
    let head = ledger.state().head;
    drop(ledger);
    Ok(head)
}

/// The longest NDJSON line import reads: a limit, like every input.
pub const MAX_IMPORT_LINE: usize = 1 << 20;

/// Appends an NDJSON export to the log in `data_dir`. The export must
/// continue the log exactly: its first seq is the next one, and every
/// record's chain hash recomputes to the one exported. Every line is checked
/// before anything is appended; a bad line is named by its number.
pub fn import_ndjson(
    data_dir: &Path,
    input: &mut dyn std::io::BufRead,
) -> Result<u64, LedgerError> {
    log::create_dir_synced(data_dir)?;
    let _lock = lock_dir(data_dir)?;
    let log_dir = data_dir.join("log");
    let mut last = (0, Vec::new());
    let (mut log, _) = Log::open(&log_dir, log::DEFAULT_SEGMENT_BYTES, |record| {
        last.0 = record.seq;
        last.1.clear();
        last.1.extend_from_slice(record.payload);
        Ok(())
    })?;
    let mut head = log.head();
    // Recorded times never go back along a log: reads `as_of` a time
    // search for it.
    let mut last_recorded_at = match last {
        (0, _) => Timestamp::MIN,
        (seq, payload) => {
            decode_record(seq, &payload)
                .map_err(|what| log_short_of(&log_dir, seq, what))?
                .recorded_at
        }
    };
    let mut payloads = Vec::new();
    let mut line = String::new();
    let mut number = 0usize;
    loop {
        line.clear();
        number += 1;
        let bad = |message: String| LedgerError::Import {
            line: number,
            message,
        };
        let read = std::io::BufRead::read_line(
            &mut std::io::Read::take(&mut *input, MAX_IMPORT_LINE as u64 + 1),
            &mut line,
        )
        .map_err(|e| bad(e.to_string()))?;
        if read == 0 {
            break;
        }
        if line.len() > MAX_IMPORT_LINE {
            return Err(bad(format!("longer than {MAX_IMPORT_LINE} bytes")));
        }
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
        let hash = parsed.hash.clone();
        let recorded = parsed.into_recorded().map_err(bad)?;
        if recorded.seq != head.seq + 1 {
            return Err(bad(format!(
                "seq {} does not continue the log at {}",
                recorded.seq,
                head.seq + 1
            )));
        }
        // As `verify` checks: a log an import may append is one it passes.
        if recorded.recorded_at < rules::EARLIEST_AT {
            return Err(bad(format!(
                "recorded_at {} is before 1970: no ledger records an event then",
                recorded.recorded_at.to_rfc3339()
            )));
        }
        if recorded.recorded_at < last_recorded_at {
            return Err(bad(format!(
                "recorded_at {} is before the previous event's, {}: recorded times never go back along the log",
                recorded.recorded_at.to_rfc3339(),
                last_recorded_at.to_rfc3339()
            )));
        }
        last_recorded_at = recorded.recorded_at;
        let payload = encode(&recorded).map_err(|e| bad(e.to_string()))?;
        let chained = log::chain_hash(&head.hash, recorded.seq, &payload);
        if log::hex(&chained) != hash {
            return Err(bad(
                "the hash does not match: the line was changed, or the export does not continue this log"
                    .into(),
            ));
        }
        head = log::Head {
            seq: recorded.seq,
            hash: chained,
        };
        payloads.push(payload);
    }
    let count = payloads.len() as u64;
    for chunk in payloads.chunks(1024) {
        log.append(chunk)?;
    }
    Ok(count)
}

fn lock_dir(dir: &Path) -> Result<File, LedgerError> {
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_error(&lock_path))?;
    if lock.try_lock().is_err() {
        return Err(LedgerError::Locked(dir.to_path_buf()));
    }
    Ok(lock)
}

/// What [`repair_log`] found, and what it set aside.
#[derive(Debug, serde::Serialize)]
pub struct RepairReport {
    /// The log needs no repair (a torn tail, which a start cuts, does not count).
    pub sound: bool,
    /// The events the log keeps.
    pub events: Seq,
    /// The first bad record: its seq, segment, offset and what is wrong.
    pub bad_seq: Option<Seq>,
    pub segment: Option<PathBuf>,
    pub offset: Option<u64>,
    pub problem: Option<String>,
    /// Bytes from the bad record to the end of the log: its segment's rest
    /// and every later segment.
    pub set_aside_bytes: u64,
    /// Of those, the bytes up to each file's last non-zero byte: without
    /// the zero-filled space a segment grows by, what may hold records.
    pub set_aside_data_bytes: u64,
    /// The later segments, which go aside whole.
    pub later_segments: Vec<PathBuf>,
    /// Where they went (with `apply`).
    pub set_aside_in: Option<PathBuf>,
    pub applied: bool,
    /// False when the bad record is intact (its CRC and the chain hold) but
    /// does not decode: not damage but a version this build cannot read,
    /// which `repair` never cuts.
    pub repairable: bool,
}

/// Sets aside a damaged stretch of the log so that the ledger can start
/// again: the operator's answer to a start refused for a bad record that
/// is not a torn tail. Power loss can leave one when the pages of the
/// last write, not yet synced and so not acknowledged, reach the disk out
/// of order: zeros, then record bytes. Finds the first bad record; with
/// `apply`, copies its segment from that record on, and moves every later
/// segment, into `damaged/seq-N/` under the data directory (nothing is
/// deleted), cuts the segment before the record, and deletes the index
/// store, which the next start rebuilds from the log. Without `apply` it
/// only reports. Every event from the bad record on leaves the ledger; any
/// acknowledged among them survive only as the bytes set aside.
pub fn repair_log(data_dir: &Path, apply: bool) -> Result<RepairReport, LedgerError> {
    let _lock = lock_dir(data_dir)?;
    let log_dir = data_dir.join("log");
    let mut report = RepairReport {
        sound: false,
        events: 0,
        bad_seq: None,
        segment: None,
        offset: None,
        problem: None,
        set_aside_bytes: 0,
        set_aside_data_bytes: 0,
        later_segments: Vec::new(),
        set_aside_in: None,
        applied: false,
        repairable: true,
    };
    let mut undecodable = None;
    let scanned = log::scan(&log_dir, ScanMode::Read, None, |record| {
        decode(record.payload).map(|_| ()).map_err(|e| {
            undecodable = Some(record.seq);
            format!("an intact record (CRC and chain hold) that does not decode: {e}")
        })
    });
    let (segment, offset, seq) = match scanned {
        Ok(scanned) => {
            report.sound = true;
            report.events = scanned.head.seq;
            return Ok(report);
        }
        Err(LogError::Corrupt {
            segment,
            offset,
            seq,
            what,
        }) => {
            report.problem = Some(what);
            (segment, offset, seq)
        }
        Err(e) => return Err(LedgerError::Log(e)),
    };
    report.events = seq - 1;
    report.bad_seq = Some(seq);
    report.segment = Some(segment.clone());
    report.offset = Some(offset);
    let segments = log::list_segments(&log_dir)?;
    report.later_segments = segments
        .into_iter()
        .map(|(_, path)| path)
        .skip_while(|path| *path != segment)
        .skip(1)
        .collect();
    let size = |path: &Path| fs::metadata(path).map(|m| m.len()).map_err(io_error(path));
    // A bad segment header: the whole segment goes aside.
    let whole = offset <= log::SEGMENT_MAGIC.len() as u64;
    let cut_at = if whole { 0 } else { offset };
    report.set_aside_bytes = size(&segment)?.saturating_sub(cut_at);
    report.set_aside_data_bytes = data_bytes(&segment, cut_at)?;
    for path in &report.later_segments {
        report.set_aside_bytes += size(path)?;
        report.set_aside_data_bytes += data_bytes(path, 0)?;
    }
    report.repairable = undecodable != Some(seq);
    if !apply || !report.repairable {
        return Ok(report);
    }
    let damaged = data_dir.join("damaged");
    let mut aside = damaged.join(format!("seq-{seq}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = damaged.join(format!("seq-{seq}-{n}"));
    }
    fs::create_dir_all(&aside).map_err(io_error(&aside))?;
    let name = |path: &Path| path.file_name().map(PathBuf::from).unwrap_or_default();
    if whole {
        fs::rename(&segment, aside.join(name(&segment))).map_err(io_error(&segment))?;
    } else {
        // Copied, made durable, and only then cut from the log.
        use std::io::{Seek, SeekFrom};
        let mut source = File::open(&segment).map_err(io_error(&segment))?;
        source
            .seek(SeekFrom::Start(cut_at))
            .map_err(io_error(&segment))?;
        let copy_path = aside.join(format!("{}.from-offset-{cut_at}", name(&segment).display()));
        let mut copy = File::create(&copy_path).map_err(io_error(&copy_path))?;
        std::io::copy(&mut source, &mut copy).map_err(io_error(&copy_path))?;
        copy.sync_all().map_err(io_error(&copy_path))?;
    }
    for path in &report.later_segments {
        fs::rename(path, aside.join(name(path))).map_err(io_error(path))?;
    }
    for dir in [&aside, &damaged, data_dir] {
        log::sync_dir(dir)?;
    }
    // The index goes before the cut: never a cut log beside an index that
    // runs past it (a start would notice and rebuild, but need not).
    let index = data_dir.join("index");
    Store::destroy(&index).map_err(io_error(&index))?;
    if !whole {
        log::cut_tail(&segment, cut_at)?;
    }
    log::sync_dir(&log_dir)?;
    report.set_aside_in = Some(aside);
    report.applied = true;
    Ok(report)
}

/// The bytes of `path` from `from` up to its last non-zero byte.
fn data_bytes(path: &Path, from: u64) -> Result<u64, LedgerError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = File::open(path).map_err(io_error(path))?;
    file.seek(SeekFrom::Start(from)).map_err(io_error(path))?;
    let mut chunk = vec![0u8; 1 << 16];
    let (mut read, mut end) = (0u64, 0u64);
    loop {
        let n = file.read(&mut chunk).map_err(io_error(path))?;
        if n == 0 {
            return Ok(end);
        }
        if let Some(last) = chunk[..n].iter().rposition(|&b| b != 0) {
            end = read + last as u64 + 1;
        }
        read += n as u64;
    }
}

/// Copies the log (up to its last whole record) and the key secret to
/// `target`, which must not exist. Safe while a server runs: the log is
/// read first as any reader beside the writer reads it ([`ScanMode::Read`]:
/// a record a write in progress left unfinished is read again, not taken
/// for damage, and a torn last record ends the log), what was read is made
/// durable in the source ([`log::make_read_durable`]), and then exactly the
/// bytes read are copied: segments are append-only, so those no longer
/// change.
pub fn backup(data_dir: &Path, target: &Path) -> Result<Head, LedgerError> {
    if target.exists() {
        return Err(LedgerError::Io {
            path: target.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the backup target exists",
            ),
        });
    }
    let log_dir = data_dir.join("log");
    let report = log::scan(&log_dir, ScanMode::Read, None, |_| Ok(()))?;
    // What was read may be written and not yet synced by the writer.
    log::make_read_durable(&log_dir, &report)?;
    let target_log = target.join("log");
    fs::create_dir_all(&target_log).map_err(io_error(&target_log))?;
    let secret = data_dir.join("secret");
    fs::copy(&secret, target.join("secret")).map_err(io_error(&secret))?;
    let last = report.segments.len().saturating_sub(1);
    for (i, (_, path)) in report.segments.iter().enumerate() {
        // A last segment with no record yet (its header may still be being
        // written): the backup's log ends before it, and a start there
        // makes it anew.
        if i == last && report.end <= log::SEGMENT_MAGIC.len() as u64 {
            break;
        }
        let name = path.file_name().map(PathBuf::from).unwrap_or_default();
        let copy = target_log.join(name);
        fs::copy(path, &copy).map_err(io_error(path))?;
        let file = OpenOptions::new()
            .write(true)
            .open(&copy)
            .map_err(io_error(&copy))?;
        // What the writer appended after the read is not part of it.
        if i == last {
            file.set_len(report.end).map_err(io_error(&copy))?;
        }
        file.sync_all().map_err(io_error(&copy))?;
    }
    // The backup is whole once it says so: the secret, and the directory
    // entries that name it all (down from the one that holds `target`),
    // are on disk too.
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let entries = [
        target.join("secret"),
        target_log,
        target.to_path_buf(),
        parent.to_path_buf(),
    ];
    for path in entries {
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_error(&path))?;
    }
    Ok(report.head)
}
