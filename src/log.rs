//! The append-only log: segment files of framed records, a SHA-256 hash
//! chain, `fdatasync` before anything is acknowledged, and recovery.
//!
//! Knows bytes, not business: a record's payload is opaque here.
//!
//! On disk, `DIR/{first_seq:020}.seg` files, each starting with an 8-byte
//! magic, then records framed as
//! `len: u32 LE | crc32c(body): u32 LE | body` with
//! `body = seq: u64 LE | hash: [u8; 32] | payload`, where
//! `hash = SHA-256(previous hash | seq LE | payload)` and the first previous
//! hash is 32 zero bytes. One writer appends; a new segment is started at a
//! batch boundary once the active one passes its size limit, and the
//! directory is synced when it is created.
//!
//! Recovery: a torn record at the very end of the last segment (a crash
//! mid-write) is cut off; any other bad record is an error naming the
//! segment, the offset and the seq, and nothing is served.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::events::Seq;

/// The first bytes of every segment file: format name and version.
pub const SEGMENT_MAGIC: &[u8; 8] = b"CLSEG\0\0\x01";
const FRAME_HEADER_LEN: usize = 8;
const BODY_PREFIX_LEN: usize = 8 + 32;
/// The largest record body accepted: a limit, so a corrupt length can never
/// make recovery allocate gigabytes.
pub const MAX_RECORD_LEN: usize = 16 << 20;
/// Segments roll over at a batch boundary once they pass this size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// A hash in the chain.
pub type Hash = [u8; 32];

/// The hash before the first record.
pub const GENESIS_HASH: Hash = [0; 32];

/// Fail-stop problems of the log: the server never serves past them.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O call failed. A failed `fdatasync` is never retried: the caller
    /// stops the process (the PostgreSQL lesson).
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record that is not a torn tail failed its checks.
    #[error("corrupt log: segment {segment}, offset {offset}, seq {seq}: {what}")]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        /// The seq the record should have had.
        seq: Seq,
        what: String,
    },
}

impl LogError {
    /// The seq of the first bad record, for a corruption.
    pub fn bad_seq(&self) -> Option<Seq> {
        match self {
            LogError::Corrupt { seq, .. } => Some(*seq),
            LogError::Io { .. } => None,
        }
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { op, path, source }
}

/// The last record of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Head {
    pub seq: Seq,
    pub hash: Hash,
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS_HASH,
    };
}

/// The chain link of a record.
pub fn chain_hash(previous: &Hash, seq: Seq, payload: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize().into()
}

/// Lower-case hex, as statements and `verify` show hashes.
pub fn hex(hash: &Hash) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a record is: its segment (by first seq) and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub segment_first_seq: Seq,
    pub offset: u64,
}

/// A record handed to a scan's visitor.
pub struct Record<'a> {
    pub seq: Seq,
    pub hash: Hash,
    pub payload: &'a [u8],
    pub position: Position,
}

/// How many times a [`ScanMode::Read`] scan reads a bad record of the last
/// segment again (after 1, 2, 4 … 64 ms: 127 ms in all) before it reports
/// it.
const READ_AGAIN_MAX: u32 = 7;

/// How a scan treats a torn tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanMode {
    /// Cut a torn tail off the last segment (server start).
    Repair,
    /// Report a torn tail as an error (`verify`).
    Strict,
    /// Stop quietly before a torn tail, changing nothing (reads beside a writer).
    Read,
}

/// What a scan found.
#[derive(Debug)]
pub struct ScanReport {
    pub head: Head,
    pub segments: Vec<(Seq, PathBuf)>,
    /// Bytes cut off (Repair) or ignored (Read) at the end of the last segment.
    pub torn_bytes: u64,
    /// Where the records of the last segment end (preallocated zeros may follow).
    pub end: u64,
}

fn segment_name(first_seq: Seq) -> String {
    format!("{first_seq:020}.seg")
}

/// The segment files of a log directory, in order.
pub fn list_segments(dir: &Path) -> Result<Vec<(Seq, PathBuf)>, LogError> {
    let mut segments = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(segments),
        Err(e) => return Err(io("read directory", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io("read directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if let Ok(first_seq) = stem.parse::<Seq>() {
            segments.push((first_seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Reads every record of the log in order, checking frames, CRCs, the seq
/// sequence and the hash chain, and hands each to `visit` (which may refuse
/// a record by returning a message: the scan then stops with a corruption
/// at that record). Stops at the first record after `until` when given.
pub fn scan(
    dir: &Path,
    mode: ScanMode,
    until: Option<Seq>,
    mut visit: impl FnMut(Record<'_>) -> Result<(), String>,
) -> Result<ScanReport, LogError> {
    let segments = list_segments(dir)?;
    let mut head = Head::EMPTY;
    let mut torn_bytes = 0;
    let mut end = SEGMENT_MAGIC.len() as u64;
    let count = segments.len();
    for (index, (first_seq, path)) in segments.iter().enumerate() {
        let is_last = index + 1 == count;
        let corrupt = |offset: usize, seq: Seq, what: String| LogError::Corrupt {
            segment: path.clone(),
            offset: offset as u64,
            seq,
            what,
        };
        if *first_seq != head.seq + 1 {
            return Err(corrupt(
                0,
                head.seq + 1,
                format!(
                    "segment starts at seq {first_seq}, expected {}",
                    head.seq + 1
                ),
            ));
        }
        let mut window = Window::open(path)?;
        let header = window.fill(SEGMENT_MAGIC.len())?;
        let header = header[..header.len().min(SEGMENT_MAGIC.len())].to_vec();
        if header != SEGMENT_MAGIC {
            let torn_header = is_last && SEGMENT_MAGIC.starts_with(&header);
            if torn_header && mode != ScanMode::Strict {
                torn_bytes = header.len() as u64;
                if mode == ScanMode::Repair {
                    rewrite_segment_header(path)?;
                }
                end = SEGMENT_MAGIC.len() as u64;
                continue;
            }
            return Err(corrupt(0, head.seq + 1, "bad segment header".into()));
        }
        window.consume(SEGMENT_MAGIC.len());
        let mut read_again = 0;
        loop {
            let offset = window.offset();
            if let Some(until) = until
                && head.seq >= until
            {
                return Ok(ScanReport {
                    head,
                    segments,
                    torn_bytes,
                    end: offset,
                });
            }
            let frame = window.fill(FRAME_HEADER_LEN)?;
            if frame.is_empty() {
                break;
            }
            let zero_frame = frame.iter().all(|b| *b == 0);
            let wanted = if frame.len() >= FRAME_HEADER_LEN {
                let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
                FRAME_HEADER_LEN + len.min(MAX_RECORD_LEN)
            } else {
                FRAME_HEADER_LEN
            };
            if zero_frame && window.rest_is_zero(0)? {
                // Preallocated space, never written: the records end here.
                break;
            }
            let seq = head.seq + 1;
            let rest = window.fill(wanted)?;
            let checked = match check_record(rest, &head) {
                Err(Bad::CrcMismatch { record_len }) => {
                    // The last record written, in a file that ends with it or
                    // with never-written preallocated space, was torn by a crash.
                    let what = "CRC32C mismatch".to_string();
                    Err(if window.rest_is_zero(record_len)? {
                        Bad::Torn(what)
                    } else {
                        Bad::Corrupt(what)
                    })
                }
                other => other,
            };
            let offset_usize = usize::try_from(offset).unwrap_or(usize::MAX);
            // Beside a writer, a read can meet a page before the writer
            // fills it and the next one after: zeros before whole records
            // (seen in 1 of 589 copies of a segment being appended to).
            // Read again a moment later, the record is whole; one still bad
            // then is damage.
            if mode == ScanMode::Read
                && is_last
                && matches!(checked, Err(Bad::Corrupt(_)))
                && read_again < READ_AGAIN_MAX
            {
                std::thread::sleep(std::time::Duration::from_millis(1 << read_again));
                read_again += 1;
                window.read_again()?;
                continue;
            }
            match checked {
                Ok((record_len, hash)) => {
                    let rest = window.fill(record_len)?;
                    let record = Record {
                        seq,
                        hash,
                        payload: &rest[FRAME_HEADER_LEN + BODY_PREFIX_LEN..record_len],
                        position: Position {
                            segment_first_seq: *first_seq,
                            offset,
                        },
                    };
                    visit(record).map_err(|what| corrupt(offset_usize, seq, what))?;
                    head = Head { seq, hash };
                    window.consume(record_len);
                }
                Err(Bad::Torn(_)) if is_last && mode != ScanMode::Strict => {
                    torn_bytes = window.file_len().saturating_sub(offset);
                    if mode == ScanMode::Repair {
                        cut_tail(path, offset)?;
                    }
                    break;
                }
                Err(Bad::Torn(what)) => {
                    let what = if is_last {
                        format!(
                            "torn record at the end of the log ({what}); it is cut off on the next start"
                        )
                    } else {
                        what
                    };
                    return Err(corrupt(offset_usize, seq, what));
                }
                Err(Bad::Corrupt(what)) => return Err(corrupt(offset_usize, seq, what)),
                Err(Bad::CrcMismatch { .. }) => {
                    return Err(corrupt(offset_usize, seq, "CRC32C mismatch".into()));
                }
            }
        }
        end = window.offset();
    }
    Ok(ScanReport {
        head,
        segments,
        torn_bytes,
        end,
    })
}

enum Bad {
    /// The record runs into the end of the file: a crash mid-write can leave this.
    Torn(String),
    /// The record is whole but wrong.
    Corrupt(String),
    /// The body fails its CRC: torn if only zeros follow it, else corrupt.
    CrcMismatch { record_len: usize },
}

/// Checks the record at the start of `rest` (the rest of the segment, or
/// at least the whole record); returns its framed length and hash.
fn check_record(rest: &[u8], previous: &Head) -> Result<(usize, Hash), Bad> {
    if rest.len() < FRAME_HEADER_LEN {
        return Err(Bad::Torn("incomplete frame header".into()));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if !(BODY_PREFIX_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(Bad::Corrupt(format!("impossible record length {len}")));
    }
    let record_len = FRAME_HEADER_LEN + len;
    if rest.len() < record_len {
        return Err(Bad::Torn(format!(
            "record of {len} bytes, {} present",
            rest.len() - FRAME_HEADER_LEN
        )));
    }
    let body = &rest[FRAME_HEADER_LEN..record_len];
    if crc32c::crc32c(body) != crc {
        return Err(Bad::CrcMismatch { record_len });
    }
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
    let expected = previous.seq + 1;
    if seq != expected {
        return Err(Bad::Corrupt(format!(
            "seq {seq} where {expected} was expected"
        )));
    }
    let mut stored = [0u8; 32];
    stored.copy_from_slice(&body[8..BODY_PREFIX_LEN]);
    let hash = chain_hash(&previous.hash, seq, &body[BODY_PREFIX_LEN..]);
    if hash != stored {
        return Err(Bad::Corrupt("hash chain broken".into()));
    }
    Ok((record_len, hash))
}

/// A segment read front to back through one reused buffer: a scan holds a
/// window of the file, not the file (the whole of a 64 MiB segment in
/// memory cost page faults and RSS at every start).
struct Window {
    file: File,
    path: PathBuf,
    len: u64,
    buf: Vec<u8>,
    /// Where the unread bytes start in `buf`.
    pos: usize,
    /// The file offset of `buf[0]`.
    base: u64,
}

/// What a window reads from the file at a time.
const WINDOW_READ: usize = 1 << 20;

impl Window {
    fn open(path: &Path) -> Result<Window, LogError> {
        let file = File::open(path).map_err(io("open", path))?;
        let len = file.metadata().map_err(io("stat", path))?.len();
        Ok(Window {
            file,
            path: path.to_path_buf(),
            len,
            buf: Vec::new(),
            pos: 0,
            base: 0,
        })
    }

    fn file_len(&self) -> u64 {
        self.len
    }

    /// The file offset of the next unread byte.
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The unread bytes, at least `n` of them unless the file (as long as
    /// it was when opened or read again) ends first.
    fn fill(&mut self, n: usize) -> Result<&[u8], LogError> {
        use std::os::unix::fs::FileExt;
        if self.buf.len() - self.pos < n {
            self.buf.drain(..self.pos);
            self.base += self.pos as u64;
            self.pos = 0;
            while self.buf.len() < n {
                let have = self.buf.len();
                // Never past the length the file had when opened (or read
                // again): a scan beside a writer reads the log as it was
                // then, and does not chase what is appended meanwhile.
                let room = self.len.saturating_sub(self.base + have as u64);
                let want = (n - have).max(WINDOW_READ).min(room as usize);
                if want == 0 {
                    break;
                }
                self.buf.resize(have + want, 0);
                let read = self
                    .file
                    .read_at(&mut self.buf[have..], self.base + have as u64)
                    .map_err(io("read", &self.path))?;
                self.buf.truncate(have + read);
                if read == 0 {
                    break;
                }
            }
        }
        Ok(&self.buf[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.buf.len());
    }

    /// Forgets the unread bytes, so that the next [`Self::fill`] reads them
    /// from the file again, as the file is now.
    fn read_again(&mut self) -> Result<(), LogError> {
        self.buf.truncate(self.pos);
        self.len = self.file.metadata().map_err(io("stat", &self.path))?.len();
        Ok(())
    }

    /// Whether everything from `skip` bytes past the unread start to the
    /// end of the file is zero (never-written preallocated space). Reads
    /// past the window without moving it.
    fn rest_is_zero(&mut self, skip: usize) -> Result<bool, LogError> {
        use std::os::unix::fs::FileExt;
        let from = self.pos + skip;
        if self
            .buf
            .get(from..)
            .is_some_and(|bytes| bytes.iter().any(|b| *b != 0))
        {
            return Ok(false);
        }
        let mut at = self.base + self.buf.len().max(from) as u64;
        let mut scratch = vec![0u8; WINDOW_READ];
        while at < self.len {
            let read = self
                .file
                .read_at(&mut scratch, at)
                .map_err(io("read", &self.path))?;
            if read == 0 {
                break;
            }
            if scratch[..read].iter().any(|b| *b != 0) {
                return Ok(false);
            }
            at += read as u64;
        }
        Ok(true)
    }
}

/// Cuts a segment to `len` bytes and makes that durable (a torn tail at
/// start; `repair`, before a bad record).
pub fn cut_tail(path: &Path, len: u64) -> Result<(), LogError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io("open", path))?;
    file.set_len(len).map_err(io("truncate", path))?;
    file.sync_all().map_err(io("fsync", path))
}

fn rewrite_segment_header(path: &Path) -> Result<(), LogError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io("open", path))?;
    file.write_all(SEGMENT_MAGIC).map_err(io("write", path))?;
    file.sync_all().map_err(io("fsync", path))
}

/// Makes a directory's entries durable (files created, renamed into it).
pub fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Makes durable every byte a [`ScanMode::Read`] scan beside a running
/// writer read: the writer acknowledges a record only after its
/// `fdatasync`, so a reader can meet records written and not yet synced,
/// which a power cut could take back (and the writer then give their seqs
/// to other events). `fdatasync` writes every dirty page of a file, and
/// what the scan read was in the page cache when read, so before this call;
/// the directory is synced too, for a segment the writer has just created.
/// A copy or export that calls this after its scan and before it reports
/// success holds nothing the log could lose.
pub fn make_read_durable(dir: &Path, report: &ScanReport) -> Result<(), LogError> {
    for (_, path) in &report.segments {
        File::open(path)
            .and_then(|f| f.sync_data())
            .map_err(io("fdatasync", path))?;
    }
    sync_dir(dir)
}

/// Creates `dir` and its missing parents, and makes each new entry
/// durable by syncing the directory that holds it: a segment's own
/// `fdatasync` does not make the directories that lead to it survive a
/// power cut (PostgreSQL syncs the parent of what it creates).
pub fn create_dir_synced(dir: &Path) -> Result<(), LogError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_synced(parent)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io("create directory", dir)(e)),
    }
}

/// The writer's handle on the log: exactly one per directory at a time.
/// It is two halves, which a pipelined writer runs on two threads: the
/// [`Framer`] lays out records (seq, chain hash, CRC, position) and the
/// [`SegmentWriter`] writes them and makes them durable.
pub struct Log {
    framer: Framer,
    writer: SegmentWriter,
}

/// Lays out batches of records: assigns seqs, chains hashes, frames and
/// places them, and decides when a new segment starts. No I/O.
pub struct Framer {
    head: Head,
    active_first_seq: Seq,
    active_len: u64,
    segment_bytes: u64,
}

/// Records laid out for framing as their payloads are encoded: each
/// payload is written once, after room for its frame header and body
/// prefix, which [`Framer::frame_laid_out`] fills in. (Encoding each event
/// into its own buffer and copying it into the batch cost an allocation,
/// a copy and a free per event on the writer's thread.)
#[derive(Default)]
pub struct Unframed {
    bytes: Vec<u8>,
    count: usize,
}

/// Where an [`Unframed`] batch stood, to cut it back to.
#[derive(Clone, Copy)]
pub struct UnframedMark {
    len: usize,
    count: usize,
}

impl Unframed {
    /// Room for `records` records of a typical size.
    pub fn with_capacity(records: usize) -> Unframed {
        Unframed {
            bytes: Vec::with_capacity(records * 256),
            count: 0,
        }
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn mark(&self) -> UnframedMark {
        UnframedMark {
            len: self.bytes.len(),
            count: self.count,
        }
    }

    /// Drops every record pushed since `mark`.
    pub fn cut_to(&mut self, mark: UnframedMark) {
        self.bytes.truncate(mark.len);
        self.count = mark.count;
    }

    /// Adds a record whose payload `write` appends to the buffer it is
    /// given (it must only append). Returns the payload's length, or `None`
    /// (and keeps nothing) when `write` fails, cuts the buffer, or the
    /// record would pass [`MAX_RECORD_LEN`].
    pub fn push<E>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Option<usize> {
        let mark = self.mark();
        let header = mark.len;
        self.bytes
            .resize(header + FRAME_HEADER_LEN + BODY_PREFIX_LEN, 0);
        let written = write(&mut self.bytes);
        let payload_len = self
            .bytes
            .len()
            .saturating_sub(header + FRAME_HEADER_LEN + BODY_PREFIX_LEN);
        let len = BODY_PREFIX_LEN + payload_len;
        match u32::try_from(len) {
            Ok(len32)
                if written.is_ok()
                    && len <= MAX_RECORD_LEN
                    && self.bytes.len() == header + FRAME_HEADER_LEN + len =>
            {
                self.bytes[header..header + 4].copy_from_slice(&len32.to_le_bytes());
                self.count += 1;
                Some(payload_len)
            }
            _ => {
                self.cut_to(mark);
                None
            }
        }
    }
}

/// A batch laid out by the [`Framer`], ready for the [`SegmentWriter`].
pub struct FramedBatch {
    /// The framed records, back to back.
    pub bytes: Vec<u8>,
    /// Start a new segment, named by this seq, before writing.
    pub roll_to: Option<Seq>,
    /// Where each record lands, and its chain hash.
    pub placed: Vec<(Position, Hash)>,
    /// The head of the log once the batch is written.
    pub head: Head,
}

/// Writes framed batches to the active segment and syncs them.
pub struct SegmentWriter {
    dir: PathBuf,
    active: File,
    active_path: PathBuf,
    /// The active segment's size on disk: zeros past the last record. Writing
    /// into space already allocated lets `fdatasync` skip the file-size
    /// update (measured here: about 400 µs → 240 µs), as PostgreSQL's
    /// zero-filled WAL segments do.
    allocated: u64,
    /// How much zero-filled space to add at a time.
    preallocate: u64,
    /// Reused to join batches into one write.
    joined: Vec<u8>,
}

/// The segment grows by this much zero-filled space at a time. The zeros
/// reach the disk with the next `fdatasync`, which therefore pays for them:
/// measured here (64 records of 200 bytes per `fdatasync`), 4 MiB at a
/// time gave 4,100–4,350 syncs/s with a 17–20 ms stall every 4 MiB; 1 MiB
/// 5,200–5,300/s; 256 KiB 5,300–5,600/s, as fast as writing into space
/// zero-filled beforehand (5,300–5,500/s), p999 1–2 ms instead of 17–20;
/// 64 KiB 4,600–4,900/s.
pub const PREALLOCATE_BYTES: u64 = 256 << 10;

impl Log {
    /// Opens (creating if needed) the log in `dir`, repairing a torn tail,
    /// and hands every record to `visit` in order.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        visit: impl FnMut(Record<'_>) -> Result<(), String>,
    ) -> Result<(Log, ScanReport), LogError> {
        create_dir_synced(dir)?;
        let report = scan(dir, ScanMode::Repair, None, visit)?;
        let (active_first_seq, active_path) = match report.segments.last() {
            Some((first_seq, path)) => (*first_seq, path.clone()),
            None => {
                let path = dir.join(segment_name(1));
                create_segment(dir, &path)?;
                (1, path)
            }
        };
        let active = OpenOptions::new()
            .write(true)
            .open(&active_path)
            .map_err(io("open", &active_path))?;
        let allocated = active.metadata().map_err(io("stat", &active_path))?.len();
        let active_len = if report.segments.is_empty() {
            SEGMENT_MAGIC.len() as u64
        } else {
            report.end
        };
        let log = Log {
            framer: Framer {
                head: report.head,
                active_first_seq,
                active_len,
                segment_bytes: segment_bytes.max(4096),
            },
            writer: SegmentWriter {
                dir: dir.to_path_buf(),
                active,
                active_path,
                allocated,
                preallocate: PREALLOCATE_BYTES,
                joined: Vec::new(),
            },
        };
        Ok((log, report))
    }

    pub fn head(&self) -> Head {
        self.framer.head
    }

    pub fn dir(&self) -> &Path {
        &self.writer.dir
    }

    /// Appends a batch of payloads, seqs `head + 1 ..`, and makes it durable
    /// with one `fdatasync`. Returns the position and hash of each record.
    /// On error the log must not be used again: the process stops.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<Vec<(Position, Hash)>, LogError> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let batch = self.framer.frame(payloads);
        self.writer.write(&batch)?;
        Ok(batch.placed)
    }

    /// Sets how much zero-filled space segments grow by at a time (at least 4 KiB).
    pub fn set_preallocate(&mut self, bytes: u64) {
        self.writer.preallocate = bytes.max(4096);
    }

    /// The two halves, for a writer that frames and syncs on two threads.
    pub fn split(self) -> (Framer, SegmentWriter) {
        (self.framer, self.writer)
    }
}

impl Framer {
    /// The head once every batch framed so far is written.
    pub fn head(&self) -> Head {
        self.head
    }

    /// Lays out `payloads` as seqs `head + 1 ..`.
    pub fn frame(&mut self, payloads: &[Vec<u8>]) -> FramedBatch {
        let size: usize = payloads
            .iter()
            .map(|p| FRAME_HEADER_LEN + BODY_PREFIX_LEN + p.len())
            .sum();
        let mut unframed = Unframed {
            bytes: Vec::with_capacity(size),
            count: 0,
        };
        for payload in payloads {
            let pushed = unframed.push(|bytes| {
                bytes.extend_from_slice(payload);
                Ok::<(), ()>(())
            });
            assert!(
                pushed.is_some(),
                "a record of {} bytes passed the size limit",
                payload.len()
            );
        }
        self.frame_laid_out(unframed)
    }

    /// Frames records laid out in place: seqs `head + 1 ..`, each with its
    /// length, seq, chain hash and CRC written into the room left for them.
    pub fn frame_laid_out(&mut self, unframed: Unframed) -> FramedBatch {
        let roll_to = (self.active_len >= self.segment_bytes).then(|| {
            self.active_first_seq = self.head.seq + 1;
            self.active_len = SEGMENT_MAGIC.len() as u64;
            self.active_first_seq
        });
        let Unframed { mut bytes, count } = unframed;
        let mut placed = Vec::with_capacity(count);
        let mut head = self.head;
        let mut at = 0;
        while at + FRAME_HEADER_LEN <= bytes.len() {
            let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
                as usize;
            let body = at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len;
            let seq = head.seq + 1;
            let hash = chain_hash(
                &head.hash,
                seq,
                &bytes[body.start + BODY_PREFIX_LEN..body.end],
            );
            bytes[body.start..body.start + 8].copy_from_slice(&seq.to_le_bytes());
            bytes[body.start + 8..body.start + BODY_PREFIX_LEN].copy_from_slice(&hash);
            let crc = crc32c::crc32c(&bytes[body.clone()]);
            bytes[at + 4..at + FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
            placed.push((
                Position {
                    segment_first_seq: self.active_first_seq,
                    offset: self.active_len + at as u64,
                },
                hash,
            ));
            head = Head { seq, hash };
            at = body.end;
        }
        self.active_len += bytes.len() as u64;
        self.head = head;
        FramedBatch {
            bytes,
            roll_to,
            placed,
            head,
        }
    }
}

impl SegmentWriter {
    /// Writes a framed batch and makes it durable with one `fdatasync`
    /// (starting its new segment first, with the directory synced). On
    /// error the log must not be used again: the process stops.
    pub fn write(&mut self, batch: &FramedBatch) -> Result<(), LogError> {
        self.put(batch)?;
        self.sync()
    }

    /// Writes a framed batch without syncing it: [`Self::sync`] then makes
    /// every batch put so far durable with one `fdatasync`. A batch that
    /// starts a new segment first syncs the records of the old one, so a
    /// crash never leaves a torn record before a later segment. On error the
    /// log must not be used again: the process stops.
    pub fn put(&mut self, batch: &FramedBatch) -> Result<(), LogError> {
        let start = batch.placed.first().map(|(position, _)| position.offset);
        self.put_bytes(batch.roll_to, start, &batch.bytes)
    }

    /// Writes framed records starting at `start` in the active segment,
    /// after starting a new one first when `roll_to` says so.
    fn put_bytes(
        &mut self,
        roll_to: Option<Seq>,
        start: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), LogError> {
        use std::os::unix::fs::FileExt;
        if let Some(first_seq) = roll_to {
            self.sync()?;
            let path = self.dir.join(segment_name(first_seq));
            create_segment(&self.dir, &path)?;
            self.active = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io("open", &path))?;
            self.active_path = path;
            self.allocated = SEGMENT_MAGIC.len() as u64;
        }
        let Some(start) = start else {
            return Ok(());
        };
        let end = start + bytes.len() as u64;
        self.active
            .write_all_at(bytes, start)
            .map_err(io("write", &self.active_path))?;
        if end > self.allocated {
            // Zeros past the records only: the records themselves are not
            // written twice (a batch of 10,000 events is about 3 MB).
            let target = end.div_ceil(self.preallocate) * self.preallocate;
            let zeros = vec![0u8; (target - end) as usize];
            self.active
                .write_all_at(&zeros, end)
                .map_err(io("preallocate", &self.active_path))?;
            self.allocated = target;
        }
        Ok(())
    }

    /// [`Self::put`] for several batches: those that follow each other in
    /// one segment are written with one call (the writer now hands over
    /// small batches as it decides them; one `pwrite` per batch would add a
    /// syscall each to every sync).
    pub fn put_all(&mut self, batches: &[&FramedBatch]) -> Result<(), LogError> {
        let mut rest = batches;
        while let Some((first, after)) = rest.split_first() {
            let run = 1 + after.iter().take_while(|b| b.roll_to.is_none()).count();
            let (together, next) = rest.split_at(run);
            rest = next;
            if let [one] = together {
                self.put(one)?;
                continue;
            }
            let mut joined = std::mem::take(&mut self.joined);
            joined.clear();
            for batch in together {
                joined.extend_from_slice(&batch.bytes);
            }
            let start = together
                .iter()
                .find_map(|b| b.placed.first())
                .map(|(p, _)| p.offset);
            let result = self.put_bytes(first.roll_to, start, &joined);
            self.joined = joined;
            result?;
        }
        Ok(())
    }

    /// Makes what was put into the active segment durable (`fdatasync`).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.active
            .sync_data()
            .map_err(io("fdatasync", &self.active_path))
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<(), LogError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(SEGMENT_MAGIC).map_err(io("write", path))?;
    file.sync_all().map_err(io("fsync", path))?;
    sync_dir(dir)
}

/// Reads one record at a known position, checking its frame and CRC.
pub fn read_at(dir: &Path, position: Position) -> Result<(Seq, Vec<u8>), LogError> {
    use std::io::{Seek, SeekFrom};
    let path = dir.join(segment_name(position.segment_first_seq));
    let mut file = File::open(&path).map_err(io("open", &path))?;
    file.seek(SeekFrom::Start(position.offset))
        .map_err(io("seek", &path))?;
    let mut header = [0u8; FRAME_HEADER_LEN];
    file.read_exact(&mut header).map_err(io("read", &path))?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let corrupt = |what: &str| LogError::Corrupt {
        segment: path.clone(),
        offset: position.offset,
        seq: 0,
        what: what.to_string(),
    };
    if !(BODY_PREFIX_LEN..=MAX_RECORD_LEN).contains(&len) {
        return Err(corrupt("impossible record length"));
    }
    let mut body = vec![0u8; len];
    file.read_exact(&mut body).map_err(io("read", &path))?;
    if crc32c::crc32c(&body) != crc {
        return Err(corrupt("CRC32C mismatch"));
    }
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
    body.drain(..BODY_PREFIX_LEN);
    Ok((seq, body))
}

/// Reads records `from..=to` sequentially, starting at a known position
/// whose record has seq `start_seq` (≤ `from`), continuing into the next
/// segments. Checks each frame's CRC and seq (the chain is checked at open
/// and by `verify`). Stops early at the end of the log.
pub fn read_range(
    dir: &Path,
    start_seq: Seq,
    start: Position,
    from: Seq,
    to: Seq,
    mut visit: impl FnMut(Seq, &Hash, &[u8]) -> Result<(), String>,
) -> Result<(), LogError> {
    use std::io::{BufReader, Seek, SeekFrom};
    let segments = list_segments(dir)?;
    let mut index = segments
        .iter()
        .position(|(first, _)| *first == start.segment_first_seq)
        .ok_or_else(|| LogError::Corrupt {
            segment: dir.join(segment_name(start.segment_first_seq)),
            offset: start.offset,
            seq: start_seq,
            what: "the index points into a segment that does not exist".into(),
        })?;
    let mut seq = start_seq;
    let mut offset = start.offset;
    let mut body = Vec::new();
    while seq <= to && index < segments.len() {
        let (first_seq, path) = &segments[index];
        if *first_seq > seq || (*first_seq < seq && *first_seq != start.segment_first_seq) {
            return Err(LogError::Corrupt {
                segment: path.clone(),
                offset,
                seq,
                what: format!("segment starts at seq {first_seq}, expected {seq}"),
            });
        }
        let file = File::open(path).map_err(io("open", path))?;
        let len = file.metadata().map_err(io("stat", path))?.len();
        let mut reader = BufReader::with_capacity(64 << 10, file);
        reader
            .seek(SeekFrom::Start(offset))
            .map_err(io("seek", path))?;
        while seq <= to && offset + FRAME_HEADER_LEN as u64 <= len {
            let corrupt = |what: &str| LogError::Corrupt {
                segment: path.clone(),
                offset,
                seq,
                what: what.to_string(),
            };
            let mut header = [0u8; FRAME_HEADER_LEN];
            reader.read_exact(&mut header).map_err(io("read", path))?;
            if header == [0; FRAME_HEADER_LEN] {
                // Preallocated space: this segment's records end here.
                break;
            }
            let body_len =
                u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
            if !(BODY_PREFIX_LEN..=MAX_RECORD_LEN).contains(&body_len)
                || offset + (FRAME_HEADER_LEN + body_len) as u64 > len
            {
                // The end of what was written so far (a writer may be appending).
                return Ok(());
            }
            body.resize(body_len, 0);
            reader.read_exact(&mut body).map_err(io("read", path))?;
            if crc32c::crc32c(&body) != crc {
                return Err(corrupt("CRC32C mismatch"));
            }
            let found = u64::from_le_bytes(body[..8].try_into().unwrap_or([0; 8]));
            if found != seq {
                return Err(corrupt(&format!("seq {found} where {seq} was expected")));
            }
            if seq >= from {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&body[8..BODY_PREFIX_LEN]);
                visit(seq, &hash, &body[BODY_PREFIX_LEN..]).map_err(|what| corrupt(&what))?;
            }
            seq += 1;
            offset += (FRAME_HEADER_LEN + body_len) as u64;
        }
        index += 1;
        offset = SEGMENT_MAGIC.len() as u64;
    }
    Ok(())
}
