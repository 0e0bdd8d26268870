//! # commission-ledger
//!
//! An event-sourced commission ledger for the affiliate and partner programs
//! of hosting and SaaS providers. Every click, signup, charge, payment,
//! refund, reward, withdrawal and correction is an event in an append-only,
//! hash-chained log; balances, statistics and statements are projections
//! rebuilt from it. The product is specified in `../shared/DESIGN.md`.
//!
//! ## Bird's-eye view
//!
//! ```text
//!  billing system / portal / operator
//!        │  Submission (Command + actor + at + idempotency key)
//!        ▼
//!  ledger::Ledger ──bounded queue──▶ writer thread (one per data directory)
//!        ▲                            │ rules::decide(model, ctx, command) → events
//!        │ reads (fair RwLock, as_of; │ Model::apply + Projections::apply
//!        │  wait until durable)       │ log::Framer::frame (CRC, hash chain)
//!  State { Model, Projections } ◀─────┤ while the batch before is synced:
//!        │                            ▼
//!        └─ durable head ◀──────── syncer thread: SegmentWriter::put + one
//!                                   fdatasync for every batch waiting, then answer
//! ```
//!
//! The ground state is the log: `DATA/log/*.seg`. Everything else (the
//! write model the rules decide against, the projections the reads serve,
//! the sled indexes and checkpoints in `DATA/index/`) is a fold over it. At
//! start the whole log is checked (frames, CRCs, chain); the state is the
//! last checkpoint plus the events after it, on two threads (read and
//! decode; fold). An indexer thread writes the sparse seq index and the
//! idempotency keys to sled at most every 50 ms, only for acknowledged
//! batches. A checkpoint builder thread makes checkpoints (by itself in a
//! lull, or when the writer forces one once the tail is a million events
//! and half the log) as a start would, from the last one and the log, so the
//! writer never waits for one; the writer encodes its own state only at
//! shutdown, and the indexer saves that one. `serve` also runs the
//! auto-closer, which makes the month closes programs' `auto_close_day`
//! owes, as the actor `auto-close`. The one thing kept beside the log that is
//! not a fold over it: what-if replays computed and not applied yet, in
//! `DATA/replays/` (the newest 256; they can be computed again).
//!
//! ## Code map
//!
//! - [`money`]: decimal amounts, ISO 4217 currencies and minor units, rates,
//!   the one rounding rule (half-to-even, once per reward line). Pure.
//! - [`events`]: the event vocabulary (past tense), the versioned envelope,
//!   the postcard encoding, and the double-entry postings of each event. Pure.
//! - [`log`]: segment files, record frames (length + CRC32C), the SHA-256
//!   hash chain, `fdatasync`, recovery. Knows bytes, not business.
//! - [`rules`]: the write model and `decide(model, context, command, ids)`:
//!   every program rule, pure, with refusals as [`rules::Rejection`] values.
//!   `rules.rs` holds the commands and `decide`; `rules/model.rs` the write
//!   model and its fold; `rules/commission.rs` rates, rewards at a month
//!   close, and pending estimates.
//! - [`projections`]: balances, statements, statistics, referral lists:
//!   infallible folds over recorded events. Pure; never calls the rules.
//! - [`replay`]: what-if replays: one program's history folded again under
//!   overrides, rewards decided again by the rules' own close and
//!   reassignment functions, and the money diff against what was recorded.
//!   Pure.
//! - [`store`]: sled: the sparse seq → position index, idempotency keys and
//!   checkpoints of the state (the last, and the last of each recent month
//!   for reads of the past); all derived, checked against the log at open,
//!   rebuilt when deleted or stale. The only module that imports sled.
//! - [`ledger`]: the single writer and its syncer (pipelined group commit), the indexer, the
//!   read model, `as_of` replays, verify, export/import, backup. The only
//!   module joining log, rules, projections and store. `ledger.rs` holds
//!   the handle and the state; its submodules (`ledger/`) one thread or
//!   job each: `writer`, `indexer`, `checkpoint`, `start`, `history`,
//!   `verify`, `data_dir`.
//! - [`api`]: axum routes and `application/problem+json` errors. The only
//!   module that imports axum. `api.rs` holds the router and most handlers;
//!   its submodules (`api/`): `errors`, `auth`, `ingestion`, `links`,
//!   `telemetry`, `openapi_doc`.
//! - [`cli`]: the command line. The only module that imports clap.
//!
//! Dependencies point one way:
//! `money ← events ← {log, rules ← replay, projections} ← store ← ledger ← {api, cli}`.
//!
//! ## Architecture invariants
//!
//! 1. **The log is the truth.** Nothing is acknowledged before its batch is
//!    on disk (`fdatasync`), and no reader is shown a state whose head is
//!    not on disk yet; a failed write or sync aborts the process and is
//!    never retried. Recovery cuts a torn tail of the last segment and
//!    refuses any other bad record, naming segment, offset and seq.
//! 2. **History is never rewritten.** Corrections are new events
//!    (`ReferralReassigned`, `AdjustmentPosted`); closed months are never
//!    re-posted; old event versions are upcast on read after the hash check.
//! 3. **One writer decides.** Decisions that depend on state (withdrawals
//!    against the balance, code uniqueness) are made in log order by one
//!    thread, so racing requests cannot overdraw.
//! 4. **Pure core.** `money`, `events`, `rules`, `replay` and `projections` do no I/O
//!    and read no clock: time and ids are arguments.
//! 5. **Amounts are decided once.** A reward's amount is computed by the
//!    rules at month close and recorded in its event; projections only add
//!    recorded amounts, so a rule change can never alter a replay.
//! 6. **Double entry.** Every money event posts balanced entries; their sum
//!    over the whole log is zero, and `verify` checks it.
//! 7. **Exact money.** `rust_decimal` everywhere money flows; no floats.
//! 8. **Projections equal a fresh replay.** `verify` compares them.
//! 9. **Recorded times never go back along the log.** The writer records
//!    `max(clock, last)` and `import` refuses a file that goes back, so a
//!    read `as_of` a time finds its seq by binary search.
//! 10. **Whatever holds a whole state takes turns.** Reads of the past,
//!     verifications and what-if replays each fold the log into a state of
//!     their own: one at a time per kind, a bounded number waiting, and the
//!     rest refused as busy ([`ledger::HISTORY_WAITING`],
//!     [`ledger::WHOLE_LOG_WAITING`]).
//!
//! A `tidy` test in `tests/it/tidy.rs` holds the mechanical ones: module
//! docs, imports per module, no floats, no clock or I/O in the pure core.
//!
//! ## Cross-cutting concerns
//!
//! - **Errors.** Expected refusals are values ([`rules::Rejection`],
//!   [`ledger::SubmitError`]); fail-stop problems are [`ledger::LedgerError`]
//!   and [`log::LogError`]. Only `api` maps them to HTTP statuses.
//! - **Limits.** Record size ([`log::MAX_RECORD_LEN`]), queue length and batch
//!   size ([`ledger::LedgerConfig`]), identifier and text lengths
//!   ([`events::MAX_IDENTIFIER_LEN`], [`events::MAX_TEXT_LEN`]), import line
//!   length ([`ledger::MAX_IMPORT_LINE`]).
//! - **Time.** Months are calendar months in the program's IANA zone; every
//!   event keeps `occurred_at` (when it happened) and `recorded_at`.
//! - **Personal data.** Visitors are random ids, referrers keep origin and
//!   path only, API keys are kept as a keyed BLAKE3 hash.

pub mod api;
pub mod cli;
pub mod demo;
pub mod events;
pub mod ledger;
pub mod log;
pub mod money;
pub mod projections;
pub mod replay;
pub mod rules;
pub mod store;

/// The allocator of every binary and test: mimalloc. Replay decodes on one
/// thread and folds (and frees) on another, and the writer allocates many
/// small values per event; with the system allocator, malloc and free were
/// a third of a full replay (measured: 1M events in 2.1 s with glibc, 1.0 s
/// with mimalloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// After a replay, which frees about as much as it keeps: returns the
/// allocator's free memory to the system now rather than as it is reused.
/// mimalloc purges freed memory 10 ms after it is freed; purging at once
/// made a replay fault (and zero) every chunk again (measured: 1M events
/// in 1.3-1.4 s purging at once, 0.94-1.09 s with the default delay and
/// this collection at the end, RSS 138-154 MiB either way).
pub fn return_free_memory() {
    // SAFETY: a collection request without pointers; mimalloc allows it
    // at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
