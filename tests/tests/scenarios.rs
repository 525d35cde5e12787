//! The scenario corpora through the runner, on the real kernel and with the
//! real collector: the project's own (`tests/scenarios`) and the shared one
//! (`../shared/scenarios`, skipped with a notice where it is absent). Every
//! attack scenario must be detected as its `# expect:` lines say and yield
//! an evidence bundle that reaches the collector byte-identical and
//! verified. The shared corpus runs with the collector killed after its
//! first attack scenario and restarted 30 s after its last (about two
//! minutes down): every bundle and detection must still arrive, once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vigil_tests::scenarios::{self, RunOptions};

/// Scenario runs must not overlap: a learning agent would learn the other
/// run's attacks as normal for the host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_dir(dir: &Path, tag: &str, opts: RunOptions) -> Vec<scenarios::Outcome> {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = std::env::temp_dir().join(format!("vigil-scenarios-{tag}-{}", std::process::id()));
    let (outcomes, check) = scenarios::run_with(dir, &work, &opts).expect("scenario run");
    let mut report = scenarios::report(&outcomes);
    if let Some(c) = &check {
        report.push_str(&c.report());
    }
    println!("{report}");
    assert!(
        outcomes.iter().all(|o| o.passed) && check.as_ref().is_none_or(|c| c.ok()),
        "scenarios failed in {}:\n{report}\n(agent output in {})",
        dir.display(),
        work.display()
    );
    let _ = std::fs::remove_dir_all(&work);
    outcomes
}

/// Rules the project's corpus cannot exercise on a kernel without BPF LSM
/// (`tests/tests/deny_exec.rs` covers it in the VM testbed).
const NEEDS_BPF_LSM: &[&str] = &[vigil_agent::detect::rules::ids::EXEC_DENIED];

#[test]
fn project_scenarios() {
    let outcomes = run_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios"),
        "own",
        RunOptions {
            collector: true,
            outage: None,
        },
    );
    // The mutation check: each built-in rule switched off in turn (its
    // detections taken out of the run) must make some scenario fail.
    // A rule only skipped scenarios expect (a requirement this machine
    // lacks, such as kernel modules) cannot be checked here.
    let only_skipped: Vec<&str> = vigil_agent::detect::rules::ids::ALL
        .iter()
        .copied()
        .filter(|r| {
            let expects =
                |o: &&scenarios::Outcome| o.scenario.expect.iter().flatten().any(|a| a == r);
            outcomes.iter().filter(expects).count() > 0
                && outcomes.iter().filter(expects).all(|o| o.skipped.is_some())
        })
        .collect();
    if !only_skipped.is_empty() {
        eprintln!(
            "NOTICE: the mutation check skips {only_skipped:?}: their scenarios were skipped"
        );
    }
    let rules: Vec<&str> = vigil_agent::detect::rules::ids::ALL
        .iter()
        .copied()
        .filter(|r| !NEEDS_BPF_LSM.contains(r) && !only_skipped.contains(r))
        .collect();
    let unneeded = scenarios::rules_no_scenario_needs(&outcomes, &rules);
    assert!(
        unneeded.is_empty(),
        "no scenario of the project's corpus fails without these rules: {unneeded:?}"
    );
}

#[test]
fn shared_scenarios_with_a_collector_outage() {
    let dir: PathBuf = std::env::var_os("VIGIL_SHARED_SCENARIOS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/scenarios"));
    if !dir.join("lib.sh").exists() {
        eprintln!(
            "NOTICE: shared scenarios not found at {}: skipped",
            dir.display()
        );
        return;
    }
    run_dir(
        &dir,
        "shared",
        RunOptions {
            collector: true,
            outage: Some(Duration::from_secs(30)),
        },
    );
}
