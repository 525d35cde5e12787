//! Bootstrap: the processes that were running before the agent started,
//! read from /proc, so they have parents and ancestry too.

use std::sync::Arc;

use tracing::debug;

use crate::tree::{Process, ProcessTree};
use crate::workload::Workload;
use crate::workload_cache::WorkloadCache;

/// Reads every process in /proc into `tree`. Returns how many were added.
/// Processes that vanish mid-scan are skipped.
pub fn bootstrap(tree: &mut ProcessTree, workloads: &mut WorkloadCache) -> anyhow::Result<usize> {
    let tps = procfs::ticks_per_second();
    let mut n = 0;
    for p in procfs::process::all_processes()? {
        let Ok(p) = p else { continue };
        let Ok(stat) = p.stat() else { continue };
        let pid = stat.pid as u32;
        let exe = p
            .exe()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let argv = p.cmdline().unwrap_or_default();
        let (uid, euid) = p
            .status()
            .map(|s| (s.ruid, s.euid))
            .unwrap_or((u32::MAX, u32::MAX));
        let workload = Workload::read_for_pid(pid)
            .map(|w| workloads.intern(w))
            .unwrap_or_else(|_| tree.host_workload());
        tree.insert(Process {
            pid,
            ppid: stat.ppid as u32,
            start_boot_ns: stat.starttime * (1_000_000_000 / tps.max(1)),
            exe,
            argv,
            comm: stat.comm.clone(),
            uid,
            euid,
            cgroup_id: 0,
            workload: Arc::clone(&workload),
            exited: None,
        });
        n += 1;
    }
    debug!(processes = n, "bootstrapped process tree from /proc");
    Ok(n)
}
