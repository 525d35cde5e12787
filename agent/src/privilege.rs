//! Least privilege: once the programs are loaded and attached (and bpffs,
//! tracefs and the ledger pin are in place), the agent keeps only the
//! capabilities it uses from then on, in every set, and sets
//! `no_new_privs`. SECURITY.md lists them with the same reasons.
//!
//! Capabilities are per thread: [`drop_to_runtime_set`] must run while the
//! agent has a single thread, before the async runtime and the worker
//! threads start (they inherit the reduced sets).

use anyhow::Context as _;
use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the running agent keeps, and why.
pub const KEPT: &[(Capability, &str)] = &[
    (
        Capability::CAP_BPF,
        "map operations after load (heartbeat, freeze ledger, server marks, kernel counters): bpf() needs it when unprivileged BPF is disabled",
    ),
    (
        Capability::CAP_SYS_PTRACE,
        "reading other users' /proc/PID/{mem,environ,maps,fd,exe} and registers (PTRACE_SEIZE) for the process tree and evidence capture",
    ),
    (
        Capability::CAP_KILL,
        "SIGSTOP/SIGCONT (freeze and release) and SIGKILL (containment) of processes of any user",
    ),
    (
        Capability::CAP_DAC_READ_SEARCH,
        "reading executables and /proc files that the file mode hides from root without CAP_DAC_OVERRIDE (hashing and copying the captured executable)",
    ),
];

/// The kept set.
pub fn runtime_set() -> CapsHashSet {
    KEPT.iter().map(|(c, _)| *c).collect()
}

/// The kept set as the bit mask /proc/PID/status shows (`CapEff:` etc.).
pub fn runtime_mask() -> u64 {
    KEPT.iter().fold(0u64, |m, (c, _)| m | c.bitmask())
}

/// Drops every capability but [`KEPT`] from the bounding, inheritable,
/// ambient, permitted and effective sets and sets `no_new_privs`. Errors
/// when more than one thread runs (the others would keep everything).
pub fn drop_to_runtime_set() -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    anyhow::ensure!(
        threads == 1,
        "dropping capabilities needs a single thread, found {threads}"
    );
    let keep = runtime_set();
    // The bounding set first, while CAP_SETPCAP is still effective. Where
    // the agent was not given CAP_SETPCAP (a container granted only what
    // it needs), the runtime's bounding set stays as it is, logged.
    let effective = caps::read(None, CapSet::Effective).context("reading the effective set")?;
    if effective.contains(&Capability::CAP_SETPCAP) {
        let supported = caps::runtime::thread_all_supported();
        for cap in supported.iter().filter(|c| !keep.contains(c)) {
            caps::drop(None, CapSet::Bounding, *cap)
                .with_context(|| format!("dropping {cap} from the bounding set"))?;
        }
    } else {
        tracing::warn!("no CAP_SETPCAP: the bounding set is left as the runtime set it");
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    caps::clear(None, CapSet::Inheritable).context("clearing the inheritable set")?;
    let have = caps::read(None, CapSet::Permitted).context("reading the permitted set")?;
    let missing: Vec<String> = keep
        .iter()
        .filter(|c| !have.contains(c))
        .map(|c| c.to_string())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "the agent lacks {}: run it as root or grant them",
        missing.join(", ")
    );
    caps::set(None, CapSet::Effective, &keep).context("setting the effective set")?;
    caps::set(None, CapSet::Permitted, &keep).context("setting the permitted set")?;
    nix::sys::prctl::set_no_new_privs().context("setting no_new_privs")?;
    tracing::info!(
        kept = %KEPT.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>().join(","),
        "dropped every other capability"
    );
    Ok(())
}
