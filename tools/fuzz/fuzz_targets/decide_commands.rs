//! The fuzz target of [`commission_ledger_fuzz::decide_commands`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| commission_ledger_fuzz::decide_commands::run(data));
