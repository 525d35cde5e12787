//! Bootstrap: the processes that were running before the agent started,
//! read from /proc, so they have parents and ancestry too.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::debug;

use crate::model::workload::Workload;
use crate::tree::{Process, ProcessTree};
use crate::workload_cache::WorkloadCache;

/// The kernel's clock tick rate (`/proc` times are in ticks): read once
/// (it is asked per event). From `sysconf`, not the auxiliary vector.
pub fn ticks_per_second() -> u64 {
    static TPS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TPS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 {
            t as u64
        } else {
            100
        }
    })
}

/// Reads every process in /proc into `tree`. Returns how many were added.
/// Processes that vanish mid-scan are skipped.
pub fn bootstrap(tree: &mut ProcessTree, workloads: &mut WorkloadCache) -> anyhow::Result<usize> {
    let tps = ticks_per_second();
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

/// Most bytes of an environment read from /proc for `LD_PRELOAD`.
const ENVIRON_MAX_BYTES: u64 = 1 << 20;

/// Which process, and which of its images, a /proc read must come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageKey {
    /// The process's start time (boot ns): another process on a reused
    /// pid differs.
    pub start_boot_ns: u64,
    /// Where the image's arguments start (`mm->arg_start`, from the exec
    /// record; 0: any image of the process). An exec keeps the process's
    /// start time but gives it a new stack: a process that exec'd again
    /// since the record was made differs here (unless address layout
    /// randomization is off and its arguments take the same room: hence
    /// also `exe_ino`). Where /proc does not show it (0: the reader may not
    /// trace the process), it is not compared.
    pub arg_start: u64,
    /// Inode of the image's executable (the exec record's; 0: not
    /// compared): `/proc/PID/exe` must still be that file.
    pub exe_ino: u64,
}

impl ImageKey {
    /// Any image of the process started at `start_boot_ns`.
    pub fn process(start_boot_ns: u64) -> ImageKey {
        ImageKey {
            start_boot_ns,
            arg_start: 0,
            exe_ino: 0,
        }
    }

    /// `p` is still this process (its start time in clock ticks matches
    /// within one tick) and, when known, this image.
    fn matches(&self, p: &procfs::process::Process) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let tick_ns = 1_000_000_000 / ticks_per_second().max(1);
        let same = p.stat().is_ok_and(|st| {
            let shown = st.arg_start.unwrap_or(0);
            (st.starttime * tick_ns).abs_diff(self.start_boot_ns) <= tick_ns
                && (self.arg_start == 0 || shown == 0 || shown == self.arg_start)
        });
        // The inode number alone (an overlay shows its own device).
        same && (self.exe_ino == 0
            || std::fs::metadata(format!("/proc/{}/exe", p.pid))
                .is_ok_and(|m| m.ino() == self.exe_ino))
    }
}

/// `read` of the process `pid` when it is `key`'s image both before and
/// after the read (an exec between the two would have read another image).
fn read_image<T>(
    pid: u32,
    key: ImageKey,
    read: impl FnOnce(&procfs::process::Process) -> Option<T>,
) -> Option<T> {
    let p = procfs::process::Process::new(pid as i32).ok()?;
    if !key.matches(&p) {
        return None;
    }
    let v = read(&p)?;
    key.matches(&p).then_some(v)
}

/// The command line of `pid` (as `key` names it) read from /proc, bounded
/// like the bootstrap's: for an exec whose record was cut. `None` when the
/// process is gone, is another one, or runs another image.
pub fn cmdline_of(pid: u32, key: ImageKey) -> Option<Vec<String>> {
    let argv = read_image(pid, key, |p| p.cmdline().ok())?;
    (!argv.is_empty()).then(|| bounded_argv(argv))
}

/// The value of `name` in the environment `pid` (as `key` names it) was
/// given at exec, read from /proc (at most 1 MiB): `Some(None)` when it
/// has none, `None` when it cannot be read or is another image's.
pub fn env_var_of(pid: u32, key: ImageKey, name: &str) -> Option<Option<String>> {
    use std::io::Read;
    read_image(pid, key, |_| {
        let mut buf = Vec::new();
        std::fs::File::open(format!("/proc/{pid}/environ"))
            .ok()?
            .take(ENVIRON_MAX_BYTES)
            .read_to_end(&mut buf)
            .ok()?;
        Some(env_value(&buf, name))
    })
}

/// The pid, in the agent's pid namespace, of the process `actor` names
/// `target` (a pid in `actor`'s own namespace, as ptrace takes it). The
/// same number when `actor` shares the agent's namespace; else the process
/// in `actor`'s namespace whose innermost `NSpid` is `target` (a scan of
/// /proc, done for rare events only). `None` when it cannot be told.
pub fn host_pid_of(actor: u32, target: u32) -> Option<u32> {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let actor_ns = ns(&actor.to_string())?;
    if Some(&actor_ns) == ns("self").as_ref() {
        return Some(target);
    }
    for p in procfs::process::all_processes().ok()?.flatten() {
        if ns(&p.pid.to_string()).as_ref() != Some(&actor_ns) {
            continue;
        }
        let inner = p.status().ok().and_then(|s| s.nspid?.last().copied());
        if inner == Some(target as i32) {
            return Some(p.pid as u32);
        }
    }
    None
}

/// `name`'s value in a NUL-separated environment block.
fn env_value(block: &[u8], name: &str) -> Option<String> {
    block.split(|&b| b == 0).find_map(|kv| {
        let v = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        Some(String::from_utf8_lossy(v).into_owned())
    })
}

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
    fn environment_values_are_found_past_any_number_of_variables() {
        let mut block = Vec::new();
        for i in 0..5000 {
            block.extend_from_slice(format!("PAD{i}={}\0", "x".repeat(100)).as_bytes());
        }
        block.extend_from_slice(b"LD_PRELOAD_NOT=1\0LD_PRELOAD=/tmp/.x/e.so\0");
        assert_eq!(
            env_value(&block, "LD_PRELOAD").as_deref(),
            Some("/tmp/.x/e.so")
        );
        assert_eq!(env_value(b"A=1\0LD_PRELOADX=2\0", "LD_PRELOAD"), None);
    }

    /// Waits (at most 5 s) until `p`'s command line satisfies `done`.
    fn wait_cmdline(p: &procfs::process::Process, done: impl Fn(&[String]) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !p.cmdline().is_ok_and(|c| done(&c)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn a_command_line_cut_by_the_kernel_is_read_whole_from_proc_while_it_is_that_image() {
        use std::io::Write as _;
        let pad = "p".repeat(3000);
        // A shell that waits for a line, then execs another program in
        // place (same pid, same start time).
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read x; exec sleep 30", &pad, "tail-argument"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        let me = procfs::process::Process::new(pid as i32).expect("proc");
        // spawn() may return while the exec is still setting up the new
        // image (an empty command line): the agent reads it only after the
        // kernel's exec event, when it is in place.
        wait_cmdline(&me, |c| !c.is_empty());
        let tick_ns = 1_000_000_000 / ticks_per_second();
        let stat = me.stat().expect("stat");
        let start = stat.starttime * tick_ns;
        use std::os::unix::fs::MetadataExt as _;
        let key = ImageKey {
            start_boot_ns: start,
            arg_start: stat.arg_start.expect("arg_start in /proc/PID/stat"),
            exe_ino: std::fs::metadata("/bin/sh").unwrap().ino(),
        };
        let argv = cmdline_of(pid, key).expect("live process");
        assert_eq!(argv.last().map(String::as_str), Some("tail-argument"));
        // Another process under that pid (a start time 1 s off) is not it.
        let other = ImageKey {
            start_boot_ns: start + 1_000_000_000,
            ..key
        };
        assert_eq!(cmdline_of(pid, other), None);
        assert_eq!(env_var_of(pid, other, "PATH"), None);
        // Another executable than the record's is not it either, whatever
        // the address of its arguments.
        let file = ImageKey {
            exe_ino: key.exe_ino + 1,
            ..key
        };
        assert_eq!(cmdline_of(pid, file), None);
        let by_exe = ImageKey {
            arg_start: 0,
            ..key
        };
        assert!(cmdline_of(pid, by_exe).is_some());
        // Once it exec'd again, the first image's command line and
        // environment are gone: /proc shows the new image's, which must not
        // be taken for the first's. Any image of the process still reads.
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("writing to sh");
        wait_cmdline(&me, |c| c.first().is_some_and(|a| a == "sleep"));
        assert_eq!(cmdline_of(pid, key), None);
        assert_eq!(env_var_of(pid, key, "PATH"), None);
        assert_eq!(cmdline_of(pid, by_exe), None, "another executable now");
        assert_eq!(
            cmdline_of(pid, ImageKey::process(start)),
            Some(vec!["sleep".to_string(), "30".into()])
        );
        let _ = child.kill();
        let _ = child.wait();
    }

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
