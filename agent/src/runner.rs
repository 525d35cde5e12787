//! Wires the agent together and runs it until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::config::AgentConfig;
use crate::detect::baseline::Baseline;
use crate::detect::sigma::SigmaRules;
use crate::detect::DetectEngine;
use crate::metrics::{self, Metrics};
use crate::outputs::{JsonLinesSink, Sink};
use crate::pipeline::Pipeline;
use crate::respond::Responder;
use crate::sensor::Sensor;

/// Most records handled per drain before other work gets a turn.
const DRAIN_BUDGET: usize = 8192;

/// The privileged part of the start, done: programs loaded and attached,
/// the ledger pinned. Made by [`prepare`] on a single thread, before the
/// capabilities are dropped; [`run`] goes on from here.
pub struct Prepared {
    cfg: AgentConfig,
    metrics: Arc<Metrics>,
    sinks: Vec<Box<dyn Sink>>,
    sensor: Sensor,
    ledger: crate::frozen::FreezeLedger,
}

/// Everything that needs full root: releases what a dead agent left frozen,
/// reads BTF, loads and attaches the programs, pins the ledger. Starts no
/// thread (capabilities are per thread: see [`crate::privilege`]).
pub fn prepare(cfg: AgentConfig) -> anyhow::Result<Prepared> {
    cfg.validate()?;
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "vigil-agent must run as root: loading eBPF programs needs CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN"
        );
    }
    let btf = crate::btf::load_kernel_btf(cfg.sensor.btf_path.as_deref())?;
    let offsets = crate::btf::resolve_offsets(&btf)?;
    let uring = crate::btf::resolve_uring(&btf).map_err(|e| format!("{e}"));
    drop(btf);

    let metrics = Arc::new(Metrics::default());
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(p) = &cfg.outputs.events_json {
        sinks.push(Box::new(
            JsonLinesSink::open(p, metrics.clone())?
                .with_ancestry_argv(cfg.outputs.events_ancestry_argv),
        ));
    }

    // What a dead agent left frozen is released before anything else.
    match crate::frozen::resume_leftovers(&cfg.sensor.bpf_pin_dir, false) {
        Ok(r) if !r.resumed.is_empty() || !r.resumed_at_exec.is_empty() => {
            tracing::warn!(resumed = ?r.resumed, at_exec = ?r.resumed_at_exec, "released what a previous agent left frozen")
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "reading earlier frozen-process ledgers failed")
        }
    }

    // Attach first, then scan /proc: a process born in between is in the
    // ring buffer, so nothing falls in the gap.
    let options = cfg
        .sensor
        .options(offsets, uring, cfg.contain.denies_connects()?)?;
    let mut sensor = Sensor::load(&options)?;
    metrics.set_hooks(&sensor.hooks);
    metrics.set_paths(&sensor.paths);
    let (frozen_map, pin) = match sensor.frozen.take() {
        Some((m, pin)) => (Some(m), pin),
        None => (None, None),
    };
    let ledger =
        crate::frozen::FreezeLedger::new(frozen_map, pin, cfg.sensor.ledger(), metrics.clone());
    Ok(Prepared {
        cfg,
        metrics,
        sinks,
        sensor,
        ledger,
    })
}

/// Runs the prepared agent until a termination signal.
pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        cfg,
        metrics,
        mut sinks,
        sensor,
        ledger,
    } = prepared;
    ledger.start_watchdog()?;
    let deny_list = sensor.deny.clone();

    let mut tree = cfg.tree.build();
    let mut workloads = cfg.tree.workloads();
    let n = crate::procscan::bootstrap(&mut tree, &mut workloads).context("scanning /proc")?;
    info!(processes = n, "process tree bootstrapped from /proc");
    let archives = cfg.capture.enabled.then(|| cfg.capture.dir.join("bundles"));
    let shipper = match cfg.ship.options(archives, cfg.capture.keep_shipped_mib) {
        Some(opts) => Some(crate::ship::Shipper::start(opts, metrics.clone())?),
        None => None,
    };
    // Ordinary events: the shipper's best-effort lane.
    if let (true, Some(s)) = (cfg.ship.events, &shipper) {
        sinks.push(Box::new(s.event_sink()));
    }
    let mut pipeline =
        Pipeline::new(tree, workloads, metrics.clone(), sinks).with_ledger(ledger.clone());
    // Detections and bundles reach the collector through outputs::Forward:
    // no stage before `ship` names it.
    let forward = shipper
        .clone()
        .map(|s| Arc::new(s) as Arc<dyn crate::outputs::Forward>);
    if let Some(f) = &forward {
        pipeline = pipeline.with_forward(f.clone());
    }
    if cfg.detect.enabled {
        let engine = build_detection(&cfg.detect)?;
        let out = match &cfg.outputs.detections_json {
            Some(p) => Some(JsonLinesSink::open(p, metrics.clone())?),
            None => None,
        };
        pipeline = pipeline
            .with_detection(engine, out)
            .with_aggregation(cfg.detect.aggregation());
        // Containment (opt-in): its actions reported from the pipeline and
        // from the capture worker alike.
        let actions = match cfg.contain.policy()? {
            Some(policy) => {
                let policy = policy.sparing_peers(cfg.sensor.bpf_pin_dir.clone());
                let log = crate::contain::ActionLog::open(
                    cfg.outputs.actions_json.as_deref(),
                    metrics.clone(),
                )?;
                info!(dry_run = cfg.contain.dry_run, action = %cfg.contain.action, "containment on");
                pipeline = pipeline.with_containment(policy, log.clone(), deny_list.clone());
                Some(log)
            }
            None => None,
        };
        if cfg.capture.enabled {
            // The certificate name when shipping (the collector binds a
            // signed bundle's agent id to the certificate that uploads
            // it), else the host name.
            let agent_id = match &cfg.ship.agent_name {
                Some(name) if cfg.ship.collector.is_some() => name.clone(),
                _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "vigil-agent".into()),
            };
            let mut response = cfg.capture.response(
                agent_id,
                cfg.outputs.evidence_json.clone(),
                forward.clone(),
                actions.clone(),
            )?;
            // Other agents pin their ledgers where this one does.
            response.peer_pin_dir = Some(cfg.sensor.bpf_pin_dir.clone());
            let responder = Responder::start(response, ledger.clone(), metrics.clone())?;
            pipeline = pipeline.with_responder(responder);
        }
    }
    let mut last_save = Instant::now();

    let metrics_task = match cfg.outputs.metrics_addr {
        Some(addr) => {
            // Bound here, before "ready": a bad address is a startup
            // error, and a scrape right after "ready" finds the listener.
            let registry = metrics.registry();
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding metrics address {addr}"))?;
            Some(tokio::spawn(metrics::serve(
                listener,
                registry,
                metrics.clone(),
            )))
        }
        None => None,
    };

    let (ring, mut sensor) = sensor.into_parts();
    sensor.mark_servers(
        crate::procscan::listening_pids()
            .into_iter()
            .filter(|&p| p != std::process::id()),
    );
    let mut ring = Ring::Resting(ring);
    ring.arm()
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with the runtime: {e}"))?;
    let mut poll = tokio::time::interval(Duration::from_millis(cfg.sensor.poll_interval_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A rest as long as the poll interval is the poll interval.
    let rest = Duration::from_millis(
        cfg.sensor
            .min_wakeup_interval_ms
            .min(cfg.sensor.poll_interval_ms),
    );
    let rest_over = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(rest_over);
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    metrics.health.drained();
    metrics.health.set_ready(true);
    info!("vigil-agent running");
    eprintln!("vigil-agent: ready");

    loop {
        tokio::select! {
            guard = ring.woken(), if ring.is_armed() => {
                let mut guard = guard?;
                let emptied = drain(guard.get_inner_mut(), &mut pipeline);
                if emptied {
                    guard.clear_ready();
                } else {
                    // Records left behind (the drain's budget): no wakeup
                    // comes for those, so the next turn drains again.
                    guard.retain_ready();
                }
                drop(guard);
                metrics.health.drained();
                if emptied && !rest.is_zero() {
                    ring.rest();
                    rest_over.as_mut().reset(tokio::time::Instant::now() + rest);
                }
            }
            () = &mut rest_over, if !ring.is_armed() => {
                if let Err(e) = ring.arm() {
                    // Still drained by the poll tick; tried again later.
                    tracing::warn!(error = %e, "registering the ring buffer with the runtime failed; draining every poll_interval_ms until it works");
                    rest_over.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            _ = poll.tick() => {
                drain(ring.get_mut(), &mut pipeline);
                pipeline.flush();
                metrics.health.drained();
            }
            _ = housekeeping.tick() => {
                sensor.heartbeat();
                pipeline.tick(Instant::now());
                if last_save.elapsed() >= Duration::from_secs(60) {
                    save_baseline(&cfg.detect, &mut pipeline);
                    last_save = Instant::now();
                }
                read_kernel_counters(&sensor, &metrics);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    metrics.health.set_ready(false);
    info!("shutting down: draining the ring buffer and detaching");
    // No new freezes from here on; every process frozen so far is in the ring
    // buffer and gets resumed by the drains below.
    sensor.stop_freezing();
    drain_all(ring.get_mut(), &mut pipeline);
    read_kernel_counters(&sensor, &metrics);
    pipeline.flush();
    save_baseline(&cfg.detect, &mut pipeline);
    // Detaches every program (the ledger map lives on in `ledger`).
    drop(sensor);
    // A program that passed its heartbeat check just before the clear may
    // have frozen one more process: the ring buffer outlives the programs.
    drain_all(ring.get_mut(), &mut pipeline);
    // Repeats still tallied are reported (after the last drain).
    pipeline.finish();
    drop(ring);
    // Never exit with a process stopped by a capture in progress.
    pipeline.shutdown_responder(Duration::from_secs(30));
    // Whatever is still in the ledger goes now; the pin goes with it.
    let n = ledger.release_all();
    if n > 0 {
        info!(resumed = n, "released frozen processes at shutdown");
    }
    if let Some(s) = &shipper {
        // Detections handed over so far reach the spool (and the next start
        // ships them); bounded wait.
        s.flush(Duration::from_secs(3));
    }
    if let Some(t) = metrics_task {
        t.abort();
    }
    Ok(())
}

/// Folds the kernel's counters and in-flight syscalls into the metrics.
fn read_kernel_counters(sensor: &crate::sensor::SensorHandle, metrics: &crate::metrics::Metrics) {
    if let Ok(stats) = sensor.kernel_stats() {
        metrics.update_kernel(&stats);
    }
    if let Ok(n) = sensor.syscalls_in_flight() {
        metrics.syscalls_in_flight.set(n as i64);
    }
}

/// The ring buffer as the drain loop holds it. Armed: registered with the
/// runtime, waiting for the kernel's wakeup (which comes for the first
/// record written after a drain emptied it, or past `wakeup_bytes`).
/// Resting, for `min_wakeup_interval_ms` after a drain that emptied it:
/// not registered, so the wakeups the kernel sends meanwhile wake no
/// thread; arming again reports at once what came in (epoll checks
/// readiness when an fd is added). Under load that is one wakeup per rest
/// instead of one per record, and a record waits at most about a rest.
/// The poll tick drains in either state.
enum Ring {
    Armed(AsyncFd<RingBuf<MapData>>),
    Resting(RingBuf<MapData>),
    /// Only inside `rest` and `arm`.
    Gone,
}

impl Ring {
    fn is_armed(&self) -> bool {
        matches!(self, Ring::Armed(_))
    }

    fn get_mut(&mut self) -> &mut RingBuf<MapData> {
        match self {
            Ring::Armed(fd) => fd.get_mut(),
            Ring::Resting(r) => r,
            Ring::Gone => unreachable!("the ring buffer is always put back"),
        }
    }

    /// Until the kernel's wakeup (pending forever while resting).
    async fn woken(
        &mut self,
    ) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, RingBuf<MapData>>> {
        match self {
            Ring::Armed(fd) => fd.readable_mut().await,
            _ => std::future::pending().await,
        }
    }

    fn rest(&mut self) {
        if let Ring::Armed(fd) = std::mem::replace(self, Ring::Gone) {
            *self = Ring::Resting(fd.into_inner());
        }
    }

    /// Registers a resting ring buffer; on failure it stays resting.
    fn arm(&mut self) -> std::io::Result<()> {
        match std::mem::replace(self, Ring::Gone) {
            Ring::Resting(r) => {
                // SAFETY: `r` owns its fd and moves into the AsyncFd, which
                // drops the registration before the fd is closed (or hands
                // `r` back, deregistered, in `rest`).
                match unsafe { AsyncFd::register_with_interest(r, tokio::io::Interest::READABLE) } {
                    Ok(fd) => *self = Ring::Armed(fd),
                    Err(e) => {
                        let (r, e) = e.into_parts();
                        *self = Ring::Resting(r);
                        return Err(e);
                    }
                }
            }
            other => *self = other,
        }
        Ok(())
    }
}

/// Handles what is in the ring buffer (bounded per call), then flushes.
/// False when the budget ran out before the ring buffer was empty.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) -> bool {
    drain_up_to(ring, pipeline, DRAIN_BUDGET)
}

/// At shutdown: everything left (the ring buffer is bounded, so is this).
fn drain_all(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline) {
    drain_up_to(ring, pipeline, usize::MAX);
}

fn drain_up_to(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline, budget: usize) -> bool {
    let mut n = 0;
    let mut emptied = false;
    while n < budget {
        let Some(item) = ring.next() else {
            emptied = true;
            break;
        };
        pipeline.handle_record(&item);
        n += 1;
    }
    if n > 0 {
        pipeline.flush();
    }
    emptied
}

fn build_detection(cfg: &crate::config::DetectConfig) -> anyhow::Result<DetectEngine> {
    let learn = cfg.learn_duration()?;
    let until = (!learn.is_zero()).then(|| Instant::now() + learn);
    let baseline = match &cfg.baseline_file {
        Some(p) if p.exists() => Baseline::load(p, until)?,
        _ => Baseline::new(until),
    };
    info!(
        entries = baseline.len(),
        learning_secs = learn.as_secs(),
        "baseline ready"
    );
    let sigma = match &cfg.rules_dir {
        Some(d) => Some(SigmaRules::load(d)?),
        None => None,
    };
    Ok(DetectEngine::new(
        baseline,
        sigma,
        crate::model::wall_offset_ns(),
    ))
}

fn save_baseline(cfg: &crate::config::DetectConfig, pipeline: &mut Pipeline) {
    let (Some(path), Some(engine)) = (&cfg.baseline_file, pipeline.detect_mut()) else {
        return;
    };
    let b = engine.baseline_mut();
    if !b.is_dirty() && path.exists() {
        return;
    }
    if let Err(e) = b.save(path) {
        tracing::warn!(error = %format!("{e:#}"), "saving the baseline failed");
    }
}
