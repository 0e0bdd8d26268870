//! The fuzz target of [`commission_ledger_fuzz::api_requests`], over one
//! ledger on tmpfs that lives as long as the fuzzer.
#![no_main]

use std::sync::OnceLock;

use commission_ledger_fuzz::api_requests::{Server, run};

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::path::PathBuf::from(format!("/dev/shm/fuzz-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Server::start(&dir)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| run(server(), data));
