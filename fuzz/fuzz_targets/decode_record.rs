//! `cargo fuzz run decode_record`: see [`vigil_fuzz::decode_record`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::decode_record(data));
