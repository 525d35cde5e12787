//! `vigil-scenarios [--dir DIR]... [--work DIR] [--collector] [--outage SECS]`:
//! runs behaviour scenarios against the real agent and prints a table and
//! `N passed, N failed`. With `--collector` the agent ships to a real
//! collector started for the run, and every attack scenario must also yield
//! a verified evidence bundle there; `--outage SECS` kills that collector
//! after the first attack scenario and restarts it SECS after the last.
//! Exits non-zero when any scenario (or the collector check) fails.
//! `cargo xtask scenarios` runs it.

use std::path::PathBuf;
use std::time::Duration;

use vigil_tests::scenarios::{self, RunOptions};

const USAGE: &str =
    "usage: vigil-scenarios [--dir DIR]... [--work DIR] [--collector] [--outage SECS]";

fn main() -> std::process::ExitCode {
    let mut dirs = Vec::new();
    let mut work = std::env::temp_dir().join("vigil-scenarios");
    let mut opts = RunOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dirs.push(PathBuf::from(args.next().expect("--dir DIR"))),
            "--work" => work = PathBuf::from(args.next().expect("--work DIR")),
            "--collector" => opts.collector = true,
            "--outage" => {
                let secs = args.next().and_then(|s| s.parse::<u64>().ok());
                let Some(secs) = secs else {
                    eprintln!("vigil-scenarios: --outage needs a number of seconds\n{USAGE}");
                    return std::process::ExitCode::from(2);
                };
                opts.collector = true;
                opts.outage = Some(Duration::from_secs(secs));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("vigil-scenarios: unknown argument {other:?}\n{USAGE}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    if dirs.is_empty() {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios"));
    }
    let mut failed = false;
    for (i, dir) in dirs.iter().enumerate() {
        println!("== scenarios in {}", dir.display());
        match scenarios::run_with(dir, &work.join(i.to_string()), &opts) {
            Ok((outcomes, check)) => {
                print!("{}", scenarios::report(&outcomes));
                failed |= outcomes.iter().any(|o| !o.passed);
                if let Some(c) = check {
                    print!("{}", c.report());
                    failed |= !c.ok();
                }
            }
            Err(e) => {
                eprintln!("vigil-scenarios: {}: {e:#}", dir.display());
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
