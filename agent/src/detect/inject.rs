//! Rules on code reaching where a program's own file does not take it:
//! into another process (ptrace, `process_vm_writev`), into the kernel
//! (modules, BPF programs), into anonymous executable memory.
//!
//! Each is judged by relationship and place, not by name: whether the
//! target is the actor's own child (a tracer of what it started), whether
//! the actor is a system-installed debugger, where its program and the
//! loaded file live and how they got there (provenance), and whether the
//! actor is a runtime that compiles code at all.

use super::classify::*;
use super::provenance::Origin;
use super::rules::{absolute, finding, ids};
use super::Ctx;
use crate::model::event::{BpfLoad, ExecMem, ModuleLoad, ProcessAccess};
use crate::model::{Finding, Severity};
use crate::tree::ProcessTree;

/// Whether `pid` descends from `ancestor` (bounded walk up the tree).
pub fn is_descendant(tree: &ProcessTree, pid: u32, ancestor: u32) -> bool {
    let mut cur = pid;
    for _ in 0..64 {
        let Some(p) = tree.get(cur) else { return false };
        if p.ppid == ancestor {
            return true;
        }
        if p.ppid == 0 || p.ppid == cur {
            return false;
        }
        cur = p.ppid;
    }
    false
}

/// Why the acting process's own program is suspect, if it is: it came from
/// the network or a decoder, lives in a hidden or temporary directory, runs
/// from memory or a deleted file, or reads a downloader's output on stdin.
fn suspect_actor(ctx: &mut Ctx<'_>) -> Option<String> {
    let exe = ctx.ev.process.image.exe.clone();
    let pid = ctx.ev.event.pid;
    if let Some(p) = ctx.state.files.at_path(&exe) {
        return Some(format!("{} {}", p.writer.exe, p.origin.verb()));
    }
    if let Some(t) = ctx.state.files.taint(pid) {
        return Some(match t.origin {
            Origin::Network => format!("it reads what {} fetched", t.source.exe),
            Origin::Decoded => format!("it reads what {} decoded", t.source.exe),
        });
    }
    if exe.starts_with("/memfd:") || exe.ends_with(" (deleted)") {
        return Some("it runs from memory or a deleted file".into());
    }
    if let Some(h) = hidden_dir_component(&exe) {
        return Some(format!("it runs from the hidden directory {h}"));
    }
    if in_temp_dir(&exe) {
        return Some("it runs from a temporary directory".into());
    }
    None
}

/// The target's program, for summaries.
fn target_exe(ctx: &Ctx<'_>, pid: Option<u32>) -> String {
    pid.and_then(|p| ctx.tree.get(p))
        .map(|p| p.image.exe.clone())
        .unwrap_or_else(|| "?".into())
}

/// ptrace and `process_vm_writev` on a process the actor did not start,
/// by anything but a system debugger: writes are injection (critical),
/// an attach alone is the step before it (high, and learnable: some
/// workloads run their own tracers).
pub fn process_access(ctx: &mut Ctx<'_>, a: &ProcessAccess, out: &mut Vec<Finding>) {
    if a.ret < 0 {
        return;
    }
    let e = &ctx.ev.event;
    let exe = ctx.ev.process.image.exe.clone();
    let target = a.target_pid;
    if target == Some(e.pid)
        || is_system_debugger(&exe)
        || target.is_some_and(|t| is_descendant(ctx.tree, t, e.pid))
    {
        return;
    }
    let victim = format!(
        "process {} ({})",
        target.unwrap_or(a.target),
        target_exe(ctx, target)
    );
    let via_ptrace = a.op != "vm_writev";
    let technique = if via_ptrace { "T1055.008" } else { "T1055" };
    if a.writes() {
        let how = match a.op {
            "vm_writev" => "wrote into the memory of",
            "set_regs" | "set_fpregs" | "set_regset" => "rewrote the registers of",
            _ => "wrote (ptrace) into the memory of",
        };
        out.push(finding(
            ids::INJECTION,
            Severity::Critical,
            &[technique],
            format!("{exe} {how} {victim}"),
            true,
            "",
        ));
    } else {
        out.push(finding(
            ids::PTRACE_ATTACH,
            Severity::High,
            &[technique],
            format!("{exe} attached (ptrace {}) to {victim}", a.op),
            false,
            "",
        ));
    }
}

/// A kernel module from outside the system's module trees: a file
/// elsewhere (`insmod /tmp/x.ko`), or an image from memory loaded by a
/// program that is not the system's module loader, or by that loader
/// told to load a file elsewhere. Refused loads count: the attempt is the
/// finding.
pub fn module_load(ctx: &mut Ctx<'_>, m: &ModuleLoad, out: &mut Vec<Finding>) {
    let exe = ctx.ev.process.image.exe.clone();
    let argv = ctx.ev.process.image.argv.clone();
    let source = if !m.from_memory {
        (!in_module_tree(&m.path)).then(|| m.path.clone())
    } else if !in_system_dir(&exe) {
        Some(format!("the memory of {exe}"))
    } else {
        module_file_operand(&argv)
            .filter(|f| !in_module_tree(&absolute(ctx.ev.event.pid, f)))
            .map(str::to_string)
    };
    let Some(source) = source else { return };
    let fetched = if m.from_memory {
        None
    } else {
        ctx.state
            .files
            .at_path(&m.path)
            .map(|p| format!("; {} {}", p.writer.exe, p.origin.verb()))
    };
    let suspect = suspect_actor(ctx).map(|w| format!("; {w}"));
    let severity = if fetched.is_some() || suspect.is_some() {
        Severity::Critical
    } else {
        Severity::High
    };
    out.push(finding(
        ids::MODULE_LOAD,
        severity,
        &["T1547.006"],
        format!(
            "{exe} {} a kernel module from {source}{}{}",
            if m.ret < 0 {
                format!("tried to load (refused, errno {})", -m.ret)
            } else {
                "loaded".into()
            },
            fetched.unwrap_or_default(),
            suspect.unwrap_or_default()
        ),
        severity == Severity::Critical,
        &m.path,
    ));
}

/// A BPF program that hooks the kernel's own functions (kprobes,
/// tracepoints, LSM, fentry: what a BPF rootkit is made of) loaded by a
/// program outside the system's directories or a suspect one. Network
/// and cgroup filters are not judged.
pub fn bpf_load(ctx: &mut Ctx<'_>, b: &BpfLoad, out: &mut Vec<Finding>) {
    if !b.instruments_kernel() {
        return;
    }
    let exe = ctx.ev.process.image.exe.clone();
    let suspect = suspect_actor(ctx);
    if in_system_dir(&exe) && suspect.is_none() {
        return;
    }
    let name = if b.name.is_empty() {
        String::new()
    } else {
        format!(" \"{}\"", b.name)
    };
    out.push(finding(
        ids::BPF_LOAD,
        if suspect.is_some() {
            Severity::Critical
        } else {
            Severity::High
        },
        &["T1014"],
        format!(
            "{exe} {} a {} BPF program{name}{}",
            if b.ret < 0 { "tried to load" } else { "loaded" },
            b.prog_type,
            suspect.map(|w| format!(" ({w})")).unwrap_or_default()
        ),
        false,
        "",
    ));
}

/// Anonymous memory made executable by a process that has no JIT to
/// explain it (a shell or a plain interpreter: shellcode runners,
/// reflective loaders) or whose own program is suspect.
pub fn exec_memory(ctx: &mut Ctx<'_>, x: &ExecMem, out: &mut Vec<Finding>) {
    if x.ret < 0 {
        return;
    }
    let exe = ctx.ev.process.image.exe.clone();
    let plain = is_jit_free_interpreter(&exe, &ctx.ev.process.image.argv);
    let suspect = suspect_actor(ctx);
    if !plain && suspect.is_none() {
        return;
    }
    let why = suspect.unwrap_or_else(|| "it compiles no code of its own".into());
    out.push(finding(
        ids::EXEC_MEMORY,
        Severity::High,
        &["T1620"],
        format!(
            "{exe} made {} bytes of anonymous memory executable ({}{}; {why})",
            x.len,
            x.op,
            if x.writable() { ", writable too" } else { "" }
        ),
        false,
        "",
    ));
}
