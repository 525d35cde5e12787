//! Replays a synthetic storm through the agent's pipeline after the
//! kernel (state, JSON lines output, detection, reaction), as `cargo xtask
//! bench` makes one, and prints the agent's CPU per event:
//!
//! - `replay N` (or `replay N exec`): N processes, per process a fork, an
//!   exec and an exit, under one parent (`--workload exec`);
//! - `replay N write`: one process creating N new files
//!   (`--workload write`: a `file_open` event per file).
//!
//! Wall-clock figures on a shared machine are noisy; instruction counts
//! are not:
//!
//! ```text
//! cargo build --release -p vigil-agent --example replay
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/replay 20000
//! callgrind_annotate /tmp/cg.out | head -40
//! ```

use std::sync::Arc;
use std::time::Instant;

use vigil_agent::config::AgentConfig;
use vigil_agent::detect::baseline::Baseline;
use vigil_agent::detect::DetectEngine;
use vigil_agent::metrics::Metrics;
use vigil_agent::model::event::{Event, Exec, FileOpen, Payload, Stdio};
use vigil_agent::outputs::{JsonLinesSink, Sink};
use vigil_agent::pipeline::Pipeline;

/// The storm's parent (a load thread of the benchmark), far above real pids.
const PARENT: u32 = 3_000_000;

fn main() -> anyhow::Result<()> {
    let n: u32 = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 20_000,
    };
    let write = match std::env::args().nth(2).as_deref() {
        None | Some("exec") => false,
        Some("write") => true,
        Some(other) => anyhow::bail!("unknown storm {other:?}: exec or write"),
    };
    let cfg = AgentConfig::default();
    let metrics = Arc::new(Metrics::default());
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("events.jsonl");
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(JsonLinesSink::open(&out, metrics.clone())?)];
    // Learning, as a freshly started agent is (the bench's case).
    let learn_until = Some(Instant::now() + std::time::Duration::from_secs(3600));
    let engine = DetectEngine::new(
        Baseline::new(learn_until),
        None,
        vigil_agent::model::wall_offset_ns(),
    );
    let mut p = Pipeline::new(cfg.tree.build(), cfg.tree.workloads(), metrics, sinks)
        .with_detection(engine, None)
        .with_aggregation(cfg.detect.aggregation());

    let mut clock = vigil_agent::model::boot_ns_now();
    let mut event = |pid: u32, comm: &str, payload: Payload| {
        clock += 1_000;
        Event {
            boot_ns: clock,
            tid: pid,
            pid,
            uid: 0,
            gid: 0,
            start_boot_ns: clock,
            cgroup_id: 1,
            comm: comm.into(),
            payload,
        }
    };
    let exec = |ppid: u32, exe: &str, argv: &[&str]| {
        Payload::Exec(Exec {
            ppid,
            exe: exe.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            exe_ino: 4242,
            exe_dev: 2049,
            exe_size: 35_000,
            stdio: [Stdio::CharDevice; 3],
            ..Default::default()
        })
    };
    p.handle_event(event(
        PARENT,
        "bash",
        exec(
            1,
            "/usr/bin/bash",
            &["bash", "-c", "while :; do /bin/true; done"],
        ),
    ));
    let started = Instant::now();
    let cpu0 = cpu_ns();
    if write {
        // The writer: a child of the parent, as a load thread's process.
        let pid = PARENT + 1;
        p.handle_event(event(pid, "bash", Payload::Fork { ppid: PARENT }));
        p.handle_event(event(
            pid,
            "xtask",
            exec(PARENT, "/work/target/debug/xtask", &["xtask", "bench"]),
        ));
        for i in 0..n {
            p.handle_event(event(
                pid,
                "xtask",
                Payload::FileOpen(FileOpen {
                    path: format!("/dev/shm/vigil-bench/write-0/f{i}"),
                    // O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC
                    flags: 0o2001101,
                    mode: 0o100644,
                    ino: 100_000 + u64::from(i),
                    dev: 26,
                    io_uring: false,
                }),
            ));
        }
    }
    for i in (0..n).filter(|_| !write) {
        let pid = PARENT + 1 + i;
        p.handle_event(event(pid, "bash", Payload::Fork { ppid: PARENT }));
        p.handle_event(event(
            pid,
            "true",
            exec(PARENT, "/usr/bin/true", &["/bin/true"]),
        ));
        p.handle_event(event(
            pid,
            "true",
            Payload::Exit {
                exit_code: Some(0),
                signal: None,
            },
        ));
    }
    p.flush();
    let events = if write {
        u64::from(n) + 2
    } else {
        3 * u64::from(n)
    };
    let cpu = cpu_ns() - cpu0;
    println!(
        "{events} events in {:.2} s: {:.2} us of CPU per event, {} bytes of JSON lines",
        started.elapsed().as_secs_f64(),
        cpu as f64 / events as f64 / 1000.0,
        std::fs::metadata(&out)?.len()
    );
    Ok(())
}

/// This process's CPU time (user + system), ns.
fn cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
