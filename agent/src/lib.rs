//! vigil agent: loads the eBPF sensor, keeps a live process tree of the
//! machine, and reports every event enriched with its process, ancestry and
//! workload.
//!
//! The event path, one direction only (see ARCHITECTURE.md):
//! kernel ([`sensor`]) -> ring buffer -> [`decode`] -> [`tree`] ->
//! [`pipeline`] (enrich) -> [`outputs`] (JSON lines) ; [`metrics`] observes.
#![deny(missing_docs)]

pub mod btf;
pub mod budget;
pub mod capture;
pub mod config;
pub mod contain;
pub mod container_meta;
pub mod decode;
pub mod detect;
pub mod dirs;
pub mod frozen;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod outputs;
pub mod pipeline;
pub mod privilege;
pub mod procscan;
pub mod reaction;
pub mod respond;
pub mod runner;
pub mod sensor;
pub mod ship;
pub mod state;
pub mod tree;
pub mod workload_cache;
