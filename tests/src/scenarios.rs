//! The scenario runner: runs a directory of behaviour scenarios
//! (`attack/*.sh`, `benign/*.sh`, `lib.sh`) against the real agent.
//!
//! 1. Learning: an agent learns the baseline while every benign scenario
//!    runs, then saves it (SIGINT).
//! 2. Testing: a second agent loads that baseline (learning off); each
//!    scenario runs alone. A benign scenario must raise nothing; an attack
//!    scenario must raise one detection per `# expect:` line (alternatives
//!    separated by `|`, matched as prefixes of the detection's ATT&CK ids;
//!    distinct lines need distinct detections).
//!
//! A detection belongs to a scenario when the scenario's shell is the
//! triggering process or one of its ancestors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Agent;

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
}

/// Outcome of one scenario.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// Passed?
    pub passed: bool,
    /// Rules raised (with their techniques).
    pub raised: Vec<String>,
    /// What was wrong, if anything.
    pub problem: Option<String>,
    /// Latencies (ns) of its detections.
    pub latencies: Vec<u64>,
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
            out.push(Scenario {
                name: path.file_stem().unwrap().to_string_lossy().into_owned(),
                path,
                attack,
                expect,
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
                    techniques(d)
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

/// Runs every scenario of `dir`; `work` keeps the agents' output.
pub fn run(dir: &Path, work: &Path) -> anyhow::Result<Vec<Outcome>> {
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
        for s in scenarios.iter().filter(|s| !s.attack) {
            run_script(&s.path, &work.join(format!("learn-{}.log", s.name)))?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let (st, _) = agent.stop();
        anyhow::ensure!(st.success(), "learning agent exited with {st}");
        anyhow::ensure!(baseline.exists(), "the learning agent saved no baseline");
    }

    // 2. Test every scenario against the learned baseline.
    let dets_path = work.join("detections.jsonl");
    let _ = std::fs::remove_file(&dets_path);
    let agent = Agent::start(&[
        "--config",
        &cfg_s,
        "--learn",
        "0s",
        "--baseline-file",
        &base_s,
        "--detections-json",
        &dets_path.to_string_lossy(),
    ]);
    let mut out = Vec::new();
    for s in &scenarios {
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
        let problem = if let Some(f) = failure {
            Some(f)
        } else if s.attack {
            let missing = unmatched(&s.expect, &dets);
            (!missing.is_empty()).then(|| format!("missing: {}", missing.join("; ")))
        } else {
            (!dets.is_empty())
                .then(|| format!("benign scenario raised {} detection(s)", dets.len()))
        };
        out.push(Outcome {
            scenario: s.clone(),
            passed: problem.is_none(),
            raised,
            problem,
            latencies,
        });
    }
    drop(agent);
    Ok(out)
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
            if o.passed { "PASS" } else { "FAIL" },
            if raised.is_empty() {
                "-".to_string()
            } else {
                raised.join(" ")
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
    let passed = outcomes.iter().filter(|o| o.passed).count();
    s.push_str(&format!(
        "{} passed, {} failed\n",
        passed,
        outcomes.len() - passed
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
}
