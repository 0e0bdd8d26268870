//! The command line as a process: every verb, and bad input to each (a clear
//! error, a non-zero exit, nothing appended).

use std::path::Path;
use std::process::{Command, Output};

use commission_ledger::events::Timestamp;
use commission_ledger::ledger::verify_log;

fn cli(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_commission-ledger"))
        .args(args)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The events of an NDJSON export, in order.
fn recorded_of(export: &str) -> Vec<commission_ledger::events::Recorded> {
    export
        .lines()
        .map(|line| {
            serde_json::from_str::<commission_ledger::ledger::ExportLine>(line)
                .unwrap()
                .into_recorded()
                .unwrap()
        })
        .collect()
}

/// An export of `recorded` with every hash made right for it (anyone can
/// recompute the chain), and the records' payloads.
fn chained(recorded: &[commission_ledger::events::Recorded]) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut previous = [0u8; 32];
    let mut lines = Vec::new();
    let mut payloads = Vec::new();
    for r in recorded {
        let payload = commission_ledger::events::encode(r).unwrap();
        previous = commission_ledger::log::chain_hash(&previous, r.seq, &payload);
        let line = commission_ledger::ledger::ExportLine::new(r, &previous);
        lines.push(serde_json::to_string(&line).unwrap());
        payloads.push(payload);
    }
    (lines, payloads)
}

/// Imports `file` into `data` and asserts it is refused with a message
/// naming every one of `words`, and that nothing was appended.
fn assert_import_refused(data: &Path, file: &Path, words: &[&str]) {
    let out = cli(data, &["import", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    for word in words {
        assert!(stderr(&out).contains(word), "{word}: {}", stderr(&out));
    }
    assert_eq!(head(data), 0);
}

/// Writes `payloads` as a new log in `data`, as the writer would, with
/// none of the checks `import` makes.
fn write_log(data: &Path, payloads: &[Vec<u8>]) {
    let (mut log, _) = commission_ledger::log::Log::open(
        &data.join("log"),
        commission_ledger::log::DEFAULT_SEGMENT_BYTES,
        |_| Ok(()),
    )
    .unwrap();
    log.append(payloads).unwrap();
}

fn head(data: &Path) -> u64 {
    verify_log(&data.join("log"), None).head_seq
}

/// The data directory's first segment, its bytes, and where its `nth`
/// record (from 1) starts: past the magic and the frames before it.
fn segment_and_record(data: &Path, nth: usize) -> (std::path::PathBuf, Vec<u8>, usize) {
    let segment = std::fs::read_dir(data.join("log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(&segment).unwrap();
    let mut at = 8;
    for _ in 1..nth {
        at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    (segment, bytes, at)
}

#[test]
fn keys_create_prints_the_key_alone_on_the_last_line_and_logs_only_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(dir.path(), &["keys", "create", "--role", "portal"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let key = text.lines().last().unwrap();
    assert!(key.starts_with("cl_") && !key.contains(' '), "{key}");
    assert_eq!(head(dir.path()), 1);
    let segment = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(segment).unwrap();
    assert!(
        !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
        "the key itself is in the log"
    );
    let export = cli(dir.path(), &["export"]);
    let line: serde_json::Value = serde_json::from_str(stdout(&export).trim()).unwrap();
    assert_eq!(
        (
            line["type"].as_str(),
            line["data"]["role"].as_str(),
            line["data"]["issuer"].as_str()
        ),
        (Some("ApiKeyIssued"), Some("portal"), Some("cli"))
    );
    // revoke it, then revoking again is refused
    let key_id = line["data"]["key_id"].as_str().unwrap();
    assert!(
        cli(
            dir.path(),
            &["keys", "revoke", key_id, "--reason", "rotated"]
        )
        .status
        .success()
    );
    let again = cli(
        dir.path(),
        &["keys", "revoke", key_id, "--reason", "rotated"],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("no key"), "{}", stderr(&again));
    assert_eq!(head(dir.path()), 2);
}

#[test]
fn bad_input_to_every_verb_is_a_clear_error_and_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        cli(dir.path(), &["keys", "create", "--role", "admin"])
            .status
            .success()
    );
    let cases: &[(&[&str], &str)] = &[
        (&["keys", "create", "--role", "wizard"], "role"),
        (&["keys", "revoke", "k-nope", "--reason", "x"], "no key"),
        (&["keys", "revoke", "k-nope", "--reason", " "], "reason"),
        (
            &["close-month", "--program", "hosting", "--month", "2026-13"],
            "month",
        ),
        (
            &["close-month", "--program", "no/such", "--month", "2026-01"],
            "program",
        ),
        (
            &["close-month", "--program", "nope", "--month", "2026-01"],
            "no program",
        ),
        (&["import", "/definitely/not/here.ndjson"], "not/here"),
        (&["export", "--program", "bad program"], "program"),
        (&["serve", "--listen", "not-an-address"], "invalid"),
        (&["repair", "--cut-at", "3"], "unexpected argument"),
        (
            &["serve", "--trusted-proxy", "10.0.0.0/33"],
            "not an IP address or a CIDR network",
        ),
        (
            &["serve", "--fallback-site", "javascript:alert(1)"],
            "must be an absolute http(s) URL",
        ),
        (&["frobnicate"], "unrecognized"),
    ];
    for (args, expected) in cases {
        let out = cli(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(head(dir.path()), 1, "{args:?} appended");
    }
}

#[test]
fn verify_exits_zero_only_for_a_sound_log_and_names_the_first_bad_seq() {
    let dir = tempfile::tempdir().unwrap();
    for role in ["admin", "ingest", "portal"] {
        assert!(
            cli(dir.path(), &["keys", "create", "--role", role])
                .status
                .success()
        );
    }
    let ok = cli(dir.path(), &["verify"]);
    assert_eq!(ok.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_str(stdout(&ok).trim()).unwrap();
    assert_eq!(
        (report["ok"].as_bool(), report["events"].as_u64()),
        (Some(true), Some(3))
    );
    // Each `keys create` stopped with a checkpoint at its head.
    assert_eq!(report["projections"], "equal");
    // corrupt record 2
    let (segment, mut bytes, second) = segment_and_record(dir.path(), 2);
    bytes[second + 8 + 45] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();
    let bad = cli(dir.path(), &["verify"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("seq 2"), "{}", stderr(&bad));
    let report: serde_json::Value = serde_json::from_str(stdout(&bad).trim()).unwrap();
    assert_eq!(report["bad_seq"].as_u64(), Some(2));
}

/// A log in `source` of one key issued per role, exported by the command
/// line to `dir/events.ndjson`, which is returned.
fn keys_exported(dir: &Path, source: &Path, roles: &[&str]) -> std::path::PathBuf {
    for role in roles {
        assert!(
            cli(source, &["keys", "create", "--role", role])
                .status
                .success()
        );
    }
    let export = dir.join("events.ndjson");
    assert!(
        cli(source, &["export", "--out", export.to_str().unwrap()])
            .status
            .success()
    );
    export
}

/// Reads by time search for their seq, so recorded times must never go
/// back along the log: `import` refuses such a file, and `verify` fails a
/// log written by other means that breaks the rule, naming the seq.
#[test]
fn verify_fails_a_log_whose_recorded_times_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let export = keys_exported(dir.path(), &source, &["admin", "ingest", "portal"]);
    let mut recorded = recorded_of(&std::fs::read_to_string(&export).unwrap());
    recorded[2].recorded_at = Timestamp::parse("2001-01-01T00:00:00Z").unwrap();
    let (_, payloads) = chained(&recorded);
    let written = dir.path().join("written");
    write_log(&written, &payloads);
    let bad = cli(&written, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stdout(&bad));
    let report: serde_json::Value = serde_json::from_str(stdout(&bad).trim()).unwrap();
    assert_eq!(report["bad_seq"].as_u64(), Some(3));
    assert!(
        report["problem"]
            .as_str()
            .unwrap()
            .contains("never go back"),
        "{report}"
    );
}

#[test]
fn export_import_reproduce_the_chain_and_a_bad_line_appends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let export = keys_exported(
        dir.path(),
        &source,
        &["admin", "ingest", "portal", "ingest"],
    );
    let copy = dir.path().join("copy");
    let imported = cli(&copy, &["import", export.to_str().unwrap()]);
    assert!(imported.status.success(), "{}", stderr(&imported));
    let (a, b) = (
        verify_log(&source.join("log"), None),
        verify_log(&copy.join("log"), None),
    );
    assert!(b.ok);
    assert_eq!((a.head_seq, a.head_hash), (b.head_seq, b.head_hash));

    // a file whose third line was edited: refused by number, nothing appended
    let text = std::fs::read_to_string(&export).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[2] = lines[2].replace("\"role\":\"portal\"", "\"role\":\"admin\"");
    let tampered = dir.path().join("tampered.ndjson");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let fresh = dir.path().join("fresh");
    assert_import_refused(&fresh, &tampered, &["line 3", "hash"]);
    // not JSON at all
    std::fs::write(&tampered, format!("{}\n{{oops\n", lines[0])).unwrap();
    assert_import_refused(&fresh, &tampered, &["line 2"]);
    // a file whose times go back, each line's hash made right for it:
    // refused at the line that goes back
    let mut events = recorded_of(&text);
    events[2].recorded_at = Timestamp::parse("2001-01-01T00:00:00Z").unwrap();
    let (rehashed, _) = chained(&events);
    // The first line recorded before 1970: import refused nothing of it,
    // but verify failed the log it made (found by `tools/fuzz`)
    let mut first = events[..1].to_vec();
    first[0].recorded_at = Timestamp::parse("1913-02-09T16:00:00Z").unwrap();
    let (first_line, first_payload) = chained(&first);
    std::fs::write(&tampered, &first_line[0]).unwrap();
    assert_import_refused(&fresh, &tampered, &["line 1", "before 1970"]);
    let written = dir.path().join("written");
    write_log(&written, &first_payload);
    let bad = cli(&written, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stdout(&bad));
    assert!(stdout(&bad).contains("before 1970"), "{}", stdout(&bad));
    std::fs::write(&tampered, rehashed[..2].join("\n")).unwrap();
    let out = cli(&fresh, &["import", tampered.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(&fresh).unwrap();
    std::fs::write(&tampered, rehashed.join("\n")).unwrap();
    assert_import_refused(&fresh, &tampered, &["line 3", "never go back"]);
    // importing the same export twice: the second does not continue the log
    let twice = cli(&copy, &["import", export.to_str().unwrap()]);
    assert!(
        stderr(&twice).contains("line 1") && stderr(&twice).contains("does not continue"),
        "{}",
        stderr(&twice)
    );
    assert_eq!(head(&copy), 4);
}

#[test]
fn close_month_posts_rewards_once_and_backup_copies_a_verifiable_log() {
    use commission_ledger::ledger::{Ledger, LedgerConfig, Submission};
    use commission_ledger::rules::Command as C;
    let dir = tempfile::tempdir().unwrap();
    {
        let ledger = Ledger::open(LedgerConfig::new(dir.path())).unwrap();
        let program = commission_ledger::events::ProgramId::parse("hosting").unwrap();
        let submit = |at: Option<&str>, c| {
            let mut s = Submission::new(Some(&program), "test", c);
            if let Some(at) = at {
                s = s.at(commission_ledger::events::Timestamp::parse(at).unwrap());
            }
            ledger.submit_blocking(s).unwrap()
        };
        submit(
            None,
            C::DefineProgram {
                rules: Box::new(crate::support::rules("hosting", serde_json::json!({}))),
                reason: None,
            },
        );
        submit(
            None,
            C::EnrollAffiliate {
                affiliate_id: crate::support::aff("alice"),
                customer_id: None,
                group: None,
                rate: None,
            },
        );
        submit(
            Some("2026-01-02T00:00:00Z"),
            C::Signup {
                customer_id: crate::support::cust("c-1"),
                visitor: None,
                promo_code: Some("HOST-alice".into()),
                group: None,
            },
        );
        submit(
            Some("2026-01-03T00:00:00Z"),
            C::RecordBasisLine {
                kind: commission_ledger::events::LineKind::Expense,
                id: crate::support::line("l-1"),
                customer_id: crate::support::cust("c-1"),
                amount: "100.00".into(),
                currency: "USD".into(),
                product: None,
                order_id: None,
            },
        );
    }
    let out = cli(
        dir.path(),
        &["close-month", "--program", "hosting", "--month", "2026-01"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let answer: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"month": "2026-01", "rewards": 1, "total": "20.00", "already_closed": false})
    );
    let head_after = head(dir.path());
    let again = cli(
        dir.path(),
        &["close-month", "--program", "hosting", "--month", "2026-01"],
    );
    let answer: serde_json::Value = serde_json::from_str(stdout(&again).trim()).unwrap();
    assert_eq!(answer["already_closed"], serde_json::json!(true));
    assert_eq!(head(dir.path()), head_after);

    let backup = dir.path().join("backup");
    let out = cli(dir.path(), &["backup", backup.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, b) = (
        verify_log(&dir.path().join("log"), None),
        verify_log(&backup.join("log"), None),
    );
    assert!(b.ok);
    assert_eq!(a.head_hash, b.head_hash);
    assert!(backup.join("secret").exists());
    assert!(
        !cli(dir.path(), &["backup", backup.to_str().unwrap()])
            .status
            .success(),
        "a backup never overwrites"
    );
    assert!(cli(&backup, &["replay"]).status.success());
}

#[test]
fn serve_prints_the_admin_key_once_answers_and_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_commission-ledger"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = Vec::new();
        let address = loop {
            let line = lines.next().unwrap().unwrap();
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.to_string();
            }
            printed.push(line);
        };
        (child, address, printed)
    };
    let (mut child, address, printed) = start();
    assert!(
        printed.iter().any(|l| l.starts_with("created admin key")),
        "{printed:?}"
    );
    let key = printed.last().unwrap().clone();
    let client = reqwest::blocking::Client::new();
    assert_eq!(
        client
            .get(format!("{address}/healthz"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
        "ok"
    );
    let verify = client
        .get(format!("{address}/v1/verify"))
        .bearer_auth(&key)
        .send()
        .unwrap();
    assert_eq!(verify.status().as_u16(), 200);
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "a clean exit on SIGTERM"
    );
    // the second start prints no new key, and the first key still works
    let (mut child, address, printed) = start();
    assert!(
        !printed.iter().any(|l| l.starts_with("created admin key")),
        "{printed:?}"
    );
    assert_eq!(
        client
            .get(format!("{address}/v1/verify"))
            .bearer_auth(&key)
            .send()
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// Power loss can leave zeros, then record bytes, where the pages of the
/// last (unsynced, unacknowledged) write reached the disk out of order.
/// The ledger refuses to start on that; `repair` reports it, and with
/// `--apply` sets the damaged stretch aside so that the ledger starts
/// again with the records before it.
#[test]
fn repair_reports_a_damaged_stretch_and_sets_it_aside_so_the_ledger_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..5 {
        assert!(
            cli(dir.path(), &["keys", "create", "--role", "portal"])
                .status
                .success()
        );
    }
    let (segment, mut bytes, third) = segment_and_record(dir.path(), 3);
    bytes[third..third + 28].fill(0);
    std::fs::write(&segment, &bytes).unwrap();
    let refused = commission_ledger::ledger::Ledger::open(
        commission_ledger::ledger::LedgerConfig::new(dir.path()),
    )
    .err()
    .expect("a start refuses a bad record with records after it");
    assert!(refused.to_string().contains("seq 3"), "{refused}");
    // `backup` reads the record again (beside a running writer, such a
    // hole can be a write in progress), then reports it.
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("backup");
    let backup = cli(dir.path(), &["backup", target.to_str().unwrap()]);
    assert!(!backup.status.success());
    assert!(stderr(&backup).contains("seq 3"), "{}", stderr(&backup));
    for verb in [&["keys", "create", "--role", "portal"][..], &["replay"]] {
        let refused_verb = cli(dir.path(), verb);
        assert_eq!(refused_verb.status.code(), Some(2));
        assert!(
            stderr(&refused_verb).contains("repair") && stderr(&refused_verb).contains("seq 3"),
            "a refused start points the operator to repair: {}",
            stderr(&refused_verb)
        );
    }

    let report = cli(dir.path(), &["repair"]);
    assert_eq!(report.status.code(), Some(1), "{}", stderr(&report));
    let found: serde_json::Value = serde_json::from_str(stdout(&report).trim()).unwrap();
    assert_eq!(
        (
            found["bad_seq"].as_u64(),
            found["events"].as_u64(),
            found["offset"].as_u64(),
            found["applied"].as_bool()
        ),
        (Some(3), Some(2), Some(third as u64), Some(false))
    );
    assert_eq!(
        found["set_aside_bytes"].as_u64(),
        Some((bytes.len() - third) as u64)
    );
    // Of which data: up to the last non-zero byte, within the fifth
    // record; the zero-filled space after it holds nothing.
    let data_end = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    assert!(data_end > segment_and_record(dir.path(), 5).2 && data_end < bytes.len());
    assert_eq!(
        found["set_aside_data_bytes"].as_u64(),
        Some((data_end - third) as u64)
    );
    assert!(stderr(&report).contains("--apply"), "{}", stderr(&report));
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "a report changes nothing"
    );
    assert!(!dir.path().join("damaged").exists());

    let applied = cli(dir.path(), &["repair", "--apply"]);
    assert_eq!(applied.status.code(), Some(0), "{}", stderr(&applied));
    let done: serde_json::Value = serde_json::from_str(stdout(&applied).trim()).unwrap();
    assert_eq!(done["applied"].as_bool(), Some(true));
    let aside = std::path::PathBuf::from(done["set_aside_in"].as_str().unwrap());
    let copies: Vec<_> = std::fs::read_dir(&aside).unwrap().collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(
        std::fs::read(copies[0].as_ref().unwrap().path()).unwrap(),
        bytes[third..],
        "the damaged stretch is kept, byte for byte"
    );
    assert_eq!(std::fs::read(&segment).unwrap(), bytes[..third]);

    // The ledger starts again with the two records before it, and goes on.
    let verified = cli(dir.path(), &["verify"]);
    assert_eq!(verified.status.code(), Some(0), "{}", stdout(&verified));
    assert_eq!(head(dir.path()), 2);
    assert!(
        cli(dir.path(), &["keys", "create", "--role", "portal"])
            .status
            .success()
    );
    assert_eq!(head(dir.path()), 3);
    let sound = cli(dir.path(), &["repair"]);
    assert_eq!(sound.status.code(), Some(0), "{}", stderr(&sound));
    assert!(stderr(&sound).contains("sound"), "{}", stderr(&sound));
}

#[test]
fn repair_leaves_an_intact_record_it_cannot_decode_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = commission_ledger::log::Log::open(
        &dir.path().join("log"),
        commission_ledger::log::DEFAULT_SEGMENT_BYTES,
        |_| Ok(()),
    )
    .unwrap();
    log.append(&[b"not an event this build reads".to_vec()])
        .unwrap();
    drop(log);
    let (segment, before, _) = segment_and_record(dir.path(), 1);
    let refused = cli(dir.path(), &["repair", "--apply"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("intact") && stderr(&refused).contains("leaves it"),
        "{}",
        stderr(&refused)
    );
    assert!(!dir.path().join("damaged").exists());
    assert_eq!(std::fs::read(&segment).unwrap(), before);
}

/// `import` checks an export's frame (seqs, times, the hash chain, which
/// anyone can recompute), so it must also refuse an event the ledger could
/// not hold: amounts past [`commission_ledger::events::MAX_EVENT_AMOUNT`]
/// would overflow the sums a start folds (found while writing `tools/fuzz`). A log
/// holding one anyway, written by other means, is reported, never served.
#[test]
fn import_refuses_an_amount_too_large_to_add_and_a_start_refuses_such_a_log() {
    use commission_ledger::events::{Event, MAX_EVENT_AMOUNT};
    use commission_ledger::ledger::{Ledger, LedgerConfig, Submission};
    use commission_ledger::rules::Command as C;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    {
        let ledger = Ledger::open(LedgerConfig::new(&source)).unwrap();
        let program = commission_ledger::events::ProgramId::parse("hosting").unwrap();
        let submit = |at: &str, c| {
            let s = Submission::new(Some(&program), "test", c).at(Timestamp::parse(at).unwrap());
            ledger.submit_blocking(s).unwrap()
        };
        let rules = crate::support::rules("hosting", serde_json::json!({}));
        let define = C::DefineProgram {
            rules: Box::new(rules),
            reason: None,
        };
        submit("2026-01-01T00:00:00Z", define);
        let enroll = C::EnrollAffiliate {
            affiliate_id: crate::support::aff("alice"),
            customer_id: None,
            group: None,
            rate: None,
        };
        submit("2026-01-01T00:00:00Z", enroll);
        let signup = C::Signup {
            customer_id: crate::support::cust("c-1"),
            visitor: None,
            promo_code: Some("HOST-alice".into()),
            group: None,
        };
        submit("2026-01-02T00:00:00Z", signup);
        for id in ["l-1", "l-2"] {
            let line = C::RecordBasisLine {
                kind: commission_ledger::events::LineKind::Expense,
                id: crate::support::line(id),
                customer_id: crate::support::cust("c-1"),
                amount: "100.00".into(),
                currency: "USD".into(),
                product: None,
                order_id: None,
            };
            submit("2026-01-03T00:00:00Z", line);
        }
        let month = commission_ledger::events::Month::parse("2026-01").unwrap();
        submit("2026-02-01T00:00:00Z", C::CloseMonth { month });
    }
    let export = dir.path().join("export.ndjson");
    let out = cli(&source, &["export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Both rewards made as large as a decimal goes, each hash made right.
    let mut recorded = recorded_of(&std::fs::read_to_string(&export).unwrap());
    let mut tampered_at = Vec::new();
    for (i, r) in recorded.iter_mut().enumerate() {
        if let Event::RewardAccrued(e) = &mut r.event {
            e.amount = rust_decimal::Decimal::MAX;
            tampered_at.push(i + 1);
        }
    }
    assert_eq!(tampered_at.len(), 2, "two rewards to tamper with");
    let (lines, payloads) = chained(&recorded);
    let tampered = dir.path().join("tampered.ndjson");
    std::fs::write(&tampered, lines.join("\n")).unwrap();
    let fresh = dir.path().join("fresh");
    let line = format!("line {}", tampered_at[0]);
    assert_import_refused(&fresh, &tampered, &[&line, &MAX_EVENT_AMOUNT.to_string()]);

    // The same events written straight into a log: verify names the first,
    // and neither a replay nor a start serves the log.
    let written = dir.path().join("written");
    write_log(&written, &payloads);
    let bad = cli(&written, &["verify"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    let report: serde_json::Value = serde_json::from_str(stdout(&bad).trim()).unwrap();
    assert_eq!(report["bad_seq"].as_u64(), Some(tampered_at[0] as u64));
    let replay = cli(&written, &["replay"]);
    assert!(!replay.status.success());
    assert!(!stderr(&replay).contains("panicked"), "{}", stderr(&replay));
    let error = Ledger::open(LedgerConfig::new(&written)).err().unwrap();
    assert!(
        error
            .to_string()
            .contains(&format!("seq {}", tampered_at[0])),
        "{error}"
    );
}
