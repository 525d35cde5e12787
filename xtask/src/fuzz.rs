//! `cargo xtask fuzz`: the `cargo fuzz` targets of `fuzz/`, each for a
//! bounded time, from the committed corpus.
//!
//! Each target runs `cargo +nightly fuzz run --features libfuzzer TARGET`
//! with three corpus directories: `target/fuzz/corpus/TARGET` first (where
//! libFuzzer writes what it finds, so the committed corpus does not churn),
//! then `fuzz/corpus/TARGET` (the committed seeds and finds) and
//! `fuzz/regressions/TARGET` (every crash found so far, kept so that it
//! stays fixed). A crash is written to `target/fuzz/artifacts/TARGET/` and
//! fails the run; the fix goes with a copy of the input in
//! `fuzz/regressions/TARGET/` (replayed by `cargo test -p vigil-fuzz` on
//! stable too).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util;

/// The targets, as named in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "decode_record",
    "bundle_reader",
    "ingest",
    "agent_json",
    "rules",
];

/// The cargo-fuzz release `cargo xtask setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `cargo xtask fuzz`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct FuzzArgs {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (comma-separated or repeated) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// Largest input libFuzzer makes, bytes.
    #[arg(long, default_value_t = 65536)]
    pub max_len: usize,
}

struct Outcome {
    target: String,
    ok: bool,
    runs: Option<u64>,
    elapsed: Duration,
    corpus: usize,
    detail: String,
}

/// Installs cargo-fuzz (in ~/.cargo/bin) when `cargo +nightly fuzz` does
/// not answer.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let answers = util::capture(
        Command::new("cargo").args(["+nightly", "fuzz", "--version"]),
        Duration::from_secs(60),
    )
    .map(|(s, _)| s.success())
    .unwrap_or(false);
    if answers {
        println!("setup: {:<34} present", "cargo-fuzz");
        return Ok(());
    }
    println!("setup: {:<34} installing (about 2 min)", "cargo-fuzz");
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]);
    let step = util::run_step(
        "cargo install cargo-fuzz",
        &mut cmd,
        Duration::from_secs(1800),
    );
    if !step.ok {
        bail!("installing cargo-fuzz failed: {}", step.detail);
    }
    if let Some(bin) = util::cargo_home_bin() {
        util::ensure_in_path(&bin);
    }
    Ok(())
}

/// Builds every target, then runs each for `args.seconds`; prints a table
/// and fails when a target crashed, hung or did not run.
pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    let targets: Vec<String> = if args.target.is_empty() {
        TARGETS.iter().map(|s| s.to_string()).collect()
    } else {
        args.target.clone()
    };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target {t:?}; the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    ensure_cargo_fuzz()?;
    let root = util::workspace_root();
    let mut build = fuzz_command();
    build.args(["build", "--features", "libfuzzer"]);
    let step = util::run_step("cargo fuzz build", &mut build, Duration::from_secs(45 * 60));
    if !step.ok {
        bail!("building the fuzz targets failed: {}", step.detail);
    }
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_target(&root, t, args)?);
        if util::interrupted() {
            break;
        }
    }
    println!();
    println!(
        "{:<14} {:>8} {:>12} {:>9} {:>8}  result",
        "target", "seconds", "runs", "runs/s", "corpus"
    );
    for o in &outcomes {
        let secs = o.elapsed.as_secs_f64();
        let runs = o.runs.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
        let rate = o
            .runs
            .map(|r| format!("{:.0}", r as f64 / secs.max(0.001)))
            .unwrap_or_else(|| "-".into());
        let result = if o.ok { "clean" } else { o.detail.as_str() };
        println!(
            "{:<14} {:>8.0} {:>12} {:>9} {:>8}  {result}",
            o.target, secs, runs, rate, o.corpus
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.target.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fuzz target(s) failed: {} (inputs in target/fuzz/artifacts/, logs in target/fuzz/logs/)",
            failed.join(", ")
        );
    }
    if outcomes.len() < targets.len() {
        bail!("interrupted");
    }
    Ok(())
}

/// Where `cargo fuzz build` puts its (sanitized, release) build: the
/// target directory's host-triple subdirectory.
pub fn build_dir() -> PathBuf {
    util::target_dir().join(HOST_TRIPLE)
}

/// The triple `cargo fuzz` builds for by default (the only one this
/// project's machines run).
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn fuzz_command() -> Command {
    let mut cmd = util::cargo();
    cmd.args(["+nightly", "fuzz"]);
    cmd
}

fn run_target(root: &Path, target: &str, args: &FuzzArgs) -> Result<Outcome> {
    let work = root.join("target/fuzz");
    let found = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for d in [&found, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let committed = root.join("fuzz/corpus").join(target);
    let regressions = root.join("fuzz/regressions").join(target);
    std::fs::create_dir_all(&regressions)
        .with_context(|| format!("creating {}", regressions.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = fuzz_command();
    cmd.args(["run", "--features", "libfuzzer", target])
        .arg(&found)
        .arg(&committed)
        .arg(&regressions)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds))
        .arg(format!("-max_len={}", args.max_len))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // A single input taking this long is a hang: reported as a crash.
        .arg("-timeout=20")
        .arg("-rss_limit_mb=4096")
        .arg("-print_final_stats=1")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let start = Instant::now();
    // The build above made the binary; the run gets its time plus a margin
    // for the corpus's first pass.
    let step = util::run_step(
        &format!("fuzz {target} ({} s)", args.seconds),
        &mut cmd,
        Duration::from_secs(args.seconds + 300),
    );
    let elapsed = start.elapsed();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let runs = text
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|v| v.trim().parse().ok())
        .next_back();
    // libFuzzer's own count of the seconds it fuzzed (the step also
    // includes any rebuild `cargo fuzz run` makes).
    let fuzzed = text
        .lines()
        .filter_map(|l| l.strip_prefix("Done "))
        .filter_map(|l| l.split(" runs in ").nth(1))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .next_back()
        .map(Duration::from_secs);
    let corpus = count_files(&found) + count_files(&committed);
    let detail = if step.ok {
        String::new()
    } else {
        let why = text
            .lines()
            .find(|l| l.contains("ERROR: libFuzzer") || l.contains("ERROR: AddressSanitizer"))
            .or_else(|| text.lines().find(|l| l.contains("panicked at")))
            .unwrap_or(step.detail.as_str())
            .trim()
            .to_string();
        eprintln!(
            "==> fuzz {target}: {why}\n    log: {}\n    input: {}",
            log_path.display(),
            newest(&artifacts)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none written)".into())
        );
        why
    };
    Ok(Outcome {
        target: target.to_string(),
        ok: step.ok,
        runs,
        elapsed: fuzzed.unwrap_or(elapsed),
        corpus,
        detail,
    })
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

fn newest(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}
