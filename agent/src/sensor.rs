//! Loading and attaching the eBPF programs, and reading what they produce.
//!
//! The hook table ([`HOOKS`]) is the one place that says which program goes
//! on which kernel hook and what the agent can do without it. Process
//! lifecycle hooks are required; the others degrade: a refused hook is
//! reported (log, `vigil_hook_attached` metric) and the rest carry on.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::{RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};
use vigil_sensor_common::{EventKind, KernelOffsets, SensorConfig, FREEZE_NAME_LEN, STATS_SLOTS};

/// The compiled eBPF object, built by build.rs.
static SENSOR_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vigil-sensor"));

/// What an attachment is for; the unit the agent degrades by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// exec, fork, exit: required.
    Process,
    /// Opens for write/create.
    FileWrite,
    /// chmod family.
    Chmod,
    /// rename family.
    Rename,
    /// connect.
    Connect,
    /// listen.
    Listen,
    /// utimensat family with given times (timestomping).
    Utimes,
    /// A process renaming itself (`task_rename`).
    Comm,
    /// Datagrams sent to an address given with the call (sendto/sendmsg
    /// on unconnected sockets), reported as connects.
    Send,
    /// ptrace attach/seize/writes and `process_vm_writev`.
    ProcessAccess,
    /// Kernel module loads (init_module, finit_module).
    Module,
    /// BPF program loads.
    Bpf,
    /// Anonymous memory made executable (mmap, mprotect).
    ExecMem,
    /// Unlinks of logs and shell histories (filtered in the kernel).
    Unlink,
    /// Containment's connect refusal (cgroup connect/sendmsg hooks).
    DenyConnect,
    /// The deny_exec policy (BPF LSM `bprm_check_security`).
    DenyExec,
}

impl Feature {
    /// Every feature, for reporting.
    pub const ALL: [Feature; 16] = [
        Feature::Process,
        Feature::FileWrite,
        Feature::Chmod,
        Feature::Rename,
        Feature::Connect,
        Feature::Listen,
        Feature::Utimes,
        Feature::Comm,
        Feature::Send,
        Feature::ProcessAccess,
        Feature::Module,
        Feature::Bpf,
        Feature::ExecMem,
        Feature::Unlink,
        Feature::DenyConnect,
        Feature::DenyExec,
    ];

    /// Stable name (metrics label, config's `disable`).
    pub fn name(self) -> &'static str {
        match self {
            Feature::Process => "process",
            Feature::FileWrite => "file_write",
            Feature::Chmod => "chmod",
            Feature::Rename => "rename",
            Feature::Connect => "connect",
            Feature::Listen => "listen",
            Feature::Utimes => "utimes",
            Feature::Comm => "comm",
            Feature::Send => "send",
            Feature::ProcessAccess => "process_access",
            Feature::Module => "module",
            Feature::Bpf => "bpf",
            Feature::ExecMem => "exec_mem",
            Feature::Unlink => "unlink",
            Feature::DenyConnect => "deny_connect",
            Feature::DenyExec => "deny_exec",
        }
    }
}

/// Which kind of hook serves a feature, from the hooks that attached:
/// "lsm", "tracepoint" (raw or syscall), "cgroup", "freeze" (deny_exec
/// without BPF LSM: its execs are frozen instead) or "off".
fn feature_path(hooks: &[HookStatus], feature: Feature, freeze_fallback: bool) -> &'static str {
    let attached = |prefix: &str| {
        hooks
            .iter()
            .any(|h| h.feature == feature && h.error.is_none() && h.hook.starts_with(prefix))
    };
    if attached("lsm/") {
        "lsm"
    } else if attached("raw_tp/") || attached("syscalls/") {
        "tracepoint"
    } else if attached("cgroup/") {
        "cgroup"
    } else if feature == Feature::DenyExec && freeze_fallback {
        "freeze"
    } else {
        "off"
    }
}

/// Where a program attaches.
#[derive(Clone, Copy, Debug)]
pub enum Attach {
    /// A raw tracepoint by name.
    RawTp(&'static str),
    /// A syscall: `sys_enter_<name>` gets `program`, `sys_exit_<name>` gets
    /// the shared exit program.
    Syscall(&'static str),
}

/// One row of the hook table.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    /// Program name in the object.
    pub program: &'static str,
    /// Where it goes.
    pub attach: Attach,
    /// What it serves.
    pub feature: Feature,
}

const fn sys(program: &'static str, name: &'static str, feature: Feature) -> Hook {
    Hook {
        program,
        attach: Attach::Syscall(name),
        feature,
    }
}

/// Every hook, in attach order. Exec before fork: a fork seen without the
/// exec that followed it would leave the tree holding a copy of the parent
/// (a subshell that became curl would still be "bash" to the rules).
pub const HOOKS: &[Hook] = &[
    Hook {
        program: "vigil_exec",
        attach: Attach::RawTp("sched_process_exec"),
        feature: Feature::Process,
    },
    Hook {
        program: "vigil_fork",
        attach: Attach::RawTp("sched_process_fork"),
        feature: Feature::Process,
    },
    Hook {
        program: "vigil_exit",
        attach: Attach::RawTp("sched_process_exit"),
        feature: Feature::Process,
    },
    Hook {
        program: "vigil_task_rename",
        attach: Attach::RawTp("task_rename"),
        feature: Feature::Comm,
    },
    sys("vigil_enter_openat", "openat", Feature::FileWrite),
    sys("vigil_enter_openat2", "openat2", Feature::FileWrite),
    sys("vigil_enter_open", "open", Feature::FileWrite),
    sys("vigil_enter_creat", "creat", Feature::FileWrite),
    sys("vigil_enter_chmod", "chmod", Feature::Chmod),
    sys("vigil_enter_fchmodat", "fchmodat", Feature::Chmod),
    sys("vigil_enter_fchmodat2", "fchmodat2", Feature::Chmod),
    sys("vigil_enter_fchmod", "fchmod", Feature::Chmod),
    sys("vigil_enter_rename", "rename", Feature::Rename),
    sys("vigil_enter_renameat", "renameat", Feature::Rename),
    sys("vigil_enter_renameat2", "renameat2", Feature::Rename),
    sys("vigil_enter_connect", "connect", Feature::Connect),
    sys("vigil_enter_listen", "listen", Feature::Listen),
    sys("vigil_enter_utimensat", "utimensat", Feature::Utimes),
    sys("vigil_enter_futimesat", "futimesat", Feature::Utimes),
    sys("vigil_enter_utimes", "utimes", Feature::Utimes),
    sys("vigil_enter_utime", "utime", Feature::Utimes),
    sys("vigil_enter_sendto", "sendto", Feature::Send),
    sys("vigil_enter_sendmsg", "sendmsg", Feature::Send),
    sys("vigil_enter_sendmmsg", "sendmmsg", Feature::Send),
    sys("vigil_enter_ptrace", "ptrace", Feature::ProcessAccess),
    sys(
        "vigil_enter_process_vm_writev",
        "process_vm_writev",
        Feature::ProcessAccess,
    ),
    sys("vigil_enter_init_module", "init_module", Feature::Module),
    sys("vigil_enter_finit_module", "finit_module", Feature::Module),
    sys("vigil_enter_bpf", "bpf", Feature::Bpf),
    sys("vigil_enter_mmap", "mmap", Feature::ExecMem),
    sys("vigil_enter_mprotect", "mprotect", Feature::ExecMem),
    sys(
        "vigil_enter_pkey_mprotect",
        "pkey_mprotect",
        Feature::ExecMem,
    ),
    sys("vigil_enter_unlink", "unlink", Feature::Unlink),
    sys("vigil_enter_unlinkat", "unlinkat", Feature::Unlink),
];

/// The shared syscall-exit program.
const SYS_EXIT_PROGRAM: &str = "vigil_sys_exit";

/// Outcome of attaching one hook.
#[derive(Clone, Debug)]
pub struct HookStatus {
    /// e.g. "raw_tp/sched_process_exec" or "syscalls/openat".
    pub hook: String,
    /// What it serves.
    pub feature: Feature,
    /// The error, if it did not attach.
    pub error: Option<String>,
}

/// Settings for [`Sensor::load`].
#[derive(Clone, Debug)]
pub struct SensorOptions {
    /// Kernel struct offsets (from BTF).
    pub offsets: KernelOffsets,
    /// The io_uring submission hook (from BTF), or why there is none.
    pub uring: Result<crate::btf::UringHook, String>,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Pending bytes before the kernel wakes the agent.
    pub wakeup_bytes: u32,
    /// Features to leave off.
    pub disabled: Vec<Feature>,
    /// `FREEZE_*` policy bits.
    pub freeze_policy: u32,
    /// `FREEZE_*` bits of the execs refused in the kernel (BPF LSM); where
    /// that hook cannot attach they are frozen instead.
    pub deny_policy: u32,
    /// Program base names frozen when a server starts them.
    pub freeze_names: Vec<String>,
    /// File sizes of the system's copies of those programs (a renamed
    /// copy is frozen too).
    pub freeze_sizes: Vec<u64>,
    /// Window of the in-kernel connect de-duplication, ns (0: off).
    pub connect_dedup_ns: u64,
    /// bpffs directory where the frozen-process ledger is pinned, always
    /// and before any program is loaded: a freeze outlives an agent crash
    /// in a record the next start reads, and other agents know this one
    /// for an agent, never to be stopped or contained (see
    /// [`crate::frozen::peer_agent`]).
    pub pin_dir: PathBuf,
    /// Attach the connect-refusal programs (containment `deny_connect`).
    pub deny_connect: bool,
    /// Use the BPF LSM programs for file writes and connects where the
    /// kernel allows them (else syscall tracepoints).
    pub prefer_lsm: bool,
}

/// Cgroup programs that refuse the connects and unconnected sends of the
/// processes in the `DENY_CONNECT` map.
const DENY_PROGRAMS: &[&str] = &[
    "vigil_deny_connect4",
    "vigil_deny_connect6",
    "vigil_deny_sendmsg4",
    "vigil_deny_sendmsg6",
];

/// The kernel's list of contained processes whose connects are refused
/// (inherited by their children, cleared at their exit).
#[derive(Clone)]
pub struct DenyList(std::sync::Arc<std::sync::Mutex<aya::maps::HashMap<MapData, u32, u8>>>);

impl DenyList {
    /// Refuses `tgid`'s (and its future children's) connects from now on.
    pub fn deny(&self, tgid: u32) -> Result<(), String> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(tgid, 1, 0)
            .map_err(|e| format!("adding {tgid} to the connect deny list: {e}"))
    }

    /// Lets `tgid` connect again (its entry was made for a process gone).
    pub fn allow(&self, tgid: u32) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = m.remove(&tgid);
    }
}

impl std::fmt::Debug for DenyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DenyList")
    }
}

/// BPF LSM programs that replace a feature's syscall tracepoints where the
/// kernel allows them (tried first at load; `prefer_lsm = false` skips
/// them): (program, LSM hook, feature).
const LSM_HOOKS: &[(&str, &str, Feature)] = &[
    ("vigil_lsm_file_open", "file_open", Feature::FileWrite),
    ("vigil_lsm_connect", "socket_connect", Feature::Connect),
];

/// Loads and attaches one BPF LSM program (needs BTF, a kernel booted with
/// `bpf` in its LSM list, and a kernel that lets this process load LSM
/// programs).
fn attach_lsm(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    program: &str,
    hook: &str,
) -> anyhow::Result<()> {
    use aya::programs::Lsm;
    let btf = btf.context("no kernel BTF (/sys/kernel/btf/vmlinux)")?;
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if !lsms.is_empty() && !lsms.split(',').any(|l| l.trim() == "bpf") {
        bail!(
            "BPF LSM is not active (/sys/kernel/security/lsm: {}; boot with lsm=...,bpf)",
            lsms.trim()
        );
    }
    let p: &mut Lsm = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing"))?
        .try_into()
        .with_context(|| format!("program {program}"))?;
    retry_interrupted(program, || p.load(hook, btf))
        .with_context(|| format!("loading the LSM program {program}"))?;
    p.attach()
        .with_context(|| format!("attaching {program} to lsm/{hook}"))?;
    Ok(())
}

/// Cgroup programs that report connects and unconnected sends made
/// without the syscalls (io_uring): (feature, programs, hook name). The
/// connect pair only where BPF LSM does not serve connects (its hook sees
/// those too).
const OBSERVER_PROGRAMS: &[(Feature, &[&str], &str)] = &[
    (
        Feature::Connect,
        &["vigil_cg_connect4", "vigil_cg_connect6"],
        "cgroup/connect4,connect6",
    ),
    (
        Feature::Send,
        &["vigil_cg_sendmsg4", "vigil_cg_sendmsg6"],
        "cgroup/sendmsg4,sendmsg6",
    ),
];

/// The program that reports file opens submitted through io_uring.
const URING_PROGRAM: &str = "vigil_uring_submit";

/// Attaches cgroup sock_addr programs to the cgroup v2 root (every
/// process is below it) as links, beside any other program there.
fn attach_cgroup(ebpf: &mut Ebpf, programs: &[&str]) -> anyhow::Result<()> {
    use aya::programs::{CgroupAttachMode, CgroupSockAddr};
    let root =
        crate::workload_cache::find_cgroup2_root().context("no cgroup v2 hierarchy is mounted")?;
    for name in programs {
        let cg =
            std::fs::File::open(&root).with_context(|| format!("opening {}", root.display()))?;
        let p: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("program {name}"))?;
        retry_interrupted(name, || p.load()).with_context(|| format!("loading {name}"))?;
        // A link (kernel >= 5.7) is always one of many on its cgroup, and
        // refuses the multi flag; on older kernels this is a plain attach.
        p.attach(cg, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", root.display()))?;
    }
    Ok(())
}

/// The loaded, attached sensor. Dropping it detaches every program; only
/// the frozen-process ledger is pinned (see [`crate::frozen`]).
pub struct Sensor {
    _ebpf: Ebpf,
    /// The frozen-process ledger and where it is pinned (`None` when
    /// pinning is refused here).
    pub frozen: Option<(crate::frozen::FrozenMap, Option<PathBuf>)>,
    freeze_enabled: bool,
    /// The event ring buffer.
    pub ring: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    pending: aya::maps::Array<MapData, u64>,
    alive: aya::maps::Array<MapData, u64>,
    servers: aya::maps::HashMap<MapData, u32, u8>,
    /// One entry per hook.
    pub hooks: Vec<HookStatus>,
    /// The connect deny list, when its programs are attached.
    pub deny: Option<DenyList>,
    /// Which kind of hook serves each feature ([`feature_path`]), decided
    /// once at load.
    pub paths: Vec<(Feature, &'static str)>,
}

impl Sensor {
    /// Loads the programs with `opts`, attaches every hook it can.
    pub fn load(opts: &SensorOptions) -> anyhow::Result<Self> {
        ensure_tracefs();
        raise_memlock();
        let btf = aya::Btf::from_sys_fs().ok();
        // The deny policy's execs are in the freeze policy too: where the
        // LSM hook refuses them they never reach the exec tracepoint; where
        // it cannot attach, the tracepoint stops them instead.
        let freeze_policy = opts.freeze_policy | opts.deny_policy;
        let config = SensorConfig {
            agent_tgid: std::process::id(),
            wakeup_bytes: opts.wakeup_bytes,
            freeze_policy,
            deny_policy: opts.deny_policy,
            connect_dedup_ns: opts.connect_dedup_ns,
            deny_connect: opts.deny_connect as u32,
            _reserved: 0,
        };
        let mut ebpf = EbpfLoader::new()
            .btf(btf.as_ref())
            .override_global("OFFSETS", &opts.offsets, true)
            .override_global("CONFIG", &config, true)
            .override_global(
                "URING",
                &opts.uring.as_ref().map(|h| h.offsets).unwrap_or_default(),
                true,
            )
            .map_max_entries("EVENTS", opts.ring_bytes)
            .map_max_entries("INFLIGHT", lru_entries())
            .map_max_entries("SERVERS", lru_entries())
            .load(SENSOR_OBJ)
            .context("loading the eBPF object")?;
        // The ledger is pinned before any program is loaded: another agent
        // that sees this one load its programs (a `bpf_program_load`
        // detection) finds the pin and never stops or contains it. The pin
        // also lets a restarted agent read what a dead one froze; where
        // bpffs pinning is refused, `frozen::resume_leftovers` finds those
        // processes in /proc instead (stopped before their first
        // instruction), and other agents know this one only by its
        // executable. A start-up that fails from here removes the pin.
        let pin = PinGuard(match ebpf.map("FROZEN") {
            Some(map) => match pin_ledger(map, &opts.pin_dir) {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "the frozen-process ledger cannot be pinned; after a crash, leftovers are found in /proc instead, and another agent on this node knows this one only by its executable");
                    None
                }
            },
            None => bail!("FROZEN map missing"),
        });

        let mut hooks = Vec::new();
        // Process hooks first: whatever acts once another hook is attached
        // had its fork and exec seen (or is in the /proc scan that follows),
        // so no event names a process the tree cannot know. Then BPF LSM: a
        // feature it serves skips its syscall tracepoints.
        let mut by_lsm = Vec::new();
        let mut lsm_refusal = None;
        let mut exit_loaded = false;
        for process_pass in [true, false] {
            if !process_pass {
                for (program, hook, feature) in LSM_HOOKS {
                    if !opts.prefer_lsm || opts.disabled.contains(feature) || lsm_refusal.is_some()
                    {
                        continue;
                    }
                    match attach_lsm(&mut ebpf, btf.as_ref(), program, hook) {
                        Ok(()) => {
                            debug!(hook = %format!("lsm/{hook}"), "attached");
                            by_lsm.push(*feature);
                            hooks.push(HookStatus {
                                hook: format!("lsm/{hook}"),
                                feature: *feature,
                                error: None,
                            });
                        }
                        // One refusal says it for all: the kernel has no usable BPF LSM.
                        Err(e) => lsm_refusal = Some(format!("{e:#}")),
                    }
                }
                if let Some(why) = &lsm_refusal {
                    info!(reason = %why, "BPF LSM hooks unavailable: file writes and connects use syscall tracepoints");
                }
            }
            for hook in HOOKS
                .iter()
                .filter(|h| (h.feature == Feature::Process) == process_pass)
            {
                if opts.disabled.contains(&hook.feature) || by_lsm.contains(&hook.feature) {
                    continue;
                }
                let (name, result) = match hook.attach {
                    Attach::RawTp(tp) => (
                        format!("raw_tp/{tp}"),
                        attach_raw(&mut ebpf, hook.program, tp),
                    ),
                    // The exit first: an entry stashed with no exit to
                    // take it back would stay in flight for good.
                    Attach::Syscall(sc) => {
                        let r = attach_tp(
                            &mut ebpf,
                            SYS_EXIT_PROGRAM,
                            &format!("sys_exit_{sc}"),
                            &mut exit_loaded,
                        )
                        .and_then(|()| {
                            attach_tp(
                                &mut ebpf,
                                hook.program,
                                &format!("sys_enter_{sc}"),
                                &mut false,
                            )
                        });
                        (format!("syscalls/{sc}"), r)
                    }
                };
                match &result {
                    Ok(()) => debug!(hook = %name, "attached"),
                    Err(e) if hook.feature == Feature::Process => {
                        bail!("required hook {name} could not be attached: {e:#}")
                    }
                    Err(e) => {
                        warn!(hook = %name, error = %format!("{e:#}"), "hook unavailable; carrying on without it")
                    }
                }
                hooks.push(HookStatus {
                    hook: name,
                    feature: hook.feature,
                    error: result.err().map(|e| format!("{e:#}")),
                });
            }
        }
        // File opens submitted through io_uring, where the LSM hook that
        // sees them is not in use.
        if !opts.disabled.contains(&Feature::FileWrite) && !by_lsm.contains(&Feature::FileWrite) {
            let (hook, r) = match &opts.uring {
                Ok(h) => (
                    format!("raw_tp/{}", h.tracepoint),
                    attach_raw(&mut ebpf, URING_PROGRAM, h.tracepoint),
                ),
                Err(why) => (
                    "raw_tp/io_uring_submit_req".to_string(),
                    Err(anyhow::anyhow!("{why}")),
                ),
            };
            match &r {
                Ok(()) => debug!(hook, "attached"),
                Err(e) => warn!(
                    hook,
                    error = %format!("{e:#}"),
                    "hook unavailable: file writes opened through io_uring are not seen"
                ),
            }
            hooks.push(HookStatus {
                hook,
                feature: Feature::FileWrite,
                error: r.err().map(|e| format!("{e:#}")),
            });
        }
        for (feature, programs, hook) in OBSERVER_PROGRAMS {
            if opts.disabled.contains(feature) || by_lsm.contains(feature) {
                continue;
            }
            let r = attach_cgroup(&mut ebpf, programs);
            match &r {
                Ok(()) => debug!(hook, "attached"),
                Err(e) => warn!(
                    hook,
                    error = %format!("{e:#}"),
                    "hook unavailable: connects and sends made without the syscalls (io_uring) are not seen"
                ),
            }
            hooks.push(HookStatus {
                hook: (*hook).into(),
                feature: *feature,
                error: r.err().map(|e| format!("{e:#}")),
            });
        }
        let mut deny = None;
        if opts.deny_connect {
            let r = attach_cgroup(&mut ebpf, DENY_PROGRAMS);
            if let Err(e) = &r {
                warn!(error = %format!("{e:#}"), "connect refusal unavailable: containment's deny_connect will fail");
            }
            hooks.push(HookStatus {
                hook: "cgroup/connect4,connect6,sendmsg4,sendmsg6".into(),
                feature: Feature::DenyConnect,
                error: r.as_ref().err().map(|e| format!("{e:#}")),
            });
            if r.is_ok() {
                let m = ebpf
                    .take_map("DENY_CONNECT")
                    .context("DENY_CONNECT map missing")?;
                deny = Some(DenyList(std::sync::Arc::new(std::sync::Mutex::new(
                    aya::maps::HashMap::try_from(m).context("DENY_CONNECT map")?,
                ))));
            }
        }
        if opts.deny_policy != 0 {
            let r = attach_lsm(
                &mut ebpf,
                btf.as_ref(),
                "vigil_exec_guard",
                "bprm_check_security",
            );
            match &r {
                Ok(()) => info!("deny_exec: matching execs are refused in the kernel (BPF LSM bprm_check_security)"),
                Err(e) => warn!(
                    error = %format!("{e:#}"),
                    "deny_exec: the BPF LSM exec hook is unavailable on this kernel; matching execs are frozen at exec instead"
                ),
            }
            hooks.push(HookStatus {
                hook: "lsm/bprm_check_security".into(),
                feature: Feature::DenyExec,
                error: r.err().map(|e| format!("{e:#}")),
            });
        }
        // What the verifier walked for each program: the bulk of the
        // start-up time (and what grows when a program gets harder to prove).
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (program, p) in ebpf.programs() {
                if let Ok(info) = p.info() {
                    debug!(program, verified_insns = ?info.verified_instruction_count(), "verified");
                }
            }
        }
        let ok = hooks.iter().filter(|h| h.error.is_none()).count();
        let paths: Vec<(Feature, &'static str)> = Feature::ALL
            .into_iter()
            .map(|f| {
                let fallback = f == Feature::DenyExec && opts.deny_policy != 0;
                (f, feature_path(&hooks, f, fallback))
            })
            .collect();
        info!(
            attached = ok,
            unavailable = hooks.len() - ok,
            paths = %paths
                .iter()
                .map(|(f, p)| format!("{}={p}", f.name()))
                .collect::<Vec<_>>()
                .join(" "),
            "sensor loaded"
        );

        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").context("EVENTS map missing")?)
            .context("EVENTS map")?;
        let stats = PerCpuArray::try_from(ebpf.take_map("STATS").context("STATS map missing")?)
            .context("STATS map")?;
        let mut names: aya::maps::HashMap<MapData, [u8; FREEZE_NAME_LEN], u8> =
            aya::maps::HashMap::try_from(
                ebpf.take_map("FREEZE_NAMES")
                    .context("FREEZE_NAMES map missing")?,
            )
            .context("FREEZE_NAMES map")?;
        for n in &opts.freeze_names {
            let b = n.as_bytes();
            anyhow::ensure!(
                !b.is_empty() && b.len() < FREEZE_NAME_LEN,
                "freeze name {n:?} must be 1 to {} bytes",
                FREEZE_NAME_LEN - 1
            );
            let mut key = [0u8; FREEZE_NAME_LEN];
            key[..b.len()].copy_from_slice(b);
            names.insert(key, 1, 0).context("filling FREEZE_NAMES")?;
        }
        let mut sizes: aya::maps::HashMap<MapData, u64, u8> = aya::maps::HashMap::try_from(
            ebpf.take_map("FREEZE_SIZES")
                .context("FREEZE_SIZES map missing")?,
        )
        .context("FREEZE_SIZES map")?;
        for s in opts.freeze_sizes.iter().take(256) {
            sizes.insert(s, 1, 0).context("filling FREEZE_SIZES")?;
        }
        let pending =
            aya::maps::Array::try_from(ebpf.take_map("PENDING").context("PENDING map missing")?)
                .context("PENDING map")?;
        let alive =
            aya::maps::Array::try_from(ebpf.take_map("ALIVE").context("ALIVE map missing")?)
                .context("ALIVE map")?;
        let servers =
            aya::maps::HashMap::try_from(ebpf.take_map("SERVERS").context("SERVERS map missing")?)
                .context("SERVERS map")?;
        let frozen_map = ebpf.take_map("FROZEN").context("FROZEN map missing")?;
        let freeze_enabled = freeze_policy != 0;
        let frozen_map: crate::frozen::FrozenMap =
            aya::maps::HashMap::try_from(frozen_map).context("FROZEN map")?;
        let mut sensor = Self {
            _ebpf: ebpf,
            frozen: Some((frozen_map, pin.keep())),
            freeze_enabled,
            ring,
            stats,
            pending,
            alive,
            servers,
            hooks,
            deny,
            paths,
        };
        sensor.handle_heartbeat();
        Ok(sensor)
    }

    fn handle_heartbeat(&mut self) {
        if !self.freeze_enabled {
            return;
        }
        let now = crate::model::boot_ns_now();
        if let Err(e) = self.alive.set(0, now, 0) {
            tracing::warn!(error = %e, "heartbeat to the kernel failed: in-kernel freezing pauses");
        }
    }

    /// Splits into the ring buffer (for the consumer) and the rest.
    pub fn into_parts(self) -> (RingBuf<MapData>, SensorHandle) {
        (
            self.ring,
            SensorHandle {
                _ebpf: self._ebpf,
                freeze_enabled: self.freeze_enabled,
                stats: self.stats,
                pending: self.pending,
                alive: self.alive,
                servers: self.servers,
                hooks: self.hooks,
            },
        )
    }
}

/// The loaded programs without their ring buffer: keeps them attached and
/// reads the kernel counters. Dropping it detaches everything.
pub struct SensorHandle {
    _ebpf: Ebpf,
    freeze_enabled: bool,
    stats: PerCpuArray<MapData, u64>,
    pending: aya::maps::Array<MapData, u64>,
    alive: aya::maps::Array<MapData, u64>,
    servers: aya::maps::HashMap<MapData, u32, u8>,
    /// One entry per hook.
    pub hooks: Vec<HookStatus>,
}

impl SensorHandle {
    /// Stops in-kernel freezing (heartbeat cleared): call before the final
    /// drain at shutdown so no process is stopped that the agent will not
    /// resume.
    pub fn stop_freezing(&mut self) {
        self.freeze_enabled = false;
        if let Err(e) = self.alive.set(0, 0, 0) {
            tracing::warn!(error = %e, "clearing the heartbeat failed");
        }
    }

    /// Marks processes that already listen (found in /proc at start) as
    /// servers for the kernel's freeze policy.
    pub fn mark_servers(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if let Err(e) = self.servers.insert(pid, 1, 0) {
                tracing::debug!(pid, error = %e, "could not mark a server");
            }
        }
    }

    /// Tells the kernel the agent is alive (call every second): the programs
    /// freeze processes only while this is fresh, so a dead agent never
    /// leaves new processes stopped.
    pub fn heartbeat(&mut self) {
        if !self.freeze_enabled {
            return;
        }
        let now = crate::model::boot_ns_now();
        if let Err(e) = self.alive.set(0, now, 0) {
            tracing::warn!(error = %e, "heartbeat to the kernel failed: in-kernel freezing pauses");
        }
    }

    /// Kernel-side counters, summed over CPUs, indexed by slot
    /// (see `vigil_sensor_common::STATS_SLOTS`).
    pub fn kernel_stats(&self) -> anyhow::Result<Vec<u64>> {
        let mut out = vec![0u64; STATS_SLOTS as usize];
        for (slot, v) in out.iter_mut().enumerate() {
            let per_cpu = self.stats.get(&(slot as u32), 0)?;
            *v = if slot == vigil_sensor_common::STAT_RINGBUF_MAX_FILL as usize {
                per_cpu.iter().copied().max().unwrap_or(0)
            } else {
                per_cpu.iter().sum()
            };
        }
        Ok(out)
    }

    /// Syscalls whose arguments the kernel holds for their exit: a few at
    /// any moment. A value that never returns to 0 means entries were lost
    /// without their exit, and every syscall exit pays a hash look-up again.
    pub fn syscalls_in_flight(&self) -> anyhow::Result<u64> {
        Ok(self.pending.get(&0, 0)?)
    }
}

/// The size of the LRU maps whose entries must not be evicted while live
/// (`INFLIGHT`, `SERVERS`). The kernel's LRU hands each CPU up to 128 free
/// entries of its own and evicts before it takes another CPU's, so with a
/// fixed size a host with many CPUs would evict live entries (lost
/// events and `PENDING` kept above 0; a server's child not frozen): 256
/// per possible CPU, at least the object's 16384.
fn lru_entries() -> u32 {
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
    cpus.saturating_mul(256).max(16384)
}

/// Loads a program, again when the verifier was interrupted: it gives up
/// with EAGAIN when a signal is pending for the loading thread (a stop and
/// continue, a freezer), which says nothing about the program. libbpf
/// retries the same way (5 attempts).
fn retry_interrupted(
    program: &str,
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    let mut attempt = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                tracing::debug!(
                    program,
                    attempt,
                    "the verifier was interrupted; loading again"
                );
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn attach_raw(ebpf: &mut Ebpf, program: &str, tp: &str) -> anyhow::Result<()> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from object"))?
        .try_into()?;
    retry_interrupted(program, || p.load()).with_context(|| format!("loading {program}"))?;
    p.attach(tp)
        .with_context(|| format!("attaching {program} to raw tracepoint {tp}"))?;
    Ok(())
}

fn attach_tp(ebpf: &mut Ebpf, program: &str, name: &str, loaded: &mut bool) -> anyhow::Result<()> {
    let p: &mut TracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from object"))?
        .try_into()?;
    if !*loaded {
        retry_interrupted(program, || p.load()).with_context(|| format!("loading {program}"))?;
        *loaded = true;
    }
    p.attach("syscalls", name)
        .with_context(|| format!("attaching {program} to tracepoint syscalls/{name}"))?;
    Ok(())
}

/// A pin removed when dropped, unless kept: a start-up that fails leaves
/// no pin naming a live agent.
struct PinGuard(Option<PathBuf>);

impl PinGuard {
    fn keep(mut self) -> Option<PathBuf> {
        self.0.take()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Pins the ledger map as `pin_dir/frozen.<pid>.<start>` (mounting bpffs
/// at /sys/fs/bpf first if nobody has). Returns the pin path.
fn pin_ledger(map: &aya::maps::Map, pin_dir: &Path) -> anyhow::Result<PathBuf> {
    ensure_bpffs(pin_dir)?;
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(pin_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {}", pin_dir.display()))?;
    let path = pin_dir.join(crate::frozen::pin_name());
    // A stale pin of this very name (same pid and start time) cannot exist
    // unless the clock went back; replace it.
    let _ = std::fs::remove_file(&path);
    map.pin(&path)
        .map_err(|e| anyhow::Error::new(e).context(format!("pinning {}", path.display())))?;
    Ok(path)
}

/// bpffs is not mounted by default on every distribution.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let mount_point = Path::new("/sys/fs/bpf");
    let probe = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(mount_point);
    if is_bpffs(probe) {
        return Ok(());
    }
    if !pin_dir.starts_with(mount_point) {
        anyhow::bail!("{} is not on a bpffs", pin_dir.display());
    }
    nix::mount::mount(
        Some("bpf"),
        mount_point,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Syscall tracepoints need tracefs; mount it if nobody has.
fn ensure_tracefs() {
    let candidates = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    if candidates
        .iter()
        .any(|d| Path::new(d).join("events").exists())
    {
        return;
    }
    match nix::mount::mount(
        Some("tracefs"),
        "/sys/kernel/tracing",
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => info!("mounted tracefs at /sys/kernel/tracing"),
        Err(e) => {
            warn!(error = %e, "tracefs is not mounted and could not be mounted: syscall hooks will be unavailable")
        }
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use
/// memcg and ignore it, so failure here is only worth a debug line.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK (harmless on kernels >= 5.11)");
    }
}

/// Names of the emitted/dropped kernel counters, for metrics.
pub fn kind_slots() -> impl Iterator<Item = (EventKind, usize, usize)> {
    EventKind::ALL.into_iter().map(|k| {
        (
            k,
            vigil_sensor_common::stat_emitted(k) as usize,
            vigil_sensor_common::stat_dropped(k) as usize,
        )
    })
}
