//! Detection: behaviour rules over the process tree, file provenance and
//! sockets, Sigma rules, and the learned per-workload baseline that keeps
//! normal behaviour quiet.
//!
//! Flow per enriched event: update side state (connects, file provenance) ->
//! built-in rules and Sigma rules produce [`Finding`]s -> the baseline learns
//! (in the learning window) or suppresses what was learned as normal (unless
//! the rule is never suppressed) -> [`Detection`]s for the sinks.

pub mod baseline;
pub mod classify;
pub mod normalize;
pub mod provenance;
pub mod rules;
pub mod sigma;

use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;

use crate::model::event::Payload;
use crate::model::{boot_ns_now, Detection, EnrichedEvent, Finding, Severity};
use crate::tree::ProcessTree;
use baseline::Baseline;
use provenance::ProvenanceState;

/// Side state the rules read, bounded.
pub struct DetectState {
    /// Last outbound connect per pid: (boot_ns, remote port).
    pub connects: LruCache<u32, (u64, u16)>,
    /// File and pipe provenance (see [`provenance`]).
    pub files: ProvenanceState,
    /// Pipe joins completed by the current exec (set before the rules run).
    pub joins: Vec<provenance::PipeJoin>,
}

impl DetectState {
    fn new() -> Self {
        let n = |x: usize| NonZeroUsize::new(x).expect("non-zero");
        Self {
            connects: LruCache::new(n(16_384)),
            files: ProvenanceState::new(),
            joins: Vec::new(),
        }
    }

    /// The pid connected out within `window_ns` before `now_ns`.
    pub fn connected_recently(&self, pid: u32, now_ns: u64, window_ns: u64) -> bool {
        self.connects
            .peek(&pid)
            .is_some_and(|(t, _)| now_ns.saturating_sub(*t) <= window_ns)
    }

    /// Before the rules: an exec joins pipes and taints its process.
    fn before(&mut self, ev: &EnrichedEvent) {
        self.joins.clear();
        if let Payload::Exec(x) = &ev.event.payload {
            let e = &ev.event;
            let connected = self.connected_recently(e.pid, e.boot_ns, CONNECT_WINDOW_NS);
            self.joins = self.files.on_exec(ev, x, connected);
        }
    }

    /// After the rules.
    fn update(&mut self, ev: &EnrichedEvent) {
        let e = &ev.event;
        match &e.payload {
            Payload::Connect(c) if !c.daddr.is_unspecified() => {
                self.connects.put(e.pid, (e.boot_ns, c.dport));
            }
            Payload::FileOpen(f) => {
                let connected = self.connected_recently(e.pid, e.boot_ns, CONNECT_WINDOW_NS);
                const O_TRUNC: u32 = 0o1000;
                let truncates = f.flags & O_TRUNC != 0;
                self.files
                    .on_write(ev, (f.dev, f.ino), &f.path, truncates, connected);
            }
            Payload::Rename(r) => self.files.on_rename(&r.old_path, &r.new_path),
            Payload::Exit { .. } => {
                self.connects.pop(&e.pid);
                self.files.on_exit(e.pid);
            }
            _ => {}
        }
    }
}

/// A process that connected out this recently writes network content.
const CONNECT_WINDOW_NS: u64 = 60_000_000_000;

/// Everything a rule may look at.
pub struct Ctx<'a> {
    /// The event with its process and ancestry.
    pub ev: &'a EnrichedEvent,
    /// The live tree.
    pub tree: &'a ProcessTree,
    /// Side state.
    pub state: &'a mut DetectState,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct DetectStats {
    /// Findings suppressed by the baseline.
    pub suppressed: u64,
    /// Sigma rules loaded.
    pub sigma_rules: u64,
    /// Sigma rule files that failed to load.
    pub sigma_errors: u64,
}

/// The detection stage.
pub struct DetectEngine {
    state: DetectState,
    baseline: Baseline,
    sigma: Option<sigma::SigmaRules>,
    stats: DetectStats,
    wall_offset_ns: i128,
}

impl DetectEngine {
    /// An engine with `baseline` and optional Sigma rules.
    pub fn new(baseline: Baseline, sigma: Option<sigma::SigmaRules>, wall_offset_ns: i128) -> Self {
        Self {
            state: DetectState::new(),
            baseline,
            sigma,
            stats: DetectStats::default(),
            wall_offset_ns,
        }
    }

    /// The baseline (to save it).
    pub fn baseline_mut(&mut self) -> &mut Baseline {
        &mut self.baseline
    }

    /// Counters.
    pub fn stats(&self) -> DetectStats {
        let mut s = self.stats;
        if let Some(sg) = &self.sigma {
            s.sigma_rules = sg.len() as u64;
            s.sigma_errors = sg.errors();
        }
        s
    }

    /// Reloads Sigma rules if their directory changed.
    pub fn maybe_reload_rules(&mut self) {
        if let Some(s) = &mut self.sigma {
            s.reload_if_changed();
        }
    }

    /// Runs every rule on one enriched event (the tree already applied it).
    pub fn observe(
        &mut self,
        ev: &EnrichedEvent,
        tree: &ProcessTree,
        now: Instant,
    ) -> Vec<Detection> {
        self.state.before(ev);
        let mut findings = {
            let mut ctx = Ctx {
                ev,
                tree,
                state: &mut self.state,
            };
            rules::run_all(&mut ctx)
        };
        if let Some(s) = &self.sigma {
            findings.extend(s.evaluate(ev, tree));
        }
        self.state.update(ev);

        let workload = ev.process.workload.key();
        let edge = exec_edge(ev, tree);
        let learning = self.baseline.is_learning(now);
        if learning {
            if let Some(edge) = &edge {
                self.baseline.learn(&workload, edge.clone());
            }
        } else if let Some(edge) = &edge {
            if !self.baseline.knows(&workload, edge) && !self.baseline.is_empty() {
                findings.push(Finding {
                    rule: "baseline_anomaly".into(),
                    source: "builtin",
                    severity: Severity::Low,
                    mitre: vec![],
                    summary: format!(
                        "{} started {} ({}), never seen for workload {workload} while learning",
                        ev.ancestry
                            .first()
                            .map(|a| a.image.exe.as_str())
                            .unwrap_or("?"),
                        ev.process.image.exe,
                        normalize::argv_shape(&ev.process.image.argv)
                    ),
                    never_suppress: false,
                    object: String::new(),
                });
            }
        }

        let mut out = Vec::new();
        for f in findings {
            let key = match &edge {
                Some(e) => format!("{}@{}", f.rule, e),
                // Not an exec: the program and its command line doing this to
                // this object.
                None => format!(
                    "{}@{}|{}|{}",
                    f.rule,
                    normalize::shape(&ev.process.image.exe),
                    normalize::argv_shape(&ev.process.image.argv),
                    normalize::shape(&f.object)
                ),
            };
            let suppressible = !f.never_suppress && f.severity < Severity::Critical;
            if learning {
                if suppressible {
                    self.baseline.learn(&workload, key);
                    continue;
                }
            } else if suppressible
                && (self.baseline.knows(&workload, &key)
                    || edge
                        .as_ref()
                        .is_some_and(|e| self.baseline.knows(&workload, e)))
            {
                self.stats.suppressed += 1;
                continue;
            }
            out.push(self.detection(ev, f));
        }
        out
    }

    fn detection(&self, ev: &EnrichedEvent, f: Finding) -> Detection {
        let now_boot = boot_ns_now();
        let now_wall = (now_boot as i128 + self.wall_offset_ns).max(0) as u64;
        Detection {
            time: ev.time.clone(),
            detected_at: humantime::format_rfc3339_nanos(
                std::time::UNIX_EPOCH + std::time::Duration::from_nanos(now_wall),
            )
            .to_string(),
            latency_ns: now_boot.saturating_sub(ev.event.boot_ns),
            rule: f.rule,
            rule_source: f.source,
            severity: f.severity,
            mitre: f.mitre,
            summary: f.summary,
            process: ev.process.clone(),
            ancestry: ev.ancestry.clone(),
            event: ev.event.clone(),
            evidence: None,
            repeat: None,
        }
    }
}

/// The exec edge: parent exe -> child exe | argv shape, normalized.
pub fn exec_edge(ev: &EnrichedEvent, tree: &ProcessTree) -> Option<String> {
    let Payload::Exec(x) = &ev.event.payload else {
        return None;
    };
    // The creator (the tree keeps it when the process was reparented).
    let parent = tree
        .get(ev.process.ppid)
        .map(|p| p.image.exe.as_str())
        .or_else(|| ev.ancestry.first().map(|a| a.image.exe.as_str()))
        .unwrap_or("");
    let child = match &x.script {
        Some(s) => format!("{} {}", x.exe, s),
        None => x.exe.clone(),
    };
    Some(format!(
        "{}>{}|{}",
        normalize::shape(parent),
        normalize::shape(&child),
        normalize::argv_shape(&x.argv)
    ))
}
