//! `cargo fuzz run bundle_reader`: see [`vigil_fuzz::bundle_reader`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::bundle_reader(data));
