//! Real test children for the capture tests (no mocks): the test binary
//! itself, re-run as a helper that holds known bytes in memory and sleeps,
//! and a process stopped right after its exec.

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A string the helper child builds at run time on its heap (it is not in
/// the binary: the binary holds it reversed).
pub const CHILD_HEAP_MARKER: &str = "vigil-heap-marker:7f3a9c1e:the-child-made-me";
const MARKER_REVERSED: &str = "em-edam-dlihc-eht:e1c9a3f7:rekram-paeh-ligiv";
const CHILD_ENV: &str = "VIGIL_CAPTURE_TEST_CHILD";

/// A helper child, killed and reaped on drop.
pub struct TestChild {
    child: Child,
    _stdout: ChildStdout,
}

impl TestChild {
    /// Its pid.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()
    }

    /// Reaps it.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for TestChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A helper with `threads` extra threads, `VIGIL_TEST_MARKER=<marker>` in its
/// environment and [`CHILD_HEAP_MARKER`] on its heap.
pub fn spawn_sleeper(threads: usize, marker: &str) -> TestChild {
    spawn_child(threads, marker, 0)
}

/// Like [`spawn_sleeper`], plus `alloc_mb` MiB allocated and touched (a mix
/// of pseudo-random and repetitive bytes, like real heaps).
pub fn spawn_child(threads: usize, marker: &str, alloc_mb: usize) -> TestChild {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "capture::testutil::capture_test_child_main",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{threads}:{alloc_mb}"))
        .env("VIGIL_TEST_MARKER", marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).unwrap() == 0 {
            panic!("test child exited before it was ready");
        }
        if line.contains("VIGIL_READY") {
            break;
        }
    }
    TestChild {
        child,
        _stdout: lines.into_inner(),
    }
}

/// The state letter of every thread of `pid`.
pub fn thread_states(pid: i32) -> Vec<char> {
    super::procutil::thread_ids(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|tid| {
            super::procutil::StatLine::read(std::path::Path::new(&format!(
                "/proc/{pid}/task/{tid}/stat"
            )))
            .ok()
            .map(|s| s.state())
        })
        .collect()
}

/// Waits until every thread of `pid` is in state `want` (bounded).
pub fn wait_state(pid: i32, want: char) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let s = thread_states(pid);
        if !s.is_empty() && s.iter().all(|c| *c == want) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Runs `argv` (absolute path first) with `env`, stopped right after its
/// exec, before its first instruction: what the kernel-side freeze
/// (bpf_send_signal(SIGSTOP) at exec) will do. The caller reaps it with
/// [`reap`].
pub fn spawn_stopped_after_exec(argv: &[&str], env: &[&str]) -> i32 {
    use nix::sys::ptrace;
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;

    let cargv: Vec<CString> = argv.iter().map(|s| CString::new(*s).unwrap()).collect();
    let cenv: Vec<CString> = env.iter().map(|s| CString::new(*s).unwrap()).collect();
    let mut pargv: Vec<*const libc::c_char> = cargv.iter().map(|c| c.as_ptr()).collect();
    pargv.push(std::ptr::null());
    let mut penv: Vec<*const libc::c_char> = cenv.iter().map(|c| c.as_ptr()).collect();
    penv.push(std::ptr::null());
    // SAFETY: the child only calls async-signal-safe functions (raise,
    // execve, _exit) on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::raise(libc::SIGSTOP);
            libc::execve(pargv[0], pargv.as_ptr(), penv.as_ptr());
            libc::_exit(127);
        }
    }
    let p = Pid::from_raw(pid);
    match waitpid(p, Some(WaitPidFlag::WUNTRACED)).unwrap() {
        WaitStatus::Stopped(_, Signal::SIGSTOP) => {}
        s => panic!("unexpected {s:?}"),
    }
    ptrace::seize(p, ptrace::Options::PTRACE_O_TRACEEXEC).unwrap();
    kill(p, Signal::SIGCONT).unwrap();
    loop {
        match waitpid(p, Some(WaitPidFlag::__WALL)).unwrap() {
            WaitStatus::PtraceEvent(_, _, libc::PTRACE_EVENT_EXEC) => break,
            WaitStatus::Stopped(_, Signal::SIGCONT) => ptrace::cont(p, None).unwrap(),
            WaitStatus::Stopped(_, sig) => ptrace::cont(p, Some(sig)).unwrap(),
            WaitStatus::PtraceEvent(..) => ptrace::cont(p, None).unwrap(),
            s => panic!("unexpected {s:?}"),
        }
    }
    // At the exec event: queue a SIGSTOP and let go; it is taken before the
    // first user-space instruction of the new image.
    kill(p, Signal::SIGSTOP).unwrap();
    ptrace::detach(p, None).unwrap();
    assert!(wait_state(pid, 'T'), "{:?}", thread_states(pid));
    pid
}

/// Waits for a child started by [`spawn_stopped_after_exec`] to end.
pub fn reap(pid: i32) -> nix::sys::wait::WaitStatus {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap() {
            s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return s,
            _ => continue,
        }
    }
}

/// The helper child (run by [`spawn_child`] as the test binary; does
/// nothing otherwise).
#[test]
#[ignore = "helper process for the capture tests, started by them"]
fn capture_test_child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (threads, alloc_mb) = spec.split_once(':').unwrap();
    let threads: usize = threads.parse().unwrap();
    let alloc_mb: usize = alloc_mb.parse().unwrap();
    let heap: String = MARKER_REVERSED.chars().rev().collect();
    assert_eq!(heap, CHILD_HEAP_MARKER);
    let heap = std::hint::black_box(heap);
    let mut big = vec![0u8; alloc_mb << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for (i, page) in big.chunks_mut(4096).enumerate() {
        // 1 KiB of noise, 3 KiB of text: compresses about like a real heap.
        for b in page[..1024].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        let line = format!("page {i:08} of the capture benchmark child; ");
        for (j, b) in page[1024..].iter_mut().enumerate() {
            *b = line.as_bytes()[j % line.len()];
        }
    }
    let big = std::hint::black_box(big);
    for _ in 0..threads {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(3600));
        });
    }
    println!("VIGIL_READY {}", std::process::id());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        std::hint::black_box((&heap, &big));
    }
}
