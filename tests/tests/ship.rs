//! Shipping end to end: the real agent ships detections and evidence
//! bundles to the real collector over mutual TLS, and keeps them in its
//! spool while the collector is down.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use vigil_tests::{agent_bin, free_port, marker, Agent};

/// The collector binaries: next to the agent binary, else built here.
/// One test at a time: every agent watches the whole machine, and these
/// tests count what each agent ships (another test's shell would be captured
/// and shipped too).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn collector_bin(name: &str) -> PathBuf {
    let dir = agent_bin().parent().unwrap().to_path_buf();
    let p = dir.join(name);
    if !p.exists() {
        let st = Command::new(env!("CARGO"))
            .args(["build", "-p", "vigil-collector", "--bins"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(st.success(), "building vigil-collector failed");
    }
    assert!(p.exists(), "{} not found", p.display());
    p
}

fn init_pki(dir: &Path, agent: &str) {
    let out = Command::new(collector_bin("vigil-collector"))
        .args(["init-pki", "--dir"])
        .arg(dir)
        .args(["--agent", agent, "--analyst", "analyst"])
        .output()
        .unwrap();
    assert!(out.status.success(), "init-pki: {out:?}");
}

struct Collector {
    child: Child,
    data: PathBuf,
}

impl Collector {
    fn start(port: u16, pki: &Path, data: &Path) -> Collector {
        let mut child = Command::new(collector_bin("vigil-collector"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data)
            .arg("--pki")
            .arg(pki)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning vigil-collector");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("listening on") => break,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    panic!("the collector did not start");
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Collector {
            child,
            data: data.to_path_buf(),
        }
    }

    fn blob(&self, id: &str) -> PathBuf {
        self.data.join("blobs/sha256").join(&id[..2]).join(&id[2..])
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vigil_cli(url: &str, pki: &Path, args: &[&str]) -> std::process::Output {
    Command::new(collector_bin("vigil"))
        .args(["--collector", url, "--pki"])
        .arg(pki)
        .args(["--name", "analyst"])
        .args(args)
        .output()
        .unwrap()
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
    let agent = Agent::start(&[
        "--collector",
        &url,
        "--collector-pki",
        &pki.to_string_lossy(),
        "--agent-name",
        "agent1",
        "--spool-dir",
        &spool.to_string_lossy(),
    ]);
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
    // The spool is empty once acknowledged.
    for _ in 0..100 {
        if agent.metric("vigil_spool_items") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.metric("vigil_spool_items"), 0.0);
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 1.0);
    assert!(agent.metric("vigil_ship_sent_total{kind=\"detection\"}") >= 1.0);
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
    let agent = Agent::start(&[
        "--collector",
        &url,
        "--collector-pki",
        &pki.to_string_lossy(),
        "--agent-name",
        "agent2",
        "--spool-dir",
        &spool.to_string_lossy(),
    ]);
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
    for _ in 0..100 {
        if agent.metric("vigil_spool_items") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.metric("vigil_spool_items"), 0.0, "spool drained");
    // Exactly once: one bundle upload acknowledged, one stored detection.
    assert_eq!(agent.metric("vigil_ship_sent_total{kind=\"bundle\"}"), 1.0);
    let dets = stored_detections(&url, &pki, &m);
    assert_eq!(dets.len(), 1, "{dets:?}");
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
    let mut agent = Agent::start(&[
        "--collector",
        &url,
        "--collector-pki",
        &other.to_string_lossy(),
        "--agent-name",
        "agent3",
        "--spool-dir",
        &spool.to_string_lossy(),
    ]);
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
