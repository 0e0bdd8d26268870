//! Crash: a child process appends under load and is killed with SIGKILL at
//! random points; after each restart every acknowledged event is there
//! exactly once, at the seq it was acknowledged with, and `verify` passes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use commission_ledger::ledger::{Ledger, LedgerConfig, verify_log};

#[test]
fn every_acknowledged_event_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged: HashMap<u64, uuid::Uuid> = HashMap::new();
    let mut restarts_from_checkpoint = 0;
    let mut previous_head = 0;
    // Kill points spread over the run: a small deterministic sequence.
    let kill_after_ms = [150u64, 420, 90, 300, 610, 230];
    for (round, wait) in kill_after_ms.iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ledger-load"))
            // Checkpoints every few hundred events: restarts load one taken mid-run.
            .args(["crash", dir.path().to_str().unwrap(), "16", "20", "300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (started, appending) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split(' ');
                if parts.next() == Some("ack") {
                    let seq: u64 = parts.next().unwrap().parse().unwrap();
                    let id: uuid::Uuid = parts.next().unwrap().parse().unwrap();
                    if acks.is_empty() {
                        let _ = started.send(());
                    }
                    acks.push((seq, id));
                }
            }
            acks
        });
        // Wait until the child is appending, then a while longer, then kill it mid-stream.
        let first = appending.recv_timeout(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(*wait));
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        let acks = reader.join().unwrap();
        assert!(
            first.is_ok() && !acks.is_empty(),
            "round {round}: the child acknowledged nothing"
        );
        for (seq, id) in acks {
            assert_eq!(
                *acknowledged.entry(seq).or_insert(id),
                id,
                "seq {seq} acknowledged twice with different events"
            );
        }

        // Restart: recovery, then every acknowledged event is there at its seq, once.
        let ledger = Ledger::open(LedgerConfig::new(dir.path())).unwrap();
        let head = ledger.state().head.seq;
        let (_, checkpointed) = ledger.store_status();
        // A checkpoint the killed child took, not the last clean shutdown's.
        if checkpointed > previous_head && checkpointed < head {
            restarts_from_checkpoint += 1;
        }
        let events = ledger.events_range(1, head).unwrap();
        let mut seen = HashMap::new();
        for (i, r) in events.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1, "gapless seqs");
            assert!(
                seen.insert(r.id, r.seq).is_none(),
                "event {} appears twice",
                r.id
            );
        }
        for (seq, id) in &acknowledged {
            assert_eq!(
                seen.get(id),
                Some(seq),
                "round {round}: acknowledged event {id} at seq {seq} is missing"
            );
        }
        let report = ledger.verify().unwrap();
        assert!(report.ok, "round {round}: {:?}", report.problem);
        drop(ledger);
        previous_head = head;
        assert!(verify_log(&dir.path().join("log"), None).ok);
    }
    assert!(
        restarts_from_checkpoint > 0,
        "no restart started from a checkpoint taken before the kill"
    );
    assert!(
        acknowledged.len() > 100,
        "the rounds acknowledged only {} events",
        acknowledged.len()
    );
}
