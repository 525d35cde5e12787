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
mod inject;
pub mod normalize;
pub mod provenance;
pub mod rules;
pub mod sigma;

use std::num::NonZeroUsize;
use std::time::Instant;

use lru::LruCache;

use crate::model::event::Payload;
use crate::model::{boot_ns_now, wall_time, Detection, EnrichedEvent, Finding, PerImage, Severity};
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
    /// Processes under which shell history was reported switched off (one
    /// report per session).
    pub history_off: LruCache<u32, ()>,
}

impl DetectState {
    fn new() -> Self {
        let n = |x: usize| NonZeroUsize::new(x).expect("non-zero");
        Self {
            connects: LruCache::new(n(16_384)),
            files: ProvenanceState::new(),
            joins: Vec::new(),
            history_off: LruCache::new(n(1024)),
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
            // An io_uring open whose file was not found names no file.
            Payload::FileOpen(f) if !(f.io_uring && f.ino == 0) => {
                let connected = self.connected_recently(e.pid, e.boot_ns, CONNECT_WINDOW_NS);
                const O_TRUNC: u32 = 0o1000;
                let truncates = f.flags & O_TRUNC != 0;
                self.files
                    .on_write(ev, (f.dev, f.ino), &f.path, truncates, connected);
            }
            Payload::Rename(r) => self.files.on_rename(&r.old_path, &r.new_path),
            Payload::Exit { .. } => {
                self.connects.pop(&e.pid);
                self.history_off.pop(&e.pid);
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
    /// Exec edges' shapes of executables (parents exec many children).
    shapes: ExeShapes,
}

/// Images' executables as exec edges name them (see [`exec_edge`]).
pub type ExeShapes = PerImage<String>;

impl DetectEngine {
    /// An engine with `baseline` and optional Sigma rules.
    pub fn new(baseline: Baseline, sigma: Option<sigma::SigmaRules>, wall_offset_ns: i128) -> Self {
        Self {
            state: DetectState::new(),
            baseline,
            sigma,
            stats: DetectStats::default(),
            wall_offset_ns,
            shapes: PerImage::new(256),
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
        let edge = exec_edge(ev, tree, &mut self.shapes);
        let learning = self.baseline.is_learning(now);
        if learning {
            if let Some(edge) = &edge {
                self.baseline.learn(&workload, edge.clone());
            }
        } else if let Some(edge) = &edge {
            // Programs whose arguments are the behaviour (a shell's
            // command, an interpreter's code, a downloader's URL, a
            // service or account change) are known only with command
            // lines seen while learning.
            // Judged only for an edge not learned as it is.
            let by_program = || {
                let child = ev.process.image.identity();
                !classify::is_shell(child)
                    && !classify::is_interpreter(child)
                    && !classify::is_downloader(child)
                    && !classify::acts_by_arguments(child)
            };
            if !self.baseline.knows_edge(&workload, edge, by_program) && !self.baseline.is_empty() {
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
            // A finding is learned with what it is about: the exec edge
            // (or, for other events, the program and its command line) and
            // its object (an LD_PRELOAD library, a file). A learned edge
            // alone does not silence a finding never seen on it: `bash`
            // starting `sleep` is normal, with LD_PRELOAD it is not.
            let key = match &edge {
                Some(e) => format!("{}@{}|{}", f.rule, e, normalize::shape(&f.object)),
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
            } else if suppressible && self.baseline.knows(&workload, &key) {
                self.stats.suppressed += 1;
                continue;
            }
            out.push(self.detection(ev, f));
        }
        out
    }

    fn detection(&self, ev: &EnrichedEvent, f: Finding) -> Detection {
        let now_boot = boot_ns_now();
        let now_wall = (now_boot as i128 + self.wall_offset_ns).clamp(0, i64::MAX as i128) as i64;
        Detection {
            time: ev.time(),
            detected_at: wall_time(now_wall),
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
/// `shapes` keeps executables' shapes for the images seen last.
pub fn exec_edge(ev: &EnrichedEvent, tree: &ProcessTree, shapes: &mut ExeShapes) -> Option<String> {
    let Payload::Exec(x) = &ev.event.payload else {
        return None;
    };
    // The creator (the tree keeps it when the process was reparented).
    let parent = tree
        .get(ev.process.ppid)
        .map(|p| &p.image)
        .or_else(|| ev.ancestry.first().map(|a| &a.image));
    let parent: &str = match parent {
        Some(image) => shapes.get(image, |i, shape| *shape = edge_path(&i.exe)),
        None => "",
    };
    let child = match &x.script {
        Some(s) => edge_path(&format!("{} {}", x.exe, s)),
        None => edge_path(&x.exe),
    };
    Some(format!(
        "{parent}>{child}|{}",
        normalize::argv_shape(&x.argv)
    ))
}

/// A path's shape in an exec edge. `|` ends the pair (see
/// `Baseline::knows_edge`): escaped.
fn edge_path(p: &str) -> String {
    let s = normalize::shape(p);
    if s.contains('|') {
        s.replace('|', "%7C")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::{Event, Exec};
    use crate::model::{ProcessView, Workload};
    use std::sync::Arc;
    use std::time::Duration;

    fn exec(
        tree: &mut ProcessTree,
        pid: u32,
        ppid: u32,
        exe: &str,
        preload: Option<&str>,
    ) -> EnrichedEvent {
        let argv = [exe.rsplit('/').next().unwrap(), "1"];
        exec_argv(tree, pid, ppid, exe, &argv, preload)
    }

    fn exec_argv(
        tree: &mut ProcessTree,
        pid: u32,
        ppid: u32,
        exe: &str,
        argv: &[&str],
        preload: Option<&str>,
    ) -> EnrichedEvent {
        let event = Event {
            boot_ns: pid as u64 * 1_000_000,
            tid: pid,
            pid,
            uid: 0,
            gid: 0,
            start_boot_ns: pid as u64,
            cgroup_id: 1,
            comm: "x".into(),
            payload: Payload::Exec(Exec {
                ppid,
                euid: 0,
                egid: 0,
                exe: exe.into(),
                argv: argv.iter().map(|a| a.to_string()).collect(),
                argv_truncated: false,
                exe_ino: pid as u64,
                exe_dev: 1,
                exe_size: 0,
                arg_start: 0,
                exe_memfd: false,
                exe_deleted: false,
                script: None,
                ld_preload: preload.map(String::from),
                history_off: false,
                copy_of: None,
                stdio: Default::default(),
                stdio_ids: Default::default(),
                env_truncated: false,
                frozen: false,
            }),
        };
        let mut wl = |_: u32, _: u64| Arc::new(Workload::default());
        tree.apply(&event, &mut wl);
        let p = tree.get(pid).unwrap();
        EnrichedEvent {
            time_unix_nanos: 0,
            process: ProcessView {
                pid,
                ppid,
                image: p.image.clone(),
                comm: "x".into(),
                uid: 0,
                euid: 0,
                workload: Arc::new(Workload::default()),
            },
            ancestry: tree.ancestry(pid),
            event: Arc::new(event),
        }
    }

    #[test]
    fn a_learned_edge_does_not_silence_a_finding_never_seen_on_it() {
        let mut tree = ProcessTree::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut engine =
            DetectEngine::new(Baseline::new(Some(t0 + Duration::from_secs(3600))), None, 0);
        let ev = exec(&mut tree, 10, 1, "/usr/bin/bash", None);
        engine.observe(&ev, &tree, t0);
        // Learned: bash starting sleep, and sleep with one preloaded library.
        let ev = exec(&mut tree, 11, 10, "/usr/bin/sleep", None);
        assert!(engine.observe(&ev, &tree, t0).is_empty());
        let ev = exec(
            &mut tree,
            12,
            10,
            "/usr/bin/sleep",
            Some("/opt/apm/libagent.so"),
        );
        assert!(engine.observe(&ev, &tree, t0).is_empty());
        engine.baseline_mut().stop_learning();
        let rules_of = |d: Vec<Detection>| d.into_iter().map(|d| d.rule).collect::<Vec<_>>();
        // The same edge with another library: reported.
        let ev = exec(
            &mut tree,
            13,
            10,
            "/usr/bin/sleep",
            Some("/srv/app/libcache.so"),
        );
        assert_eq!(
            rules_of(engine.observe(&ev, &tree, t0)),
            ["ld_preload_injection"]
        );
        // What was learned stays quiet.
        let ev = exec(
            &mut tree,
            14,
            10,
            "/usr/bin/sleep",
            Some("/opt/apm/libagent.so"),
        );
        assert!(engine.observe(&ev, &tree, t0).is_empty());
        let ev = exec(&mut tree, 15, 10, "/usr/bin/sleep", None);
        assert!(engine.observe(&ev, &tree, t0).is_empty());
    }

    #[test]
    fn a_tool_run_with_varied_arguments_while_learning_stays_quiet_on_new_ones() {
        let mut tree = ProcessTree::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut engine =
            DetectEngine::new(Baseline::new(Some(t0 + Duration::from_secs(3600))), None, 0);
        let make = exec(&mut tree, 10, 1, "/usr/bin/make", None);
        engine.observe(&make, &tree, t0);
        let app = exec(&mut tree, 20, 1, "/opt/shop/bin/worker", None);
        engine.observe(&app, &tree, t0);
        let mut pid = 100;
        let mut run =
            |tree: &mut ProcessTree, engine: &mut DetectEngine, ppid, exe, argv: &[&str]| {
                pid += 1;
                let ev = exec_argv(tree, pid, ppid, exe, argv, None);
                engine
                    .observe(&ev, tree, t0)
                    .into_iter()
                    .map(|d| d.rule)
                    .collect::<Vec<_>>()
            };
        // Learning: make compiles four files, the app shells out with
        // four commands and resizes one image.
        for f in ["main.c", "util.c", "parse.c", "scan.c"] {
            run(
                &mut tree,
                &mut engine,
                10,
                "/usr/bin/gcc",
                &["gcc", "-c", f],
            );
        }
        for c in ["uptime", "df -h", "date", "free -m"] {
            run(&mut tree, &mut engine, 20, "/bin/sh", &["sh", "-c", c]);
        }
        run(
            &mut tree,
            &mut engine,
            20,
            "/usr/bin/convert",
            &["convert", "a.png", "b.jpg"],
        );
        engine.baseline_mut().stop_learning();
        // A new source file: quiet.
        assert!(run(
            &mut tree,
            &mut engine,
            10,
            "/usr/bin/gcc",
            &["gcc", "-c", "lexer.c"]
        )
        .is_empty());
        // A new shell command, a new convert call: anomalies.
        let sh = run(&mut tree, &mut engine, 20, "/bin/sh", &["sh", "-c", "id"]);
        assert!(sh.contains(&"baseline_anomaly".to_string()), "{sh:?}");
        let cv = run(
            &mut tree,
            &mut engine,
            20,
            "/usr/bin/convert",
            &["convert", "-x", "c", "d", "e"],
        );
        assert_eq!(cv, ["baseline_anomaly"]);
        // A program make never started: an anomaly.
        let ld = run(
            &mut tree,
            &mut engine,
            10,
            "/usr/bin/ld",
            &["ld", "-o", "x"],
        );
        assert_eq!(ld, ["baseline_anomaly"]);
    }
}
