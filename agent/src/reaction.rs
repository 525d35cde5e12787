//! What follows detection, per event: containment decided once per
//! process, capture jobs (with the process's recent events), the release
//! of a process the kernel froze at exec, repeats collapsed, and detections
//! reported (JSON lines, log, metrics, `outputs::Forward`). Owned by the pipeline,
//! which calls it after the detection stage.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;

use crate::budget::{AggregateOptions, Aggregator};
use crate::metrics::Metrics;
use crate::model::event::{Event, Payload};
use crate::model::{Detection, EnrichedEvent, Severity};
use crate::outputs::{Forward, JsonLinesSink};
use crate::respond::{CaptureJob, Responder};
use crate::tree::ProcessTree;

/// Events kept per process for evidence timelines.
const TIMELINE_PER_PROCESS: usize = 32;

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
        d.process.image.exe.clone(),
        crate::detect::normalize::argv_shape(&d.process.image.argv),
    )
}

/// The reaction stage (see the module documentation).
pub struct Reaction {
    metrics: Arc<Metrics>,
    detection_out: Option<JsonLinesSink>,
    responder: Option<Responder>,
    forward: Option<Arc<dyn Forward>>,
    ledger: Option<crate::frozen::FreezeLedger>,
    contain: Option<Containment>,
    repeats: Aggregator<RepeatKey, Detection>,
    timeline: LruCache<u32, VecDeque<Arc<Event>>>,
}

impl Reaction {
    /// Nothing but counting until configured.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            detection_out: None,
            responder: None,
            forward: None,
            ledger: None,
            contain: None,
            repeats: Aggregator::new(AggregateOptions::default(), 4096),
            timeline: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        }
    }

    /// Collapses repeated detections with `opts`.
    pub fn set_aggregation(&mut self, opts: AggregateOptions) {
        self.repeats = Aggregator::new(opts, 4096);
    }

    /// Writes detections to `out`.
    pub fn set_detection_out(&mut self, out: Option<JsonLinesSink>) {
        self.detection_out = out;
    }

    /// Captures evidence on detection.
    pub fn set_responder(&mut self, r: Responder) {
        self.responder = Some(r);
    }

    /// Releases kernel-frozen processes that need no capture.
    pub fn set_ledger(&mut self, l: crate::frozen::FreezeLedger) {
        self.ledger = Some(l);
    }

    /// Forwards detections beyond the node's files (never blocks).
    pub fn set_forward(&mut self, f: Arc<dyn Forward>) {
        self.forward = Some(f);
    }

    /// Contains what `policy` names, reporting to `log`; `deny` is the
    /// kernel's connect deny list.
    pub fn set_containment(
        &mut self,
        policy: crate::contain::Policy,
        log: Arc<crate::contain::ActionLog>,
        deny: Option<crate::sensor::DenyList>,
    ) {
        self.contain = Some(Containment {
            policy,
            log,
            deny,
            done: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        });
    }

    /// Stops the capture worker (bounded wait; see `Responder::shutdown`).
    pub fn shutdown_responder(&mut self, timeout: std::time::Duration) {
        if let Some(r) = &mut self.responder {
            r.shutdown(timeout);
        }
    }

    /// Reacts to one event and what detection found in it (`None`: no
    /// detection stage).
    pub fn handle(
        &mut self,
        enriched: &EnrichedEvent,
        dets: Option<Vec<Detection>>,
        tree: &ProcessTree,
        now: Instant,
    ) {
        self.remember(enriched);
        let is_exit = matches!(enriched.event.payload, Payload::Exit { .. });
        let mut capture_asked = false;
        if let Some(mut dets) = dets {
            let alive = !is_exit;
            let mut held = false;
            // Once per process: a later detection of a process already
            // contained (or waiting for its capture to contain it) asks
            // nothing more.
            let key = (enriched.event.pid, enriched.event.start_boot_ns);
            let start_ticks = (enriched.event.start_boot_ns > 0)
                .then(|| crate::frozen::boot_ns_to_ticks(enriched.event.start_boot_ns));
            let contain = match &mut self.contain {
                Some(c) if alive && !c.done.contains(&key) => {
                    let d = c.policy.decide(&dets);
                    if d.is_some() {
                        c.done.put(key, ());
                    }
                    // Another agent is reported, never contained: refused
                    // here, so that neither the capture nor a later step
                    // kills it.
                    d.and_then(|d| match c.policy.spared(enriched.event.pid, start_ticks) {
                        Some(why) => {
                            let mut rec = crate::contain::Record::new(
                                &d,
                                enriched.event.pid,
                                crate::contain::Outcome::Refused,
                            );
                            rec.error = Some(why);
                            c.log.record(&rec);
                            None
                        }
                        None => Some(d),
                    })
                }
                _ => None,
            };
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
                            .map(|a| tree.get(a.pid).map_or(0, |p| p.start_boot_ns))
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
    }

    /// Keeps the last events of each process for evidence timelines.
    fn remember(&mut self, ev: &EnrichedEvent) {
        if self.responder.is_none() {
            return;
        }
        // A shared handle, not a copy nor JSON: serialization happens only
        // for a capture.
        let q = self.timeline.get_or_insert_mut(ev.event.pid, || {
            VecDeque::with_capacity(TIMELINE_PER_PROCESS)
        });
        if q.len() >= TIMELINE_PER_PROCESS {
            q.pop_front();
        }
        q.push_back(Arc::clone(&ev.event));
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
        if let Some(f) = &self.forward {
            f.detection(d);
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
    }

    /// Periodic: reports repeats whose window ended.
    pub fn tick(&mut self, now: Instant) {
        self.flush_repeats(now, false);
    }

    /// End of a batch: flushes the detection lines.
    pub fn flush(&mut self) {
        if let Some(out) = &mut self.detection_out {
            out.flush_out();
        }
    }
}

/// Recent events of `pid` and its parent, oldest first.
fn timeline_of(
    timeline: &LruCache<u32, VecDeque<Arc<Event>>>,
    pid: u32,
    ppid: u32,
) -> Vec<serde_json::Value> {
    let mut evs: Vec<&Event> = [ppid, pid]
        .iter()
        .filter_map(|p| timeline.peek(p))
        .flatten()
        .map(|e| &**e)
        .collect();
    evs.sort_by_key(|e| e.boot_ns);
    evs.into_iter()
        .filter_map(|e| serde_json::to_value(e).ok())
        .collect()
}
