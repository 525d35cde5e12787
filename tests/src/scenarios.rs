//! The scenario runner: runs a directory of behaviour scenarios
//! (`attack/*.sh`, `benign/*.sh`, `lib.sh`) against the real agent.
//!
//! 1. Learning: an agent learns the baseline while every benign scenario
//!    runs [`LEARN_ROUNDS`] times, then saves it (SIGINT). Each run of a
//!    benign scenario makes new names (temp files, request ids, time
//!    stamps, its application directory): the test run after it is the
//!    third, and must be quiet.
//! 2. Testing: a second agent loads that baseline (learning off); each
//!    scenario runs alone. A benign scenario must raise nothing; an attack
//!    scenario must raise one detection per `# expect:` line (alternatives
//!    separated by `|`, each a rule id, matched exactly, or an ATT&CK id,
//!    matched as a prefix of the detection's technique ids; distinct lines
//!    need distinct detections). A scenario with `# requires: PATH` lines
//!    is skipped (and reported so) on a machine where a path is missing,
//!    such as `/proc/modules` on a kernel built without modules.
//!
//! [`rules_no_scenario_needs`] is the mutation check: with each rule's
//! detections taken out in turn, some attack scenario must fail.
//!
//! A detection belongs to a scenario when the scenario's shell is the
//! triggering process or one of its ancestors.
//!
//! With [`RunOptions::collector`], the testing agent ships to a real
//! collector started here (its own PKI, mutual TLS), and every attack
//! scenario must also yield an evidence bundle that reaches the collector
//! byte-identical and verifies (every artifact against the manifest); all
//! bundles of the run must form one unbroken chain of custody, each stored
//! once, and the collector must hold exactly the agent's detections. With
//! [`RunOptions::outage`] the collector is killed (SIGKILL) after the first
//! attack scenario and started again only after the last one (plus the
//! given extra time): nothing may be lost or doubled meanwhile.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::collector::{init_pki, shipping_args, vigil_cli, Collector};
use crate::Agent;

/// How many times the learning agent sees each benign scenario
/// (`VIGIL_LEARN_ROUNDS` overrides it, for measuring how fast the
/// baseline settles).
pub const LEARN_ROUNDS: usize = 2;

fn learn_rounds() -> usize {
    std::env::var("VIGIL_LEARN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LEARN_ROUNDS)
}

/// One scenario script.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// File name without extension.
    pub name: String,
    /// The script.
    pub path: PathBuf,
    /// Attack (true) or benign.
    pub attack: bool,
    /// Expectation lines: each a list of alternative technique prefixes.
    pub expect: Vec<Vec<String>>,
    /// Paths that must exist for the scenario to run (`# requires:`).
    pub requires: Vec<PathBuf>,
}

impl Scenario {
    /// The first required path this machine lacks, if any.
    pub fn missing_requirement(&self) -> Option<&Path> {
        self.requires
            .iter()
            .map(PathBuf::as_path)
            .find(|p| !p.exists())
    }
}

/// How to run the scenarios.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Ship to a real collector and require evidence there (see the module
    /// docs).
    pub collector: bool,
    /// With `collector`: kill it after the first attack scenario and start
    /// it again this long after the last one.
    pub outage: Option<Duration>,
}

/// What the collector check found, for the report.
#[derive(Clone, Debug, Default)]
pub struct CollectorCheck {
    /// Bundles the agent sealed during the test phase.
    pub bundles: usize,
    /// Of which stored at the collector, byte-identical and verified.
    pub stored: usize,
    /// Detections the agent raised during the run / of those, stored.
    pub detections: (usize, usize),
    /// How long the collector was down (outage runs).
    pub outage: Option<Duration>,
    /// Last bundle sealed -> last bundle stored.
    pub drain: Duration,
    /// Capture times (detection handed over -> bundle sealed), ms: median
    /// and max.
    pub capture_ms: (u64, u64),
    /// Bundles that are a stand-in (the detected process was gone).
    pub stand_ins: usize,
    /// Everything wrong with the run as a whole.
    pub problems: Vec<String>,
}

/// Outcome of one scenario.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// Passed? (A skipped scenario passes.)
    pub passed: bool,
    /// Why it did not run, when skipped.
    pub skipped: Option<String>,
    /// Rules raised (with their techniques).
    pub raised: Vec<String>,
    /// What was wrong, if anything.
    pub problem: Option<String>,
    /// Latencies (ns) of its detections.
    pub latencies: Vec<u64>,
    /// Evidence bundles captured for it (ids).
    pub bundles: Vec<String>,
    /// Its detections, as the agent wrote them.
    pub detections: Vec<Value>,
}

/// Reads `dir/attack/*.sh` and `dir/benign/*.sh`.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Scenario>> {
    anyhow::ensure!(
        dir.join("lib.sh").exists(),
        "{} is not a scenario directory (no lib.sh)",
        dir.display()
    );
    let mut out = Vec::new();
    for (sub, attack) in [("benign", false), ("attack", true)] {
        let d = dir.join(sub);
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sh"))
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path)?;
            let expect = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("# expect:"))
                .map(|l| {
                    l.split('|')
                        .map(|a| a.trim().to_string())
                        .filter(|a| !a.is_empty())
                        .collect()
                })
                .collect();
            let requires = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("# requires:"))
                .map(|l| PathBuf::from(l.trim()))
                .collect();
            out.push(Scenario {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                path,
                attack,
                expect,
                requires,
            });
        }
    }
    Ok(out)
}

/// Runs one script with bash; returns its pid and, if it did not succeed,
/// why. Bounded at 120 s.
fn run_script(path: &Path, log: &Path) -> anyhow::Result<(u32, Option<String>)> {
    let logf = std::fs::File::create(log)?;
    let mut child = Command::new("bash")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Ok((pid, (!st.success()).then(|| format!("script {st}: {tail}"))));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((pid, Some("script timed out after 120 s".into())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn detections(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn belongs_to(d: &Value, pid: u32) -> bool {
    let pid = pid as u64;
    d["process"]["pid"].as_u64() == Some(pid)
        || d["ancestry"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["pid"].as_u64() == Some(pid)))
}

fn techniques(d: &Value) -> Vec<String> {
    d["mitre"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Matches expectation lines to distinct detections. Returns the lines
/// left unmatched.
pub fn unmatched(expect: &[Vec<String>], dets: &[Value]) -> Vec<String> {
    let cands: Vec<Vec<usize>> = expect
        .iter()
        .map(|alts| {
            dets.iter()
                .enumerate()
                .filter(|(_, d)| {
                    let rule = d["rule"].as_str().unwrap_or("");
                    alts.iter().any(|a| a == rule)
                        || techniques(d)
                            .iter()
                            .any(|t| alts.iter().any(|a| t.starts_with(a.as_str())))
                })
                .map(|(i, _)| i)
                .collect()
        })
        .collect();
    // Augmenting-path bipartite matching (lines are few).
    fn try_line(
        l: usize,
        cands: &[Vec<usize>],
        seen: &mut [bool],
        owner: &mut [Option<usize>],
    ) -> bool {
        for &d in &cands[l] {
            if seen[d] {
                continue;
            }
            seen[d] = true;
            if owner[d].is_none() || try_line(owner[d].unwrap(), cands, seen, owner) {
                owner[d] = Some(l);
                return true;
            }
        }
        false
    }
    let mut owner = vec![None; dets.len()];
    let mut missing = Vec::new();
    for (l, alts) in expect.iter().enumerate() {
        let mut seen = vec![false; dets.len()];
        if !try_line(l, &cands, &mut seen, &mut owner) {
            missing.push(alts.join("|"));
        }
    }
    missing
}

/// The mutation check: the rules of `rules` whose detections no attack
/// scenario needs, i.e. taking every detection of that rule out of a run
/// leaves every scenario that passed still passing. Such a rule is
/// untested by the corpus (or redundant with another).
pub fn rules_no_scenario_needs(outcomes: &[Outcome], rules: &[&str]) -> Vec<String> {
    rules
        .iter()
        .filter(|rule| {
            !outcomes
                .iter()
                .filter(|o| o.scenario.attack && o.passed && o.skipped.is_none())
                .any(|o| {
                    let without: Vec<Value> = o
                        .detections
                        .iter()
                        .filter(|d| d["rule"].as_str() != Some(**rule))
                        .cloned()
                        .collect();
                    !unmatched(&o.scenario.expect, &without).is_empty()
                })
        })
        .map(|r| r.to_string())
        .collect()
}

/// Runs every scenario of `dir`; `work` keeps the agents' output.
pub fn run(dir: &Path, work: &Path) -> anyhow::Result<Vec<Outcome>> {
    Ok(run_with(dir, work, &RunOptions::default())?.0)
}

/// [`run`] with options; with a collector also returns its check.
pub fn run_with(
    dir: &Path,
    work: &Path,
    opts: &RunOptions,
) -> anyhow::Result<(Vec<Outcome>, Option<CollectorCheck>)> {
    let scenarios = load(dir)?;
    anyhow::ensure!(!scenarios.is_empty(), "no scenarios in {}", dir.display());
    std::fs::create_dir_all(work)?;
    let baseline = work.join("baseline.json");
    let _ = std::fs::remove_file(&baseline);
    let cfg = work.join("agent.toml");
    // Keep exited processes long enough that every scenario's ancestry stays
    // whole even when its helpers exit early.
    std::fs::write(&cfg, "exit_grace_secs = 600\n")?;
    let cfg_s = cfg.to_string_lossy().into_owned();
    let base_s = baseline.to_string_lossy().into_owned();

    // 1. Learn from the benign scenarios.
    {
        let learn_dets = work.join("learn-detections.jsonl");
        let mut agent = Agent::start(&[
            "--config",
            &cfg_s,
            "--learn",
            "24h",
            "--baseline-file",
            &base_s,
            "--detections-json",
            &learn_dets.to_string_lossy(),
        ]);
        for round in 0..learn_rounds() {
            for s in scenarios
                .iter()
                .filter(|s| !s.attack && s.missing_requirement().is_none())
            {
                let log = work.join(format!("learn{round}-{}.log", s.name));
                run_script(&s.path, &log)?;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let (st, _) = agent.stop();
        anyhow::ensure!(st.success(), "learning agent exited with {st}");
        anyhow::ensure!(baseline.exists(), "the learning agent saved no baseline");
    }

    // 2. Test every scenario against the learned baseline.
    let dets_path = work.join("detections.jsonl");
    let _ = std::fs::remove_file(&dets_path);
    let dets_s = dets_path.to_string_lossy().into_owned();
    let mut args: Vec<String> = [
        "--config",
        &cfg_s,
        "--learn",
        "0s",
        "--baseline-file",
        &base_s,
        "--detections-json",
        &dets_s,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut shipping = if opts.collector {
        let s = Shipping::start(work)?;
        args.extend(s.agent_args());
        Some(s)
    } else {
        None
    };
    let agent = Agent::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut out = Vec::new();
    let mut outage_started: Option<Instant> = None;
    let last_attack = scenarios.iter().rposition(|s| s.attack);
    for (idx, s) in scenarios.iter().enumerate() {
        if let Some(p) = s.missing_requirement() {
            out.push(Outcome {
                scenario: s.clone(),
                passed: true,
                skipped: Some(format!("this machine has no {}", p.display())),
                raised: Vec::new(),
                problem: None,
                latencies: Vec::new(),
                bundles: Vec::new(),
                detections: Vec::new(),
            });
            continue;
        }
        // Only detections written from now on can be this scenario's (pids
        // are reused).
        let seen_before = detections(&dets_path).len();
        let (pid, failure) = run_script(&s.path, &work.join(format!("{}.log", s.name)))?;
        // Expectations hold from start until 3 s after exit.
        std::thread::sleep(Duration::from_secs(3));
        let _ = agent.metrics(); // a round trip: the agent is alive and draining
        let dets: Vec<Value> = detections(&dets_path)
            .into_iter()
            .skip(seen_before)
            .filter(|d| belongs_to(d, pid))
            .collect();
        let raised: Vec<String> = dets
            .iter()
            .map(|d| {
                format!(
                    "{}[{}]",
                    d["rule"].as_str().unwrap_or("?"),
                    techniques(d).join(",")
                )
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let latencies = dets
            .iter()
            .filter_map(|d| d["latency_ns"].as_u64())
            .collect();
        let bundles = if shipping.is_some() && s.attack {
            scenario_bundles(&agent, pid, Duration::from_secs(30))
        } else {
            Vec::new()
        };
        if let Some(sh) = &mut shipping {
            if s.attack && opts.outage.is_some() && outage_started.is_none() {
                sh.kill();
                outage_started = Some(Instant::now());
            }
            if Some(idx) == last_attack {
                if let Some(extra) = opts.outage {
                    std::thread::sleep(extra);
                    sh.restart();
                }
            }
        }
        let problem = if let Some(f) = failure {
            Some(f)
        } else if s.attack {
            let missing = unmatched(&s.expect, &dets);
            if !missing.is_empty() {
                Some(format!("missing: {}", missing.join("; ")))
            } else if shipping.is_some() && bundles.is_empty() {
                Some(format!(
                    "no evidence bundle captured ({})",
                    capture_errors(&agent, pid, &dets).join("; ")
                ))
            } else {
                None
            }
        } else {
            (!dets.is_empty())
                .then(|| format!("benign scenario raised {} detection(s)", dets.len()))
        };
        out.push(Outcome {
            scenario: s.clone(),
            passed: problem.is_none(),
            skipped: None,
            raised,
            problem,
            latencies,
            bundles,
            detections: dets,
        });
    }
    let check = match shipping {
        Some(sh) => {
            let outage = outage_started.map(|t| sh.restarted.unwrap_or(t).duration_since(t));
            let mut check = sh.check(&agent, &dets_path);
            check.outage = outage;
            // A scenario's bundles must be among those stored and verified.
            for o in &mut out {
                if o.problem.is_none() && o.bundles.iter().any(|b| check.missing(b)) {
                    o.passed = false;
                    o.problem =
                        Some("its evidence bundle did not reach the collector intact".into());
                }
            }
            Some(check)
        }
        None => None,
    };
    // Keep the capture outcomes with the rest of the run's output.
    let _ = std::fs::copy(
        agent.dir.path().join("evidence.jsonl"),
        work.join("evidence.jsonl"),
    );
    drop(agent);
    Ok((out, check))
}

/// Bundles captured for the scenario whose shell is `pid` (waiting up to
/// `timeout` for the first: captures finish after the scenario).
fn scenario_bundles(agent: &Agent, pid: u32, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let ids: Vec<String> = agent
            .evidence()
            .iter()
            .filter(|e| belongs_to(&e["detection"], pid))
            .filter_map(|e| e["evidence"]["bundle_id"].as_str().map(String::from))
            .collect();
        if !ids.is_empty() || Instant::now() > deadline {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Why a scenario has no bundle: the captures' errors, else whether any
/// of its detections asked for a capture at all.
fn capture_errors(agent: &Agent, pid: u32, dets: &[Value]) -> Vec<String> {
    let errs: Vec<String> = agent
        .evidence()
        .iter()
        .filter(|e| belongs_to(&e["detection"], pid))
        .filter_map(|e| e["error"].as_str().map(String::from))
        .collect();
    if !errs.is_empty() {
        return errs;
    }
    let asked = dets
        .iter()
        .filter(|d| !d["evidence"]["capture"].is_null())
        .count();
    if asked > 0 {
        vec![format!(
            "{asked} detection(s) asked for a capture and none ended within the wait \
             (still queued or running: a slow or overloaded machine)"
        )]
    } else {
        vec!["no capture was attempted: no detection at or above the capture severity".into()]
    }
}

/// The collector side of a run: PKI, the collector process, and the check
/// at the end.
struct Shipping {
    pki: PathBuf,
    data: PathBuf,
    spool: PathBuf,
    port: u16,
    collector: Option<Collector>,
    restarted: Option<Instant>,
}

const SCENARIO_AGENT: &str = "scenario-agent";

impl Shipping {
    fn start(work: &Path) -> anyhow::Result<Shipping> {
        let pki = work.join("pki");
        let data = work.join("collector");
        let spool = work.join("spool");
        for d in [&pki, &data, &spool] {
            let _ = std::fs::remove_dir_all(d);
        }
        init_pki(&pki, SCENARIO_AGENT);
        let port = crate::free_port();
        let collector = Some(Collector::start(port, &pki, &data));
        Ok(Shipping {
            pki,
            data,
            spool,
            port,
            collector,
            restarted: None,
        })
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn agent_args(&self) -> Vec<String> {
        shipping_args(&self.url(), &self.pki, SCENARIO_AGENT, &self.spool)
    }

    fn kill(&mut self) {
        if let Some(c) = self.collector.take() {
            c.kill();
        }
    }

    fn restart(&mut self) {
        self.collector = Some(Collector::start(self.port, &self.pki, &self.data));
        self.restarted = Some(Instant::now());
    }

    /// Waits (bounded) until every bundle the agent sealed is stored, then
    /// checks bytes, manifests, the chain, and the detections.
    fn check(&self, agent: &Agent, dets_path: &Path) -> CollectorCheck {
        let mut c = CollectorCheck::default();
        let coll = self.collector.as_ref().expect("collector running");
        // Every capture of the test phase, in the agent's chain order; read
        // again until nothing new is sealed and everything sealed is stored
        // and acknowledged (captures finish after their scenario).
        let sealed_now = || {
            let mut v: Vec<(u64, String, PathBuf)> = agent
                .evidence()
                .iter()
                .filter_map(|e| {
                    let ev = &e["evidence"];
                    Some((
                        ev["seq"].as_u64()?,
                        ev["bundle_id"].as_str()?.to_string(),
                        PathBuf::from(ev["archive"].as_str()?),
                    ))
                })
                .collect();
            v.sort();
            v
        };
        let sent_now = || agent.metric("vigil_ship_sent_total{kind=\"bundle\"}") as usize;
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(180);
        let mut sealed = sealed_now();
        loop {
            if Instant::now() > deadline {
                break;
            }
            let settled = sealed.iter().all(|(_, id, _)| coll.blob(id).exists())
                && sent_now() >= sealed.len();
            if settled {
                std::thread::sleep(Duration::from_secs(2));
                let again = sealed_now();
                // Nothing new sealed: done (a count mismatch is reported
                // below).
                if again.len() == sealed.len() {
                    break;
                }
                sealed = again;
                continue;
            }
            std::thread::sleep(Duration::from_millis(200));
            sealed = sealed_now();
        }
        // A capture can still finish after a quiet spell (a stand-in queued
        // behind others while the collector was down): wait, bounded, until
        // what was sealed and what was acknowledged agree, and check all of
        // it.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let now = sealed_now();
            let agree =
                now.len() == sent_now() && now.iter().all(|(_, id, _)| coll.blob(id).exists());
            sealed = now;
            if agree || Instant::now() > until {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        c.bundles = sealed.len();
        c.drain = t0.elapsed();
        let evidence = agent.evidence();
        let mut ms: Vec<u64> = evidence
            .iter()
            .filter_map(|e| e["evidence"]["timings"]["total_us"].as_u64())
            .map(|us| us / 1000)
            .collect();
        ms.sort_unstable();
        if !ms.is_empty() {
            c.capture_ms = (ms[ms.len() / 2], ms[ms.len() - 1]);
        }
        c.stand_ins = evidence
            .iter()
            .filter(|e| e["stand_in"].as_bool() == Some(true) && e.get("evidence").is_some())
            .count();
        let mut stored_paths = Vec::new();
        for (_, id, archive) in &sealed {
            let blob = coll.blob(id);
            if !blob.exists() {
                c.problems
                    .push(format!("bundle {id} never reached the collector"));
                continue;
            }
            match (std::fs::read(&blob), std::fs::read(archive)) {
                (Ok(a), Ok(b)) if a == b => {}
                (Ok(_), Ok(_)) => {
                    c.problems
                        .push(format!("bundle {id} differs at the collector"));
                    continue;
                }
                (a, b) => {
                    c.problems.push(format!(
                        "bundle {id}: reading it failed (collector {:?}, agent {:?})",
                        a.err(),
                        b.err()
                    ));
                    continue;
                }
            }
            if let Err(e) = vigil_agent::capture::bundle::verify_bundle(&blob) {
                c.problems.push(format!("bundle {id} does not verify: {e}"));
                continue;
            }
            c.stored += 1;
            stored_paths.push(blob);
        }
        if stored_paths.len() == sealed.len() && !stored_paths.is_empty() {
            if let Err(e) = vigil_agent::capture::bundle::verify_chain(&stored_paths) {
                c.problems.push(format!("chain of custody: {e}"));
            }
        }
        // Exactly once: the agent was acknowledged once per bundle.
        let sent = sent_now();
        if sent != sealed.len() {
            c.problems.push(format!(
                "the agent shipped {sent} bundles for {} sealed",
                sealed.len()
            ));
        }
        // Detections: the collector holds each the agent raised, once.
        // (The runner's own `vigil` calls raise more while this runs: those
        // may be missing, never doubled.)
        let raised: Vec<String> = detections(dets_path).iter().map(detection_key).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut missing, mut doubled);
        loop {
            let stored = self.stored_detections();
            let mut count = std::collections::HashMap::new();
            for k in stored.iter().flatten() {
                *count.entry(k.clone()).or_insert(0usize) += 1;
            }
            missing = raised.iter().filter(|k| !count.contains_key(*k)).count();
            doubled = count.values().filter(|&&n| n > 1).count();
            c.detections = (raised.len(), raised.len() - missing);
            if (stored.is_some() && missing == 0) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if missing > 0 {
            c.problems.push(format!(
                "{missing} of the agent's {} detections are not at the collector",
                raised.len()
            ));
        }
        if doubled > 0 {
            c.problems
                .push(format!("{doubled} detections are stored more than once"));
        }
        c
    }

    fn stored_detections(&self) -> Option<Vec<String>> {
        let out = vigil_cli(
            &self.url(),
            &self.pki,
            &["detections", "list", "--json", "--limit", "1000"],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .ok()
            .map(|v| v.iter().map(|d| detection_key(&d["detection"])).collect())
    }
}

/// A detection's identity: event time, rule, process.
fn detection_key(d: &Value) -> String {
    format!(
        "{} {} {}",
        d["time"].as_str().unwrap_or(""),
        d["rule"].as_str().unwrap_or(""),
        d["process"]["pid"]
    )
}

impl CollectorCheck {
    fn missing(&self, id: &str) -> bool {
        self.problems.iter().any(|p| p.contains(id))
    }

    /// Printed under the scenario table.
    pub fn report(&self) -> String {
        let mut s = format!(
            "collector: {} of {} bundles ({} stand-ins; capture p50 {} ms, max {} ms) stored byte-identical and verified, chain of custody {}; detections {} raised, {} stored once; drained {:.1} s after the run{}\n",
            self.stored,
            self.bundles,
            self.stand_ins,
            self.capture_ms.0,
            self.capture_ms.1,
            if self.problems.iter().any(|p| p.starts_with("chain")) { "BROKEN" } else { "unbroken" },
            self.detections.0,
            self.detections.1,
            self.drain.as_secs_f64(),
            self.outage
                .map(|d| format!("; collector down {:.0} s", d.as_secs_f64()))
                .unwrap_or_default()
        );
        for p in &self.problems {
            s.push_str(&format!("  problem: {p}\n"));
        }
        s
    }

    /// No problem found.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.bundles > 0
    }
}

/// Prints the result table and the closing `N passed, N failed` line.
pub fn report(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<34} {:<7} {:<5} detections\n",
        "scenario", "kind", "ok"
    ));
    for o in outcomes {
        let mut raised = o.raised.clone();
        raised.sort();
        s.push_str(&format!(
            "{:<34} {:<7} {:<5} {}{}\n",
            o.scenario.name,
            if o.scenario.attack {
                "attack"
            } else {
                "benign"
            },
            if o.skipped.is_some() {
                "SKIP"
            } else if o.passed {
                "PASS"
            } else {
                "FAIL"
            },
            if let Some(why) = &o.skipped {
                format!("skipped: {why}")
            } else if raised.is_empty() {
                "-".to_string()
            } else {
                raised.join(" ")
            } + &if o.bundles.is_empty() {
                String::new()
            } else {
                format!(" +{} bundle(s)", o.bundles.len())
            },
            o.problem
                .as_ref()
                .map(|p| format!("  <- {p}"))
                .unwrap_or_default()
        ));
    }
    let mut lat: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.latencies.iter().copied())
        .collect();
    lat.sort_unstable();
    if !lat.is_empty() {
        let q = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e6;
        s.push_str(&format!(
            "detection latency (kernel event -> decision): p50 {:.2} ms, p99 {:.2} ms, n={}\n",
            q(0.5),
            q(0.99),
            lat.len()
        ));
    }
    let skipped = outcomes.iter().filter(|o| o.skipped.is_some()).count();
    let passed = outcomes.iter().filter(|o| o.passed).count() - skipped;
    s.push_str(&format!(
        "{} passed, {} failed, {} skipped\n",
        passed,
        outcomes.len() - passed - skipped,
        skipped
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matching_needs_distinct_detections() {
        let d = vec![json!({"mitre": ["T1059.004"]}), json!({"mitre": ["T1095"]})];
        let e = |s: &str| s.split('|').map(String::from).collect::<Vec<_>>();
        assert!(unmatched(&[e("T1059"), e("T1071|T1095|T1059")], &d).is_empty());
        let one = vec![json!({"mitre": ["T1059.004"]})];
        assert_eq!(
            unmatched(&[e("T1059"), e("T1071|T1095|T1059")], &one).len(),
            1
        );
        assert_eq!(unmatched(&[e("T1105")], &one), ["T1105"]);
    }

    #[test]
    fn rule_ids_match_exactly_and_the_mutation_check_finds_unneeded_rules() {
        let e = |s: &str| s.split('|').map(String::from).collect::<Vec<_>>();
        let d = vec![
            json!({"rule": "pipe_to_shell", "mitre": ["T1059.004"]}),
            json!({"rule": "exec_from_temp_dir", "mitre": []}),
        ];
        assert!(unmatched(&[e("pipe_to_shell")], &d).is_empty());
        assert_eq!(
            unmatched(&[e("pipe_to")], &d).len(),
            1,
            "no prefix match on rules"
        );
        let scenario = |expect: &[&str]| Scenario {
            name: "s".into(),
            path: PathBuf::from("s.sh"),
            attack: true,
            expect: expect.iter().map(|x| e(x)).collect(),
            requires: vec![],
        };
        let outcome = |expect: &[&str]| Outcome {
            scenario: scenario(expect),
            passed: true,
            skipped: None,
            raised: vec![],
            problem: None,
            latencies: vec![],
            bundles: vec![],
            detections: d.clone(),
        };
        let rules = ["pipe_to_shell", "exec_from_temp_dir", "masquerading"];
        // Only pipe_to_shell is needed: the others can go.
        assert_eq!(
            rules_no_scenario_needs(&[outcome(&["T1059"])], &rules),
            ["exec_from_temp_dir", "masquerading"]
        );
        // Either rule satisfies the line: neither is needed alone.
        assert_eq!(
            rules_no_scenario_needs(&[outcome(&["pipe_to_shell|exec_from_temp_dir"])], &rules),
            rules
        );
    }
}
