//! Bootstrap: the processes that were running before the agent started,
//! read from /proc, so they have parents and ancestry too.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::debug;

use crate::model::workload::Workload;
use crate::tree::{Process, ProcessTree};
use crate::workload_cache::WorkloadCache;

/// Reads every process in /proc into `tree`. Returns how many were added.
/// Processes that vanish mid-scan are skipped.
pub fn bootstrap(tree: &mut ProcessTree, workloads: &mut WorkloadCache) -> anyhow::Result<usize> {
    let tps = procfs::ticks_per_second();
    let listening = listening_pids();
    let mut n = 0;
    for p in procfs::process::all_processes()? {
        let Ok(p) = p else { continue };
        let Ok(stat) = p.stat() else { continue };
        let pid = stat.pid as u32;
        let exe = p
            .exe()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let argv = bounded_argv(p.cmdline().unwrap_or_default());
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
            image: crate::model::Image::new(exe, argv),
            comm: stat.comm.clone(),
            uid,
            euid,
            cgroup_id: 0,
            workload: Arc::clone(&workload),
            exited: None,
            serves: listening.contains(&pid),
            children: 0,
        });
        n += 1;
    }
    debug!(processes = n, "bootstrapped process tree from /proc");
    Ok(n)
}

/// Processes holding a listening TCP socket (IPv4 or IPv6), found by matching
/// the socket inodes of /proc/net/tcp{,6} in state LISTEN with every
/// process's fds.
pub fn listening_pids() -> HashSet<u32> {
    use procfs::net::TcpState;
    let mut inodes = HashSet::new();
    for table in [procfs::net::tcp(), procfs::net::tcp6()] {
        for e in table.into_iter().flatten() {
            if e.state == TcpState::Listen {
                inodes.insert(e.inode);
            }
        }
    }
    let mut pids = HashSet::new();
    if inodes.is_empty() {
        return pids;
    }
    let Ok(all) = procfs::process::all_processes() else {
        return pids;
    };
    for p in all.flatten() {
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let procfs::process::FDTarget::Socket(ino) = fd.target {
                if inodes.contains(&ino) {
                    pids.insert(p.pid as u32);
                    break;
                }
            }
        }
    }
    pids
}

/// Most bytes of a command line read from /proc (the kernel's exec record
/// holds 1 KiB): a JVM's class path can be hundreds of KiB, and every
/// event and detection of its descendants names it in their ancestry.
pub const ARGV_MAX_BYTES: usize = 32 << 10;
/// Most arguments read from /proc.
pub const ARGV_MAX_ARGS: usize = 1024;

/// `argv` cut to [`ARGV_MAX_ARGS`] arguments and [`ARGV_MAX_BYTES`] bytes
/// (an argument cut short ends with "...").
fn bounded_argv(mut argv: Vec<String>) -> Vec<String> {
    argv.truncate(ARGV_MAX_ARGS);
    let mut left = ARGV_MAX_BYTES;
    let mut out = Vec::with_capacity(argv.len());
    for mut a in argv {
        if left == 0 {
            break;
        }
        if a.len() > left {
            let mut cut = left;
            while !a.is_char_boundary(cut) {
                cut -= 1;
            }
            a.truncate(cut);
            a.push_str("...");
            left = 0;
        } else {
            left -= a.len();
        }
        out.push(a);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_from_proc_are_bounded() {
        let short = vec!["java".to_string(), "-jar".into(), "app.jar".into()];
        assert_eq!(bounded_argv(short.clone()), short);
        let long = vec!["java".to_string(), "-cp".into(), "é".repeat(40_000)];
        let b = bounded_argv(long);
        assert_eq!(b.len(), 3);
        assert!(b[2].ends_with("..."));
        assert!(b.iter().map(String::len).sum::<usize>() <= ARGV_MAX_BYTES + 3);
        let many = vec!["x".to_string(); 5000];
        assert_eq!(bounded_argv(many).len(), ARGV_MAX_ARGS);
    }
}
