//! `cargo fuzz run agent_json`: see [`vigil_fuzz::agent_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::agent_json(data));
