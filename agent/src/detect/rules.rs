//! Built-in behaviour rules. Each looks at one event with its process tree
//! and side state and returns findings; none looks at file names of test
//! scenarios, only at behaviour: who started whom, what a file is and who
//! wrote it, what a socket is.

use super::classify::*;
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
}

fn finding(
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
        }
        Payload::Connect(c) => {
            let exe = &ctx.ev.process.image.exe;
            if is_shell(exe) && !c.daddr.is_unspecified() {
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
        Payload::ExecDenied(d) => exec_denied(ctx, d, &mut out),
        Payload::FileOpen(f) => persistence(&f.path, "wrote", ctx, &mut out),
        Payload::Rename(r) => persistence(&r.new_path, "renamed a file into", ctx, &mut out),
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
        if !is_shell(&p.image.exe) {
            return None;
        }
        cur = p.ppid;
    }
    None
}

fn server_child(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let what = if is_shell(&x.exe) {
        "a shell"
    } else if is_downloader(&x.exe) {
        "a downloader"
    } else if is_interpreter_one_liner(&x.exe, &x.argv) {
        "an interpreter one-liner"
    } else if is_recon(&x.exe) {
        "a reconnaissance tool"
    } else {
        return;
    };
    // A shell must be a direct child of the server; tools may sit under the
    // server's shells.
    let server = if is_shell(&x.exe) {
        ctx.tree
            .get(x.ppid)
            .filter(|p| p.serves)
            .map(|p| (p.pid, p.image.exe.clone()))
    } else {
        serving_ancestor(ctx, x.ppid)
    };
    let Some((spid, sexe)) = server else { return };
    let mitre: &[&str] = if is_shell(&x.exe) {
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

fn ingress_exec(ctx: &mut Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let key = (x.exe_dev, x.exe_ino);
    let Some(p) = ctx.state.provenance.get_mut(&key) else {
        return;
    };
    if !p.from_network || p.reported {
        return;
    }
    p.reported = true;
    out.push(finding(
        ids::INGRESS,
        Severity::High,
        &["T1105"],
        format!(
            "{} runs a file written by {} (pid {}), which fetched it over the network",
            x.exe, p.exe, p.pid
        ),
        false,
        &p.path.clone(),
    ));
}

fn ingress_chmod(ctx: &mut Ctx<'_>, path: &str, out: &mut Vec<Finding>) {
    let Some(key) = ctx.state.provenance_path.peek(path).copied() else {
        return;
    };
    let Some(p) = ctx.state.provenance.get_mut(&key) else {
        return;
    };
    if !p.from_network || p.reported {
        return;
    }
    p.reported = true;
    out.push(finding(
        ids::INGRESS,
        Severity::High,
        &["T1105"],
        format!(
            "{} made {path} executable; it was written by {} (pid {}), which fetched it over the network",
            ctx.ev.process.image.exe, p.exe, p.pid
        ),
        false,
        path,
    ));
}

fn masquerade(ctx: &Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    let exe_name = basename(&x.exe);
    let argv0 = x.argv.first().map(|a| basename(a)).unwrap_or("");
    let real_file = !x.exe.starts_with("/memfd:") && !x.exe.is_empty();
    let mut why = None;
    if real_file && is_borrowed_name(exe_name) && !in_system_dir(&x.exe) {
        why = Some(format!(
            "{} carries the name of a system program but runs from {}",
            exe_name,
            dirname(&x.exe)
        ));
    } else if looks_like_kernel_thread(x.argv.first().map(String::as_str).unwrap_or("")) {
        why = Some(format!(
            "{} calls itself {} like a kernel thread",
            x.exe, x.argv[0]
        ));
    } else if !argv0.is_empty()
        && argv0 != exe_name
        && is_borrowed_name(argv0)
        && !in_system_dir(&x.exe)
    {
        why = Some(format!(
            "{} runs as \"{}\", a system program's name",
            x.exe, argv0
        ));
    } else if deceptive_name(exe_name)
        || x.script
            .as_deref()
            .is_some_and(|s| deceptive_name(basename(s)))
    {
        why = Some(format!(
            "{} has a deceptive file name",
            x.script.as_deref().unwrap_or(&x.exe)
        ));
    }
    if let Some(why) = why {
        let _ = ctx;
        out.push(finding(
            ids::MASQUERADE,
            Severity::High,
            &["T1036.005"],
            why,
            true,
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
        out.push(finding(
            ids::TEMP_EXEC,
            Severity::Medium,
            &["T1036.005", "T1059"],
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
    let shell_like =
        is_shell(&x.exe) || (is_interpreter(&x.exe) && x.argv.iter().skip(1).any(|a| a == "-i"));
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
    let interactive = shell_command(&x.exe, &x.argv).is_none() && x.script.is_none();
    if interactive && x.stdio[0] == Stdio::CharDevice {
        if let Some(parent) = ctx.tree.get(x.ppid) {
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

fn pipe_to_shell(ctx: &mut Ctx<'_>, x: &Exec, out: &mut Vec<Finding>) {
    // The whole pipeline in one `sh -c` string.
    if let Some(cmd) = shell_command(&x.exe, &x.argv) {
        if let Some(kind) = pipes_into_shell(&cmd) {
            let (mitre, what): (&[&str], _) = if kind == "decode" {
                (&["T1140", "T1027", "T1059.004"], "decoded")
            } else {
                (&["T1059.004", "T1105"], "downloaded")
            };
            out.push(finding(
                ids::PIPE_TO_SHELL,
                Severity::High,
                mitre,
                format!("shell pipes {what} content into a shell: {cmd}"),
                false,
                "",
            ));
            return;
        }
    }
    // A pipeline built by a parent shell: a decoder or downloader and a shell
    // reading a pipe, siblings started together.
    let e = &ctx.ev.event;
    let source = if is_decoder(&x.exe, &x.argv) {
        Some(PipeSource::Decoder)
    } else if is_downloader(&x.exe) {
        Some(PipeSource::Downloader)
    } else {
        None
    };
    let piped_shell =
        is_shell(&x.exe) && x.stdio[0] == Stdio::Pipe && shell_command(&x.exe, &x.argv).is_none();
    if source.is_none() && !piped_shell {
        return;
    }
    let q = &mut ctx.state.recent_pipeline;
    let window = 2_000_000_000u64;
    while q
        .front()
        .is_some_and(|f| e.boot_ns.saturating_sub(f.1) > window)
    {
        q.pop_front();
    }
    // Pair a source with a shell (either may exec first).
    let partner = q
        .iter()
        .position(|&(ppid, _, other, _)| ppid == x.ppid && (other.is_some() != source.is_some()));
    match partner {
        Some(i) => {
            let (_, _, other, other_pid) = q.remove(i).expect("index from position");
            let kind = source.or(other).expect("one side is a source");
            let (mitre, what): (&[&str], _) = match kind {
                PipeSource::Decoder => (&["T1140", "T1027", "T1059.004"], "decoded"),
                PipeSource::Downloader => (&["T1105", "T1059.004"], "downloaded"),
            };
            out.push(finding(
                ids::PIPE_TO_SHELL,
                Severity::High,
                mitre,
                format!(
                    "{what} content piped into a shell (pids {} and {other_pid})",
                    e.pid
                ),
                false,
                "",
            ));
        }
        None => {
            if q.len() >= 256 {
                q.pop_front();
            }
            q.push_back((x.ppid, e.boot_ns, source, e.pid));
        }
    }
}

/// What feeds a shell through a pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipeSource {
    /// base64 -d and friends.
    Decoder,
    /// curl, wget and friends.
    Downloader,
}

#[cfg(test)]
mod tests {
    //! Detectors on synthetic trees, with near misses that must stay quiet.
    use std::time::Duration;

    use super::*;
    use crate::detect::{DetectState, Provenance};
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
                time: String::new(),
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
                stdio: [Stdio::CharDevice; 3],
                frozen: false,
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
                }),
            );
            self.run(ev);
        }

        fn node_server(&mut self) {
            self.exec(100, 1, "/usr/bin/node", &["next-server", "app.js"]);
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
            }),
        );
        w.run(ev);
        assert!(w
            .state
            .provenance
            .peek(&(9, 99))
            .is_some_and(|p: &Provenance| p.from_network));
    }

    #[test]
    fn masquerading_and_locations() {
        let mut w = World::new();
        let f = w.exec(600, 1, "/home/u/.cache/.sys/vim", &[".cache/.sys/vim", "2"]);
        let r = rules(&f);
        assert!(r.contains(&ids::MASQUERADE), "{r:?}");
        assert!(r.contains(&ids::HIDDEN_EXEC), "{r:?}");
        let f = w.exec(601, 1, "/tmp/scn/crond", &["crond"]);
        assert!(rules(&f).contains(&ids::MASQUERADE));
        assert!(rules(&f).contains(&ids::TEMP_EXEC));
        // Near misses: real vim, a login shell "-bash", node renamed by exec -a.
        assert!(w
            .exec(602, 1, "/usr/bin/vim.basic", &["vim", "notes"])
            .is_empty());
        assert!(w.exec(603, 1, "/usr/bin/bash", &["-bash"]).is_empty());
        assert!(w
            .exec(604, 1, "/usr/bin/node", &["next-server", "app.js"])
            .is_empty());
        assert!(w
            .exec(605, 1, "/root/.cargo/bin/cargo", &["cargo", "build"])
            .is_empty());
        let f = w.exec(606, 1, "/usr/local/sbin/x", &["[kworker/0:1]"]);
        assert!(rules(&f).contains(&ids::MASQUERADE));
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

    #[test]
    fn decoded_pipe_into_shell() {
        let mut w = World::new();
        w.exec(900, 1, "/usr/bin/bash", &["bash", "script.sh"]);
        let f = w.exec(901, 900, "/usr/bin/base64", &["base64", "-d"]);
        assert!(f.is_empty());
        let f = w.exec_full(902, 900, "/usr/bin/dash", &["sh"], |x| {
            x.stdio = [Stdio::Pipe, Stdio::CharDevice, Stdio::CharDevice]
        });
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL), "{f:?}");
        let f = w.exec(
            903,
            900,
            "/usr/bin/dash",
            &["sh", "-c", "echo aWQ= | base64 -d | sh"],
        );
        assert!(rules(&f).contains(&ids::PIPE_TO_SHELL));
        // Near miss: `git log | less` style pipelines.
        w.exec(910, 1, "/usr/bin/bash", &["bash"]);
        w.exec(911, 910, "/usr/bin/git", &["git", "log"]);
        let f = w.exec_full(912, 910, "/usr/bin/less", &["less"], |x| {
            x.stdio = [Stdio::Pipe, Stdio::CharDevice, Stdio::CharDevice]
        });
        assert!(f.is_empty());
    }
}
