//! The state stage: the process tree and workload identity, kept current by
//! every event, and each event enriched with them (the process as the tree
//! knows it, its ancestry, the wall-clock time).
//!
//! Invariant: an event is enriched with the state *after* it applied (an
//! exec shows its new image), except an exit, which leaves the tree only
//! once the later stages handled it ([`State::leave`]).

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::Metrics;
use crate::model::event::{Event, Payload};
use crate::model::{EnrichedEvent, ProcessView};
use crate::tree::ProcessTree;
use crate::workload_cache::WorkloadCache;

/// The tree, the workload cache and the wall clock's offset.
pub struct State {
    tree: ProcessTree,
    identities: crate::identity::Identities,
    workloads: WorkloadCache,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, ns.
    wall_offset_ns: i128,
    /// Processes (pid, start) whose command line was compared with their
    /// exec's at their first connect or listen (bounded; a process pushed
    /// out is compared again at its next one).
    argv_checked: lru::LruCache<(u32, u64), ()>,
    /// Files (process, start, dev, inode) an io_uring open was reported
    /// for: reported once, as the kernel does for the other opens.
    uring_seen: lru::LruCache<(u32, u64, u32, u64), ()>,
}

/// Processes [`State`] remembers having compared command lines of.
const ARGV_CHECKED: usize = 8192;
/// (process, file) pairs of io_uring opens remembered.
const URING_SEEN: usize = 4096;

/// Why [`State::enter`] kept an event out of the later stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// An io_uring open of a file this process was already reported
    /// opening (the kernel's per-(process, file) rule for the others).
    Repeat,
    /// An io_uring open of something that is not a regular file (a device,
    /// a FIFO): not a file write, as the kernel decides for the others.
    NotAFile,
}

impl State {
    /// State over `tree` (bootstrapped from /proc) and `workloads`.
    pub fn new(tree: ProcessTree, workloads: WorkloadCache) -> Self {
        Self {
            tree,
            identities: crate::identity::Identities::scan(),
            workloads,
            wall_offset_ns: crate::model::wall_offset_ns(),
            argv_checked: lru::LruCache::new(
                std::num::NonZeroUsize::new(ARGV_CHECKED).expect("non-zero"),
            ),
            uring_seen: lru::LruCache::new(
                std::num::NonZeroUsize::new(URING_SEEN).expect("non-zero"),
            ),
        }
    }

    /// The tree (read-only).
    pub fn tree(&self) -> &ProcessTree {
        &self.tree
    }

    /// Applies `ev` to the tree (an exit waits for [`State::leave`]) and
    /// returns it enriched, or why it goes no further.
    pub fn enter(&mut self, mut ev: Event) -> Result<EnrichedEvent, Skip> {
        if let Payload::Exec(x) = &mut ev.payload {
            // A script run by a relative path: made absolute while the
            // process's cwd can still be read.
            if let Some(s) = x.script.as_mut().filter(|s| !s.starts_with('/')) {
                if let Ok(cwd) = std::fs::read_link(format!("/proc/{}/cwd", ev.pid)) {
                    *s = crate::model::normalize_path(&cwd.join(&*s).to_string_lossy());
                }
            }
            // Padding a command line or an environment past what the kernel
            // copies must not hide its end: read the rest while the process
            // lives (rare: long command lines, huge environments).
            let image = crate::procscan::ImageKey {
                start_boot_ns: ev.start_boot_ns,
                arg_start: x.arg_start,
                exe_ino: x.exe_ino,
            };
            if x.argv_truncated {
                if let Some(argv) = crate::procscan::cmdline_of(ev.pid, image) {
                    x.argv_truncated = argv.len() >= crate::procscan::ARGV_MAX_ARGS
                        || argv.last().is_some_and(|a| a.ends_with("..."));
                    x.argv = argv;
                }
            }
            x.copy_of = self
                .identities
                .copy_of(ev.pid, &x.exe, x.exe_dev, x.exe_ino, x.exe_size)
                .map(|p| p.to_string());
            if x.env_truncated && x.ld_preload.is_none() {
                if let Some(v) = crate::procscan::env_var_of(ev.pid, image, "LD_PRELOAD") {
                    x.ld_preload = v;
                    x.env_truncated = false;
                }
            }
        }
        if let Payload::FileOpen(f) = &mut ev.payload {
            if f.io_uring {
                let wall_ns = ev.boot_ns as i128 + self.wall_offset_ns;
                match uring_target(ev.pid, &f.path, f.flags, wall_ns) {
                    Target::Changed { mode, ino, dev } => {
                        const O_TRUNC: u32 = 0o1000;
                        let key = (ev.pid, ev.start_boot_ns, dev, ino);
                        if self.uring_seen.put(key, ()).is_some() && f.flags & O_TRUNC == 0 {
                            return Err(Skip::Repeat);
                        }
                        (f.mode, f.ino, f.dev) = (mode, ino, dev);
                    }
                    Target::NotAFile => return Err(Skip::NotAFile),
                    Target::Unconfirmed => {}
                }
            }
        }
        if let Payload::Comm(c) = &mut ev.payload {
            // What the renamed process now shows as its command line.
            let any = crate::procscan::ImageKey::process(ev.start_boot_ns);
            c.argv = crate::procscan::cmdline_of(ev.pid, any).unwrap_or_default();
        }
        // A process about to talk to the network shows the command line it
        // was started with, or one it wrote over its arguments since
        // (`[kworker/0:1]`, `sshd: root@pts/0`): read once per process.
        let rewritten = match &mut ev.payload {
            Payload::Connect(c) => Some(&mut c.rewritten_argv),
            Payload::Listen(l) => Some(&mut l.rewritten_argv),
            _ => None,
        };
        if let Some(slot) = rewritten {
            let key = (ev.pid, ev.start_boot_ns);
            if self.argv_checked.put(key, ()).is_none() {
                if let Some(p) = self.tree.get(ev.pid) {
                    let started = &p.image.argv;
                    // Still the program the tree knows (it did not exec
                    // again before this event was handled): same file name.
                    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
                    let same_program = std::fs::read_link(format!("/proc/{}/exe", ev.pid))
                        .is_ok_and(|l| {
                            let l = l.to_string_lossy();
                            base(l.trim_end_matches(" (deleted)")) == base(&p.image.exe)
                        });
                    if !started.is_empty() && same_program {
                        let any = crate::procscan::ImageKey::process(ev.start_boot_ns);
                        *slot = crate::procscan::cmdline_of(ev.pid, any)
                            .filter(|now| !now.is_empty() && now != started);
                    }
                }
            }
        }
        if let Payload::ProcessAccess(a) = &mut ev.payload {
            // The target as the tree knows it (the caller named it in its
            // own pid namespace).
            a.target_pid = crate::procscan::host_pid_of(ev.pid, a.target);
        }
        if !matches!(ev.payload, Payload::Exit { .. }) {
            let workloads = &mut self.workloads;
            self.tree
                .apply(&ev, &mut |pid, cg| workloads.resolve(pid, cg));
        }
        Ok(self.enrich(ev))
    }

    /// After the later stages: an exit leaves the tree.
    pub fn leave(&mut self, enriched: &EnrichedEvent) {
        if matches!(enriched.event.payload, Payload::Exit { .. }) {
            let workloads = &mut self.workloads;
            self.tree
                .apply(&enriched.event, &mut |pid, cg| workloads.resolve(pid, cg));
        }
    }

    fn enrich(&mut self, ev: Event) -> EnrichedEvent {
        let process = match self.tree.get(ev.pid) {
            Some(p) => ProcessView {
                pid: p.pid,
                ppid: p.ppid,
                image: p.image.clone(),
                comm: ev.comm.clone(),
                uid: p.uid,
                euid: p.euid,
                workload: p.workload.clone(),
            },
            None => ProcessView {
                pid: ev.pid,
                ppid: 0,
                image: Default::default(),
                comm: ev.comm.clone(),
                uid: ev.uid,
                euid: ev.uid,
                workload: self.workloads.resolve(ev.pid, ev.cgroup_id),
            },
        };
        let ancestry = self.tree.ancestry(ev.pid);
        let wall_ns = (ev.boot_ns as i128 + self.wall_offset_ns).clamp(0, i64::MAX as i128) as i64;
        EnrichedEvent {
            time_unix_nanos: wall_ns,
            event: Arc::new(ev),
            process,
            ancestry,
        }
    }

    /// Periodic housekeeping: reaps exited processes, publishes the tree's
    /// metrics.
    pub fn tick(&mut self, now: Instant, m: &Metrics) {
        self.tree.reap(now);
        let st = self.tree.stats();
        m.tree_size.set(self.tree.len() as i64);
        m.tree_reaped
            .inc_by(st.reaped.saturating_sub(m.tree_reaped.get()));
        m.tree_rejected
            .inc_by(st.rejected.saturating_sub(m.tree_rejected.get()));
        m.tree_unknown_pid
            .inc_by(st.unknown_pid.saturating_sub(m.tree_unknown_pid.get()));
    }
}

/// What an io_uring open, seen before it ran, opened.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// A regular file created or changed at or after the open.
    Changed {
        /// `st_mode`.
        mode: u32,
        /// Inode number.
        ino: u64,
        /// Device, kernel encoding.
        dev: u32,
    },
    /// Something that is not a regular file.
    NotAFile,
    /// Nothing found, or a file the open did not visibly change (it may
    /// have failed, or its writes are still to come): an attempt.
    Unconfirmed,
}

/// How much earlier than the event a file's change time may read and still
/// count as the open's: file times come from a coarse clock.
const CHANGE_SLACK_NS: i128 = 1_000_000_000;

/// The file an io_uring open named: `path` (absolute, in the process's
/// mount namespace) resolved inside the process's root, as the process
/// would (its absolute symlinks stay in its root; `O_NOFOLLOW` kept), then
/// judged by its change time against the open's (`wall_ns`).
fn uring_target(pid: u32, path: &str, open_flags: u32, wall_ns: i128) -> Target {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    if !path.starts_with('/') {
        return Target::Unconfirmed;
    }
    let Ok(root) = std::fs::File::open(format!("/proc/{pid}/root")) else {
        return Target::Unconfirmed;
    };
    let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    if open_flags & libc::O_NOFOLLOW as u32 != 0 {
        flags |= OFlag::O_NOFOLLOW;
    }
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let Ok(fd) = openat2(root.as_raw_fd(), path, how) else {
        return Target::Unconfirmed;
    };
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
        return Target::Unconfirmed;
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Target::NotAFile;
    }
    let changed = st.st_ctime as i128 * 1_000_000_000 + st.st_ctime_nsec as i128;
    if changed + CHANGE_SLACK_NS < wall_ns {
        return Target::Unconfirmed;
    }
    Target::Changed {
        mode: st.st_mode,
        ino: st.st_ino,
        dev: crate::identity::kernel_dev(st.st_dev),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_ns() -> i128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128
    }

    #[test]
    fn an_io_uring_open_is_judged_by_what_is_at_its_path() {
        use std::os::unix::fs::MetadataExt as _;
        let me = std::process::id();
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        let before = now_ns();
        std::fs::write(&new, b"x").unwrap();
        let ino = std::fs::metadata(&new).unwrap().ino();
        let p = |f: &std::path::Path| f.to_str().unwrap().to_string();
        // Created at the open: its inode.
        match uring_target(me, &p(&new), 0o101, before) {
            Target::Changed { ino: i, .. } => assert_eq!(i, ino),
            t => panic!("{t:?}"),
        }
        // Not changed since long before the open: an attempt only (the
        // open may have failed).
        assert_eq!(
            uring_target(me, &p(&new), 0o1, before + 60_000_000_000),
            Target::Unconfirmed
        );
        // A device is not a file write; nothing there is an attempt.
        assert_eq!(uring_target(me, "/dev/null", 0o1, before), Target::NotAFile);
        assert_eq!(
            uring_target(me, &p(&dir.path().join("absent")), 0o101, before),
            Target::Unconfirmed
        );
        // A relative path (its base was not found) names nothing.
        assert_eq!(uring_target(me, "new", 0o1, before), Target::Unconfirmed);
        // O_NOFOLLOW on a symlink opens no file (the open fails).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        assert_eq!(
            uring_target(me, &p(&link), 0o1 | libc::O_NOFOLLOW as u32, before),
            Target::NotAFile
        );
        assert!(matches!(
            uring_target(me, &p(&link), 0o1, before),
            Target::Changed { .. }
        ));
    }
}
