//! The scenario corpora through the runner, on the real kernel: the
//! project's own (`tests/scenarios`) and the shared one (`../shared/scenarios`,
//! skipped with a notice where it is absent).

use std::path::{Path, PathBuf};

use vigil_tests::scenarios;

/// Scenario runs must not overlap: a learning agent would learn the other
/// run's attacks as normal for the host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_dir(dir: &Path, tag: &str) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let work = std::env::temp_dir().join(format!("vigil-scenarios-{tag}-{}", std::process::id()));
    let outcomes = scenarios::run(dir, &work).expect("scenario run");
    let report = scenarios::report(&outcomes);
    println!("{report}");
    assert!(
        outcomes.iter().all(|o| o.passed),
        "scenarios failed in {}:\n{report}\n(agent output in {})",
        dir.display(),
        work.display()
    );
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn project_scenarios() {
    run_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios"),
        "own",
    );
}

#[test]
fn shared_scenarios() {
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
    run_dir(&dir, "shared");
}
