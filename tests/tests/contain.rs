//! Containment on the real kernel: a reverse shell started by a listening
//! process is captured, then killed (never resumed); a dry run kills
//! nothing and says what it would have done; with capture off, the kill is
//! immediate. Each action is a JSON line and a metric.
//!
//! One agent at a time: an agent kills what its policy names on the whole
//! machine, whichever test started the process.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_tests::{marker, Agent, EventExt};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// An agent with `policy` (TOML lines) and an actions output.
fn agent_with(policy: &str) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let actions = dir.path().join("actions.jsonl");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!("{policy}\nactions_json = \"{}\"\n", actions.display()),
    )
    .unwrap();
    let agent = Agent::start(&["-c", &cfg.to_string_lossy()]);
    (agent, dir)
}

/// This process serves (the agent has seen it listen), then starts a shell
/// whose standard input and output are a TCP connection.
fn reverse_shell(agent: &Agent, script: &str) -> (TcpListener, Child) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id() as u64;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    let conn = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::from(OwnedFd::from(conn.try_clone().unwrap())))
        .stdout(Stdio::from(OwnedFd::from(conn)))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (l, child)
}

/// Waits (bounded) for `c` to end; kills it and fails when it does not.
fn wait_end(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("pid {} still running after {limit:?}", c.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The action record for `pid` (waits up to 30 s).
fn action_for(dir: &tempfile::TempDir, pid: u32) -> Value {
    let path = dir.path().join("actions.jsonl");
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(v) = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["pid"].as_u64() == Some(pid as u64))
        {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no action for pid {pid} in {}: {text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reverse_shell_is_captured_then_killed() {
    let _g = serial();
    let (agent, dir) = agent_with("contain_rules = [\"reverse_shell\"]");
    let m = marker("contain");
    let (_l, mut sh) = reverse_shell(&agent, &format!("sleep 30; echo {m} >/dev/null"));
    let pid = sh.id();
    let st = wait_end(&mut sh, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let a = action_for(&dir, pid);
    assert_eq!(a["action"], "kill", "{a}");
    assert_eq!(a["result"], "done", "{a}");
    assert_eq!(a["rule"], "reverse_shell", "{a}");
    // Evidence first: the bundle of the killed process.
    let bundle = a["bundle_id"].as_str().expect("a bundle before the kill");
    let ev = agent
        .evidence()
        .into_iter()
        .find(|e| e["evidence"]["bundle_id"] == bundle)
        .expect("its evidence line");
    assert_eq!(ev["evidence"]["killed"], true, "{ev}");
    assert_eq!(ev["containment"]["result"], "done", "{ev}");
    assert!(
        agent.metric("vigil_containment_actions_total{action=\"kill\",result=\"done\"}") >= 1.0
    );
}

#[test]
fn a_dry_run_kills_nothing_and_says_so() {
    let _g = serial();
    let (agent, dir) = agent_with("contain_rules = [\"reverse_shell\"]\ncontain_dry_run = true");
    let (_l, mut sh) = reverse_shell(&agent, "sleep 0.5; exit 7");
    let pid = sh.id();
    let st = wait_end(&mut sh, Duration::from_secs(30));
    assert_eq!(st.code(), Some(7), "ran to its end: {st:?}");
    let a = action_for(&dir, pid);
    assert_eq!(a["result"], "dry_run", "{a}");
    assert!(
        agent.metric("vigil_containment_actions_total{action=\"kill\",result=\"dry_run\"}") >= 1.0
    );
}

#[test]
fn with_capture_off_the_kill_is_immediate() {
    let _g = serial();
    let (agent, dir) = agent_with("contain_min_severity = \"critical\"\ncapture = false");
    let (_l, mut sh) = reverse_shell(&agent, "sleep 30");
    let pid = sh.id();
    let st = wait_end(&mut sh, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "{st:?}");
    let a = action_for(&dir, pid);
    assert_eq!(a["result"], "done", "{a}");
    assert!(a.get("bundle_id").is_none(), "no capture, no bundle: {a}");
}

#[test]
fn kill_group_takes_the_whole_process_group() {
    use std::os::unix::process::CommandExt;
    let _g = serial();
    let (agent, dir) =
        agent_with("contain_rules = [\"reverse_shell\"]\ncontain_action = \"kill_group\"");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id() as u64;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    let conn = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let fd = OwnedFd::from(conn);
    let work = tempfile::tempdir().unwrap();
    let bg = work.path().join("bg.pid");
    // A script in its own process group: a background job, then a shell
    // whose stdio is the connection (fd 3).
    let script = format!(
        "sleep 30 & echo $! > {}; sleep 0.5; sh -c 'sleep 30' <&3 >&3",
        bg.display()
    );
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut outer = unsafe {
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .pre_exec(move || {
                if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .spawn()
            .unwrap()
    };
    let st = wait_end(&mut outer, Duration::from_secs(30));
    // Killed with its group, or ended on its own as its shell child was
    // killed first (the group follows the capture's kill by a few ms).
    assert!(
        st.signal() == Some(libc::SIGKILL) || st.code() == Some(128 + libc::SIGKILL),
        "the script's shell: {st:?}"
    );
    let bg_pid: u32 = std::fs::read_to_string(&bg)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{bg_pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{bg_pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the background job {bg_pid} of the group still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = std::fs::read_to_string(dir.path().join("actions.jsonl")).unwrap();
    let a: Value = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|v: &Value| v["action"] == "kill_group")
        .unwrap_or_else(|| panic!("no kill_group action: {text}"));
    assert_eq!(a["result"], "done", "{a}");
    assert_eq!(a["process_group"].as_u64(), Some(outer.id() as u64), "{a}");
}

#[test]
fn deny_connect_cuts_the_process_and_its_children_off() {
    use std::io::Read;
    let _g = serial();
    let (agent, dir) =
        agent_with("contain_rules = [\"reverse_shell\"]\ncontain_action = \"deny_connect\"");
    // Where the contained shell's child will try to connect.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let probe = dir.path().join("probe.py");
    std::fs::write(
        &probe,
        format!(
            "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n    print('connected', flush=True)\nexcept OSError as e:\n    print('refused', e.errno, flush=True)\n"
        ),
    )
    .unwrap();
    let (l, mut sh) = reverse_shell(&agent, &format!("sleep 1; python3 {}", probe.display()));
    let pid = sh.id();
    let (mut peer, _) = l.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut said = String::new();
    let _ = peer.read_to_string(&mut said);
    assert_eq!(
        said.trim(),
        format!("refused {}", libc::EPERM),
        "the contained shell's child connected"
    );
    // The shell itself ran on to its end (it was not killed).
    let st = wait_end(&mut sh, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{st:?}");
    // Everyone else still connects.
    TcpStream::connect(("127.0.0.1", port)).expect("an uncontained process connects");
    let a = action_for(&dir, pid);
    assert_eq!(a["action"], "deny_connect", "{a}");
    assert_eq!(a["result"], "done", "{a}");
}

/// Another vigil agent is reported, never contained: the first agent's
/// policy names the second's program loads (`bpf_program_load`), with
/// capture off (killed at once) and on (killed by the capture); the
/// second runs on and stops cleanly, and the action is refused. Where the
/// agent is the system's binary its loads are no detection: then only the
/// clean stop is checked.
#[test]
fn another_agent_is_never_contained() {
    let _g = serial();
    for capture in ["capture = false", ""] {
        let out = tempfile::tempdir().unwrap();
        let dets = out.path().join("detections.jsonl");
        let (mut first, dir) = agent_with(&format!(
            "contain_rules = [\"bpf_program_load\"]\n{capture}\ndetections_json = \"{}\"",
            dets.display()
        ));
        let mut second = Agent::start(&[]);
        let pid = second.pid();
        let detected = || vigil_tests::detected(&dets, pid, "bpf_program_load");
        let t0 = Instant::now();
        while !detected() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if detected() {
            let a = action_for(&dir, pid);
            assert_eq!(a["result"], "refused", "{capture}: {a}");
            let why = a["error"].as_str().unwrap_or_default();
            assert!(why.contains("another vigil agent"), "{capture}: {a}");
        }
        let (status, _) = second.stop();
        assert!(status.success(), "{capture}: the second agent: {status:?}");
        let (status, _) = first.stop();
        assert!(status.success(), "{capture}: the first agent: {status:?}");
    }
}
