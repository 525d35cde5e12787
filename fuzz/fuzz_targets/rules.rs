//! `cargo fuzz run rules`: see [`vigil_fuzz::rules`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::rules(data));
