//! The fuzz target of [`commission_ledger_fuzz::import_open`], its data
//! directories on tmpfs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    commission_ledger_fuzz::import_open::run(std::path::Path::new("/dev/shm"), data)
});
