//! The fuzz target of [`commission_ledger_fuzz::fold_events`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| commission_ledger_fuzz::fold_events::run(data));
