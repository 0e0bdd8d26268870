//! The fuzz target of [`commission_ledger_fuzz::parse_texts`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| commission_ledger_fuzz::parse_texts::run(data));
