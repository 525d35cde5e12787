//! The agent's event path after the kernel, in order: decode -> state
//! (process tree, enrichment) -> outputs -> detect -> reaction. One owner
//! (the consumer task) drives it; it never calls back into the sensor. Each
//! stage is its own module; this one only names them in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::AggregateOptions;
use crate::decode::decode;
use crate::detect::DetectEngine;
use crate::metrics::Metrics;
use crate::model::event::Event;
use crate::outputs::{JsonLinesSink, Sink};
use crate::reaction::Reaction;
use crate::respond::Responder;
use crate::state::State;
use crate::tree::ProcessTree;
use crate::workload_cache::WorkloadCache;

/// The stages, in order.
pub struct Pipeline {
    state: State,
    metrics: Arc<Metrics>,
    sinks: Vec<Box<dyn Sink>>,
    detect: Option<DetectEngine>,
    react: Reaction,
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
            state: State::new(tree, workloads),
            react: Reaction::new(metrics.clone()),
            metrics,
            sinks,
            detect: None,
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
        self.state.tree()
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
    pub fn handle_event(&mut self, ev: Event) {
        self.metrics.count_event(ev.kind());
        let enriched = match self.state.enter(ev) {
            Ok(e) => e,
            Err(crate::state::Skip::Repeat) => {
                self.metrics.file_dedup.inc();
                return;
            }
            Err(crate::state::Skip::NotAFile) => return,
        };
        for s in &mut self.sinks {
            s.emit(&enriched);
        }
        // Windows (learning, repeats) count from when the event happened,
        // not from when a lagging pipeline got to it.
        let now = crate::model::event_instant(enriched.event.boot_ns);
        let tree = self.state.tree();
        let dets = self
            .detect
            .as_mut()
            .map(|engine| engine.observe(&enriched, tree, now));
        self.react.handle(&enriched, dets, tree, now);
        self.state.leave(&enriched);
    }

    /// At shutdown: what is still tallied is reported.
    pub fn finish(&mut self) {
        self.react.finish();
        for s in &mut self.sinks {
            s.finish();
        }
        self.react.flush();
    }

    /// End of a batch: flush the outputs.
    pub fn flush(&mut self) {
        for s in &mut self.sinks {
            s.flush();
        }
        self.react.flush();
    }

    /// Periodic housekeeping: reap exited processes, publish metrics.
    pub fn tick(&mut self, now: Instant) {
        self.react.tick(now);
        self.state.tick(now, &self.metrics);
        if let Some(engine) = &mut self.detect {
            engine.maybe_reload_rules();
            let (ds, m) = (engine.stats(), &self.metrics);
            m.detections_suppressed
                .inc_by(ds.suppressed.saturating_sub(m.detections_suppressed.get()));
            m.baseline_entries.set(engine.baseline_mut().len() as i64);
            m.sigma_rules.set(ds.sigma_rules as i64);
        }
    }
}
