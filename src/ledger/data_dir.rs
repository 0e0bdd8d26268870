//! A data directory's files for the command line: `export` (NDJSON),
//! `import`, `rebuild-index`, `repair` of a torn tail, and `backup`.

use super::*;

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
        let _lock = lock_dir(data_dir, LOCK_WAIT)?;
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
    let _lock = lock_dir(data_dir, LOCK_WAIT)?;
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
    let _lock = lock_dir(data_dir, LOCK_WAIT)?;
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
