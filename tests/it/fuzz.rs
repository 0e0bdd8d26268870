//! The fuzz targets' checks, run over the inputs kept in
//! `tools/fuzz/regressions/TARGET/`: the fewest inputs of each target's
//! corpus that cover the most of its code (`seed --keep`), and, named
//! `bug-…`, inputs that found a bug (coverage alone does not keep those:
//! with the closed-month rewrite of session 25 put back, 14 of the 3,595
//! inputs of a merged corpus fail, and none of the 300 kept for coverage
//! does; the 3 kept by name do, as the hex sign of session 24 fails its
//! input written by hand). The targets' code is
//! included from `tools/fuzz/src/` as it is, so CI runs the same checks the
//! fuzzer does (no panic; the money checks after every command of
//! `decide_commands`; no 500, problem+json and nothing appended on a 4xx
//! of `api_requests`; what `import` appends opens and verifies), without
//! the fuzzer, a nightly compiler or a sanitizer.

#[path = "../../tools/fuzz/src/api_requests.rs"]
mod api_requests;
#[path = "../../tools/fuzz/src/decide_commands.rs"]
mod decide_commands;
#[path = "../../tools/fuzz/src/fold_events.rs"]
mod fold_events;
#[path = "../../tools/fuzz/src/import_open.rs"]
mod import_open;
#[path = "../../tools/fuzz/src/input.rs"]
mod input;
#[path = "../../tools/fuzz/src/parse_texts.rs"]
mod parse_texts;

use std::path::PathBuf;

/// The kept inputs of `target`, by name: a fixed order, as `api_requests`
/// runs them all against one server.
fn kept(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tools/fuzz/regressions")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "{target}: only {} inputs", inputs.len());
    inputs
}

/// Runs `check` on every kept input of `target`; a failure names the input.
fn run_all(target: &str, mut check: impl FnMut(&[u8])) {
    for (name, data) in kept(target) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        if let Err(cause) = outcome {
            let message = cause
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| cause.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("tools/fuzz/regressions/{target}/{name}: {message}");
        }
    }
}

#[test]
fn decide_commands_kept_inputs() {
    run_all("decide_commands", decide_commands::run);
}

#[test]
fn fold_events_kept_inputs() {
    run_all("fold_events", fold_events::run);
}

#[test]
fn parse_texts_kept_inputs() {
    run_all("parse_texts", parse_texts::run);
}

#[test]
fn api_requests_kept_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let server = api_requests::Server::start(dir.path());
    run_all("api_requests", |data| api_requests::run(&server, data));
}

#[test]
fn import_open_kept_inputs() {
    let scratch = tempfile::tempdir().unwrap();
    run_all("import_open", |data| import_open::run(scratch.path(), data));
}
