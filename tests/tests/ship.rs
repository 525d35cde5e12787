//! Shipping end to end: the real agent ships detections and evidence
//! bundles to the real collector over mutual TLS, and keeps them in its
//! spool while the collector is down.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vigil_tests::collector::{init_pki, shipping_args, vigil_cli, Collector};
use vigil_tests::{free_port, marker, Agent};

/// One test at a time: every agent watches the whole machine, and these
/// tests count what each agent ships (another test's shell would be captured
/// and shipped too).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server (this test process, listening) starting a shell: frozen,
/// detected, captured. Returns the evidence outcome line.
fn trigger_capture(agent: &Agent, m: &str) -> Value {
    let me = std::process::id() as u64;
    use vigil_tests::EventExt;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    let st = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("sleep 0.3; echo {m} >/dev/null"))
        .status()
        .unwrap();
    assert!(st.success());
    for _ in 0..300 {
        if let Some(e) = agent
            .evidence()
            .into_iter()
            .find(|e| e["detection"]["process"]["argv"].to_string().contains(m))
        {
            return e;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no evidence outcome for {m}");
}

fn wait_for_file(p: &Path, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if p.exists() {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn stored_detections(url: &str, pki: &Path, m: &str) -> Vec<Value> {
    let out = vigil_cli(url, pki, &["detections", "list", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter()
        .filter(|d| d["detection"]["process"]["argv"].to_string().contains(m))
        .collect()
}

/// The incident of stored detection `det` once its timeline has an exec
/// whose parent is `pid` and it lists evidence (waits up to 90 s: held
/// events wait for the shipper's back-off; returns what it last saw).
fn incident_with_child_exec(url: &str, pki: &Path, det: &Value, pid: u64) -> Value {
    let incident = det["incident_id"].to_string();
    let mut detail = Value::Null;
    for _ in 0..450 {
        let out = vigil_cli(url, pki, &["incidents", "show", &incident, "--json"]);
        assert!(out.status.success(), "{out:?}");
        detail = serde_json::from_slice(&out.stdout).unwrap();
        let has_child = detail["events"].as_array().is_some_and(|evs| {
            evs.iter()
                .any(|e| e["type"] == "exec" && e["ppid"].as_u64() == Some(pid))
        });
        if has_child && detail["evidence"].as_array().is_some_and(|e| !e.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    detail
}

/// The agent under test, shipping to `url` as `name` with its spool in
/// `spool`.
fn shipping_agent(url: &str, pki: &Path, name: &str, spool: &Path) -> Agent {
    let args = shipping_args(url, pki, name, spool);
    Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Waits (at most 10 s) until the agent's spool is empty.
fn wait_spool_empty(agent: &Agent) {
    for _ in 0..100 {
        if agent.metric("vigil_spool_items") == 0.0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64
}

#[test]
fn detection_and_bundle_reach_the_collector() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    init_pki(&pki, "agent1");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let coll = Collector::start(port, &pki, &work.path().join("data"));
    let spool = work.path().join("spool");
    // Every output the agent can write, for the mode walk at the end (in a
    // directory the agent creates).
    let outputs = work.path().join("out");
    let mut args = shipping_args(&url, &pki, "agent1", &spool);
    for (flag, name) in [
        ("--detections-json", "detections.jsonl"),
        ("--baseline-file", "baseline.json"),
    ] {
        args.push(flag.into());
        args.push(outputs.join(name).to_string_lossy().into_owned());
    }
    let mut agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = marker("ship");
    let ev = trigger_capture(&agent, &m);
    let id = ev["evidence"]["bundle_id"].as_str().unwrap().to_string();
    let archive = PathBuf::from(ev["evidence"]["archive"].as_str().unwrap());
    let blob = coll.blob(&id);
    let stored_at = wait_for_file(&blob, Duration::from_secs(30))
        .map(|_| SystemTime::now())
        .expect("the bundle reached the collector within 30 s");
    // Latency: from the detection's event time to the bundle being stored.
    let det_time = vigil_proto::json::parse_time(&ev["detection"]["time"]).expect("detection time");
    let latency_ms = (unix_nanos(stored_at) - det_time) / 1_000_000;
    eprintln!(
        "exec-to-evidence-stored latency: {latency_ms} ms (capture timings: {}; ship errors: {})",
        ev["evidence"]["timings"],
        agent.metric("vigil_ship_errors_total")
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        std::fs::read(&archive).unwrap(),
        "stored bundle is byte-identical"
    );
    // The analyst CLI fetches the same bytes.
    let got = work.path().join("got.zst");
    let out = vigil_cli(
        &url,
        &pki,
        &["evidence", "get", &id, "-o", &got.to_string_lossy(), "-q"],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(&archive).unwrap()
    );
    // The detection is listed.
    let mut dets = Vec::new();
    for _ in 0..100 {
        dets = stored_detections(&url, &pki, &m);
        if !dets.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dets.len(), 1, "{dets:?}");
    assert_eq!(dets[0]["agent"], "agent1");
    // The incident shows the bundle (linked from its manifest) and the
    // shell's own events (shipped best effort): its child `sleep`.
    let shell_pid = ev["detection"]["process"]["pid"].as_u64().unwrap();
    let detail = incident_with_child_exec(&url, &pki, &dets[0], shell_pid);
    let evidence = detail["evidence"].as_array().unwrap();
    assert_eq!(evidence.len(), 1, "{detail}");
    assert_eq!(evidence[0]["bundle_id"], id);
    assert_eq!(evidence[0]["pid"].as_u64(), Some(shell_pid));
    assert_eq!(evidence[0]["chain"], "first");
    // Committed to when sealed, before its upload.
    assert_eq!(evidence[0]["commitment"], "committed", "{detail}");
    assert!(
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "exec" && e["ppid"].as_u64() == Some(shell_pid)),
        "the shell's child exec is in the incident's timeline: {detail}"
    );
    assert!(agent.metric("vigil_ship_sent_total{kind=\"event\"}") > 0.0);
    // The spool is empty once acknowledged.
    wait_spool_empty(&agent);
    assert_eq!(agent.metric("vigil_spool_items"), 0.0);
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 1.0);
    assert!(agent.metric("vigil_ship_sent_total{kind=\"detection\"}") >= 1.0);

    // The collector's receipt stays on the node: logged in the spool, and
    // next to the kept archive with the agent's signature, so that the node
    // proves offline that it signed these bytes and the collector stored
    // them.
    assert_eq!(
        agent.metric("vigil_evidence_receipts_total{reason=\"verified\"}"),
        1.0
    );
    let log = std::fs::read_to_string(spool.join("receipts.jsonl")).expect("the receipt log");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(lines[0]["verified"], true, "{log}");
    assert_eq!(lines[0]["receipt"]["bundle_id"], id.as_str());
    assert_eq!(lines[0]["receipt"]["agent"], "agent1");
    assert_eq!(lines[0]["receipt"]["chain"], "first");
    let out = vigil_cli(
        &url,
        &pki,
        &[
            "evidence",
            "verify",
            "--offline",
            &archive.to_string_lossy(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("OK   signed by agent agent1"), "{text}");
    assert!(
        text.contains("OK   receipt: stored by the collector from agent agent1, seq "),
        "{text}"
    );

    // Evidence and state are private: everything the agent wrote (capture
    // work, bundles, chain and freeze state, events, evidence, detections,
    // baseline, spool) and the collector wrote (database and its -wal/-shm,
    // blobs, partial uploads) is the running user's only.
    let (st, _) = agent.stop();
    assert!(st.success(), "{st:?}");
    assert!(
        outputs.join("baseline.json").exists(),
        "baseline saved at exit"
    );
    assert!(agent.dir.path().join("capture/state/chain.json").exists());
    assert!(coll.data.join("vigil.db-wal").exists());
    let mut seen = 0;
    // (The agent's temp dir itself is the test's.)
    let a = agent.dir.path();
    for root in [
        &a.join("capture"),
        &a.join("events.jsonl"),
        &a.join("evidence.jsonl"),
        &outputs,
        &spool,
        &coll.data,
    ] {
        seen += assert_private(root);
    }
    assert!(seen >= 12, "walked {seen} paths");
}

/// Walks `root` (not following links): directories must be 0700, files
/// 0600 (complete collector blobs are 0400, read-only by design). Returns
/// how many paths were checked. Nothing else (sockets, FIFOs, links) is
/// expected there: any is a failure.
fn assert_private(root: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.mode() & 0o7777;
        n += 1;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "directory {} is {mode:04o}", p.display());
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else if meta.is_file() {
            assert!(
                mode == 0o600 || (mode == 0o400 && p.starts_with(root.join("blobs"))),
                "file {} is {mode:04o}",
                p.display()
            );
        } else {
            panic!("{} is neither a file nor a directory", p.display());
        }
        assert_eq!(meta.uid(), unsafe { libc::geteuid() }, "{}", p.display());
    }
    n
}

/// The agent refuses (exit 2, the path and the reason on stderr) a capture
/// directory anyone could write to, or a symbolic link; so does the
/// collector for its data directory. Nothing is loaded before the check.
#[test]
fn unsafe_directories_are_refused_at_start() {
    // Its agents and collectors are children of this (listening) test
    // process: while another test's agent watches, they must not run.
    let _serial = serial();
    vigil_tests::require_root();
    use std::os::unix::fs::PermissionsExt;
    let work = tempfile::tempdir().unwrap();
    let open = work.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let real = work.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = work.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let refused = |cmd: &mut Command, dir: &Path, why: &str| {
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", dir.display());
        assert!(
            err.contains(&dir.display().to_string()) && err.contains(why),
            "{err}"
        );
    };
    for (dir, why) in [
        (&open, "writable by group or others (mode 0777)"),
        (&link, "symbolic link"),
    ] {
        refused(
            Command::new(vigil_tests::agent_bin())
                .arg("--capture-dir")
                .arg(dir),
            dir,
            why,
        );
        refused(
            Command::new(vigil_tests::collector::collector_bin("vigil-collector"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir),
            dir,
            why,
        );
    }
    // Left as they were.
    assert_eq!(
        std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777,
        0o777
    );
    assert!(std::fs::read_dir(&real).unwrap().next().is_none());
}

#[test]
fn spooled_bundle_arrives_once_the_collector_is_up() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    init_pki(&pki, "agent2");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let spool = work.path().join("spool");
    // Collector down: nothing listens on `port`.
    let agent = shipping_agent(&url, &pki, "agent2", &spool);
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = marker("spool");
    let ev = trigger_capture(&agent, &m);
    let id = ev["evidence"]["bundle_id"].as_str().unwrap().to_string();
    let archive = PathBuf::from(ev["evidence"]["archive"].as_str().unwrap());
    // Waits in the spool.
    let mut spooled = false;
    for _ in 0..100 {
        spooled = std::fs::read_dir(&spool)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().contains(&id));
        if spooled {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(spooled, "the bundle is in the spool");
    assert!(agent.metric("vigil_ship_errors_total") >= 1.0);
    assert!(agent.metric("vigil_spool_items") >= 1.0);

    let coll = Collector::start(port, &pki, &work.path().join("data"));
    let blob = coll.blob(&id);
    assert!(
        wait_for_file(&blob, Duration::from_secs(60)).is_some(),
        "the spooled bundle reached the collector"
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        std::fs::read(&archive).unwrap()
    );
    wait_spool_empty(&agent);
    assert_eq!(agent.metric("vigil_spool_items"), 0.0, "spool drained");
    // Exactly once: one bundle upload acknowledged, one stored detection.
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 1.0);
    let dets = stored_detections(&url, &pki, &m);
    assert_eq!(dets.len(), 1, "{dets:?}");
    // Events of the outage were held in memory and arrived too.
    let shell_pid = ev["detection"]["process"]["pid"].as_u64().unwrap();
    let detail = incident_with_child_exec(&url, &pki, &dets[0], shell_pid);
    assert!(
        detail["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "exec" && e["ppid"].as_u64() == Some(shell_pid)),
        "events from the outage reached the collector: {detail}"
    );
}

#[test]
fn a_foreign_certificate_is_refused_and_items_stay_spooled() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    // The collector trusts one CA; the agent's certificate is from another.
    let pki = work.path().join("pki");
    init_pki(&pki, "agent3");
    let other = work.path().join("other");
    init_pki(&other, "agent3");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let _coll = Collector::start(port, &pki, &work.path().join("data"));
    let spool = work.path().join("spool");
    let mut agent = shipping_agent(&url, &other, "agent3", &spool);
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = marker("foreign");
    let ev = trigger_capture(&agent, &m);
    let id = ev["evidence"]["bundle_id"].as_str().unwrap().to_string();
    let mut errors = 0.0;
    for _ in 0..100 {
        errors = agent.metric("vigil_ship_errors_total");
        if errors >= 1.0 && agent.metric("vigil_spool_items") >= 2.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(errors >= 1.0, "the refusal is counted");
    assert!(
        agent.metric("vigil_spool_items") >= 2.0,
        "detection and bundle kept"
    );
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 0.0);
    assert!(std::fs::read_dir(&spool)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains(&id)));
    assert!(stored_detections(&url, &pki, &m).is_empty());
    let (_, log) = agent.stop();
    let refused: Vec<_> = log
        .iter()
        .filter(|l| l.contains("check the agent certificate"))
        .collect();
    eprintln!("{}", refused.first().map(|s| s.as_str()).unwrap_or(""));
    assert!(!refused.is_empty(), "a clear error is logged: {log:?}");
}

/// The collector accepts bundles up to 2 KiB: a real one is larger. It is
/// refused for good (not retried forever), set aside intact in the spool's
/// `rejected/`, counted; the detection still arrives.
#[test]
fn an_oversized_bundle_is_set_aside_not_retried() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    init_pki(&pki, "agent4");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let _coll = Collector::start_with(
        port,
        &pki,
        &work.path().join("data"),
        &["--max-bundle-bytes", "2048"],
    );
    let spool = work.path().join("spool");
    let agent = shipping_agent(&url, &pki, "agent4", &spool);
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let m = marker("oversized");
    let ev = trigger_capture(&agent, &m);
    let id = ev["evidence"]["bundle_id"].as_str().unwrap().to_string();
    let archive = PathBuf::from(ev["evidence"]["archive"].as_str().unwrap());
    assert!(std::fs::metadata(&archive).unwrap().len() > 2048);
    let rejected = spool.join("rejected");
    // The spooled archive (`SEQ.ID.tar.zst`) is set aside; its signature
    // (`SEQ.ID.tar.zst.sig`) goes along with it.
    let find = |suffix: &str| {
        std::fs::read_dir(&rejected).ok().and_then(|rd| {
            rd.filter_map(Result::ok).map(|e| e.path()).find(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                n.contains(&id) && n.ends_with(suffix)
            })
        })
    };
    let mut kept = None;
    for _ in 0..300 {
        kept = find(".tar.zst");
        if kept.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let kept = kept.unwrap_or_default();
    assert!(
        kept.exists(),
        "the refused bundle is set aside in rejected/: {:?}",
        std::fs::read_dir(&rejected)
            .map(|rd| rd
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .collect::<Vec<_>>())
            .unwrap_or_default()
    );
    assert!(
        std::fs::read(&kept).unwrap() == std::fs::read(&archive).unwrap(),
        "the set-aside archive is intact"
    );
    assert!(
        find(".tar.zst.sig").is_some(),
        "its signature is kept with it"
    );
    assert_eq!(agent.metric("vigil_ship_rejected_total"), 1.0);
    // Not retried: the queue moved on, the detection is stored.
    let mut dets = Vec::new();
    for _ in 0..100 {
        dets = stored_detections(&url, &pki, &m);
        if !dets.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(dets.len(), 1);
    wait_spool_empty(&agent);
    assert_eq!(agent.metric("vigil_spool_items"), 0.0);
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 0.0);
}

/// A tmpfs of `kib` KiB mounted at `dir` (unmounted on drop); its root is
/// 0700 (a tmpfs is 1777 by default, which the agent refuses as a capture
/// directory).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, kib: u64) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "vigil-test",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs at {}", dir.display());
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The capture directory is full: the capture fails (or drops what does not
/// fit) with a clear error, counted; the frozen process is released; no
/// half-written archive is left and the chain of custody is not advanced
/// past a bundle that does not exist. Once space is back, the next bundle
/// verifies and chains on.
#[test]
fn a_full_capture_disk_gives_clear_errors_and_corrupts_nothing() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let cap_dir = work.path().join("capture");
    let _fs = SmallFs::mount(&cap_dir, 64 << 10);
    let agent = Agent::start(&["--capture-dir", &cap_dir.to_string_lossy()]);
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id() as u64;
    use vigil_tests::EventExt;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    // Fill the file system.
    let filler = cap_dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();

    let m = marker("full");
    let t0 = Instant::now();
    let st = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("sleep 0.3; echo {m} >/dev/null"))
        .status()
        .unwrap();
    // Released: the frozen shell ran to its end.
    assert!(st.success());
    assert!(t0.elapsed() < Duration::from_secs(30));
    let mut line = None;
    for _ in 0..300 {
        line = agent
            .evidence()
            .into_iter()
            .find(|e| e["detection"]["process"]["argv"].to_string().contains(&m));
        if line.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = line.expect("an evidence outcome for the capture");
    eprintln!("outcome on a full disk: {line}");
    let text = line.to_string();
    assert!(
        text.contains("No space left on device"),
        "the error names the cause: {text}"
    );
    if line.get("error").is_some() {
        assert!(agent.metric("vigil_capture_errors_total") >= 1.0);
    }
    // No half-written archive.
    assert!(
        !files(&cap_dir).iter().any(|f| f.contains(".sealing-")),
        "{:?}",
        files(&cap_dir)
    );
    let first: Option<PathBuf> = line["evidence"]["archive"].as_str().map(PathBuf::from);
    if let Some(a) = &first {
        vigil_agent::capture::bundle::verify_bundle(a).unwrap();
    }

    // Space back: the next capture seals and chains on from the last
    // bundle that exists.
    std::fs::remove_file(&filler).unwrap();
    let m2 = marker("space-back");
    let ev = trigger_capture(&agent, &m2);
    let second = PathBuf::from(ev["evidence"]["archive"].as_str().expect("sealed"));
    let v = vigil_agent::capture::bundle::verify_bundle(&second).unwrap();
    match first {
        Some(first) => {
            vigil_agent::capture::bundle::verify_chain(&[first, second]).unwrap();
        }
        None => assert_eq!(v.manifest.seq, 1, "no bundle was sealed before"),
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The collector is SIGKILLed in the middle of the agent's upload of a
/// large bundle and restarted: the agent resumes where the collector's kept
/// prefix ends (it does not start over), and the stored bundle is
/// byte-identical; no corrupt blob at any point.
#[test]
fn collector_killed_mid_upload_the_agent_resumes() {
    let _serial = serial();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    init_pki(&pki, "agent5");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let data = work.path().join("data");
    let coll = Collector::start(port, &pki, &data);
    let spool = work.path().join("spool");
    let agent = shipping_agent(&url, &pki, "agent5", &spool);
    // A process holding 160 MiB of random bytes writes a persistence file:
    // detected, captured with its memory (a bundle of about that size).
    let home = work.path().join("home/u");
    std::fs::create_dir_all(&home).unwrap();
    let m = marker("big");
    let mut py = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os,time\nb=os.urandom(160<<20)\nopen({:?},'a').write('# {m}')\ntime.sleep(30)",
            home.join(".bashrc").to_string_lossy()
        ))
        .spawn()
        .unwrap();
    let pid = py.id() as u64;
    let mut ev = None;
    for _ in 0..600 {
        ev = agent
            .evidence()
            .into_iter()
            .find(|e| e["detection"]["process"]["pid"].as_u64() == Some(pid));
        if ev.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = py.kill();
    let _ = py.wait();
    let ev = ev.expect("the big process was captured");
    let id = ev["evidence"]["bundle_id"]
        .as_str()
        .unwrap_or_else(|| panic!("capture failed: {ev}"))
        .to_string();
    let archive = PathBuf::from(ev["evidence"]["archive"].as_str().unwrap());
    let size = std::fs::metadata(&archive).unwrap().len();
    assert!(size > 100 << 20, "bundle of {size} bytes");

    // Kill the collector once part of the bundle is held.
    let partial = data.join("partial");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut held = 0;
    while Instant::now() < deadline {
        held = std::fs::read_dir(&partial)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        if held > 8 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(held > 8 << 20, "the upload started");
    coll.kill();
    assert!(
        !coll_blob(&data, &id).exists(),
        "killed before the upload completed (raise the bundle size)"
    );
    std::thread::sleep(Duration::from_secs(2));
    let maddr = format!("127.0.0.1:{}", free_port());
    let coll = Collector::start_with(port, &pki, &data, &["--metrics-addr", &maddr]);
    let blob = coll.blob(&id);
    assert!(
        wait_for_file(&blob, Duration::from_secs(120)).is_some(),
        "the upload completed after the restart"
    );
    assert_eq!(
        std::fs::read(&blob).unwrap(),
        std::fs::read(&archive).unwrap()
    );
    // Resumed, not restarted: this collector received less than the whole.
    let metrics = http_get(&maddr, "/metrics");
    let after: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("vigil_collector_ingested_bytes_total{stream=\"evidence\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no evidence bytes metric in:\n{metrics}"));
    eprintln!(
        "bundle {size} bytes; held at the kill >= {held}; received after the restart {after}"
    );
    assert!(
        after < size as f64,
        "resumed: {after} of {size} bytes after the restart"
    );
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 1.0);
}

fn coll_blob(data: &Path, id: &str) -> PathBuf {
    data.join("blobs/sha256").join(&id[..2]).join(&id[2..])
}
