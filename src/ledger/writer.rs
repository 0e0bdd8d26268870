//! The write path: the writer thread that decides each command in log
//! order and frames its records, the pipeline to the syncer thread that
//! writes and syncs them (group commit, in one group or two alternating
//! halves) and answers the submitters, and the ids the writer stamps.

use super::checkpoint::{
    CHECKPOINT_NICE, CheckpointPolicy, checkpoint_builder_loop, encode_checkpoint,
    lower_this_threads_priority, start_building,
};
use super::indexer::{IndexJob, StoreJob};
use super::*;

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
pub(super) struct GroupCommitPolicy {
    pub(super) linger: std::time::Duration,
    pub(super) halves: bool,
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
pub(super) fn writer_loop(
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
