//! `cargo fuzz run ingest`: see [`vigil_fuzz::ingest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::ingest(data));
