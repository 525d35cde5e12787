//! The agent's event path after the kernel: decode -> process tree ->
//! enrich -> sinks. One owner (the consumer task) drives it; it never calls
//! back into the sensor.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::warn;

use crate::budget::{AggregateOptions, Aggregator};
use crate::decode::decode;
use crate::detect::DetectEngine;
use crate::model::{Detection, EnrichedEvent, ProcessView, Severity};
use crate::respond::{CaptureJob, Responder};
use lru::LruCache;
use std::collections::VecDeque;
use std::num::NonZeroUsize;

/// Events kept per process for evidence timelines.
const TIMELINE_PER_PROCESS: usize = 32;
use crate::metrics::Metrics;
use crate::model::event::{Event, Payload};
use crate::tree::ProcessTree;
use crate::workload_cache::WorkloadCache;

/// A consumer of enriched events.
pub trait Sink: Send {
    /// Takes one event. Errors are the sink's to count and report.
    fn emit(&mut self, ev: &EnrichedEvent);
    /// Called after each batch.
    fn flush(&mut self) {}
}

/// Writes values as JSON lines (events, detections).
pub struct JsonLinesSink {
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    metrics: Arc<Metrics>,
    warned: bool,
}

impl JsonLinesSink {
    /// Writes one value as a line; failures are counted and logged once.
    pub fn write<T: Serialize>(&mut self, v: &T) {
        let r = serde_json::to_writer(&mut self.out, v)
            .map_err(|e| e.to_string())
            .and_then(|()| self.out.write_all(b"\n").map_err(|e| e.to_string()));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Flushes buffered lines.
    pub fn flush_out(&mut self) {
        if let Err(e) = self.out.flush() {
            self.fail(e);
        }
    }

    /// To stdout for "-", else appending to the file.
    pub fn open(path: &std::path::Path, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let w: Box<dyn Write + Send> =
            if path.as_os_str() == "-" {
                Box::new(std::io::stdout())
            } else {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    vigil_bundle::private::create_missing_dirs(dir)?;
                }
                Box::new(vigil_bundle::private::open_append(path).map_err(|e| {
                    anyhow::anyhow!("opening events output {}: {e}", path.display())
                })?)
            };
        Ok(Self {
            out: std::io::BufWriter::with_capacity(256 * 1024, w),
            metrics,
            warned: false,
        })
    }

    fn fail(&mut self, e: impl std::fmt::Display) {
        self.metrics.output_errors.inc();
        if !self.warned {
            warn!(error = %e, "writing events failed (counted in vigil_output_errors_total)");
            self.warned = true;
        }
    }
}

impl Sink for JsonLinesSink {
    fn emit(&mut self, ev: &EnrichedEvent) {
        self.write(ev);
    }
    fn flush(&mut self) {
        self.flush_out();
    }
}

/// The containment stage's policy and outputs.
struct Containment {
    policy: crate::contain::Policy,
    log: Arc<crate::contain::ActionLog>,
    deny: Option<crate::sensor::DenyList>,
    /// Processes (pid, start) already contained: each once.
    done: LruCache<(u32, u64), ()>,
}

/// What makes two detections repeats of one another.
type RepeatKey = (String, String, String, String);

fn repeat_key(d: &Detection) -> RepeatKey {
    (
        d.rule.clone(),
        d.process.workload.key(),
        d.process.exe.clone(),
        crate::detect::normalize::argv_shape(&d.process.argv),
    )
}

/// Decode -> tree -> enrich -> sinks -> detect -> detection outputs.
pub struct Pipeline {
    tree: ProcessTree,
    workloads: WorkloadCache,
    metrics: Arc<Metrics>,
    sinks: Vec<Box<dyn Sink>>,
    detect: Option<DetectEngine>,
    detection_out: Option<JsonLinesSink>,
    responder: Option<Responder>,
    shipper: Option<crate::ship::Shipper>,
    ledger: Option<crate::frozen::FreezeLedger>,
    contain: Option<Containment>,
    repeats: Aggregator<RepeatKey, Detection>,
    timeline: LruCache<u32, VecDeque<Event>>,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, ns.
    wall_offset_ns: i128,
}

impl Pipeline {
    /// A pipeline over `tree` feeding `sinks`.
    pub fn new(
        tree: ProcessTree,
        workloads: WorkloadCache,
        metrics: Arc<Metrics>,
        sinks: Vec<Box<dyn Sink>>,
    ) -> Self {
        Self {
            tree,
            workloads,
            metrics,
            sinks,
            detect: None,
            detection_out: None,
            responder: None,
            shipper: None,
            ledger: None,
            contain: None,
            repeats: Aggregator::new(AggregateOptions::default(), 4096),
            timeline: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
            wall_offset_ns: wall_offset_ns(),
        }
    }

    /// Collapses repeated detections with `opts` (default: per key and
    /// minute, 3 reported one by one, 20 for high and critical ones, the
    /// rest counted in one report).
    pub fn with_aggregation(mut self, opts: AggregateOptions) -> Self {
        self.repeats = Aggregator::new(opts, 4096);
        self
    }

    /// Adds the detection stage, writing detections to `out` (if any).
    pub fn with_detection(mut self, engine: DetectEngine, out: Option<JsonLinesSink>) -> Self {
        self.detect = Some(engine);
        self.detection_out = out;
        self
    }

    /// Adds evidence capture on detection.
    pub fn with_responder(mut self, r: Responder) -> Self {
        self.responder = Some(r);
        self
    }

    /// Releases kernel-frozen processes that need no capture through the
    /// frozen-process ledger (which also forgets them).
    pub fn with_ledger(mut self, l: crate::frozen::FreezeLedger) -> Self {
        self.ledger = Some(l);
        self
    }

    /// Contains the processes `policy` names, reporting each action to
    /// `log`; with a responder, their evidence is captured first. `deny` is
    /// the kernel's connect deny list, for `deny_connect`.
    pub fn with_containment(
        mut self,
        policy: crate::contain::Policy,
        log: Arc<crate::contain::ActionLog>,
        deny: Option<crate::sensor::DenyList>,
    ) -> Self {
        self.contain = Some(Containment {
            policy,
            log,
            deny,
            done: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        });
        self
    }

    /// Adds shipping of detections to the collector (never blocks).
    pub fn with_shipper(mut self, s: crate::ship::Shipper) -> Self {
        self.shipper = Some(s);
        self
    }

    /// Stops the capture worker (bounded wait; see `Responder::shutdown`).
    pub fn shutdown_responder(&mut self, timeout: Duration) {
        if let Some(r) = &mut self.responder {
            r.shutdown(timeout);
        }
    }

    /// The detection engine, if any.
    pub fn detect_mut(&mut self) -> Option<&mut DetectEngine> {
        self.detect.as_mut()
    }

    /// The tree (read-only).
    pub fn tree(&self) -> &ProcessTree {
        &self.tree
    }

    /// Handles one ring-buffer record.
    pub fn handle_record(&mut self, bytes: &[u8]) {
        match decode(bytes) {
            Ok(ev) => self.handle_event(ev),
            Err(e) => {
                self.metrics.decode_errors.inc();
                tracing::debug!(error = %e, "malformed record");
            }
        }
    }

    /// Handles one decoded event.
    pub fn handle_event(&mut self, mut ev: Event) {
        self.metrics.count_event(ev.kind());
        let workloads = &mut self.workloads;
        let is_exit = matches!(ev.payload, Payload::Exit { .. });
        if let Payload::Exec(x) = &mut ev.payload {
            if let Some(s) = x.script.as_mut().filter(|s| !s.starts_with('/')) {
                if let Ok(cwd) = std::fs::read_link(format!("/proc/{}/cwd", ev.pid)) {
                    *s = cwd.join(&*s).to_string_lossy().into_owned();
                }
            }
        }
        if !is_exit {
            self.tree
                .apply(&ev, &mut |pid, cg| workloads.resolve(pid, cg));
        }
        let enriched = self.enrich(ev);
        for s in &mut self.sinks {
            s.emit(&enriched);
        }
        self.remember(&enriched);
        let mut capture_asked = false;
        if let Some(engine) = &mut self.detect {
            // Windows (learning, repeats) count from when the event
            // happened, not from when a lagging pipeline got to it.
            let now = crate::model::event_instant(enriched.event.boot_ns);
            let mut dets = engine.observe(&enriched, &self.tree, now);
            let alive = !is_exit;
            let mut held = false;
            // Once per process: a later detection of a process already
            // contained (or waiting for its capture to contain it) asks
            // nothing more.
            let key = (enriched.event.pid, enriched.event.start_boot_ns);
            let contain = match &mut self.contain {
                Some(c) if alive && !c.done.contains(&key) => {
                    let d = c.policy.decide(&dets);
                    if d.is_some() {
                        c.done.put(key, ());
                    }
                    d
                }
                _ => None,
            };
            let start_ticks = (enriched.event.start_boot_ns > 0)
                .then(|| crate::frozen::boot_ns_to_ticks(enriched.event.start_boot_ns));
            // Connects are refused at once, before any capture; the process
            // runs on and is captured like any other.
            let denying = contain
                .as_ref()
                .is_some_and(|d| d.action == crate::contain::Action::DenyConnect);
            if let (true, Some(d), Some(c)) = (denying, &contain, &self.contain) {
                c.log.record(&crate::contain::deny_now(
                    d,
                    enriched.event.pid,
                    start_ticks,
                    c.deny.as_ref(),
                ));
            }
            // The capture decision sees every detection (its budget bounds
            // it); only their reporting collapses repeats.
            if let Some(r) = &mut self.responder {
                let e = &enriched.event;
                let asking = if alive {
                    r.wants(&dets, e.pid, e.start_boot_ns, contain.as_ref())
                } else {
                    None
                };
                if let Some(asking) = asking {
                    capture_asked = true;
                    for d in &mut dets {
                        d.evidence = Some(serde_json::json!({ "capture": "queued" }));
                    }
                    let job = CaptureJob {
                        pid: e.pid,
                        start_boot_ns: e.start_boot_ns,
                        detection: serde_json::to_value(&dets[asking]).unwrap_or_default(),
                        ancestors: enriched.ancestry.iter().map(|a| a.pid as i32).collect(),
                        ancestor_starts: enriched
                            .ancestry
                            .iter()
                            .map(|a| self.tree.get(a.pid).map_or(0, |p| p.start_boot_ns))
                            .collect(),
                        timeline: timeline_of(&self.timeline, e.pid, enriched.process.ppid),
                        frozen: matches!(&e.payload, Payload::Exec(x) if x.frozen),
                        severity: dets
                            .iter()
                            .map(|d| d.severity)
                            .max()
                            .unwrap_or(Severity::Low),
                        // deny_connect is done: the capture kills nothing.
                        contain: contain.clone().filter(|_| !denying),
                    };
                    // A dropped job holds nothing: contained below.
                    held = r.submit(job);
                }
            }
            // Containment the capture does not carry out happens now.
            if let (Some(d), false, false, Some(c)) = (&contain, held, denying, &self.contain) {
                c.log.record(&crate::contain::execute_now(
                    d,
                    enriched.event.pid,
                    start_ticks,
                ));
            }
            // Detections whose process is being captured are each reported
            // (the bundle links to them); the rest may collapse.
            let mut ended = Vec::new();
            for d in dets {
                let d = if capture_asked {
                    Some(d)
                } else {
                    let time = d.time.clone();
                    let high = d.severity >= Severity::High;
                    let kept =
                        self.repeats
                            .observe(repeat_key(&d), &time, d, high, now, &mut ended);
                    if kept.is_none() {
                        self.metrics.detections_aggregated.inc();
                    }
                    kept
                };
                if let Some(d) = d {
                    self.report(&d);
                }
            }
            for (d, r) in ended {
                self.report_repeat(d, r);
            }
        }
        // A process the kernel froze at exec waits for us: inspection (and
        // later evidence capture) is done, let it run.
        // (A capture job releases its process itself.)
        if let (Payload::Exec(x), Some(l)) = (&enriched.event.payload, &self.ledger) {
            if x.frozen && !capture_asked {
                l.release(enriched.event.pid, None);
            }
        }
        if is_exit {
            let workloads = &mut self.workloads;
            self.tree
                .apply(&enriched.event, &mut |pid, cg| workloads.resolve(pid, cg));
        }
    }

    /// Keeps the last events of each process for evidence timelines.
    fn remember(&mut self, ev: &EnrichedEvent) {
        if self.responder.is_none() {
            return;
        }
        // A clone, not JSON: serialization happens only for a capture.
        let q = self.timeline.get_or_insert_mut(ev.event.pid, || {
            VecDeque::with_capacity(TIMELINE_PER_PROCESS)
        });
        if q.len() >= TIMELINE_PER_PROCESS {
            q.pop_front();
        }
        q.push_back(ev.event.clone());
    }

    /// One detection out: counted, logged, written, shipped.
    fn report(&mut self, d: &Detection) {
        self.metrics.count_detection(d);
        tracing::warn!(
            rule = %d.rule,
            severity = ?d.severity,
            mitre = ?d.mitre,
            pid = d.process.pid,
            repeats = d.repeat.as_ref().map_or(0, |r| r.count),
            "detection: {}",
            d.summary
        );
        if let Some(out) = &mut self.detection_out {
            out.write(d);
        }
        if let Some(s) = &self.shipper {
            match serde_json::to_string(d) {
                Ok(line) => s.detection(line, d.severity >= Severity::High),
                Err(_) => {
                    self.metrics.output_errors.inc();
                }
            }
        }
    }

    /// The report standing for a detection's repeats in a window.
    fn report_repeat(&mut self, mut d: Detection, r: crate::model::Repeat) {
        d.summary = format!(
            "{} (repeated {} times in {} s, {} not reported one by one)",
            d.summary, r.count, r.window_secs, r.suppressed
        );
        d.evidence = None;
        d.repeat = Some(r);
        self.report(&d);
    }

    /// Reports repeats whose window ended (call from `tick`), or all of
    /// them (`all`, at shutdown).
    fn flush_repeats(&mut self, now: Instant, all: bool) {
        let ended = if all {
            self.repeats.drain()
        } else {
            self.repeats.expire(now)
        };
        for (d, r) in ended {
            self.report_repeat(d, r);
        }
    }

    /// At shutdown: what is still tallied is reported.
    pub fn finish(&mut self) {
        self.flush_repeats(Instant::now(), true);
        self.flush();
    }

    fn enrich(&mut self, ev: Event) -> EnrichedEvent {
        let process = match self.tree.get(ev.pid) {
            Some(p) => ProcessView {
                pid: p.pid,
                ppid: p.ppid,
                exe: p.exe.clone(),
                comm: ev.comm.clone(),
                argv: p.argv.clone(),
                uid: p.uid,
                euid: p.euid,
                workload: p.workload.clone(),
            },
            None => ProcessView {
                pid: ev.pid,
                ppid: 0,
                exe: String::new(),
                comm: ev.comm.clone(),
                argv: Vec::new(),
                uid: ev.uid,
                euid: ev.uid,
                workload: self.workloads.resolve(ev.pid, ev.cgroup_id),
            },
        };
        let ancestry = self.tree.ancestry(ev.pid);
        EnrichedEvent {
            time: self.wall_time(ev.boot_ns),
            event: ev,
            process,
            ancestry,
        }
    }

    fn wall_time(&self, boot_ns: u64) -> String {
        let ns = (boot_ns as i128 + self.wall_offset_ns).max(0) as u64;
        humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
    }

    /// End of a batch: flush sinks.
    pub fn flush(&mut self) {
        for s in &mut self.sinks {
            s.flush();
        }
        if let Some(out) = &mut self.detection_out {
            out.flush_out();
        }
    }

    /// Periodic housekeeping: reap exited processes, publish tree metrics.
    pub fn tick(&mut self, now: Instant) {
        self.flush_repeats(now, false);
        self.tree.reap(now);
        let st = self.tree.stats();
        self.metrics.tree_size.set(self.tree.len() as i64);
        let m = &self.metrics;
        m.tree_reaped
            .inc_by(st.reaped.saturating_sub(m.tree_reaped.get()));
        m.tree_rejected
            .inc_by(st.rejected.saturating_sub(m.tree_rejected.get()));
        m.tree_unknown_pid
            .inc_by(st.unknown_pid.saturating_sub(m.tree_unknown_pid.get()));
        if let Some(engine) = &mut self.detect {
            engine.maybe_reload_rules();
            let ds = engine.stats();
            m.detections_suppressed
                .inc_by(ds.suppressed.saturating_sub(m.detections_suppressed.get()));
            m.baseline_entries.set(engine.baseline_mut().len() as i64);
            m.sigma_rules.set(ds.sigma_rules as i64);
        }
    }
}

/// Recent events of `pid` and its parent, oldest first.
fn timeline_of(
    timeline: &LruCache<u32, VecDeque<Event>>,
    pid: u32,
    ppid: u32,
) -> Vec<serde_json::Value> {
    let mut evs: Vec<&Event> = [ppid, pid]
        .iter()
        .filter_map(|p| timeline.peek(p))
        .flatten()
        .collect();
    evs.sort_by_key(|e| e.boot_ns);
    evs.into_iter()
        .filter_map(|e| serde_json::to_value(e).ok())
        .collect()
}

/// CLOCK_REALTIME minus CLOCK_BOOTTIME, in ns.
pub fn wall_offset_ns() -> i128 {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or(0);
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    wall - boot
}
