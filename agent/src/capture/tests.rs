//! End-to-end capture tests: real processes, real freeze, real files,
//! checked with gdb/readelf and the bundle verifier.

use std::path::Path;
use std::time::{Duration, Instant};

use super::bundle::{verify_bundle, verify_chain};
use super::testutil::{reap, spawn_child, spawn_sleeper, spawn_stopped_after_exec, thread_states};
use super::*;

fn capturer(root: &Path) -> Capturer {
    let (c, resumed) = Capturer::new(CaptureConfig::under(root, "agent-e2e")).unwrap();
    assert!(resumed.is_empty());
    c
}

/// Unpacks an archive into `dest` (for gdb/readelf on its files).
fn unpack(archive: &Path, dest: &Path) {
    let f = std::fs::File::open(archive).unwrap();
    let mut t = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    t.unpack(dest).unwrap();
}

/// The sleeping child of `sh -c 'sleep 30; exit $?'` (sh waits for it).
#[allow(clippy::zombie_processes)] // returned to the caller, which reaps it
fn shell_and_sleeper(marker: &str) -> (std::process::Child, i32) {
    let sh = std::process::Command::new("/bin/sh")
        .args(["-c", "sleep 30; exit $?"])
        .env("VIGIL_TEST_MARKER", marker)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let shpid = sh.id();
    let t0 = Instant::now();
    loop {
        let kids = std::fs::read_to_string(format!("/proc/{shpid}/task/{shpid}/children"))
            .unwrap_or_default();
        if let Some(k) = kids
            .split_whitespace()
            .next()
            .and_then(|k| k.parse::<i32>().ok())
        {
            if std::fs::read_link(format!("/proc/{k}/exe"))
                .map(|p| p.ends_with("sleep"))
                .unwrap_or(false)
            {
                return (sh, k);
            }
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let mut sh = sh;
            let _ = sh.kill();
            let _ = sh.wait();
            panic!("no sleep child");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn capture_process_end_to_end_resume() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let (mut sh, pid) = shell_and_sleeper("E2E");
    let shpid = sh.id() as i32;
    let req = CaptureRequest {
        start_time: Some(procutil::start_time(pid).unwrap()),
        detection: serde_json::json!({"rule": "test_rule", "severity": "high"}),
        ancestors: vec![shpid],
        timeline: vec![serde_json::json!({"type": "exec", "pid": pid})],
        contain: false,
        core: None,
        max_exe_bytes: None,
        stand_in_for: None,
    };
    let out = cap.capture_process(pid, &req).unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert!(!out.killed);
    let core = out.core.clone().unwrap();
    assert_eq!(core.threads, core.threads_with_registers);
    // Resumed, not left in the stopped list.
    std::thread::sleep(Duration::from_millis(50));
    assert!(thread_states(pid).iter().all(|s| *s != 'T'));
    assert!(cap.freezer().listed().is_empty());
    // Every step timed.
    let t = &out.timings;
    assert!(t.core_us > 0 && t.context_us > 0 && t.seal_us > 0 && t.total_us >= t.stopped_us);

    let v = verify_bundle(&out.archive).unwrap();
    assert_eq!(v.id.as_deref(), Some(out.bundle_id.as_str()));
    let m = &v.manifest;
    assert_eq!(m.seq, 1);
    assert_eq!(m.detection["rule"], "test_rule");
    assert_eq!(m.subject["pid"], pid);
    assert_eq!(m.agent.id, "agent-e2e");
    let names: Vec<&str> = m.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["core", "core-report.json", "exe", "context.json"]);
    assert!(m.times.monotonic_end_ns > m.times.monotonic_start_ns);

    // The artifacts, as an examiner would open them.
    let x = root.path().join("x");
    unpack(&out.archive, &x);
    let exe_sha = bundle::hash_file(&std::fs::canonicalize("/bin/sleep").unwrap())
        .unwrap()
        .0;
    assert_eq!(bundle::hash_file(&x.join("exe")).unwrap().0, exe_sha);
    let ctx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join("context.json")).unwrap()).unwrap();
    assert_eq!(ctx["subject"]["exe_sha256"], exe_sha);
    assert_eq!(ctx["subject"]["ppid"], shpid);
    assert_eq!(ctx["ancestry"][0]["pid"], shpid);
    assert_eq!(
        ctx["ancestry"][0]["cmdline"],
        serde_json::json!(["/bin/sh", "-c", "sleep 30; exit $?"])
    );
    assert!(ctx["ancestry"][0]["exe_sha256"].is_string());
    assert_eq!(ctx["timeline"][0]["type"], "exec");
    let core_bytes = std::fs::read(x.join("core")).unwrap();
    assert!(core_bytes
        .windows(21)
        .any(|w| w == b"VIGIL_TEST_MARKER=E2E"));
    let out2 = std::process::Command::new("readelf")
        .arg("-n")
        .arg(x.join("core"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out2.stdout).contains("NT_PRSTATUS"));

    // A second capture chains to the first.
    let out3 = cap
        .capture_process(pid, &CaptureRequest::default())
        .unwrap();
    assert_eq!(out3.seq, 2);
    verify_chain(&[out.archive.clone(), out3.archive.clone()]).unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = sh.kill();
    sh.wait().unwrap();
}

#[test]
fn capture_process_contain_kills() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let (mut sh, pid) = shell_and_sleeper("CONTAIN");
    let out = cap
        .capture_process(
            pid,
            &CaptureRequest {
                contain: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(out.killed);
    // The shell reports its child's death by SIGKILL (128 + 9).
    assert_eq!(sh.wait().unwrap().code(), Some(137));
    verify_bundle(&out.archive).unwrap();
}

#[test]
fn capture_process_deleted_executable_copied_before_kill() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let bin = root.path().join("dropper");
    std::fs::copy("/bin/sleep", &bin).unwrap();
    let mut child = std::process::Command::new(&bin).arg("30").spawn().unwrap();
    let pid = child.id() as i32;
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p != bin)
        .unwrap_or(true)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    std::fs::remove_file(&bin).unwrap();
    let out = cap
        .capture_process(
            pid,
            &CaptureRequest {
                contain: true,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    child.wait().unwrap();
    let x = root.path().join("x");
    unpack(&out.archive, &x);
    assert_eq!(
        std::fs::read(x.join("exe")).unwrap(),
        std::fs::read("/bin/sleep").unwrap()
    );
    let ctx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join("context.json")).unwrap()).unwrap();
    assert_eq!(ctx["subject"]["exe_deleted"], true);
    assert!(ctx["subject"]["exe"]
        .as_str()
        .unwrap()
        .ends_with("dropper (deleted)"));
}

#[test]
fn capture_process_refuses_recycled_pid() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let child = spawn_sleeper(0, "RECYCLE");
    let pid = child.id() as i32;
    let st = procutil::start_time(pid).unwrap();
    let r = cap.capture_process(
        pid,
        &CaptureRequest {
            start_time: Some(st + 7),
            ..Default::default()
        },
    );
    assert!(matches!(
        r,
        Err(CaptureError::Freeze(FreezeError::Recycled { .. }))
    ));
    assert!(thread_states(pid).iter().all(|s| *s != 'T'));
}

/// A process that dies after it was stopped but before its memory was read
/// (a writer done at once) is reported gone, with no empty bundle sealed:
/// the caller then captures its nearest living ancestor.
#[test]
fn capture_of_a_process_that_died_after_the_stop_is_gone_and_seals_nothing() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let child = spawn_sleeper(0, "VANISH");
    let pid = child.id() as i32;
    let frozen = cap.freezer().freeze(pid).unwrap();
    // SIGKILL ends even a stopped process; not reaped, it stays a zombie.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t0 = Instant::now();
    while !matches!(
        procutil::StatLine::read(Path::new(&format!("/proc/{pid}/stat"))).map(|s| s.state()),
        Ok('Z')
    ) {
        assert!(t0.elapsed() < Duration::from_secs(5), "no zombie");
        std::thread::sleep(Duration::from_millis(2));
    }
    let r = cap.capture_frozen(frozen, &CaptureRequest::default());
    assert!(
        matches!(r, Err(CaptureError::Freeze(FreezeError::Gone { .. }))),
        "{r:?}"
    );
    for sub in ["bundles", "work"] {
        let left: Vec<_> = std::fs::read_dir(root.path().join(sub))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    drop(child);
}

/// A process that exits 20 ms after its exec, frozen right after the exec
/// (as the kernel-side freeze will), is captured completely, then runs on
/// and exits normally.
#[test]
fn capture_process_short_lived_20ms() {
    let root = tempfile::tempdir().unwrap();
    let cap = capturer(root.path());
    let pid = spawn_stopped_after_exec(
        &["/bin/sleep", "0.02"],
        &["VIGIL_TEST_MARKER=SHORTLIVED", "PATH=/usr/bin:/bin"],
    );
    let t0 = Instant::now();
    let out = cap
        .capture_process(
            pid,
            &CaptureRequest {
                detection: serde_json::json!({"rule": "short"}),
                ..Default::default()
            },
        )
        .unwrap();
    let elapsed = t0.elapsed();
    assert!(out.freeze.already_stopped);
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    let core = out.core.clone().unwrap();
    assert!(core.dumped_bytes > 0);
    assert_eq!(core.threads_with_registers, 1);
    // It ran on and exited normally after the capture.
    match reap(pid) {
        nix::sys::wait::WaitStatus::Exited(_, 0) => {}
        s => panic!("{s:?}"),
    }
    let x = root.path().join("x");
    unpack(&out.archive, &x);
    let core_bytes = std::fs::read(x.join("core")).unwrap();
    let needle = b"VIGIL_TEST_MARKER=SHORTLIVED";
    assert!(core_bytes.windows(needle.len()).any(|w| w == needle));
    let sleep_sha = bundle::hash_file(Path::new("/bin/sleep")).unwrap().0;
    assert_eq!(bundle::hash_file(&x.join("exe")).unwrap().0, sleep_sha);
    let ctx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(x.join("context.json")).unwrap()).unwrap();
    assert_eq!(
        ctx["subject"]["cmdline"],
        serde_json::json!(["/bin/sleep", "0.02"])
    );
    // gdb opens it: the process is at its first instruction (in ld.so).
    let g = std::process::Command::new("gdb")
        .args(["-batch", "-nx", "-c"])
        .arg(x.join("core"))
        .arg("/bin/sleep")
        .args(["-ex", "info registers rip"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&g.stdout);
    assert!(text.contains("rip            0x"), "{text}");
    verify_bundle(&out.archive).unwrap();
    eprintln!(
        "short-lived capture: {:?} total, timings {:?}",
        elapsed, out.timings
    );
}

/// Measures a ~200 MB process (run: cargo test -p vigil-agent --release
/// capture_bench -- --ignored --nocapture).
#[test]
#[ignore = "benchmark: prints capture time, MB/s and compression ratio"]
fn capture_bench_200mb() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = CaptureConfig::under(root.path(), "agent-bench");
    if let Ok(l) = std::env::var("VIGIL_BENCH_ZSTD_LEVEL") {
        cfg.bundle.zstd_level = l.parse().unwrap();
    }
    println!("zstd level {}", cfg.bundle.zstd_level);
    let (cap, _) = Capturer::new(cfg).unwrap();
    let child = spawn_child(2, "BENCH", 200);
    let pid = child.id() as i32;
    let out = cap
        .capture_process(pid, &CaptureRequest::default())
        .unwrap();
    let core = out.core.clone().unwrap();
    let mb = core.size as f64 / (1 << 20) as f64;
    let t = &out.timings;
    println!(
        "core {:.1} MiB ({} dumped bytes) in {:.0} ms = {:.0} MiB/s; stopped {:.0} ms; \
         seal {:.0} ms; total {:.0} ms; archive {:.1} MiB of {:.1} MiB = ratio {:.2}; timings {:?}",
        mb,
        core.dumped_bytes,
        t.core_us as f64 / 1e3,
        mb / (t.core_us as f64 / 1e6),
        t.stopped_us as f64 / 1e3,
        t.seal_us as f64 / 1e3,
        t.total_us as f64 / 1e3,
        out.archive_size as f64 / (1 << 20) as f64,
        out.content_size as f64 / (1 << 20) as f64,
        out.content_size as f64 / out.archive_size as f64,
        t
    );
    // The same core again, to /dev/null: reading + hashing alone.
    let frozen = cap.freezer().freeze(pid).unwrap();
    let r = core::write_core(pid, Path::new("/dev/null"), &core::CoreOptions::default()).unwrap();
    frozen.resume().unwrap();
    println!(
        "core to /dev/null: {:.0} ms = {:.0} MiB/s (registers {} us)",
        r.elapsed_us as f64 / 1e3,
        r.size as f64 / (1 << 20) as f64 / (r.elapsed_us as f64 / 1e6),
        r.registers_us
    );
    let t0 = Instant::now();
    verify_bundle(&out.archive).unwrap();
    println!("verify {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    drop(child);
}
