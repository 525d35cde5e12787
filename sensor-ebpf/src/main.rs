//! vigil's kernel sensor: collect, filter, hand over.
//!
//! One function per hook, nothing clever. Every record is built in a per-CPU
//! scratch area and copied to one ring buffer with its real length. Kernel
//! struct offsets come from the agent (read from BTF) through the read-only
//! `OFFSETS` global; the programs emit nothing until it is filled.
//!
//! Hooks (all exist on every BTF kernel >= 5.8):
//! - raw tracepoints `sched_process_exec`, `sched_process_fork`, `sched_process_exit`;
//! - syscall tracepoints: `sys_enter_*` stash the arguments of the calls we
//!   care about (already filtered: write-ish open flags, exec/setuid modes,
//!   IPv4/IPv6 connects), one shared `sys_exit` program reads the result and
//!   emits.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![allow(clippy::missing_safety_doc)]

// On the host (cargo check/clippy/test of the workspace) this crate is an
// empty program; the real one is built for the bpf target by agent/build.rs.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs;
