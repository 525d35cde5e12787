//! Small helpers: paths, root checks, running commands as named steps with
//! bounded waits, and signal forwarding to child process groups.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Root of the Cargo workspace (the parent of the xtask crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// The Cargo target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// Path of one of the workspace's binaries for a profile.
pub fn bin_path(name: &str, release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join(name)
}

/// Path of the agent binary for a profile.
pub fn agent_bin(release: bool) -> PathBuf {
    bin_path("vigil-agent", release)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks a program up in `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`).
pub fn cargo_home_bin() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home).join("bin"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo").join("bin"))
}

/// Makes sure `dir` is in this process's `PATH` (inherited by every child).
pub fn ensure_in_path(dir: &Path) {
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == dir) {
        return;
    }
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&current));
    if let Ok(joined) = std::env::join_paths(dirs) {
        // Single-threaded at this point (setup runs before anything spawns threads).
        std::env::set_var("PATH", joined);
    }
}

/// Renders a command line for humans.
pub fn display_cmd(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(shell_word));
    let envs: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), shell_word(v))))
        .collect();
    if envs.is_empty() {
        parts.join(" ")
    } else {
        format!("{} {}", envs.join(" "), parts.join(" "))
    }
}

fn shell_word(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@+,%".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs a command to completion and captures stdout (stderr passes through).
/// For quick queries (`rustup ... list`, `--version`); bounded by `timeout`.
pub fn capture(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String)> {
    let shown = display_cmd(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{shown}`"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut buf);
        buf
    });
    let status = match wait_timeout(&mut child, timeout)? {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{shown}` did not finish within {timeout:?}");
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() && !err.trim().is_empty() {
        eprintln!("{}", err.trim_end());
    }
    Ok((status, out))
}

/// Polls a child until it exits or the timeout passes.
pub fn wait_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Signals: SIGINT/SIGTERM to xtask are forwarded to the child's process group,
// and remembered so that loops can stop cleanly.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILD_PGID: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let pgid = CHILD_PGID.load(Ordering::SeqCst);
    if pgid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// Installs the SIGINT/SIGTERM handler (idempotent).
pub fn install_signal_handlers() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a plain sigaction with a handler that only touches atomics
        // and calls kill(2), both async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Makes the child the leader of a new process group, and has the kernel send
/// it `death_signal` if xtask dies first.
pub fn own_process_group(cmd: &mut Command, death_signal: libc::c_int) {
    cmd.process_group(0);
    die_with_parent(cmd, death_signal);
}

/// Has the kernel send the child `death_signal` when xtask dies (the thread
/// that spawns it, strictly: spawn from the main thread). If xtask is already
/// gone by the time the child runs, the child sends it to itself.
pub fn die_with_parent(cmd: &mut Command, death_signal: libc::c_int) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: prctl, getppid and raise are async-signal-safe; nothing else
    // runs in the closure.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            );
            if libc::getppid() != parent {
                libc::raise(death_signal);
            }
            Ok(())
        });
    }
}

/// Sends a signal to a whole process group.
pub fn kill_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a process group we created.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}

/// Sends a signal to one process.
pub fn kill_pid(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a child we spawned (not yet reaped).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Outcome of one named step.
pub struct StepResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub elapsed: Duration,
}

/// Runs a command as a named step: prints it, runs it in its own process
/// group with stdin closed (Ctrl-C/SIGTERM to xtask are forwarded), and kills
/// the whole group if it exceeds `timeout`.
pub fn run_step(name: &str, cmd: &mut Command, timeout: Duration) -> StepResult {
    install_signal_handlers();
    println!("==> {name}: {}", display_cmd(cmd));
    let start = Instant::now();
    let result = run_in_group(cmd, timeout);
    let elapsed = start.elapsed();
    let (ok, detail) = match result {
        Ok(status) if status.success() => (true, String::new()),
        Ok(status) => (false, describe_status(status)),
        Err(err) => (false, format!("{err:#}")),
    };
    if !ok {
        eprintln!("==> {name} FAILED ({detail}) after {:.1?}", elapsed);
    }
    StepResult {
        name: name.to_string(),
        ok,
        detail,
        elapsed,
    }
}

fn run_in_group(cmd: &mut Command, timeout: Duration) -> Result<ExitStatus> {
    if interrupted() {
        bail!("interrupted");
    }
    cmd.stdin(Stdio::null());
    own_process_group(cmd, libc::SIGTERM);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", display_cmd(cmd)))?;
    let pgid = child.id();
    CHILD_PGID.store(pgid as i32, Ordering::SeqCst);
    let waited = wait_timeout(&mut child, timeout);
    let result = match waited {
        Ok(Some(status)) => {
            // Leftovers in the group (e.g. a test's helper) must not outlive the step.
            kill_group(pgid, libc::SIGKILL);
            if interrupted() {
                Err(anyhow::anyhow!("interrupted ({})", describe_status(status)))
            } else {
                Ok(status)
            }
        }
        Ok(None) => {
            eprintln!("==> timed out after {timeout:?}: terminating the process group");
            kill_group(pgid, libc::SIGTERM);
            if wait_timeout(&mut child, Duration::from_secs(10))
                .ok()
                .flatten()
                .is_none()
            {
                kill_group(pgid, libc::SIGKILL);
                let _ = child.wait();
            }
            kill_group(pgid, libc::SIGKILL);
            Err(anyhow::anyhow!("timed out after {} s", timeout.as_secs()))
        }
        Err(err) => {
            kill_group(pgid, libc::SIGKILL);
            let _ = child.wait();
            Err(err)
        }
    };
    CHILD_PGID.store(0, Ordering::SeqCst);
    result
}

pub fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Prints a summary table of steps; returns an error naming the failed ones.
pub fn summarize(steps: &[StepResult]) -> Result<()> {
    println!();
    println!("==> summary");
    for step in steps {
        let mark = if step.ok { "ok    " } else { "FAILED" };
        let detail = if step.detail.is_empty() {
            String::new()
        } else {
            format!("  ({})", step.detail)
        };
        println!(
            "  {mark}  {:<28} {:>8.1} s{detail}",
            step.name,
            step.elapsed.as_secs_f64()
        );
    }
    let failed: Vec<&str> = steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| s.name.as_str())
        .collect();
    if failed.is_empty() {
        println!("==> all steps passed");
        Ok(())
    } else {
        bail!("failed step(s): {}", failed.join(", "))
    }
}

/// A `cargo` command (the rustup proxy from `PATH`, so `+toolchain` works),
/// run from the workspace root.
///
/// Without the variables `cargo run` gave xtask itself (`CARGO_MANIFEST_DIR`,
/// `CARGO_PKG_*`, ...): build scripts that watch them (ring's watches
/// `CARGO_MANIFEST_DIR`) would otherwise see a change between a build from
/// xtask and one from the shell, and everything above them would be rebuilt
/// each time.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    for (key, _) in std::env::vars_os() {
        if is_cargo_run_var(&key.to_string_lossy()) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Variables `cargo run` sets for the program it runs (not user settings such
/// as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn is_cargo_run_var(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || matches!(
            key,
            "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
        )
}

/// Builds the agent's and the collector's binaries (`--release` if asked),
/// as one step bounded by `timeout`.
pub fn build_binaries(release: bool, timeout: Duration) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "vigil-agent",
        "-p",
        "vigil-collector",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    let step = run_step("build agent and collector", &mut cmd, timeout);
    if !step.ok {
        bail!("building the binaries failed: {}", step.detail);
    }
    Ok(())
}

/// Runs `f` as a named step of `xtask test` (timed, its error the detail).
pub fn fn_step(name: &str, f: impl FnOnce() -> Result<()>) -> StepResult {
    let start = std::time::Instant::now();
    let r = f();
    StepResult {
        name: name.into(),
        ok: r.is_ok(),
        detail: r.err().map(|e| format!("{e:#}")).unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Tally of a checking subcommand (`deploy-check`, `package --check`):
/// each check printed as it ends, the `N passed, N failed` line from the
/// counts.
#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl Report {
    /// Records and prints one check.
    pub fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                self.passed += 1;
                println!("  ok    {name}");
            }
            Err(e) => {
                self.failed += 1;
                println!("  FAIL  {name}: {e:#}");
            }
        }
    }

    /// Records and prints a check that could not run here.
    pub fn skip(&mut self, name: &str, why: &str) {
        self.skipped += 1;
        println!("  skip  {name}: {why}");
    }
}

/// The last `lines` lines of a log file, for an error message.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        format!("(log {} is empty)", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

/// An error naming `what` and the end of its log if `child` has exited.
pub fn check_running(child: &mut Child, what: &str, log: &Path, lines: usize) -> Result<()> {
    if let Some(status) = child.try_wait()? {
        bail!(
            "{what} exited early ({})\n{}",
            describe_status(status),
            log_tail(log, lines)
        );
    }
    Ok(())
}

/// Stops `child`, the leader of its own process group: `signal` to the
/// group, a bounded wait, then SIGKILL to the group. Describes the exit.
pub fn stop_group_leader(child: &mut Child, signal: libc::c_int, timeout: Duration) -> String {
    if let Ok(Some(status)) = child.try_wait() {
        return format!("had already exited ({})", describe_status(status));
    }
    let pgid = child.id();
    kill_group(pgid, signal);
    match wait_timeout(child, timeout) {
        Ok(Some(status)) => describe_status(status),
        _ => {
            kill_group(pgid, libc::SIGKILL);
            let _ = child.wait();
            format!(
                "did not stop within {} s of signal {signal}: killed",
                timeout.as_secs()
            )
        }
    }
}
