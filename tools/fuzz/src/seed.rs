//! Writes a seed corpus for `fold_events`: prefixes of real logs, in the
//! target's `[u16 LE length][postcard bytes]` form. The logs are the demo's
//! (made in a fresh directory) and those of the data directories given.
//!
//! `cargo run --release --bin seed -- CORPUS_DIR [DATA_DIR ...]`, and
//! `seed --api CORPUS_DIR` for `api_requests` (a valid request per route).
//!
//! `seed --keep CONTROL_FILE MOST DIR` chooses the inputs kept for the
//! test suite (`tests/it/fuzz.rs`): from the control file of a libFuzzer
//! merge (`-merge=1 -merge_control_file=CONTROL_FILE`), which lists every
//! input with the code edges it covers, at most `MOST` inputs, each the
//! one that covers the most edges not yet covered (the smaller first), and
//! copies them into `DIR`.

use std::path::{Path, PathBuf};

use commission_ledger::ledger::{Ledger, LedgerConfig};
use commission_ledger::log::{ScanMode, scan};

/// Prefix lengths, in events; every seed starts at the log's first event,
/// where the programs are defined.
const PREFIXES: [usize; 7] = [5, 20, 60, 150, 400, 1000, 3000];

fn fail(message: &str) -> ! {
    eprintln!("seed: {message}");
    std::process::exit(1)
}

fn payloads(data_dir: &Path, most: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    scan(
        &data_dir.join("log"),
        ScanMode::Read,
        Some(most as u64),
        |record| {
            out.push(record.payload.to_vec());
            Ok(())
        },
    )
    .unwrap_or_else(|e| fail(&e.to_string()));
    out
}

/// (method, route, caller, flags, path segments, query, body)
type ApiSeed = (
    u8,
    u8,
    u8,
    u8,
    &'static [&'static str],
    &'static str,
    &'static str,
);

/// Seeds of `api_requests`: one valid request per route, in the target's
/// form (method, route, caller, flags, then segments, query and body
/// separated by 0xFF). Routes by their index in the target's table.
fn api_seeds(corpus: &Path) {
    // (method, route, caller, flags, segments, query, body); callers: 0
    // admin, 1 ingest, 2 portal, 3 alice's token; flags: 1 JSON, 2 an
    // idempotency key, 4 HTML, 8 CSV
    let seeds: &[ApiSeed] = &[
        (0, 0, 4, 0, &["P-alice"], "", ""),
        (0, 1, 4, 0, &[], "code=P-alice&visitor=v1", ""),
        (0, 5, 0, 0, &[], "after=0&limit=5&type=ClickRecorded", ""),
        (0, 6, 0, 0, &["p"], "", ""),
        (
            2,
            6,
            0,
            1,
            &["q"],
            "",
            r#"{"id":"q","name":"Q","currency":"JPY","timezone":"UTC","site_url":"https://q.example/","default_rate":"10","payout_threshold":"0"}"#,
        ),
        (
            1,
            7,
            2,
            3,
            &[],
            "",
            r#"{"affiliate_id":"carol","group":"vip","rate":"30"}"#,
        ),
        (0, 9, 3, 0, &["alice"], "as_of=2026-08-01T00:00:00Z", ""),
        (0, 10, 2, 4, &["alice", "2026-08"], "as_of_seq=5", ""),
        (
            0,
            11,
            2,
            0,
            &["alice"],
            "from=2026-08-01&to=2026-08-31&by=creative",
            "",
        ),
        (
            0,
            12,
            2,
            8,
            &["alice"],
            "status=active&q=c&sort=commission_desc&limit=2",
            "",
        ),
        (1, 13, 3, 1, &["alice"], "", r#"{"amount":"10.00"}"#),
        (
            1,
            14,
            0,
            1,
            &["alice"],
            "",
            r#"{"amount":"1.00","invoice_id":"inv-1"}"#,
        ),
        (1, 15, 2, 1, &["alice"], "", r#"{"ttl_seconds":60}"#),
        (
            1,
            16,
            0,
            1,
            &["01890000-0000-7000-8000-000000000000"],
            "",
            r#"{"reference":"wire-1"}"#,
        ),
        (
            1,
            17,
            0,
            1,
            &["01890000-0000-7000-8000-000000000000"],
            "",
            r#"{"reason":"no"}"#,
        ),
        (
            1,
            18,
            1,
            1,
            &[],
            "",
            r#"{"referral_code":"P-alice","visitor":"v1","creative":"b","referrer":"https://x.example/a?b"}"#,
        ),
        (
            1,
            19,
            1,
            3,
            &[],
            "",
            r#"{"customer_id":"c1","visitor":"v1","promo_code":"P-bob","group":"staff","at":"2026-08-02T00:00:00Z"}"#,
        ),
        (
            1,
            20,
            1,
            3,
            &[],
            "",
            r#"{"id":"i1","customer_id":"c1","amount":"100.00","currency":"USD","product":"domains","at":"2026-08-03T00:00:00Z"}"#,
        ),
        (
            1,
            21,
            1,
            1,
            &[],
            "",
            r#"{"id":"pay1","customer_id":"c1","amount":"50.00","currency":"USD"}"#,
        ),
        (
            1,
            22,
            1,
            1,
            &[],
            "",
            r#"{"id":"r1","customer_id":"c1","refunds":"i1","amount":"20.00","currency":"USD"}"#,
        ),
        (
            1,
            23,
            1,
            1,
            &[],
            "",
            r#"{"events":[{"type":"click","referral_code":"P-alice","visitor":"v2"},{"type":"expense","id":"i2","customer_id":"c1","amount":"5.00","currency":"USD"}]}"#,
        ),
        (1, 24, 0, 1, &["2026-07"], "", "{}"),
        (1, 25, 1, 1, &["c1"], "", r#"{"reason":"gone"}"#),
        (1, 26, 1, 1, &["c1"], "", r#"{"group":"vip"}"#),
        (
            1,
            27,
            0,
            1,
            &["c1"],
            "",
            r#"{"to":"bob","from":"2026-08-01T00:00:00Z","retroactive":true,"reason":"ticket 1"}"#,
        ),
        (
            1,
            28,
            0,
            1,
            &[],
            "",
            r#"{"overrides":{"attribution":[{"customer_id":"c1","affiliate_id":"bob"}],"exclude":[5]},"months":{"from":"2026-07","to":"2026-08"}}"#,
        ),
        (
            0,
            29,
            0,
            8,
            &["01890000-0000-7000-8000-000000000000"],
            "",
            "",
        ),
        (
            1,
            30,
            0,
            1,
            &["01890000-0000-7000-8000-000000000000"],
            "",
            r#"{"reason":"ticket 2"}"#,
        ),
        (0, 31, 0, 0, &[], "", ""),
        (0, 4, 0, 0, &[], "", ""),
    ];
    for (i, (method, route, caller, flags, segments, query, body)) in seeds.iter().enumerate() {
        let mut seed = vec![*method, *route, *caller, *flags];
        for segment in *segments {
            seed.extend_from_slice(segment.as_bytes());
            seed.push(0xFF);
        }
        seed.extend_from_slice(query.as_bytes());
        seed.push(0xFF);
        seed.extend_from_slice(body.as_bytes());
        std::fs::write(corpus.join(format!("route-{i:02}")), seed)
            .unwrap_or_else(|e| fail(&e.to_string()));
    }
    println!("{} seeds in {}", seeds.len(), corpus.display());
}

/// The greedy choice of `seed --keep`: indices into `edges`, each adding
/// the most edges not covered yet (ties: the smaller input), until `most`
/// are chosen or none adds anything.
fn keep(edges: &[(u64, std::collections::HashSet<u64>)], most: usize) -> Vec<usize> {
    let mut covered = std::collections::HashSet::new();
    let mut taken = vec![false; edges.len()];
    let mut chosen = Vec::new();
    while chosen.len() < most {
        let best = (0..edges.len())
            .filter(|&i| !taken[i])
            .map(|i| {
                (
                    edges[i].1.difference(&covered).count(),
                    std::cmp::Reverse(edges[i].0),
                    i,
                )
            })
            .max();
        let Some((added, _, i)) = best else { break };
        if added == 0 {
            break;
        }
        covered.extend(edges[i].1.iter().copied());
        taken[i] = true;
        chosen.push(i);
    }
    chosen
}

fn keep_inputs(control: &Path, most: usize, dir: &Path) {
    let text = std::fs::read_to_string(control).unwrap_or_else(|e| fail(&e.to_string()));
    let mut lines = text.lines();
    let count: usize = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| fail("not a merge control file"));
    let _first_corpus = lines.next();
    let files: Vec<PathBuf> = lines.by_ref().take(count).map(PathBuf::from).collect();
    let mut edges: Vec<(u64, std::collections::HashSet<u64>)> = Vec::new();
    let mut index = Vec::new();
    for line in lines {
        let mut words = line.split_whitespace();
        if words.next() != Some("COV") {
            continue;
        }
        let Some(i) = words.next().and_then(|w| w.parse::<usize>().ok()) else {
            continue;
        };
        let Some(file) = files.get(i) else { continue };
        let Ok(meta) = std::fs::metadata(file) else {
            continue;
        };
        edges.push((meta.len(), words.filter_map(|w| w.parse().ok()).collect()));
        index.push(i);
    }
    let all: std::collections::HashSet<u64> =
        edges.iter().flat_map(|(_, e)| e.iter().copied()).collect();
    let chosen = keep(&edges, most);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| fail(&e.to_string()));
    let mut covered = std::collections::HashSet::new();
    let mut bytes = 0;
    for &c in &chosen {
        let file = &files[index[c]];
        let name = file
            .file_name()
            .unwrap_or_else(|| fail("an input without a name"));
        std::fs::copy(file, dir.join(name)).unwrap_or_else(|e| fail(&e.to_string()));
        covered.extend(edges[c].1.iter().copied());
        bytes += edges[c].0;
    }
    println!(
        "{} inputs ({bytes} bytes) in {}: {} of the {} edges the corpus covers",
        chosen.len(),
        dir.display(),
        covered.len(),
        all.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--keep") {
        let (Some(control), Some(most), Some(dir)) = (
            args.get(1).map(PathBuf::from),
            args.get(2).and_then(|m| m.parse().ok()),
            args.get(3).map(PathBuf::from),
        ) else {
            fail("usage: seed --keep CONTROL_FILE MOST DIR")
        };
        return keep_inputs(&control, most, &dir);
    }
    if args.first().map(String::as_str) == Some("--api") {
        let Some(corpus) = args.get(1).map(PathBuf::from) else {
            fail("usage: seed --api CORPUS_DIR")
        };
        std::fs::create_dir_all(&corpus).unwrap_or_else(|e| fail(&e.to_string()));
        return api_seeds(&corpus);
    }
    let Some(corpus) = args.first().map(PathBuf::from) else {
        fail("usage: seed CORPUS_DIR [DATA_DIR ...]")
    };
    std::fs::create_dir_all(&corpus).unwrap_or_else(|e| fail(&e.to_string()));
    let demo = std::env::temp_dir().join(format!("fuzz-seed-demo-{}", std::process::id()));
    {
        let ledger =
            Ledger::open(LedgerConfig::new(&demo)).unwrap_or_else(|e| fail(&e.to_string()));
        commission_ledger::demo::load(&ledger).unwrap_or_else(|e| fail(&e.to_string()));
    }
    let mut dirs = vec![demo.clone()];
    dirs.extend(args[1..].iter().map(PathBuf::from));
    let mut written = 0;
    for (d, dir) in dirs.iter().enumerate() {
        let all = payloads(dir, PREFIXES[PREFIXES.len() - 1]);
        for n in PREFIXES {
            let mut seed = Vec::new();
            for payload in all.iter().take(n) {
                let Ok(len) = u16::try_from(payload.len()) else {
                    continue;
                };
                seed.extend_from_slice(&len.to_le_bytes());
                seed.extend_from_slice(payload);
            }
            std::fs::write(corpus.join(format!("log{d}-{n}")), seed)
                .unwrap_or_else(|e| fail(&e.to_string()));
            written += 1;
            if n >= all.len() {
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&demo);
    println!("{written} seeds in {}", corpus.display());
}
