//! The live process tree: every process's parent, image and workload,
//! bootstrapped from /proc and kept current by exec/fork/exit events.
//!
//! Invariants:
//! - bounded: at most `max_processes` entries; exited processes are kept for
//!   a grace period (late events still find their ancestry), then reaped;
//!   when full, the oldest exited entries go first, and a live process that
//!   still does not fit is counted in [`TreeStats::rejected`];
//! - a process is `(pid, start_boot_ns)`: a recycled pid replaces the old entry;
//! - ancestry walks stop at pid 0/1, at an unknown parent, at a cycle, or after
//!   [`MAX_ANCESTRY`] steps.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::event::{Event, Payload};
use crate::model::workload::Workload;
use crate::model::{Ancestor, Image};

/// Most ancestors reported for one process.
pub const MAX_ANCESTRY: usize = 64;

/// What the tree knows about one process.
#[derive(Clone, Debug)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Start time, ns since boot (0 if unknown).
    pub start_boot_ns: u64,
    /// Executable and arguments, shared with the events that name it.
    pub image: Arc<Image>,
    /// comm.
    pub comm: String,
    /// Real uid.
    pub uid: u32,
    /// Effective uid.
    pub euid: u32,
    /// cgroup v2 id (0 if unknown).
    pub cgroup_id: u64,
    /// Workload identity.
    pub workload: Arc<Workload>,
    /// When the exit was seen, if it was.
    pub exited: Option<Instant>,
    /// The process holds a listening IP socket (it serves): set by a listen
    /// event or the /proc bootstrap, inherited across fork, cleared by exec.
    pub serves: bool,
    /// Entries in the tree whose parent this is (maintained by the tree; an
    /// exited process with children is kept, so its descendants keep their
    /// ancestry).
    pub children: u32,
}

/// Counters the tree keeps about itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct TreeStats {
    /// Exited processes removed after their grace period or to make room.
    pub reaped: u64,
    /// Processes that could not be added because the tree was full of live ones.
    pub rejected: u64,
    /// Events about a pid the tree did not know (created from the event).
    pub unknown_pid: u64,
}

/// The tree. Single owner: the pipeline's consumer task.
pub struct ProcessTree {
    /// By pid. Hashed with foldhash (seeded per tree): every event looks
    /// up its process and each ancestor.
    procs: HashMap<u32, Process, foldhash::fast::RandomState>,
    /// Exited pids in exit order, with their start time (to skip recycled pids).
    exited: VecDeque<(Instant, u32, u64)>,
    /// Exited processes kept because they still have children in the tree,
    /// oldest first: evicted only under memory pressure.
    retained: VecDeque<(u32, u64)>,
    max_processes: usize,
    grace: Duration,
    stats: TreeStats,
    host: Arc<Workload>,
    /// The image of a process the tree learnt of without its exec.
    unknown: Arc<Image>,
}

impl ProcessTree {
    /// An empty tree with the given bounds.
    pub fn new(max_processes: usize, grace: Duration) -> Self {
        Self {
            procs: HashMap::default(),
            exited: VecDeque::new(),
            retained: VecDeque::new(),
            max_processes: max_processes.max(16),
            grace,
            stats: TreeStats::default(),
            host: Arc::new(Workload::from_cgroup_path("/")),
            unknown: Arc::default(),
        }
    }

    /// Number of processes held (live and in their exit grace period).
    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> TreeStats {
        self.stats
    }

    /// A process by pid.
    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.procs.get(&pid)
    }

    /// Inserts a process found by scanning /proc (bootstrap).
    pub fn insert(&mut self, p: Process) {
        self.upsert(p);
    }

    /// Whether `pid` is held from the /proc scan (no cgroup id) with a start
    /// time that names the same process: the scan's is rounded down to the
    /// clock tick, so it may be up to one tick earlier.
    fn scanned_same(&self, pid: u32, start_boot_ns: u64) -> bool {
        const TICK_SLACK_NS: u64 = 20_000_000;
        self.procs.get(&pid).is_some_and(|p| {
            p.cgroup_id == 0
                && start_boot_ns >= p.start_boot_ns
                && start_boot_ns - p.start_boot_ns < TICK_SLACK_NS
        })
    }

    /// Applies an exec/fork/exit event; other kinds only register an unknown
    /// pid. `workload_of` resolves the workload of a live pid (reads /proc);
    /// it is called only when the cgroup changed from the parent's.
    pub fn apply(&mut self, ev: &Event, workload_of: &mut dyn FnMut(u32, u64) -> Arc<Workload>) {
        match &ev.payload {
            // A fork is a process's first event, so a record of the same
            // process already here came from the /proc scan at start, read
            // after this fork: it is fresher (an exec may have followed
            // before the exec hook was attached) and the fork must not turn
            // it back into a copy of its parent.
            Payload::Fork { .. } if self.scanned_same(ev.pid, ev.start_boot_ns) => {}
            Payload::Fork { ppid } => {
                let parent = self.procs.get(ppid);
                let serves = parent.is_some_and(|p| p.serves);
                let (image, euid, workload) = match parent {
                    Some(p) if p.cgroup_id == ev.cgroup_id => {
                        (p.image.clone(), p.euid, p.workload.clone())
                    }
                    Some(p) => (p.image.clone(), p.euid, workload_of(ev.pid, ev.cgroup_id)),
                    None => (
                        self.unknown.clone(),
                        ev.uid,
                        workload_of(ev.pid, ev.cgroup_id),
                    ),
                };
                self.upsert(Process {
                    pid: ev.pid,
                    ppid: *ppid,
                    start_boot_ns: ev.start_boot_ns,
                    image,
                    comm: ev.comm.clone(),
                    uid: ev.uid,
                    euid,
                    cgroup_id: ev.cgroup_id,
                    workload,
                    exited: None,
                    serves,
                    children: 0,
                });
            }
            Payload::Exec(x) => {
                let workload = match self.procs.get(&ev.pid) {
                    Some(p)
                        if p.cgroup_id == ev.cgroup_id && p.start_boot_ns == ev.start_boot_ns =>
                    {
                        p.workload.clone()
                    }
                    _ => match self.procs.get(&x.ppid) {
                        Some(pp) if pp.cgroup_id == ev.cgroup_id => pp.workload.clone(),
                        _ => workload_of(ev.pid, ev.cgroup_id),
                    },
                };
                if !self.procs.contains_key(&ev.pid) {
                    self.stats.unknown_pid += 1;
                }
                // The creator's lineage, not the reaper's: a process whose
                // parent exited before it exec'd (a double fork, a subshell
                // that failed) has been handed to init or a subreaper by
                // now; while the tree still holds the parent that forked it,
                // it keeps that one.
                let ppid = match self.procs.get(&ev.pid) {
                    Some(p)
                        if p.start_boot_ns == ev.start_boot_ns
                            && p.ppid != x.ppid
                            && self.procs.contains_key(&p.ppid) =>
                    {
                        p.ppid
                    }
                    _ => x.ppid,
                };
                self.upsert(Process {
                    pid: ev.pid,
                    ppid,
                    start_boot_ns: ev.start_boot_ns,
                    image: Arc::new(Image {
                        exe: x.exe.clone(),
                        argv: x.argv.clone(),
                        copy_of: x.copy_of.clone(),
                    }),
                    comm: ev.comm.clone(),
                    uid: ev.uid,
                    euid: x.euid,
                    cgroup_id: ev.cgroup_id,
                    workload,
                    exited: None,
                    serves: false,
                    children: 0,
                });
            }
            Payload::Comm(c) => match self.procs.get_mut(&ev.pid) {
                Some(p) => p.comm = c.new_comm.clone(),
                None => self.stats.unknown_pid += 1,
            },
            Payload::Listen(_) => match self.procs.get_mut(&ev.pid) {
                Some(p) => p.serves = true,
                None => self.stats.unknown_pid += 1,
            },
            Payload::Exit { .. } => {
                let now = Instant::now();
                if let Some(p) = self.procs.get_mut(&ev.pid) {
                    if p.exited.is_none() {
                        p.exited = Some(now);
                        self.exited.push_back((now, p.pid, p.start_boot_ns));
                    }
                }
            }
            _ => {
                if !self.procs.contains_key(&ev.pid) {
                    self.stats.unknown_pid += 1;
                }
            }
        }
    }

    fn upsert(&mut self, mut p: Process) {
        // make_room is a no-op for a pid already held.
        if !self.make_room(p.pid) {
            return;
        }
        match self.procs.get(&p.pid).map(|o| (o.ppid, o.children)) {
            Some((old_ppid, children)) => {
                p.children = children;
                if old_ppid != p.ppid {
                    self.detach(old_ppid);
                    self.attach(p.ppid);
                }
            }
            None => {
                p.children = 0;
                self.attach(p.ppid);
            }
        }
        self.procs.insert(p.pid, p);
    }

    fn attach(&mut self, ppid: u32) {
        if let Some(pp) = self.procs.get_mut(&ppid) {
            pp.children += 1;
        }
    }

    /// One child of `ppid` left the tree; an exited parent with no children
    /// left starts its grace period again.
    fn detach(&mut self, ppid: u32) {
        if let Some(pp) = self.procs.get_mut(&ppid) {
            pp.children = pp.children.saturating_sub(1);
            if pp.children == 0 && pp.exited.is_some() {
                self.exited
                    .push_back((Instant::now(), pp.pid, pp.start_boot_ns));
            }
        }
    }

    fn remove(&mut self, pid: u32) {
        if let Some(p) = self.procs.remove(&pid) {
            self.stats.reaped += 1;
            if p.ppid != pid {
                self.detach(p.ppid);
            }
        }
    }

    /// Ensures there is room for one more entry; false if the tree is full of
    /// live processes.
    fn make_room(&mut self, pid: u32) -> bool {
        if self.procs.contains_key(&pid) || self.procs.len() < self.max_processes {
            return true;
        }
        while self.procs.len() >= self.max_processes {
            if !self.reap_one() {
                self.stats.rejected += 1;
                return false;
            }
        }
        true
    }

    /// Removes the oldest exited process (without children if possible);
    /// false if there is none.
    fn reap_one(&mut self) -> bool {
        while let Some((_, pid, start)) = self.exited.pop_front() {
            if self.try_reap(pid, start) {
                return true;
            }
        }
        while let Some((pid, start)) = self.retained.pop_front() {
            if self.is_exited(pid, start) {
                self.remove(pid);
                return true;
            }
        }
        false
    }

    fn is_exited(&self, pid: u32, start: u64) -> bool {
        self.procs
            .get(&pid)
            .is_some_and(|p| p.exited.is_some() && p.start_boot_ns == start)
    }

    /// Removes an exited process, or retains it while it has children.
    fn try_reap(&mut self, pid: u32, start: u64) -> bool {
        if !self.is_exited(pid, start) {
            return false;
        }
        if self.procs.get(&pid).is_some_and(|p| p.children > 0) {
            self.retained.push_back((pid, start));
            if self.retained.len() > self.max_processes {
                self.retained.pop_front();
            }
            return false;
        }
        self.remove(pid);
        true
    }

    /// Removes exited processes whose grace period is over. Returns how many.
    pub fn reap(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(t, pid, start)) = self.exited.front() {
            if now.duration_since(t) < self.grace {
                break;
            }
            self.exited.pop_front();
            if self.try_reap(pid, start) {
                n += 1;
            }
        }
        n
    }

    /// The chain of ancestors of `pid`, parent first, up to init.
    pub fn ancestry(&self, pid: u32) -> Vec<Ancestor> {
        let mut out = Vec::new();
        let mut cur = match self.procs.get(&pid) {
            Some(p) => p.ppid,
            None => return out,
        };
        while cur != 0 && out.len() < MAX_ANCESTRY {
            let Some(p) = self.procs.get(&cur) else { break };
            if out.iter().any(|a: &Ancestor| a.pid == cur) || cur == pid {
                break;
            }
            out.push(Ancestor {
                pid: p.pid,
                image: p.image.clone(),
            });
            if p.pid == 1 {
                break;
            }
            cur = p.ppid;
        }
        out
    }

    /// The host workload (shared value).
    pub fn host_workload(&self) -> Arc<Workload> {
        self.host.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::Exec;

    fn ev(pid: u32, start: u64, payload: Payload) -> Event {
        Event {
            boot_ns: 0,
            tid: pid,
            pid,
            uid: 0,
            gid: 0,
            start_boot_ns: start,
            cgroup_id: 7,
            comm: "x".into(),
            payload,
        }
    }

    fn exec(pid: u32, ppid: u32, exe: &str) -> Event {
        ev(
            pid,
            pid as u64,
            Payload::Exec(Exec {
                ppid,
                euid: 0,
                egid: 0,
                exe: exe.into(),
                argv: vec![exe.into()],
                argv_truncated: false,
                exe_ino: 1,
                exe_dev: 1,
                exe_memfd: false,
                exe_deleted: false,
                script: None,
                ld_preload: None,
                copy_of: None,
                history_off: false,
                stdio: [crate::model::event::Stdio::Closed; 3],
                frozen: false,
                ..Default::default()
            }),
        )
    }

    fn wl() -> impl FnMut(u32, u64) -> Arc<Workload> {
        |_, _| Arc::new(Workload::default())
    }

    #[test]
    fn a_late_fork_event_does_not_undo_what_the_start_scan_saw() {
        let mut t = ProcessTree::new(100, Duration::from_secs(1));
        let mut w = wl();
        t.apply(&exec(20, 1, "/usr/bin/bash"), &mut w);
        // The scan at start saw pid 21 already running curl (its exec came
        // before the exec hook was attached); its start time is rounded
        // down to the tick.
        let mut scanned = t.get(20).unwrap().clone();
        scanned.pid = 21;
        scanned.ppid = 20;
        scanned.start_boot_ns = 1_000_000_000;
        scanned.image = Image::new("/usr/bin/curl".into(), vec![]);
        scanned.cgroup_id = 0;
        t.insert(scanned);
        // Then the fork event recorded before the scan is processed.
        t.apply(&ev(21, 1_004_000_000, Payload::Fork { ppid: 20 }), &mut w);
        assert_eq!(t.get(21).unwrap().image.exe, "/usr/bin/curl");
        // A fork of another process that got the pid later is applied.
        t.apply(&ev(21, 9_000_000_000, Payload::Fork { ppid: 20 }), &mut w);
        assert_eq!(t.get(21).unwrap().image.exe, "/usr/bin/bash");
    }

    /// init (1) -> node (10) -> sh (11), by forks and execs.
    fn init_node_sh(t: &mut ProcessTree, w: &mut impl FnMut(u32, u64) -> Arc<Workload>) {
        t.apply(&exec(1, 0, "/sbin/init"), w);
        t.apply(&ev(10, 10, Payload::Fork { ppid: 1 }), w);
        t.apply(&exec(10, 1, "/usr/bin/node"), w);
        t.apply(&ev(11, 11, Payload::Fork { ppid: 10 }), w);
        t.apply(&exec(11, 10, "/bin/sh"), w);
    }

    #[test]
    fn ancestry_follows_forks_and_execs() {
        let mut t = ProcessTree::new(100, Duration::from_secs(1));
        let mut w = wl();
        init_node_sh(&mut t, &mut w);
        t.apply(&ev(12, 12, Payload::Fork { ppid: 11 }), &mut w);
        // Before exec the child carries its parent's image: the same one,
        // not a copy.
        assert_eq!(t.get(12).unwrap().image.exe, "/bin/sh");
        assert!(Arc::ptr_eq(
            &t.get(12).unwrap().image,
            &t.get(11).unwrap().image
        ));
        t.apply(&exec(12, 11, "/usr/bin/curl"), &mut w);
        // Ancestries share the tree's images.
        assert!(Arc::ptr_eq(
            &t.ancestry(12)[0].image,
            &t.get(11).unwrap().image
        ));
        let a: Vec<_> = t
            .ancestry(12)
            .into_iter()
            .map(|a| (a.pid, a.image.exe.clone()))
            .collect();
        assert_eq!(
            a,
            [
                (11, "/bin/sh".to_string()),
                (10, "/usr/bin/node".to_string()),
                (1, "/sbin/init".to_string())
            ]
        );
    }

    #[test]
    fn a_process_orphaned_before_its_exec_keeps_the_lineage_that_created_it() {
        let mut t = ProcessTree::new(100, Duration::from_secs(10));
        let mut w = wl();
        init_node_sh(&mut t, &mut w);
        // The shell forks a background child and dies at once: the child
        // execs after it was handed to init.
        t.apply(&ev(12, 12, Payload::Fork { ppid: 11 }), &mut w);
        t.apply(
            &ev(
                11,
                11,
                Payload::Exit {
                    exit_code: Some(2),
                    signal: None,
                },
            ),
            &mut w,
        );
        t.apply(&exec(12, 1, "/srv/x/.hid/agentd"), &mut w);
        let a: Vec<u32> = t.ancestry(12).iter().map(|a| a.pid).collect();
        assert_eq!(a, [11, 10, 1]);
        // A process whose creator the tree never held takes the kernel's.
        t.apply(&exec(40, 1, "/usr/bin/true"), &mut w);
        assert_eq!(t.get(40).unwrap().ppid, 1);
    }

    #[test]
    fn exited_are_reaped_after_grace_and_tree_stays_bounded() {
        let mut t = ProcessTree::new(50, Duration::from_millis(0));
        let mut w = wl();
        t.apply(&exec(1, 0, "/sbin/init"), &mut w);
        for pid in 2..10_000u32 {
            t.apply(&ev(pid, pid as u64, Payload::Fork { ppid: 1 }), &mut w);
            t.apply(&exec(pid, 1, "/bin/true"), &mut w);
            t.apply(
                &ev(
                    pid,
                    pid as u64,
                    Payload::Exit {
                        exit_code: Some(0),
                        signal: None,
                    },
                ),
                &mut w,
            );
            assert!(t.len() <= 50);
        }
        t.reap(Instant::now() + Duration::from_millis(1));
        assert_eq!(t.len(), 1, "only init is left");
        assert_eq!(t.stats().rejected, 0);
    }

    #[test]
    fn exited_parents_stay_while_children_live() {
        let mut t = ProcessTree::new(100, Duration::from_millis(0));
        let mut w = wl();
        t.apply(&exec(1, 0, "/sbin/init"), &mut w);
        t.apply(&exec(10, 1, "/usr/bin/node"), &mut w);
        t.apply(&exec(11, 10, "/bin/sh"), &mut w);
        t.apply(&exec(12, 11, "/tmp/miner"), &mut w);
        let exit = |pid: u32| {
            ev(
                pid,
                pid as u64,
                Payload::Exit {
                    exit_code: Some(0),
                    signal: None,
                },
            )
        };
        t.apply(&exit(11), &mut w);
        t.reap(Instant::now() + Duration::from_secs(1));
        let a: Vec<u32> = t.ancestry(12).iter().map(|a| a.pid).collect();
        assert_eq!(a, [11, 10, 1], "the exited shell is kept for its child");
        t.apply(&exit(12), &mut w);
        t.reap(Instant::now() + Duration::from_secs(1));
        t.reap(Instant::now() + Duration::from_secs(2));
        assert!(t.get(12).is_none());
        assert!(t.get(11).is_none(), "released once its last child is gone");
        assert!(t.get(10).is_some());
    }

    #[test]
    fn full_of_live_processes_rejects_and_counts() {
        let mut t = ProcessTree::new(16, Duration::from_secs(60));
        let mut w = wl();
        for pid in 1..=20u32 {
            t.apply(&exec(pid, 1, "/bin/sleep"), &mut w);
        }
        assert_eq!(t.len(), 16);
        assert_eq!(t.stats().rejected, 4);
    }

    #[test]
    fn ancestry_survives_cycles() {
        let mut t = ProcessTree::new(100, Duration::from_secs(1));
        let mut w = wl();
        t.apply(&exec(5, 6, "/a"), &mut w);
        t.apply(&exec(6, 5, "/b"), &mut w);
        assert_eq!(t.ancestry(5).len(), 1);
    }
}
