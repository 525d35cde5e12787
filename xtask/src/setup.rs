//! `cargo xtask setup`: idempotent installation of what the build needs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::util::{self, capture};

pub const BPF_LINKER_VERSION: &str = "0.10.3";
const TRACEFS: &str = "/sys/kernel/tracing";
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);
const INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TracefsPolicy {
    /// Mount it, or fail with a clear error if that needs root.
    Require,
    /// Mount it if root; otherwise say it is left to the agent (run under sudo).
    BestEffort,
}

fn step(what: &str, status: &str) {
    println!("setup: {what:<34} {status}");
}

pub fn setup(tracefs: TracefsPolicy) -> Result<()> {
    check_rustup()?;
    check_nightly()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_tracefs(tracefs)?;
    Ok(())
}

fn check_rustup() -> Result<()> {
    if util::which("rustup").is_none() {
        if let Some(bin) = util::cargo_home_bin().filter(|b| b.join("rustup").exists()) {
            util::ensure_in_path(&bin);
        } else {
            bail!(
                "rustup not found in PATH or ~/.cargo/bin: install it from https://rustup.rs \
                 (the eBPF build needs a nightly toolchain managed by rustup)"
            );
        }
    }
    Ok(())
}

fn check_nightly() -> Result<()> {
    let (status, out) = capture(
        Command::new("rustup").args(["toolchain", "list"]),
        QUERY_TIMEOUT,
    )?;
    if !status.success() {
        bail!(
            "`rustup toolchain list` failed ({})",
            util::describe_status(status)
        );
    }
    if out.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain", "present");
        Ok(())
    } else {
        bail!(
            "the nightly toolchain is missing (the eBPF crate builds with nightly + rust-src).\n\
             Install it with: rustup toolchain install nightly --profile minimal --component rust-src"
        )
    }
}

fn ensure_rust_src() -> Result<()> {
    let (status, out) = capture(
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]),
        QUERY_TIMEOUT,
    )?;
    if status.success()
        && out
            .lines()
            .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src"))
    {
        step("rust-src (nightly)", "present");
        return Ok(());
    }
    step("rust-src (nightly)", "installing");
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    let result = util::run_step("rustup component add rust-src", &mut cmd, INSTALL_TIMEOUT);
    if !result.ok {
        bail!("installing rust-src for nightly failed: {}", result.detail);
    }
    Ok(())
}

/// Finds a `bpf-linker` in PATH or in `$CARGO_HOME/bin`.
fn find_bpf_linker() -> Option<PathBuf> {
    util::which("bpf-linker").or_else(|| {
        util::cargo_home_bin()
            .map(|b| b.join("bpf-linker"))
            .filter(|p| util::is_executable(p))
    })
}

fn bpf_linker_version(path: &Path) -> Option<String> {
    let (status, out) = capture(Command::new(path).arg("--version"), QUERY_TIMEOUT).ok()?;
    if !status.success() {
        return None;
    }
    // "bpf-linker 0.10.3"
    out.split_whitespace().nth(1).map(str::to_string)
}

fn ensure_bpf_linker() -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    let existing = find_bpf_linker();
    let mut force = false;
    if let Some(path) = &existing {
        match bpf_linker_version(path) {
            Some(v) if v == BPF_LINKER_VERSION => {
                if let Some(dir) = path.parent() {
                    // aya-build's rustc finds the linker through PATH.
                    util::ensure_in_path(dir);
                }
                step(&what, &format!("present ({})", path.display()));
                return Ok(());
            }
            Some(v) => {
                step(
                    &what,
                    &format!("found {v} at {}: replacing", path.display()),
                );
                force = true;
            }
            None => {
                step(
                    &what,
                    &format!("{} does not run: reinstalling", path.display()),
                );
                force = true;
            }
        }
    } else {
        step(&what, "installing (about 2 min)");
    }
    // `--locked` uses the dependency versions bpf-linker was released with
    // (tested to build with the nightly toolchain here).
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]);
    if force {
        cmd.arg("--force");
    }
    let result = util::run_step("cargo install bpf-linker", &mut cmd, INSTALL_TIMEOUT);
    if !result.ok {
        bail!(
            "installing bpf-linker {BPF_LINKER_VERSION} failed: {} (see the cargo output above)",
            result.detail
        );
    }
    if let Some(bin) = util::cargo_home_bin() {
        util::ensure_in_path(&bin);
    }
    match find_bpf_linker().and_then(|p| bpf_linker_version(&p)) {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        other => bail!(
            "bpf-linker was installed but `bpf-linker --version` reports {other:?}; \
             is another bpf-linker earlier in PATH?"
        ),
    }
}

/// Whether a tracefs is mounted at /sys/kernel/tracing.
pub fn tracefs_mounted() -> Result<bool> {
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    Ok(mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        let target = fields.next();
        let fstype = fields.next();
        target == Some(TRACEFS) && fstype == Some("tracefs")
    }))
}

fn ensure_tracefs(policy: TracefsPolicy) -> Result<()> {
    let what = format!("tracefs at {TRACEFS}");
    if tracefs_mounted()? {
        step(&what, "mounted");
        return Ok(());
    }
    if !util::is_root() {
        match policy {
            TracefsPolicy::BestEffort => {
                step(
                    &what,
                    "not mounted; not root, left to the agent (runs as root)",
                );
                return Ok(());
            }
            TracefsPolicy::Require => bail!(
                "tracefs is not mounted at {TRACEFS} and mounting it needs root: \
                 run `sudo -E cargo xtask setup` or `sudo mount -t tracefs nodev {TRACEFS}`"
            ),
        }
    }
    step(
        &what,
        &format!("mounting: mount -t tracefs nodev {TRACEFS}"),
    );
    if !Path::new(TRACEFS).is_dir() {
        bail!("{TRACEFS} does not exist: is this kernel built with CONFIG_TRACING?");
    }
    let source = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings and no mount data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        // Raced with someone else (e.g. the agent) mounting it: fine.
        if tracefs_mounted().unwrap_or(false) {
            return Ok(());
        }
        bail!("mounting tracefs at {TRACEFS} failed: {err}");
    }
    Ok(())
}

/// Installs clippy and rustfmt for the default (stable) toolchain if missing.
pub fn ensure_lint_components() -> Result<()> {
    let (status, out) = capture(
        Command::new("rustup").args(["component", "list", "--installed"]),
        QUERY_TIMEOUT,
    )?;
    let installed = |name: &str| status.success() && out.lines().any(|l| l.starts_with(name));
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|c| !installed(c))
        .collect();
    if missing.is_empty() {
        step("clippy, rustfmt (stable)", "present");
        return Ok(());
    }
    step(
        "clippy, rustfmt (stable)",
        &format!("installing {}", missing.join(" ")),
    );
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add"]).args(&missing);
    let result = util::run_step("rustup component add", &mut cmd, INSTALL_TIMEOUT);
    if !result.ok {
        bail!(
            "installing {} failed: {}",
            missing.join(", "),
            result.detail
        );
    }
    Ok(())
}
