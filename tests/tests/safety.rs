//! Production safety on the real kernel: no process is ever left stopped
//! (full ring buffer, agent killed after a freeze, capture stuck), and the
//! running agent keeps only its documented capabilities.
//!
//! Each test runs its own agent, one at a time: an agent that starts while
//! another runs leaves that one's freezes alone, and these tests look at
//! what every agent on the machine did to their processes.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_tests::{agent_bin, marker, Agent, EventExt};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// State letter of `pid` from /proc/PID/stat ('?' when gone).
fn state(pid: u32) -> char {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            rest.chars().next()
        })
        .unwrap_or('?')
}

/// Children of this test process in state T (stopped), by pid.
fn stopped_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if f.len() > 1 && f[0] == "T" && f[1] == me {
            out.push(pid);
        }
    }
    out
}

/// This process listens on loopback: the freeze policy now watches its
/// children (shells it starts are frozen at exec).
fn become_server(agent: &Agent) -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id() as u64;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    l
}

/// Waits (bounded) for a child; kills and reports it when it does not end.
fn wait_bounded(mut c: Child, limit: Duration) -> Result<std::process::Output, String> {
    let t0 = Instant::now();
    loop {
        if c.try_wait().unwrap().is_some() {
            return Ok(c.wait_with_output().unwrap());
        }
        if t0.elapsed() > limit {
            let pid = c.id();
            let st = state(pid);
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = c.wait();
            return Err(format!("pid {pid} still in state {st} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn shell(arg: &str) -> Child {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until `pid` has been in state T for `hold` in a row (bounded).
fn wait_stopped(pid: u32, hold: Duration, limit: Duration) -> bool {
    let t0 = Instant::now();
    let mut since: Option<Instant> = None;
    while t0.elapsed() < limit {
        if state(pid) == 'T' {
            let s = *since.get_or_insert_with(Instant::now);
            if s.elapsed() >= hold {
                return true;
            }
        } else {
            since = None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn metric_eventually(agent: &Agent, series: &str, at_least: f64) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = agent.metric(series);
        if v >= at_least || t0.elapsed() > Duration::from_secs(15) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_config(dir: &std::path::Path, body: &str) -> String {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

/// (a) A tiny ring buffer, an exec storm, and the agent itself stalled for
/// two seconds while a server keeps starting shells: the kernel refuses to
/// freeze what it cannot report, the watchdog releases what it froze, and
/// no shell is left stopped.
#[test]
fn tiny_ring_and_a_storm_leave_no_process_stopped() {
    let _g = serial();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg_dir.path(), "ring_buffer_bytes = 16384\n");
    let mut agent = Agent::start(&["-c", &cfg, "--no-capture"]);
    let _l = become_server(&agent);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The storm: processes that are not shells (not frozen), as fast as
    // two threads can start them.
    let storm: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = Command::new("/bin/true").status();
                    n += 1;
                }
                n
            })
        })
        .collect();
    // The agent stalls (as under CPU starvation) from 1.5 s to 3.5 s: the
    // ring fills and stays full.
    let agent_pid = agent.pid() as i32;
    let staller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        unsafe { libc::kill(agent_pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(2000));
        unsafe { libc::kill(agent_pid, libc::SIGCONT) };
    });
    // Shells started every 20 ms without waiting for one another (a
    // frozen one must not hold the others back), then each waited for.
    // Reaped round-robin all along, so each shell's lifetime is seen (to
    // 5 ms) when it ends.
    let mut longest = Duration::ZERO;
    let mut reap = |started: &mut Vec<(Instant, Child)>| {
        started.retain_mut(|(at, c)| match c.try_wait().unwrap() {
            Some(st) => {
                assert!(st.success());
                longest = longest.max(at.elapsed());
                false
            }
            None => true,
        })
    };
    let t0 = Instant::now();
    let mut started = Vec::new();
    let mut shells = 0;
    while t0.elapsed() < Duration::from_secs(6) {
        started.push((Instant::now(), shell("exit 0")));
        shells += 1;
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(5));
            reap(&mut started);
        }
    }
    let mut stuck = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.is_empty() {
        reap(&mut started);
        if Instant::now() > deadline {
            for (_, c) in &mut started {
                stuck.push(format!("pid {} in state {}", c.id(), state(c.id())));
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let storm_execs: u64 = storm.into_iter().map(|h| h.join().unwrap()).sum();
    staller.join().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let left = stopped_children();
    let frozen = metric_eventually(&agent, "vigil_frozen_total", 1.0);
    let no_room = metric_eventually(&agent, "vigil_freeze_refused_no_room_total", 1.0);
    let released = agent.metric("vigil_freeze_watchdog_released_total");
    eprintln!(
        "shells {shells}, storm execs {storm_execs}, frozen {frozen}, refused (no room) {no_room}, \
         watchdog released {released}, longest shell {longest:?}"
    );
    assert!(stuck.is_empty(), "shells left stopped: {stuck:?}");
    // The agent was stalled for 2 s: a shell frozen just before waited that
    // long (its record waits in the ring); nothing waits much longer.
    assert!(
        longest < Duration::from_secs(5),
        "a shell was held {longest:?}"
    );
    assert!(
        left.is_empty(),
        "processes of the test in state T: {left:?}"
    );
    assert!(frozen >= 1.0, "no shell was frozen: the test shows nothing");
    assert!(
        no_room >= 1.0,
        "no freeze was refused for lack of ring space: the storm did not fill the ring"
    );
    assert_eq!(agent.metric("vigil_resume_errors_total"), 0.0);
    let (st, _) = agent.stop();
    assert!(st.success());
}

/// (b) The agent is SIGKILLed while a process it froze is stopped: the
/// freeze outlives it; `vigil-agent resume-frozen` releases it, and so
/// does the next agent start.
#[test]
fn a_freeze_outlives_a_killed_agent_and_is_released_after() {
    let _g = serial();
    // The capture holds the frozen shell (a stall of 60 s with a deadline
    // of 120 s): the process stays stopped until the agent is killed.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg_dir.path(), "capture_deadline_ms = 120000\n");
    for how in ["resume-frozen", "next start"] {
        let mut agent =
            Agent::start_env(&["-c", &cfg], &[("VIGIL_FAULT_CAPTURE_STALL_MS", "60000")]);
        let capture_dir = agent.dir.path().join("capture");
        let _l = become_server(&agent);
        let m = marker("killed");
        let child = shell(&format!("echo {m}"));
        let pid = child.id();
        assert!(
            wait_stopped(pid, Duration::from_millis(1500), Duration::from_secs(20)),
            "{how}: the shell was not held stopped (state {})",
            state(pid)
        );
        agent.kill();
        std::thread::sleep(Duration::from_millis(1000));
        assert_eq!(
            state(pid),
            'T',
            "{how}: the freeze did not outlive the agent"
        );
        let t0 = Instant::now();
        let _next = match how {
            "resume-frozen" => {
                let out = Command::new(agent_bin())
                    .arg("--capture-dir")
                    .arg(&capture_dir)
                    .arg("resume-frozen")
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                let report: Value = serde_json::from_slice(&out.stdout).unwrap();
                let listed = |k: &str| {
                    report[k]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|p| p.as_u64() == Some(pid as u64)))
                };
                assert!(
                    listed("resumed_at_exec") || listed("resumed"),
                    "{how}: {report}"
                );
                None
            }
            _ => Some(Agent::start(&["--no-capture"])),
        };
        let out = wait_bounded(child, Duration::from_secs(20)).expect(how);
        eprintln!("{how}: released {:?} after it was started", t0.elapsed());
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), m, "{how}");
    }
}

/// (c) A capture that blocks (a read of the stopped process that never
/// returns, as on a stalled FUSE executable; injected here) is cut by its
/// deadline: the process runs on and the capture is reported as timed out.
#[test]
fn a_stuck_capture_is_released_by_its_deadline() {
    let _g = serial();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = write_config(cfg_dir.path(), "capture_deadline_ms = 1500\n");
    let agent = Agent::start_env(&["-c", &cfg], &[("VIGIL_FAULT_CAPTURE_STALL_MS", "30000")]);
    let _l = become_server(&agent);
    let m = marker("stuck");
    let t0 = Instant::now();
    let child = shell(&format!("echo {m}"));
    let pid = child.id();
    let out = wait_bounded(child, Duration::from_secs(25)).expect("the shell was never released");
    let held = t0.elapsed();
    eprintln!("stuck capture: the shell ran to its end {held:?} after it started");
    assert!(out.status.success());
    assert!(
        held < Duration::from_secs(20),
        "released by the stall's end, not the deadline: {held:?}"
    );
    assert!(metric_eventually(&agent, "vigil_capture_timeouts_total", 1.0) >= 1.0);
    // The outcome says so.
    let t1 = Instant::now();
    let line = loop {
        if let Some(l) = agent.evidence().into_iter().find(|e| {
            e["detection"]["process"]["pid"].as_u64() == Some(pid as u64)
                && e["error"].as_str().is_some_and(|s| s.contains("timed out"))
        }) {
            break l;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(15),
            "no timed-out outcome: {:?}",
            agent.evidence()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(line["timed_out"], true, "{line}");
}

/// The running agent keeps exactly the documented capabilities, in every
/// thread and every set, with no_new_privs.
#[test]
fn the_running_agent_keeps_only_its_documented_capabilities() {
    let _g = serial();
    // The code's list is the documented one.
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../SECURITY.md")).unwrap();
    let table = doc
        .split("<!-- capabilities")
        .nth(1)
        .and_then(|t| t.split("<!-- /capabilities -->").next())
        .expect("SECURITY.md has the capabilities table");
    let mut documented: Vec<String> = table
        .split('`')
        .filter(|w| w.starts_with("CAP_"))
        .map(String::from)
        .collect();
    let mut kept: Vec<String> = vigil_agent::privilege::KEPT
        .iter()
        .map(|(c, _)| c.to_string())
        .collect();
    documented.sort();
    kept.sort();
    assert_eq!(
        documented, kept,
        "SECURITY.md and agent/src/privilege.rs disagree"
    );

    let agent = Agent::start(&[]);
    // Probes answer (the event loop runs).
    for path in ["/healthz", "/readyz"] {
        let mut s = std::net::TcpStream::connect(&agent.metrics_addr).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
    }
    let want = format!("{:016x}", vigil_agent::privilege::runtime_mask());
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .unwrap()
        .flatten()
        .collect();
    assert!(tasks.len() > 1, "the agent runs threads");
    for t in tasks {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(field(set), want, "{set} of {}", t.path().display());
        }
        assert_eq!(field("CapInh:"), "0000000000000000");
        assert_eq!(field("CapAmb:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
    }
}

/// A flood: 1,000 execs of a binary in /tmp (each a medium detection that
/// asks for a capture), then a critical attack (a server starting a
/// reverse shell). The capture budgets and the disk budget hold, repeats
/// collapse, the drops are counted, the critical detection and its bundle
/// still reach the collector, and shipped archives leave the node.
#[test]
fn a_flood_stays_bounded_and_a_critical_attack_still_gets_through() {
    use std::os::fd::OwnedFd;
    use vigil_tests::collector::{init_pki, shipping_args, vigil_cli, Collector};
    let _g = serial();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    init_pki(&pki, "flood");
    let port = vigil_tests::free_port();
    let url = format!("https://127.0.0.1:{port}");
    // The collector runs as an unprivileged user (nobody), as deployed.
    let coll_dir = work.path().join("collector");
    std::fs::create_dir(&coll_dir).unwrap();
    let nobody = 65534;
    for p in [work.path(), coll_dir.as_path()] {
        std::os::unix::fs::chown(p, Some(nobody), Some(nobody)).unwrap();
    }
    let chown_tree = |p: &std::path::Path| {
        let st = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(p)
            .status()
            .unwrap();
        assert!(st.success());
    };
    chown_tree(&pki);
    let coll = Collector::start_as(port, &pki, &coll_dir.join("data"), nobody);
    let status = std::fs::read_to_string(format!("/proc/{}/status", coll.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    let budget_mib = 24u64;
    let cfg = write_config(
        work.path(),
        &format!(
            "capture_max_disk_mib = {budget_mib}\n\
             capture_budget_per_workload = 5\n\
             capture_budget_per_uid = 8\n\
             capture_budget_critical = 3\n\
             capture_max_core_mib = 16\n\
             aggregate_window_secs = 6\n"
        ),
    );
    // Shipped archives leave the node (the default): no --keep-shipped-mib.
    let mut args = shipping_args(&url, &pki, "flood", &work.path().join("spool"));
    let k = args.iter().position(|a| a == "--keep-shipped-mib").unwrap();
    args.drain(k..k + 2);
    args.extend(["-c".to_string(), cfg]);
    let agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let capture_dir = agent.dir.path().join("capture");

    // The flood: 50 programs in a temp directory, each run 20 times (a
    // distinct program is a distinct detection: the budgets bound those;
    // repeats of one collapse).
    let tmp = tempfile::Builder::new()
        .prefix("vigil-flood")
        .tempdir_in("/tmp")
        .unwrap();
    let progs: Vec<_> = (0..50)
        .map(|i| {
            let p = tmp.path().join(format!("worker{i}"));
            std::fs::copy("/bin/true", &p).unwrap();
            p
        })
        .collect();
    let t0 = Instant::now();
    for round in 0..20 {
        for p in &progs {
            assert!(Command::new(p).status().unwrap().success(), "round {round}");
        }
    }
    eprintln!("flood: 1000 execs in {:?}", t0.elapsed());

    // The attack: this process serves, and starts a shell whose stdin and
    // stdout are a TCP connection.
    let _l = become_server(&agent);
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let conn = std::net::TcpStream::connect(peer.local_addr().unwrap()).unwrap();
    let (_accepted, _) = peer.accept().unwrap();
    let m = marker("revshell");
    let mut sh = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("sleep 0.5; echo {m} >/dev/null"))
        .stdin(Stdio::from(OwnedFd::from(conn.try_clone().unwrap())))
        .stdout(Stdio::from(OwnedFd::from(conn)))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(sh.wait().unwrap().success());

    // Its bundle is sealed and reaches the collector.
    let t1 = Instant::now();
    let outcome = loop {
        if let Some(e) = agent.evidence().into_iter().find(|e| {
            e["detection"]["rule"] == "reverse_shell"
                && e["detection"]["process"]["argv"].to_string().contains(&m)
        }) {
            break e;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "no evidence outcome for the reverse shell: {:?}",
            agent.evidence().last()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let id = outcome["evidence"]["bundle_id"]
        .as_str()
        .unwrap_or_else(|| panic!("the critical capture failed: {outcome}"))
        .to_string();
    let blob = coll.blob(&id);
    let t2 = Instant::now();
    while !blob.exists() {
        assert!(
            t2.elapsed() < Duration::from_secs(60),
            "bundle {id} not stored"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The critical detection is stored at the collector.
    let t3 = Instant::now();
    loop {
        let out = vigil_cli(
            &url,
            &pki,
            &["detections", "list", "--json", "--limit", "1000"],
        );
        assert!(out.status.success(), "{out:?}");
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        if list.iter().any(|d| {
            d["detection"]["rule"] == "reverse_shell"
                && d["detection"]["process"]["argv"].to_string().contains(&m)
        }) {
            break;
        }
        assert!(
            t3.elapsed() < Duration::from_secs(60),
            "the reverse shell detection is not at the collector"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Shipped archives left the node.
    let archive = std::path::PathBuf::from(outcome["evidence"]["archive"].as_str().unwrap());
    let t4 = Instant::now();
    while archive.exists() {
        assert!(
            t4.elapsed() < Duration::from_secs(30),
            "the acknowledged archive is still on the node"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bounded, and counted.
    let used = vigil_agent::budget::disk_usage(&capture_dir);
    let refused = agent.metric("vigil_captures_refused_total{reason=\"workload_budget\"}")
        + agent.metric("vigil_captures_refused_total{reason=\"uid_budget\"}");
    let aggregated = agent.metric("vigil_detections_aggregated_total");
    let pruned = agent.metric("vigil_archives_pruned_total");
    let captures = agent.metric("vigil_captures_total");
    eprintln!(
        "flood: captures {captures}, refused by budget {refused}, detections aggregated {aggregated}, \
         archives pruned {pruned}, capture dir {used} bytes (budget {} bytes)",
        budget_mib << 20
    );
    assert!(used <= budget_mib << 20, "capture dir {used} bytes");
    // 50 programs x 3 reported occurrences asked; 5 (+3 critical) allowed.
    assert!(
        refused >= 100.0,
        "the budget did not hold: {refused} refused"
    );
    assert!(captures <= 5.0 + 3.0, "{captures} captures");
    assert!(
        aggregated >= 500.0,
        "repeats were not collapsed: {aggregated}"
    );
    assert!(pruned >= 1.0);
    // Each program's repeats reached the collector as one report that says
    // how many.
    let t5 = Instant::now();
    loop {
        let out = vigil_cli(
            &url,
            &pki,
            &[
                "detections",
                "list",
                "--json",
                "--search",
                "repeated",
                "--limit",
                "1000",
            ],
        );
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let reports = list
            .iter()
            .filter(|d| {
                d["detection"]["process"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.starts_with(&*tmp.path().to_string_lossy()))
                    && d["detection"]["summary"]
                        .as_str()
                        .is_some_and(|s| s.contains("repeated"))
            })
            .count();
        if reports >= 45 {
            break;
        }
        assert!(
            t5.elapsed() < Duration::from_secs(60),
            "repeat reports at the collector: {reports}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
