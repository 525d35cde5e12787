//! Freeze a process for capture: SIGSTOP to the whole thread group, wait
//! (bounded) until every thread is stopped, and always let it go again.
//!
//! ## Never leave a process stopped
//!
//! - In the agent: [`FrozenProcess`] resumes (SIGCONT) on drop, so an error
//!   or a panic in the capture code (unwinding) lets the process run on;
//!   only [`FrozenProcess::resume`] and [`FrozenProcess::kill`] release it
//!   otherwise.
//! - If the agent dies (crash, OOM kill, SIGKILL, abort): before each SIGSTOP
//!   the pid and its start time are added to `STATE_DIR/stopped.json`
//!   (written to a temporary file and renamed, so the list is always whole),
//!   and removed after the SIGCONT/SIGKILL. [`resume_leftovers`] sends SIGCONT
//!   to every process still listed whose start time matches (a recycled pid
//!   is left alone) and clears the list; the agent calls it at start, and the
//!   systemd unit should also run it from `ExecStopPost=` so that an agent
//!   that dies and is not restarted still frees them. No fsync is needed: the
//!   file outlives the agent's process in the page cache, and a machine crash
//!   takes the stopped processes with it.
//! - Signals go through a pidfd (pidfd_open + pidfd_send_signal, Linux 5.3+)
//!   opened and checked against the start time before the SIGSTOP, so a
//!   resume or kill can never hit a recycled pid.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::procutil;

/// The list of processes the agent has stopped and not yet released.
pub const STOPPED_LIST: &str = "stopped.json";

/// Freeze failures.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// No such process (or it exited before the SIGSTOP).
    #[error("process {pid} is gone")]
    Gone {
        /// The pid.
        pid: i32,
    },
    /// The pid now belongs to another process than the one asked for.
    #[error("pid {pid} was recycled (start time {actual}, expected {expected})")]
    Recycled {
        /// The pid.
        pid: i32,
        /// The start time the caller knew (clock ticks since boot).
        expected: u64,
        /// The start time found in /proc.
        actual: u64,
    },
    /// Sending a signal failed.
    #[error("sending {signal} to {pid}: {source}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The signal name.
        signal: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The process is another vigil agent: two agents that stop each
    /// other would both stay stopped, neither left to resume the other.
    #[error("process {pid} is another vigil agent ({why}): not stopped, so that two agents never stop each other")]
    PeerAgent {
        /// The pid.
        pid: i32,
        /// How it is known for one.
        why: String,
    },
    /// Reading or writing the stopped list.
    #[error("stopped list {path}: {source}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Freeze settings.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// How long to wait for every thread to reach the stopped state. A
    /// thread in uninterruptible sleep (D) stops only when it leaves it; the
    /// capture then goes on and reports the threads that did not stop.
    pub stop_timeout: Duration,
    /// Where agents pin their freeze ledgers (`sensor.bpf_pin_dir`): a
    /// process with a live ledger there, or running this agent's
    /// executable, is another agent and is never stopped (see
    /// [`crate::frozen::peer_agent`]). None: no such check.
    pub peer_pin_dir: Option<PathBuf>,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        FreezeOptions {
            stop_timeout: Duration::from_secs(2),
            peer_pin_dir: None,
        }
    }
}

/// What the freeze did (goes into the manifest).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FreezeInfo {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (identifies the process with the pid).
    pub start_time: u64,
    /// Every thread was already stopped before our SIGSTOP (e.g. by the
    /// kernel-side freeze).
    pub already_stopped: bool,
    /// Threads seen when the freeze ended.
    pub threads: Vec<i32>,
    /// Threads that had not reached the stopped state within the timeout.
    pub not_stopped: Vec<i32>,
    /// From the SIGSTOP to every thread stopped (or the timeout), in µs.
    pub wait_us: u64,
}

/// Stops processes and keeps the on-disk list of those it has stopped.
/// Cheap to clone; share one per agent.
#[derive(Debug, Clone)]
pub struct Freezer {
    inner: Arc<FreezerInner>,
}

#[derive(Debug)]
struct FreezerInner {
    list_path: PathBuf,
    lock: Mutex<()>,
    options: FreezeOptions,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct StoppedEntry {
    start_time: u64,
    since: String,
}

/// `stopped.json`: pid -> entry.
type StoppedList = BTreeMap<i32, StoppedEntry>;

impl Freezer {
    /// A freezer keeping its list in `state_dir` (created if missing). Call
    /// [`resume_leftovers`] on the same directory first, at agent start.
    pub fn new(state_dir: &Path, options: FreezeOptions) -> Result<Freezer, FreezeError> {
        fs::create_dir_all(state_dir).map_err(|source| FreezeError::StateFile {
            path: state_dir.to_path_buf(),
            source,
        })?;
        Ok(Freezer {
            inner: Arc::new(FreezerInner {
                list_path: state_dir.join(STOPPED_LIST),
                lock: Mutex::new(()),
                options,
            }),
        })
    }

    /// Stops every thread of `pid` and waits (bounded) until they are all
    /// stopped.
    pub fn freeze(&self, pid: i32) -> Result<FrozenProcess, FreezeError> {
        self.freeze_inner(pid, None)
    }

    /// Like [`Freezer::freeze`], but only if the process still has this start
    /// time (clock ticks since boot, /proc/PID/stat field 22): the pid may
    /// have been recycled since the event.
    pub fn freeze_checked(&self, pid: i32, start_time: u64) -> Result<FrozenProcess, FreezeError> {
        self.freeze_inner(pid, Some(start_time))
    }

    fn freeze_inner(&self, pid: i32, expected: Option<u64>) -> Result<FrozenProcess, FreezeError> {
        if pid <= 0 {
            return Err(FreezeError::Gone { pid });
        }
        let pidfd = pidfd_open(pid).map_err(|_| FreezeError::Gone { pid })?;
        // Read after the pidfd exists: if this start time is the expected
        // one, the pidfd refers to that process.
        let start_time = procutil::start_time(pid).map_err(|_| FreezeError::Gone { pid })?;
        if let Some(expected) = expected {
            if expected != start_time {
                return Err(FreezeError::Recycled {
                    pid,
                    expected,
                    actual: start_time,
                });
            }
        }
        if exiting(pid) {
            // A zombie has no memory left to capture.
            return Err(FreezeError::Gone { pid });
        }
        if let Some(dir) = &self.inner.options.peer_pin_dir {
            if let Some(why) = crate::frozen::peer_agent(dir, pid, start_time) {
                return Err(FreezeError::PeerAgent { pid, why });
            }
        }
        let already_stopped = all_stopped(pid).0;
        self.list_add(pid, start_time)?;
        let mut frozen = FrozenProcess {
            freezer: self.clone(),
            pidfd,
            released: false,
            info: FreezeInfo {
                pid,
                start_time,
                already_stopped,
                threads: Vec::new(),
                not_stopped: Vec::new(),
                wait_us: 0,
            },
        };
        let t0 = Instant::now();
        if let Err(e) = frozen.signal(libc::SIGSTOP) {
            // Dropping `frozen` sends SIGCONT (harmless) and clears the entry.
            return Err(match e.raw_os_error() {
                Some(libc::ESRCH) => FreezeError::Gone { pid },
                _ => FreezeError::Signal {
                    pid,
                    signal: "SIGSTOP",
                    source: e,
                },
            });
        }
        let mut pause = Duration::from_micros(50);
        loop {
            let (done, threads, not_stopped) = all_stopped(pid);
            if done || t0.elapsed() >= self.inner.options.stop_timeout {
                frozen.info.threads = threads;
                frozen.info.not_stopped = not_stopped;
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
        frozen.info.wait_us = t0.elapsed().as_micros() as u64;
        if !frozen.info.not_stopped.is_empty() {
            tracing::warn!(pid, not_stopped = ?frozen.info.not_stopped, "capture: threads not stopped in time");
        }
        Ok(frozen)
    }

    /// The pids in the stopped list (for tests and diagnostics).
    pub fn listed(&self) -> Vec<i32> {
        let _g = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        read_list(&self.inner.list_path)
            .map(|l| l.into_keys().collect())
            .unwrap_or_default()
    }

    fn list_add(&self, pid: i32, start_time: u64) -> Result<(), FreezeError> {
        let _g = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = &self.inner.list_path;
        let mut list = read_list(path).unwrap_or_default();
        list.insert(
            pid,
            StoppedEntry {
                start_time,
                since: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            },
        );
        write_list(path, &list).map_err(|source| FreezeError::StateFile {
            path: path.clone(),
            source,
        })
    }

    fn list_remove(&self, pid: i32) {
        let _g = self.inner.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = &self.inner.list_path;
        let mut list = read_list(path).unwrap_or_default();
        if list.remove(&pid).is_some() {
            if let Err(e) = write_list(path, &list) {
                tracing::warn!(pid, error = %e, "capture: cannot update the stopped list");
            }
        }
    }
}

/// A process stopped by [`Freezer`]. Released by [`resume`](Self::resume),
/// [`kill`](Self::kill), or on drop (resume).
#[derive(Debug)]
pub struct FrozenProcess {
    freezer: Freezer,
    pidfd: Option<OwnedFd>,
    released: bool,
    /// What the freeze did.
    pub info: FreezeInfo,
}

impl FrozenProcess {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.info.pid
    }

    /// Lets the process run on (SIGCONT). A process that exited meanwhile is
    /// not an error.
    pub fn resume(mut self) -> Result<(), FreezeError> {
        self.release(libc::SIGCONT, "SIGCONT")
    }

    /// Kills the process (SIGKILL; it needs no SIGCONT to die).
    pub fn kill(mut self) -> Result<(), FreezeError> {
        self.release(libc::SIGKILL, "SIGKILL")
    }

    fn release(&mut self, sig: i32, name: &'static str) -> Result<(), FreezeError> {
        self.released = true;
        let r = self.signal(sig);
        self.freezer.list_remove(self.info.pid);
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(source) => Err(FreezeError::Signal {
                pid: self.info.pid,
                signal: name,
                source,
            }),
        }
    }

    fn signal(&self, sig: i32) -> io::Result<()> {
        match &self.pidfd {
            Some(fd) => pidfd_send_signal(fd, sig),
            // No pidfd (kernel < 5.3): plain kill.
            None => {
                // SAFETY: kill has no memory-safety preconditions.
                if unsafe { libc::kill(self.info.pid, sig) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
        }
    }
}

impl Drop for FrozenProcess {
    fn drop(&mut self) {
        if !self.released {
            tracing::warn!(
                pid = self.info.pid,
                "capture: frozen process released without resume/kill; resuming"
            );
            let _ = self.release(libc::SIGCONT, "SIGCONT");
        }
    }
}

/// Resumes every process left in `state_dir/stopped.json` by an agent that
/// died, when its start time still matches, and clears the list. Returns the
/// pids resumed. Call at agent start (and from the unit's `ExecStopPost=`).
pub fn resume_leftovers(state_dir: &Path) -> Result<Vec<i32>, FreezeError> {
    let path = state_dir.join(STOPPED_LIST);
    let list = match read_list(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            // A torn or garbled list cannot be trusted but must not keep the
            // agent from starting: log, drop it.
            tracing::warn!(path = %path.display(), error = %source, "capture: unreadable stopped list, removed");
            let _ = fs::remove_file(&path);
            return Ok(Vec::new());
        }
    };
    let mut resumed = Vec::new();
    for (pid, entry) in list {
        match signal_if_same(pid, Some(entry.start_time), libc::SIGCONT) {
            Ok(true) => {
                tracing::warn!(pid, since = %entry.since, "capture: resumed a process left stopped by a previous agent");
                resumed.push(pid);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(pid, error = %e, "capture: cannot resume leftover"),
        }
    }
    write_list(&path, &StoppedList::new()).map_err(|source| FreezeError::StateFile {
        path: path.clone(),
        source,
    })?;
    Ok(resumed)
}

/// Sends `sig` to `pid` if it is still the process that started at
/// `start_time` (clock ticks since boot; `None`: any process with that pid),
/// through a pidfd so a pid recycled between the check and the signal is
/// never hit. `Ok(false)`: gone or recycled, nothing sent.
pub fn signal_if_same(pid: i32, start_time: Option<u64>, sig: i32) -> io::Result<bool> {
    if pid <= 0 {
        return Ok(false);
    }
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) => return Err(e),
    };
    let Ok(actual) = procutil::start_time(pid) else {
        return Ok(false);
    };
    if start_time.is_some_and(|t| t != actual) {
        return Ok(false);
    }
    let r = match &fd {
        Some(fd) => pidfd_send_signal(fd, sig),
        // SAFETY: kill has no memory-safety preconditions.
        None => match unsafe { libc::kill(pid, sig) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        },
    };
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether every thread of `pid` is exiting (Z, X) or gone.
fn exiting(pid: i32) -> bool {
    procutil::thread_ids(pid)
        .unwrap_or_default()
        .iter()
        .all(|tid| {
            let p = PathBuf::from(format!("/proc/{pid}/task/{tid}/stat"));
            procutil::StatLine::read(&p).map_or(true, |st| matches!(st.state(), 'Z' | 'X'))
        })
}

/// Whether every thread of `pid` is stopped (T, t) or exiting (Z, X, gone);
/// also the thread list and those not stopped.
fn all_stopped(pid: i32) -> (bool, Vec<i32>, Vec<i32>) {
    let threads = procutil::thread_ids(pid).unwrap_or_default();
    let not_stopped: Vec<i32> = threads
        .iter()
        .copied()
        .filter(|tid| {
            let p = PathBuf::from(format!("/proc/{pid}/task/{tid}/stat"));
            match procutil::StatLine::read(&p) {
                Ok(st) => !matches!(st.state(), 'T' | 't' | 'Z' | 'X'),
                Err(_) => false,
            }
        })
        .collect();
    (not_stopped.is_empty(), threads, not_stopped)
}

fn read_list(path: &Path) -> io::Result<StoppedList> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn write_list(path: &Path, list: &StoppedList) -> io::Result<()> {
    // 0600, via stopped.json.tmp.
    vigil_bundle::private::write_atomic(
        path,
        &serde_json::to_vec_pretty(list).map_err(io::Error::other)?,
    )
}

/// `Ok(None)` when the kernel has no pidfd_open (fall back to kill).
fn pidfd_open(pid: i32) -> io::Result<Option<OwnedFd>> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) => {
            // Still check the process exists.
            if Path::new(&format!("/proc/{pid}")).exists() {
                Ok(None)
            } else {
                Err(io::Error::from_raw_os_error(libc::ESRCH))
            }
        }
        _ => Err(e),
    }
}

fn pidfd_send_signal(fd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::testutil::{spawn_sleeper, thread_states};

    fn freezer(dir: &Path) -> Freezer {
        Freezer::new(dir, FreezeOptions::default()).unwrap()
    }

    #[test]
    fn capture_freeze_refuses_a_zombie_as_gone() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped yet: a zombie once it has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exiting(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(exiting(pid), "the child did not become a zombie");
        assert!(matches!(f.freeze(pid), Err(FreezeError::Gone { .. })));
        child.wait().unwrap();
        // Nothing left in the stopped list.
        assert!(resume_leftovers(dir.path()).unwrap().is_empty());
    }

    /// Another agent is never stopped: a process with a live freeze ledger
    /// pinned where this agent pins its own, or one running this very
    /// executable. A ledger of another start time (the pid recycled) or
    /// another pid does not count.
    #[test]
    fn capture_freeze_never_stops_another_agent() {
        let dir = tempfile::tempdir().unwrap();
        let pins = tempfile::tempdir().unwrap();
        let f = Freezer::new(
            dir.path(),
            FreezeOptions {
                peer_pin_dir: Some(pins.path().to_path_buf()),
                ..FreezeOptions::default()
            },
        )
        .unwrap();
        let not_stopped = |pid: i32| {
            std::thread::sleep(Duration::from_millis(50));
            assert!(thread_states(pid).iter().all(|s| *s != 'T'), "not stopped");
        };
        // Another program: known by its pinned ledger only.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = other.id() as i32;
        let start = procutil::start_time(pid).unwrap();
        std::fs::write(pins.path().join(format!("frozen.{pid}.{}", start + 1)), "").unwrap();
        std::fs::write(pins.path().join(format!("frozen.{}.{start}", pid + 1)), "").unwrap();
        f.freeze(pid).unwrap().resume().unwrap();
        std::fs::write(pins.path().join(format!("frozen.{pid}.{start}")), "").unwrap();
        let Err(e) = f.freeze(pid) else {
            panic!("another agent was stopped")
        };
        assert!(
            matches!(&e, FreezeError::PeerAgent { pid: p, why } if *p == pid && why.contains("pinned")),
            "{e}"
        );
        assert!(e.to_string().contains("another vigil agent"), "{e}");
        not_stopped(pid);
        other.kill().unwrap();
        other.wait().unwrap();
        // This very executable (the test binary re-run as a sleeper).
        let mut same = spawn_sleeper(1, "PEER");
        let pid = same.id() as i32;
        let Err(e) = f.freeze(pid) else {
            panic!("another agent was stopped")
        };
        assert!(
            matches!(&e, FreezeError::PeerAgent { why, .. } if why.contains("executable")),
            "{e}"
        );
        not_stopped(pid);
        assert!(f.listed().is_empty());
        same.kill().unwrap();
        same.wait().unwrap();
    }

    #[test]
    fn capture_freeze_stops_all_threads_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path());
        let mut child = spawn_sleeper(4, "FREEZE");
        let pid = child.id() as i32;
        let frozen = f.freeze(pid).unwrap();
        assert!(frozen.info.not_stopped.is_empty(), "{:?}", frozen.info);
        assert!(frozen.info.threads.len() >= 5, "{:?}", frozen.info);
        assert!(thread_states(pid).iter().all(|s| *s == 'T'));
        assert_eq!(f.listed(), vec![pid]);
        frozen.resume().unwrap();
        assert!(f.listed().is_empty());
        std::thread::sleep(Duration::from_millis(50));
        assert!(thread_states(pid).iter().all(|s| *s != 'T'));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn capture_freeze_drop_resumes_even_on_panic() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path());
        let mut child = spawn_sleeper(1, "DROP");
        let pid = child.id() as i32;
        let r = std::panic::catch_unwind(|| {
            let _frozen = f.freeze(pid).unwrap();
            assert!(thread_states(pid).iter().all(|s| *s == 'T'));
            panic!("capture failed");
        });
        assert!(r.is_err());
        std::thread::sleep(Duration::from_millis(50));
        assert!(thread_states(pid).iter().all(|s| *s != 'T'));
        assert!(f.listed().is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn capture_freeze_kill_contains() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path());
        let mut child = spawn_sleeper(2, "KILL");
        let frozen = f.freeze(child.id() as i32).unwrap();
        frozen.kill().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
        assert!(f.listed().is_empty());
    }

    #[test]
    fn capture_freeze_checked_rejects_recycled_and_gone() {
        let dir = tempfile::tempdir().unwrap();
        let f = freezer(dir.path());
        let mut child = spawn_sleeper(0, "RECYCLED");
        let pid = child.id() as i32;
        let st = procutil::start_time(pid).unwrap();
        assert!(matches!(
            f.freeze_checked(pid, st + 1),
            Err(FreezeError::Recycled { .. })
        ));
        assert!(thread_states(pid).iter().all(|s| *s != 'T'));
        f.freeze_checked(pid, st).unwrap().resume().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(matches!(f.freeze(pid), Err(FreezeError::Gone { .. })));
        assert!(f.listed().is_empty());
    }

    #[test]
    fn capture_freeze_leftovers_resumed_after_agent_death() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_sleeper(2, "LEFTOVER");
        let pid = child.id() as i32;
        {
            let f = freezer(dir.path());
            let frozen = f.freeze(pid).unwrap();
            // The agent "dies": no drop, no resume.
            std::mem::forget(frozen);
        }
        assert!(thread_states(pid).iter().all(|s| *s == 'T'));
        // A recycled pid in the list is left alone; garbage entries ignored.
        let list_path = dir.path().join(STOPPED_LIST);
        let mut list = read_list(&list_path).unwrap();
        list.insert(
            i32::MAX - 1,
            StoppedEntry {
                start_time: 1,
                since: "x".into(),
            },
        );
        write_list(&list_path, &list).unwrap();
        let resumed = resume_leftovers(dir.path()).unwrap();
        assert_eq!(resumed, vec![pid]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(thread_states(pid).iter().all(|s| *s != 'T'));
        assert!(read_list(&list_path).unwrap().is_empty());
        // Nothing listed, nothing to do; a garbled list does not block start.
        assert!(resume_leftovers(dir.path()).unwrap().is_empty());
        fs::write(&list_path, b"{garbage").unwrap();
        assert!(resume_leftovers(dir.path()).unwrap().is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
