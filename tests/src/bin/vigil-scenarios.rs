//! `vigil-scenarios [--dir DIR]... [--work DIR]`: runs behaviour scenarios
//! against the real agent and prints a table and `N passed, N failed`.
//! Exits non-zero when any scenario fails. `cargo xtask scenarios` runs it.

use std::path::PathBuf;

fn main() -> std::process::ExitCode {
    let mut dirs = Vec::new();
    let mut work = std::env::temp_dir().join("vigil-scenarios");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dirs.push(PathBuf::from(args.next().expect("--dir DIR"))),
            "--work" => work = PathBuf::from(args.next().expect("--work DIR")),
            "-h" | "--help" => {
                println!("usage: vigil-scenarios [--dir DIR]... [--work DIR]");
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("vigil-scenarios: unknown argument {other:?}");
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
        match vigil_tests::scenarios::run(dir, &work.join(i.to_string())) {
            Ok(outcomes) => {
                print!("{}", vigil_tests::scenarios::report(&outcomes));
                failed |= outcomes.iter().any(|o| !o.passed);
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
