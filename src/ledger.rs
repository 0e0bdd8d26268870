//! The single writer and the read model: the only place that joins the log,
//! the rules and the projections.
//!
//! Writes: every [`Submission`] goes through one bounded queue to one writer
//! thread. The writer takes every command waiting (up to a batch limit),
//! decides each in log order against the state left by the one before,
//! appends the whole batch to the log with one `fdatasync` (group commit),
//! and only then releases the state to readers and answers the callers. A
//! failed write or sync stops the process: nothing unacknowledged is ever
//! served, nothing acknowledged is ever lost.
//!
//! Reads see the state as of the last durable batch, or, `as_of` an earlier
//! seq or time, a replay of the log up to there.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
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

/// The clock the ledger reads; tests drive their own.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

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
    pub clock: Clock,
}

impl LedgerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> LedgerConfig {
        LedgerConfig {
            data_dir: data_dir.into(),
            segment_bytes: log::DEFAULT_SEGMENT_BYTES,
            queue_len: 16_384,
            max_batch: 4_096,
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
}

/// A command with everything the log records around it.
#[derive(Clone, Debug)]
pub struct Submission {
    pub program: Option<ProgramId>,
    /// Key id, `cli` or `system`.
    pub actor: String,
    /// When it happened, if not now.
    pub at: Option<Timestamp>,
    pub idempotency: Option<Idempotency>,
    pub command: Command,
}

impl Submission {
    pub fn new(program: Option<&ProgramId>, actor: &str, command: Command) -> Submission {
        Submission {
            program: program.cloned(),
            actor: actor.to_string(),
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
    submission: Submission,
    reply: oneshot::Sender<Result<Receipt, SubmitError>>,
}

/// Where an idempotency key's events are.
#[derive(Clone, Debug)]
struct IdempotencyEntry {
    request_hash: Bytes<32>,
    first_seq: Seq,
    count: u32,
}

/// Everything derived from the log: what decisions and reads see.
#[derive(Clone, Default)]
pub struct State {
    pub model: Model,
    pub views: Projections,
    pub head: Head,
    pub last_recorded_at: Timestamp,
    idempotency: HashMap<String, IdempotencyEntry>,
    /// Where each seq is (index `seq - 1`).
    positions: Vec<Position>,
}

impl State {
    fn apply(&mut self, recorded: &Recorded) {
        self.model.apply(recorded);
        self.views.apply(recorded);
        self.last_recorded_at = self.last_recorded_at.max(recorded.recorded_at);
        if let Some(idem) = &recorded.idempotency {
            match self.idempotency.get_mut(&idem.key) {
                Some(entry) if entry.first_seq + u64::from(entry.count) == recorded.seq => {
                    entry.count += 1
                }
                _ => {
                    self.idempotency.insert(
                        idem.key.clone(),
                        IdempotencyEntry {
                            request_hash: idem.request_hash,
                            first_seq: recorded.seq,
                            count: 1,
                        },
                    );
                }
            }
        }
    }

    /// The hash of the log at this state's head, in hex.
    pub fn head_hash(&self) -> String {
        log::hex(&self.head.hash)
    }
}

/// Fresh ids: UUID v7 for events and withdrawals, random codes for links.
struct RandomIds;

impl IdSource for RandomIds {
    fn uuid(&mut self) -> Uuid {
        Uuid::now_v7()
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
}

struct Inner {
    /// What the writer did so far.
    stats: WriterStats,
    dir: PathBuf,
    log_dir: PathBuf,
    clock: Clock,
    /// The state as of the last durable batch.
    state: RwLock<State>,
    /// The head seq, for live tails (server-sent events) to wait on.
    head: watch::Sender<Seq>,
    /// The secret that keys the hash of API keys.
    key_secret: [u8; 32],
    /// Held for the ledger's life: one process per data directory.
    _lock: File,
}

/// A stable hash of a command's request, for idempotency of API callers.
pub fn request_hash(bytes: &[u8]) -> Bytes<32> {
    Bytes(*blake3::hash(bytes).as_bytes())
}

/// Reads the state as of the whole log in `log_dir` (or up to `as_of`).
fn replay_state(
    log_dir: &Path,
    mode: ScanMode,
    until: Option<Seq>,
    until_time: Option<Timestamp>,
) -> Result<State, LedgerError> {
    let mut state = State::default();
    let mut stopped = false;
    log::scan(log_dir, mode, until, |record| {
        if stopped {
            return Ok(());
        }
        let recorded = decode(record.payload).map_err(|e| format!("undecodable event: {e}"))?;
        if recorded.seq != record.seq {
            return Err(format!(
                "event says seq {}, frame says {}",
                recorded.seq, record.seq
            ));
        }
        if until_time.is_some_and(|t| recorded.recorded_at > t) {
            stopped = true;
            return Ok(());
        }
        state.apply(&recorded);
        state.head = Head {
            seq: record.seq,
            hash: record.hash,
        };
        state.positions.push(record.position);
        Ok(())
    })?;
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
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let lock = lock_dir(&dir)?;
        let key_secret = read_or_create_secret(&dir.join("secret"))?;
        let log_dir = dir.join("log");
        let mut state = State::default();
        let (log, _report) = Log::open(&log_dir, config.segment_bytes, |record| {
            let recorded = decode(record.payload).map_err(|e| format!("undecodable event: {e}"))?;
            if recorded.seq != record.seq {
                return Err(format!(
                    "event says seq {}, frame says {}",
                    recorded.seq, record.seq
                ));
            }
            state.apply(&recorded);
            state.head = Head {
                seq: record.seq,
                hash: record.hash,
            };
            state.positions.push(record.position);
            Ok(())
        })?;
        let (head_tx, _) = watch::channel(state.head.seq);
        let inner = Arc::new(Inner {
            stats: WriterStats::default(),
            dir,
            log_dir,
            clock: config.clock.clone(),
            state: RwLock::new(state),
            head: head_tx,
            key_secret,
            _lock: lock,
        });
        let (queue, jobs) = mpsc::channel(config.queue_len.max(1));
        let writer_inner = inner.clone();
        let max_batch = config.max_batch.max(1);
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| {
                    writer_loop(&writer_inner, log, jobs, max_batch)
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
        })
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

    /// Submits a command and waits until it is durable (or refused).
    pub async fn submit(&self, submission: Submission) -> Result<Receipt, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Job { submission, reply })
            .await
            .map_err(|_| SubmitError::Stopped)?;
        answer.await.map_err(|_| SubmitError::Stopped)?
    }

    /// [`Self::submit`] for callers outside an async runtime.
    pub fn submit_blocking(&self, submission: Submission) -> Result<Receipt, SubmitError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .blocking_send(Job { submission, reply })
            .map_err(|_| SubmitError::Stopped)?;
        answer.blocking_recv().map_err(|_| SubmitError::Stopped)?
    }

    /// Waits for new events: the receiver changes whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<Seq> {
        self.inner.head.subscribe()
    }

    /// The current state, as of the last durable batch.
    pub fn state(&self) -> RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a read against the current state, or against a replay of the
    /// log up to `as_of`.
    pub fn read<T>(
        &self,
        as_of: Option<AsOf>,
        read: impl FnOnce(&State) -> T,
    ) -> Result<T, LedgerError> {
        let head = {
            let state = self.state();
            match as_of {
                None => return Ok(read(&state)),
                Some(AsOf::Seq(seq)) if seq >= state.head.seq => return Ok(read(&state)),
                Some(AsOf::Time(t)) if t >= state.last_recorded_at => return Ok(read(&state)),
                _ => state.head.seq,
            }
        };
        let (until, until_time) = match as_of {
            Some(AsOf::Seq(seq)) => (Some(seq), None),
            Some(AsOf::Time(t)) => (Some(head), Some(t)),
            None => (Some(head), None),
        };
        let state = replay_state(&self.inner.log_dir, ScanMode::Read, until, until_time)?;
        Ok(read(&state))
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

    /// Reads events `from..=to` back from the log.
    pub fn events_range(&self, from: Seq, to: Seq) -> Result<Vec<Recorded>, LedgerError> {
        let positions: Vec<Position> = {
            let state = self.state();
            let to = to.min(state.head.seq);
            if from == 0 || from > to {
                return Ok(Vec::new());
            }
            state.positions[(from - 1) as usize..to as usize].to_vec()
        };
        positions
            .into_iter()
            .map(|position| {
                let (seq, payload) = log::read_at(&self.inner.log_dir, position)?;
                decode(&payload).map_err(|e| {
                    LedgerError::Log(LogError::Corrupt {
                        segment: self.inner.log_dir.clone(),
                        offset: position.offset,
                        seq,
                        what: format!("undecodable event: {e}"),
                    })
                })
            })
            .collect()
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
        let state = self.state();
        let key_id = state.model.key_hashes.get(&hash)?;
        state.model.keys.get(key_id).filter(|k| !k.revoked).cloned()
    }

    /// Checks the whole log (frames, CRCs, chain, postings) and that the
    /// live projections equal a fresh replay.
    pub fn verify(&self) -> VerifyReport {
        let head = self.state().head.seq;
        let mut report = verify_log(&self.inner.log_dir, Some(head));
        if report.ok {
            let state = self.state();
            if let Some(fresh) = &report.fresh
                && state.head.seq == fresh.last_seq
                && &state.views != fresh
            {
                report.ok = false;
                report.problem = Some("the live projections differ from a fresh replay".into());
            }
        }
        report
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
    }
}

/// The result of `verify`.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub ok: bool,
    pub events: u64,
    pub head_seq: Seq,
    pub head_hash: String,
    pub bad_seq: Option<Seq>,
    pub problem: Option<String>,
    /// The projections of the fresh replay, to compare with live ones.
    pub fresh: Option<Projections>,
}

/// Verifies a log directory without opening a ledger on it: every frame and
/// CRC, the hash chain, every event decoded, every event's postings balanced
/// and their running sum zero.
pub fn verify_log(log_dir: &Path, until: Option<Seq>) -> VerifyReport {
    let mut state = State::default();
    let mut events = 0u64;
    let result = log::scan(log_dir, ScanMode::Strict, until, |record| {
        let recorded = decode(record.payload).map_err(|e| format!("undecodable event: {e}"))?;
        if recorded.seq != record.seq {
            return Err(format!(
                "event says seq {}, frame says {}",
                recorded.seq, record.seq
            ));
        }
        let sum: Decimal = recorded.event.postings().iter().map(|p| p.amount).sum();
        if !sum.is_zero() {
            return Err(format!("postings sum to {sum}, not zero"));
        }
        state.apply(&recorded);
        state.head = Head {
            seq: record.seq,
            hash: record.hash,
        };
        events += 1;
        Ok(())
    });
    match result {
        Ok(scan) => {
            let ok = state.views.postings_sum.is_zero();
            VerifyReport {
                ok,
                events,
                head_seq: scan.head.seq,
                head_hash: log::hex(&scan.head.hash),
                bad_seq: None,
                problem: (!ok).then(|| format!("postings sum to {}", state.views.postings_sum)),
                fresh: Some(state.views),
            }
        }
        Err(e) => VerifyReport {
            ok: false,
            events,
            head_seq: state.head.seq,
            head_hash: log::hex(&state.head.hash),
            bad_seq: e.bad_seq(),
            problem: Some(e.to_string()),
            fresh: None,
        },
    }
}

fn writer_loop(inner: &Inner, mut log: Log, mut jobs: mpsc::Receiver<Job>, max_batch: usize) {
    let mut ids = RandomIds;
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let commands = batch.len() as u64;
        let mut state = inner
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = (inner.clock)().max(state.last_recorded_at);
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        let mut answers: Vec<(oneshot::Sender<Result<Receipt, SubmitError>>, Answer)> = Vec::new();
        for job in batch.drain(..) {
            let answer = decide_one(&mut state, &job.submission, now, &mut ids, &mut payloads);
            answers.push((job.reply, answer));
        }
        let decided = Instant::now();
        if !payloads.is_empty() {
            match log.append(&payloads) {
                Ok(placed) => {
                    for (position, _) in &placed {
                        state.positions.push(*position);
                    }
                    state.head = log.head();
                }
                Err(e) => {
                    // PostgreSQL's lesson: after a failed write or fsync the
                    // page cache cannot be trusted. Stop; recovery replays the log.
                    eprintln!("fatal: {e}; stopping the process");
                    std::process::abort();
                }
            }
        }
        let head = state.head.seq;
        drop(state);
        let synced = Instant::now();
        inner.head.send_replace(head);
        for (reply, answer) in answers {
            let result = match answer {
                Answer::Done(result) => result,
                Answer::Replay { first_seq, count } => {
                    read_events(inner, first_seq, count).map(|events| Receipt {
                        events,
                        noop: None,
                        replayed: true,
                    })
                }
            };
            let _ = reply.send(result);
        }
        let stats = &inner.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.commands.fetch_add(commands, Ordering::Relaxed);
        stats
            .events
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let micros = |a: Instant, b: Instant| b.duration_since(a).as_micros() as u64;
        stats
            .decide_us
            .fetch_add(micros(started, decided), Ordering::Relaxed);
        stats
            .sync_us
            .fetch_add(micros(decided, synced), Ordering::Relaxed);
        stats
            .reply_us
            .fetch_add(micros(synced, Instant::now()), Ordering::Relaxed);
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

fn read_events(inner: &Inner, first_seq: Seq, count: u32) -> Result<Vec<Recorded>, SubmitError> {
    let positions: Vec<Position> = {
        let state = inner
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let start = (first_seq - 1) as usize;
        state
            .positions
            .get(start..start + count as usize)
            .map(<[Position]>::to_vec)
            .unwrap_or_default()
    };
    positions
        .into_iter()
        .map(|position| {
            let (_, payload) =
                log::read_at(&inner.log_dir, position).map_err(|_| SubmitError::Stopped)?;
            decode(&payload).map_err(|_| SubmitError::Stopped)
        })
        .collect()
}

fn decide_one(
    state: &mut State,
    submission: &Submission,
    now: Timestamp,
    ids: &mut RandomIds,
    payloads: &mut Vec<Vec<u8>>,
) -> Answer {
    if let Some(idem) = &submission.idempotency
        && let Some(entry) = state.idempotency.get(&idem.key)
    {
        return if entry.request_hash == idem.request_hash {
            Answer::Replay {
                first_seq: entry.first_seq,
                count: entry.count,
            }
        } else {
            Answer::Done(Err(SubmitError::IdempotencyConflict(idem.key.clone())))
        };
    }
    let at = submission.at.unwrap_or(now);
    let next_seq = state.head.seq + payloads.len() as u64 + 1;
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
            return Answer::Done(Ok(Receipt {
                events: Vec::new(),
                noop: Some(noop),
                replayed: false,
            }));
        }
        Err(rejection) => return Answer::Done(Err(SubmitError::Rejected(rejection))),
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
            id: Uuid::now_v7(),
            recorded_at: now,
            occurred_at: at,
            actor: submission.actor.clone(),
            program: program.clone(),
            idempotency: submission.idempotency.clone(),
            event,
        })
        .collect();
    let mut encoded = Vec::with_capacity(recorded.len());
    for r in &recorded {
        match encode(r) {
            Ok(bytes) if bytes.len() + 64 <= log::MAX_RECORD_LEN => encoded.push(bytes),
            _ => {
                return Answer::Done(Err(SubmitError::Rejected(Rejection::Invalid(
                    InvalidValue::new("body", "the event is too large to record"),
                ))));
            }
        }
    }
    for r in &recorded {
        state.apply(r);
    }
    // The head seq moves when the batch is durable; decisions later in this
    // batch see the events through the model and count them via `payloads`.
    payloads.extend(encoded);
    Answer::Done(Ok(Receipt {
        events: recorded,
        noop: None,
        replayed: false,
    }))
}

// ---------------------------------------------------------------------------
// Export, import, backup: whole-log operations for auditors and operators.

/// One line of the NDJSON export: the envelope, the event as `type` and
/// `data`, and the chain hash of the record.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    pub seq: Seq,
    pub id: Uuid,
    pub recorded_at: Timestamp,
    pub occurred_at: Timestamp,
    pub actor: String,
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

/// Writes every event (of one program, if given) as NDJSON; returns the count.
pub fn export_ndjson(
    data_dir: &Path,
    program: Option<&ProgramId>,
    out: &mut dyn Write,
) -> Result<u64, LedgerError> {
    let mut count = 0;
    let mut write_error = None;
    log::scan(&data_dir.join("log"), ScanMode::Read, None, |record| {
        let recorded = decode(record.payload).map_err(|e| format!("undecodable event: {e}"))?;
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
    Ok(count)
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
    fs::create_dir_all(data_dir).map_err(io_error(data_dir))?;
    let _lock = lock_dir(data_dir)?;
    let log_dir = data_dir.join("log");
    let (mut log, _) = Log::open(&log_dir, log::DEFAULT_SEGMENT_BYTES, |_| Ok(()))?;
    let mut head = log.head();
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

/// Copies the log (up to its last whole record) and the key secret to
/// `target`, which must not exist. Safe while a server runs: segments are
/// append-only, and the copy is cut to its last whole record.
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
    let target_log = target.join("log");
    fs::create_dir_all(&target_log).map_err(io_error(&target_log))?;
    let secret = data_dir.join("secret");
    fs::copy(&secret, target.join("secret")).map_err(io_error(&secret))?;
    for (_, path) in log::list_segments(&data_dir.join("log"))? {
        let name = path.file_name().map(PathBuf::from).unwrap_or_default();
        fs::copy(&path, target_log.join(name)).map_err(io_error(&path))?;
    }
    let report = log::scan(&target_log, ScanMode::Repair, None, |_| Ok(()))?;
    for (_, path) in &report.segments {
        File::open(path)
            .and_then(|f| f.sync_all())
            .map_err(io_error(path))?;
    }
    File::open(&target_log)
        .and_then(|d| d.sync_all())
        .map_err(io_error(&target_log))?;
    Ok(report.head)
}
