//! Writes a seed corpus for `fold_events`: prefixes of real logs, in the
//! target's `[u16 LE length][postcard bytes]` form. The logs are the demo's
//! (made in a fresh directory) and those of the data directories given.
//!
//! `cargo run --release --bin seed -- CORPUS_DIR [DATA_DIR ...]`

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
