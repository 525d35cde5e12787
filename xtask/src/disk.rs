//! Disk space during `cargo xtask test`: what is free before each step, and
//! (with `VIGIL_CI_RECLAIM=1`, which `.ci/run` sets) the build outputs no
//! later step needs, removed as soon as their step is over (the test
//! executables once run, the fuzz build, and `target/release`: a local
//! release build goes too, so leave it unset on a workstation). A CI machine's
//! free space is not fixed (a run once failed with ENOSPC in the middle of
//! the end-to-end tests), so the run says where its space went.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util;

/// Below this much free space at the start of a test run, the run warns.
/// Measured on a clean clone with reclaiming on: the target directory
/// peaks at 4.9 GiB (debug 1.9, the VM image 2.3, the fuzz build 2.4 while
/// it lives), the end-to-end tests' temp files at 0.3 GiB, plus the tools
/// `cargo install` builds on a fresh machine.
pub const TEST_RUN_NEEDS: u64 = 8 << 30;

/// The environment variable that turns reclaiming on.
pub const RECLAIM_ENV: &str = "VIGIL_CI_RECLAIM";

/// Whether build outputs are removed once no later step needs them.
pub fn reclaim_enabled() -> bool {
    std::env::var(RECLAIM_ENV).is_ok_and(|v| v == "1")
}

/// Bytes free (for an unprivileged user's view: `f_bavail`) on the file
/// system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Prints the free space of the target directory's and /tmp's file
/// systems, labelled with the step about to run.
pub fn report(label: &str) {
    let target = util::target_dir();
    let probe = if target.exists() {
        target
    } else {
        util::workspace_root()
    };
    let here = free_bytes(&probe).map(gib).unwrap_or_else(|| "?".into());
    let tmp = free_bytes(Path::new("/tmp"))
        .map(gib)
        .unwrap_or_else(|| "?".into());
    println!("==> disk before {label}: {here} free for target/, {tmp} free in /tmp");
}

/// Warns when the run is likely to fill the disk.
pub fn preflight() {
    let root = util::workspace_root();
    if let Some(free) = free_bytes(&root) {
        if free < TEST_RUN_NEEDS {
            eprintln!(
                "warning: {} free on the file system of {}; a full test run needs about {} \
                 (set {RECLAIM_ENV}=1 to remove build outputs as soon as no later step needs them)",
                gib(free),
                root.display(),
                gib(TEST_RUN_NEEDS)
            );
        }
    }
}

/// Removes a build output directory, saying how much it freed.
pub fn remove_dir(what: &str, dir: &Path) {
    if !dir.exists() {
        return;
    }
    let before = free_bytes(dir.parent().unwrap_or(dir));
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            let after = free_bytes(dir.parent().unwrap_or(dir));
            let freed = match (before, after) {
                (Some(b), Some(a)) => gib(a.saturating_sub(b)),
                _ => "?".into(),
            };
            println!("==> reclaimed {freed}: {what} ({})", dir.display());
        }
        Err(e) => eprintln!("warning: could not remove {}: {e}", dir.display()),
    }
}

/// The test executables `cargo test --workspace ARGS` built, as cargo
/// names them (asked again with `--no-run` and the same cargo arguments:
/// nothing is rebuilt).
pub fn test_executables(
    envs: &[(&str, &std::ffi::OsStr)],
    cargo_args: &[String],
) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"]);
    cmd.args(cargo_args.iter().take_while(|a| *a != "--"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (status, out) = util::capture(&mut cmd, Duration::from_secs(1800))?;
    if !status.success() {
        bail!("cargo test --no-run failed");
    }
    Ok(out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter_map(|v| {
            let name = v["target"]["name"].as_str()?.to_string();
            let exe = PathBuf::from(v["executable"].as_str()?);
            Some((name, exe))
        })
        .collect())
}

/// Removes the test executables `cargo test --workspace CARGO_ARGS` ran,
/// except those named in `keep` (later steps run them again).
pub fn remove_test_executables(
    envs: &[(&str, &std::ffi::OsStr)],
    cargo_args: &[String],
    keep: &[&str],
) -> Result<()> {
    let dir = util::target_dir();
    let before = free_bytes(&dir);
    let mut removed = 0usize;
    for (name, exe) in test_executables(envs, cargo_args)? {
        if keep.contains(&name.as_str()) {
            continue;
        }
        match std::fs::remove_file(&exe) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("removing {}", exe.display()));
            }
        }
    }
    let after = free_bytes(&dir);
    let freed = match (before, after) {
        (Some(b), Some(a)) => gib(a.saturating_sub(b)),
        _ => "?".into(),
    };
    println!("==> reclaimed {freed}: {removed} test executables already run");
    Ok(())
}
