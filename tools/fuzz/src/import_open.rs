//! An export of any events (decoded from the fuzzer's bytes, as in
//! `fold_events`), with its hash chain made right, imported into a fresh
//! data directory (under `scratch`: tmpfs when fuzzing), then opened as a server opens it (the sled
//! indexes built, a checkpoint made), read, verified and opened again from
//! the checkpoint. `import` may refuse a line; what it appends must open,
//! verify and answer without a panic. Slow (a ledger per input): tens of
//! inputs a second.

use std::sync::atomic::{AtomicU64, Ordering};

use commission_ledger::events::{Recorded, Timestamp, encode};
use commission_ledger::ledger::{AsOf, ExportLine, Ledger, LedgerConfig, import_ndjson};
use commission_ledger::log::{Hash, chain_hash};

pub fn run(scratch: &std::path::Path, data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let events = super::input::records(data, 400);
    let mut previous: Hash = [0; 32];
    let mut export = String::new();
    for r in &events {
        let Ok(payload) = encode(r) else { return };
        previous = chain_hash(&previous, r.seq, &payload);
        let Ok(line) = serde_json::to_string(&ExportLine::new(r, &previous)) else {
            return;
        };
        export.push_str(&line);
        export.push('\n');
    }
    let dir = scratch.join(format!(
        "fuzz-import-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let imported = import_ndjson(&dir, &mut export.as_bytes());
    if imported.is_ok() {
        for round in 0..2 {
            let mut config = LedgerConfig::new(&dir);
            let now = last_or_now(&events);
            config.clock = std::sync::Arc::new(move || now);
            config.preallocate_bytes = 64 << 10;
            let ledger = Ledger::open(config).expect("an imported log opens");
            let report = ledger.verify().expect("verify runs");
            assert!(report.ok, "round {round}: {report:?}");
            let state = ledger.state();
            let programs: Vec<_> = state
                .model
                .programs
                .iter()
                .map(|(id, pm)| {
                    (
                        id.clone(),
                        pm.affiliates.keys().cloned().collect::<Vec<_>>(),
                    )
                })
                .collect();
            drop(state);
            let middle = AsOf::Seq(events.len() as u64 / 2);
            for (program, affiliates) in &programs {
                for affiliate in affiliates.iter().take(4) {
                    let _ = ledger.balance(program, affiliate, None);
                    let _ = ledger.balance(program, affiliate, Some(middle));
                }
            }
            let _ = ledger.events_range(1, events.len() as u64);
            // Dropped, the ledger saves a checkpoint: the second round
            // starts from it.
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn last_or_now(events: &[Recorded]) -> Timestamp {
    events.last().map_or(Timestamp::MIN, |r| r.recorded_at)
}
