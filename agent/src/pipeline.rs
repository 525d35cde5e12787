//! The agent's event path after the kernel, in order: decode -> process
//! tree -> enrich -> outputs -> detect -> reaction. One owner (the consumer
//! task) drives it; it never calls back into the sensor. Each stage is its
//! own module; this one only names them in order.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::budget::AggregateOptions;
use crate::decode::decode;
use crate::detect::DetectEngine;
use crate::metrics::Metrics;
use crate::model::event::{Event, Payload};
use crate::model::{EnrichedEvent, ProcessView};
use crate::outputs::{JsonLinesSink, Sink};
use crate::reaction::Reaction;
use crate::respond::Responder;
use crate::tree::ProcessTree;
use crate::workload_cache::WorkloadCache;

/// The stages, in order.
pub struct Pipeline {
    tree: ProcessTree,
    workloads: WorkloadCache,
    metrics: Arc<Metrics>,
    sinks: Vec<Box<dyn Sink>>,
    detect: Option<DetectEngine>,
    react: Reaction,
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
            react: Reaction::new(metrics.clone()),
            metrics,
            sinks,
            detect: None,
            wall_offset_ns: wall_offset_ns(),
        }
    }

    /// Collapses repeated detections with `opts`.
    pub fn with_aggregation(mut self, opts: AggregateOptions) -> Self {
        self.react.set_aggregation(opts);
        self
    }

    /// Adds the detection stage, writing detections to `out` (if any).
    pub fn with_detection(mut self, engine: DetectEngine, out: Option<JsonLinesSink>) -> Self {
        self.detect = Some(engine);
        self.react.set_detection_out(out);
        self
    }

    /// Adds evidence capture on detection.
    pub fn with_responder(mut self, r: Responder) -> Self {
        self.react.set_responder(r);
        self
    }

    /// Releases kernel-frozen processes that need no capture.
    pub fn with_ledger(mut self, l: crate::frozen::FreezeLedger) -> Self {
        self.react.set_ledger(l);
        self
    }

    /// Contains the processes `policy` names (see `Reaction::set_containment`).
    pub fn with_containment(
        mut self,
        policy: crate::contain::Policy,
        log: Arc<crate::contain::ActionLog>,
        deny: Option<crate::sensor::DenyList>,
    ) -> Self {
        self.react.set_containment(policy, log, deny);
        self
    }

    /// Forwards detections beyond the node's files (to the collector;
    /// never blocks).
    pub fn with_forward(mut self, f: std::sync::Arc<dyn crate::outputs::Forward>) -> Self {
        self.react.set_forward(f);
        self
    }

    /// Stops the capture worker (bounded wait).
    pub fn shutdown_responder(&mut self, timeout: Duration) {
        self.react.shutdown_responder(timeout);
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

    /// Handles one decoded event: every stage in order.
    pub fn handle_event(&mut self, mut ev: Event) {
        self.metrics.count_event(ev.kind());
        let is_exit = matches!(ev.payload, Payload::Exit { .. });
        if let Payload::Exec(x) = &mut ev.payload {
            if let Some(s) = x.script.as_mut().filter(|s| !s.starts_with('/')) {
                if let Ok(cwd) = std::fs::read_link(format!("/proc/{}/cwd", ev.pid)) {
                    *s = cwd.join(&*s).to_string_lossy().into_owned();
                }
            }
        }
        let workloads = &mut self.workloads;
        // An exit leaves the tree last: its own event is enriched first.
        if !is_exit {
            self.tree
                .apply(&ev, &mut |pid, cg| workloads.resolve(pid, cg));
        }
        let enriched = self.enrich(ev);
        for s in &mut self.sinks {
            s.emit(&enriched);
        }
        // Windows (learning, repeats) count from when the event happened,
        // not from when a lagging pipeline got to it.
        let now = crate::model::event_instant(enriched.event.boot_ns);
        let dets = self
            .detect
            .as_mut()
            .map(|engine| engine.observe(&enriched, &self.tree, now));
        self.react.handle(&enriched, dets, &self.tree, now);
        if is_exit {
            let workloads = &mut self.workloads;
            self.tree
                .apply(&enriched.event, &mut |pid, cg| workloads.resolve(pid, cg));
        }
    }

    /// At shutdown: what is still tallied is reported.
    pub fn finish(&mut self) {
        self.react.finish();
        self.flush();
    }

    fn enrich(&mut self, ev: Event) -> EnrichedEvent {
        let process = match self.tree.get(ev.pid) {
            Some(p) => ProcessView {
                pid: p.pid,
                ppid: p.ppid,
                image: p.image.clone(),
                comm: ev.comm.clone(),
                uid: p.uid,
                euid: p.euid,
                workload: p.workload.clone(),
            },
            None => ProcessView {
                pid: ev.pid,
                ppid: 0,
                image: Default::default(),
                comm: ev.comm.clone(),
                uid: ev.uid,
                euid: ev.uid,
                workload: self.workloads.resolve(ev.pid, ev.cgroup_id),
            },
        };
        let ancestry = self.tree.ancestry(ev.pid);
        let wall_ns = (ev.boot_ns as i128 + self.wall_offset_ns).clamp(0, i64::MAX as i128) as i64;
        EnrichedEvent {
            time: wall_time(wall_ns),
            time_unix_nanos: wall_ns,
            event: Arc::new(ev),
            process,
            ancestry,
        }
    }

    /// End of a batch: flush the outputs.
    pub fn flush(&mut self) {
        for s in &mut self.sinks {
            s.flush();
        }
        self.react.flush();
    }

    /// Periodic housekeeping: reap exited processes, publish tree metrics.
    pub fn tick(&mut self, now: Instant) {
        self.react.tick(now);
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

/// RFC 3339 of `ns` since the Unix epoch.
fn wall_time(ns: i64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)).to_string()
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
