//! What the fuzz targets run, one module each. The targets in
//! `fuzz_targets/` call them on what libFuzzer makes; the ledger's own
//! test suite (`tests/it/fuzz.rs`, which includes these files by path)
//! calls them on the inputs kept in `tools/fuzz/regressions/`, so that
//! every check runs in CI. A module reaches what they share as
//! `super::input`, which resolves in both crates.

pub mod api_requests;
pub mod decide_commands;
pub mod fold_events;
pub mod import_open;
pub mod input;
pub mod parse_texts;
