//! What a program is, judged from its path, name and arguments. Pure
//! functions; the detectors combine them with behaviour (tree, sockets,
//! provenance).

/// Last path component.
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Directory part ("" if none).
pub fn dirname(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "",
    }
}

const SHELLS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "csh", "tcsh", "fish", "busybox", "rbash",
];

/// A command shell.
pub fn is_shell(exe: &str) -> bool {
    SHELLS.contains(&basename(exe))
}

const DOWNLOADERS: &[&str] = &[
    "curl", "wget", "fetch", "aria2c", "tftp", "ftp", "lftp", "scp", "sftp", "rsync", "nc", "ncat",
    "netcat", "socat", "axel", "httpie", "http",
];

/// A program whose job is moving files over the network.
pub fn is_downloader(exe: &str) -> bool {
    DOWNLOADERS.contains(&basename(exe))
}

const ACTS_BY_ARGUMENTS: &[&str] = &[
    "ssh",
    "git",
    "openssl",
    "systemctl",
    "service",
    "crontab",
    "at",
    "chmod",
    "chown",
    "chattr",
    "setcap",
    "iptables",
    "ip6tables",
    "nft",
    "ip",
    "useradd",
    "usermod",
    "userdel",
    "groupadd",
    "passwd",
    "chpasswd",
    "visudo",
    "sudo",
    "su",
    "docker",
    "podman",
    "kubectl",
    "crictl",
    "mount",
    "insmod",
    "modprobe",
    "rm",
    "shred",
    "truncate",
    "dd",
    "kill",
    "pkill",
    "xargs",
    "env",
    "nohup",
    "setsid",
    "timeout",
    "nice",
    "strace",
    "gdb",
];

/// A program whose command line is the action itself, beyond a file to
/// work on (remote commands, services, accounts, firewall, permissions,
/// deletions, running another program): the baseline never learns it
/// apart from its arguments.
pub fn acts_by_arguments(exe: &str) -> bool {
    ACTS_BY_ARGUMENTS.contains(&basename(exe))
}

/// A scripting language interpreter (python3.11 counts as python).
pub fn is_interpreter(exe: &str) -> bool {
    let b = basename(exe);
    let stem = b.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    matches!(
        stem,
        "python"
            | "perl"
            | "ruby"
            | "php"
            | "node"
            | "nodejs"
            | "lua"
            | "tclsh"
            | "awk"
            | "gawk"
            | "mawk"
            | "nawk"
            | "irb"
            | "pwsh"
            | "osascript"
            | "java"
            | "jjs"
            | "deno"
            | "bun"
    )
}

/// An interpreter told to run a one-liner from its command line.
pub fn is_interpreter_one_liner(exe: &str, argv: &[String]) -> bool {
    if !is_interpreter(exe) {
        return false;
    }
    argv.iter().skip(1).any(|a| {
        matches!(
            a.as_str(),
            "-c" | "-e" | "-r" | "--eval" | "-E" | "-p" | "--print"
        )
    })
}

const RECON: &[&str] = &[
    "id",
    "whoami",
    "uname",
    "hostname",
    "ifconfig",
    "ip",
    "netstat",
    "ss",
    "ps",
    "w",
    "who",
    "last",
    "lsof",
    "nmap",
    "masscan",
    "getent",
    "groups",
    "arp",
    "route",
    "env",
    "printenv",
    "lscpu",
    "lsb_release",
    "dmidecode",
];

/// A host/user reconnaissance tool.
pub fn is_recon(exe: &str) -> bool {
    RECON.contains(&basename(exe))
}

const SYSTEM_DIRS: &[&str] = &[
    "/bin",
    "/sbin",
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/local/sbin",
    "/usr/lib",
    "/usr/lib64",
    "/usr/libexec",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/opt",
    "/snap",
    "/usr/share",
    "/nix/store",
];

/// An executable installed in a system location.
pub fn in_system_dir(exe: &str) -> bool {
    SYSTEM_DIRS
        .iter()
        .any(|d| exe.starts_with(d) && exe.as_bytes().get(d.len()) == Some(&b'/'))
}

/// Names of system daemons and kernel threads that malware borrows to
/// blend in: nobody installs a program of theirs outside the system's
/// directories.
const DAEMON_NAMES: &[&str] = &[
    "crond",
    "cron",
    "atd",
    "sshd",
    "systemd",
    "systemd-journald",
    "systemd-logind",
    "init",
    "dbus-daemon",
    "rsyslogd",
    "syslogd",
    "udevd",
    "systemd-udevd",
    "kthreadd",
    "kworker",
    "ksoftirqd",
    "kswapd0",
    "migration",
    "watchdogd",
    "kdevtmpfsi",
    "agetty",
    "polkitd",
    "networkd",
    "NetworkManager",
];

/// Names of everyday tools and servers malware also borrows, but which
/// users build and install in their own directories too (a Linuxbrew
/// `htop`, an `nginx` built under /home): suspicious by place, not name.
const TOOL_NAMES: &[&str] = &[
    "vim",
    "vi",
    "nano",
    "emacs",
    "top",
    "htop",
    "less",
    "more",
    "ls",
    "ps",
    "netstat",
    "ssh",
    "sudo",
    "su",
    "apache2",
    "httpd",
    "nginx",
    "mysqld",
    "postgres",
    "php-fpm",
    "containerd",
    "dockerd",
    "kubelet",
];

fn first_part(name: &str) -> &str {
    let n = name.trim();
    n.split('/').next().unwrap_or(n) // "kworker/0:1"
}

/// A system daemon's or kernel thread's name (see [`DAEMON_NAMES`]).
pub fn is_daemon_name(name: &str) -> bool {
    DAEMON_NAMES.contains(&first_part(name))
}

/// An everyday tool's or server's name (see [`TOOL_NAMES`]).
pub fn is_tool_name(name: &str) -> bool {
    TOOL_NAMES.contains(&first_part(name))
}

/// A name that belongs to a system daemon, kernel thread or common tool.
pub fn is_borrowed_name(name: &str) -> bool {
    is_daemon_name(name) || is_tool_name(name)
}

/// argv[0] styled as a kernel thread: "[kworker/0:1]".
pub fn looks_like_kernel_thread(argv0: &str) -> bool {
    argv0.len() > 2 && argv0.starts_with('[') && argv0.ends_with(']')
}

/// A file name with trailing/leading whitespace or a deceptive double
/// extension ("invoice.pdf.sh", "report.txt .exe").
pub fn deceptive_name(name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    if name != name.trim() {
        return true;
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() >= 3 {
        let doc = parts[parts.len() - 2].to_ascii_lowercase();
        let exe = parts[parts.len() - 1].to_ascii_lowercase();
        const DOCS: &[&str] = &[
            "pdf", "doc", "docx", "txt", "jpg", "jpeg", "png", "gif", "xls", "xlsx", "csv", "zip",
            "mp4", "mp3", "log",
        ];
        const EXES: &[&str] = &["sh", "bin", "elf", "exe", "py", "pl", "run", "x"];
        return DOCS.contains(&doc.as_str()) && EXES.contains(&exe.as_str());
    }
    false
}

/// Temporary and world-writable directories programs should not run from.
pub fn in_temp_dir(path: &str) -> bool {
    ["/tmp/", "/var/tmp/", "/dev/shm/", "/run/shm/"]
        .iter()
        .any(|d| path.starts_with(d))
}

/// Hidden directories that are normal homes of tooling; executables there
/// are not "hidden execution".
const KNOWN_DOT_DIRS: &[&str] = &[
    ".cargo",
    ".rustup",
    ".local",
    ".nvm",
    ".pyenv",
    ".rbenv",
    ".sdkman",
    ".npm",
    ".vscode-server",
    ".cursor-server",
    ".deno",
    ".bun",
    ".gradle",
    ".m2",
    ".git",
    ".venv",
    ".tox",
    ".nix-profile",
    ".asdf",
    ".volta",
    ".juliaup",
    ".ghcup",
    ".dotnet",
    ".go",
    ".conda",
];

/// The first hidden directory component of `path` that is not a known
/// tooling home, if any.
pub fn hidden_dir_component(path: &str) -> Option<&str> {
    let dir = dirname(path);
    dir.split('/')
        .find(|c| c.starts_with('.') && *c != "." && *c != ".." && !KNOWN_DOT_DIRS.contains(c))
}

const MINERS: &[&str] = &[
    "xmrig",
    "xmr-stak",
    "xmr-stak-cpu",
    "minerd",
    "cpuminer",
    "cpuminer-multi",
    "ccminer",
    "nbminer",
    "t-rex",
    "lolminer",
    "phoenixminer",
    "ethminer",
    "nanominer",
    "kdevtmpfsi",
    "kinsing",
    "bminer",
    "gminer",
    "teamredminer",
    "srbminer",
    "xmrminer",
];

/// Known miner program names.
pub fn is_miner_name(name: &str) -> bool {
    MINERS.iter().any(|m| m.eq_ignore_ascii_case(name))
}

/// Command-line markers of mining (pool protocols, miner options).
pub fn miner_argument(argv: &[String]) -> Option<&str> {
    const MARKERS: &[&str] = &[
        "stratum+tcp://",
        "stratum+ssl://",
        "stratum+tls://",
        "stratum2+tcp://",
        "--donate-level",
        "--randomx",
        "--coin=",
        "cryptonight",
        "--cpu-max-threads-hint",
        "nicehash",
    ];
    argv.iter()
        .skip(1)
        .find(|a| {
            let a = if a.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(a.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(a.as_str())
            };
            MARKERS.iter().any(|m| a.contains(m))
        })
        .map(|s| s.as_str())
}

/// Ports mining pools listen on.
pub fn is_pool_port(port: u16) -> bool {
    matches!(
        port,
        3333 | 3334
            | 3335
            | 4444
            | 5555
            | 5556
            | 6666
            | 7777
            | 8888
            | 9999
            | 14433
            | 14444
            | 45560
            | 45700
    )
}

/// A persistence location, with its ATT&CK technique and a label.
pub fn persistence_target(path: &str) -> Option<(&'static str, &'static str)> {
    let b = basename(path);
    let p = path;
    // Every location below is under one of these, or a dot file, or SSH
    // keys: most written files are none of them.
    let candidate = p.starts_with("/etc/")
        || p.starts_with("/var/spool/cron/")
        || p.starts_with("/lib/systemd/")
        || p.starts_with("/usr/lib/systemd/")
        || p.starts_with("/run/systemd/")
        || b.starts_with('.')
        || b.starts_with("authorized_keys")
        || memchr::memmem::find(p.as_bytes(), b"/.config/").is_some();
    if !candidate {
        return None;
    }
    if p.starts_with("/etc/cron")
        || p.starts_with("/var/spool/cron/")
        || p == "/etc/crontab"
        || p.starts_with("/etc/anacrontab")
    {
        return Some(("T1053.003", "cron job"));
    }
    if p.starts_with("/etc/systemd/system/")
        || p.starts_with("/lib/systemd/system/")
        || p.starts_with("/usr/lib/systemd/system/")
        || p.starts_with("/run/systemd/system/")
        || p.contains("/.config/systemd/user/")
    {
        return Some(("T1543.002", "systemd unit"));
    }
    if p.starts_with("/etc/init.d/") || p == "/etc/rc.local" || p.starts_with("/etc/rc") {
        return Some(("T1037.004", "init script"));
    }
    if matches!(
        b,
        ".bashrc"
            | ".bash_profile"
            | ".bash_login"
            | ".profile"
            | ".zshrc"
            | ".zprofile"
            | ".zshenv"
            | ".bash_logout"
    ) || p == "/etc/profile"
        || p.starts_with("/etc/profile.d/")
        || p == "/etc/bash.bashrc"
        || p == "/etc/zsh/zshrc"
        || p == "/etc/environment"
    {
        return Some(("T1546.004", "shell start-up file"));
    }
    if matches!(b, "authorized_keys" | "authorized_keys2") {
        return Some(("T1098.004", "SSH authorized keys"));
    }
    if p == "/etc/sudoers" || p.starts_with("/etc/sudoers.d/") {
        return Some(("T1548.003", "sudoers"));
    }
    if p == "/etc/ld.so.preload" {
        return Some(("T1574.006", "ld.so.preload"));
    }
    if p == "/etc/passwd" || p == "/etc/shadow" || p == "/etc/group" {
        return Some(("T1136.001", "account database"));
    }
    if p.contains("/.config/autostart/") || p.starts_with("/etc/xdg/autostart/") {
        return Some(("T1547.013", "autostart entry"));
    }
    if p.starts_with("/etc/update-motd.d/") {
        return Some(("T1037", "login script"));
    }
    None
}

/// `sh -c "…"`: the command string, if this is a shell running one.
pub fn shell_command(exe: &str, argv: &[String]) -> Option<String> {
    if !is_shell(exe) {
        return None;
    }
    let i = argv.iter().position(|a| {
        a.starts_with('-') && !a.starts_with("--") && a.contains('c') && a.len() <= 4
    })?;
    argv.get(i + 1).cloned()
}

/// What kind of record `path` is, if it is one an intruder erases: a
/// system log (T1070.002) or a shell's history (T1070.003).
pub fn log_kind(path: &str) -> Option<(&'static str, &'static str)> {
    let name = basename(path);
    if path.starts_with("/var/log/")
        || matches!(name, "wtmp" | "btmp" | "utmp" | "lastlog" | "faillog")
            && (path.starts_with("/var/") || path.starts_with("/run/"))
    {
        return Some(("T1070.002", "the system log"));
    }
    const HISTORIES: &[&str] = &[
        ".bash_history",
        ".zsh_history",
        ".sh_history",
        ".ash_history",
        ".history",
        ".python_history",
        ".mysql_history",
        ".psql_history",
        ".lesshst",
        ".viminfo",
    ];
    HISTORIES
        .contains(&name)
        .then_some(("T1070.003", "the command history"))
}

/// Programs that write, rotate or manage logs as their job.
const LOG_KEEPERS: &[&str] = &[
    "logrotate",
    "savelog",
    "rsyslogd",
    "syslog-ng",
    "syslogd",
    "systemd-journald",
    "journald",
    "systemd",
    "systemd-logind",
    "login",
    "sshd",
    "sshd-session",
    "agetty",
    "dpkg",
    "apt",
    "apt-get",
    "unattended-upgrade",
    "rpm",
    "dnf",
    "yum",
    "cloud-init",
];

/// A program whose job includes writing or rotating logs.
pub fn is_log_keeper(exe: &str) -> bool {
    LOG_KEEPERS.contains(&basename(exe)) && in_system_dir(exe)
}

/// Programs whose only use on a log is destroying it.
pub fn is_eraser(exe: &str) -> bool {
    matches!(basename(exe), "shred" | "wipe" | "srm" | "truncate" | "dd")
}

/// Programs that set files' times as part of installing, unpacking or
/// copying them (preserving the originals' times).
const TIME_PRESERVERS: &[&str] = &[
    "tar",
    "bsdtar",
    "cpio",
    "unzip",
    "7z",
    "7za",
    "dpkg",
    "dpkg-deb",
    "rpm",
    "rpm2cpio",
    "apt",
    "apt-get",
    "dnf",
    "yum",
    "zypper",
    "pacman",
    "apk",
    "rsync",
    "install",
    "cp",
    "git",
    "unattended-upgrade",
    "snapd",
    "containerd",
    "dockerd",
    "runc",
    "buildkitd",
    "skopeo",
    "podman",
    "ostree",
    "systemd-tmpfiles",
];

/// A program that sets files' times as part of installing or copying them.
pub fn preserves_times(exe: &str) -> bool {
    TIME_PRESERVERS.contains(&basename(exe))
}

/// Programs that run the rest of their command line as another command
/// (`sudo bash`, `env -i sh`, `nice -n 5 sh`): looked through to find the
/// program a pipeline stage really runs.
const WRAPPERS: &[&str] = &[
    "sudo", "doas", "env", "nice", "nohup", "timeout", "stdbuf", "setsid", "command", "exec",
    "ionice", "taskset", "chroot", "runuser", "unbuffer", "time", "chrt", "flock", "xargs",
];

/// Programs with a command escape that starts a shell (GTFOBins' "shell"
/// functions): awk's `system()`, find's `-exec`, an editor's, pager's or
/// client's `!` or `.shell`, a debugger's `shell`, tar's checkpoint action,
/// zip's test command, rsync's and ssh's remote-shell options, sed's `e`.
/// Interpreters (their `system`/`exec`) count too, see
/// [`has_command_escape`].
const ESCAPERS: &[&str] = &[
    "find",
    "vim",
    "vi",
    "nvim",
    "view",
    "vimdiff",
    "rvim",
    "rview",
    "ex",
    "ed",
    "red",
    "nano",
    "pico",
    "emacs",
    "less",
    "more",
    "most",
    "pg",
    "man",
    "nmap",
    "gdb",
    "lldb",
    "ftp",
    "tar",
    "zip",
    "rsync",
    "git",
    "expect",
    "sed",
    "dc",
    "mysql",
    "mariadb",
    "psql",
    "sqlite3",
    "journalctl",
    "systemctl",
    "strace",
    "ltrace",
    "ssh",
    "sftp",
    "tclsh",
    "wish",
    "jjs",
    "irb",
];

/// A program that can start a shell through a command escape (see
/// [`ESCAPERS`]) or an interpreter (its `system("/bin/sh")`).
pub fn has_command_escape(exe: &str) -> bool {
    ESCAPERS.contains(&basename(exe)) || (is_interpreter(exe) && !is_shell(exe))
}

/// A command string that only starts a shell reading its input (`/bin/sh`,
/// `exec bash -i`): what `system("/bin/sh")` hands `sh -c`.
pub fn only_starts_a_shell(cmd: &str) -> bool {
    let p = pipelines(cmd);
    let [pipeline] = p.as_slice() else {
        return false;
    };
    let [stage] = pipeline.as_slice() else {
        return false;
    };
    let Some((prog, args)) = command_of(stage) else {
        return false;
    };
    let mut argv = vec![prog.to_string()];
    argv.extend(args.iter().cloned());
    is_shell(prog) && shell_command(prog, &argv).is_none() && script_operand(prog, &argv).is_none()
}

/// A program that runs another one (see [`WRAPPERS`]).
pub fn is_wrapper(exe: &str) -> bool {
    WRAPPERS.contains(&basename(exe))
}

/// Splits a shell command string into pipelines (at `;`, `&&`, `||`, `&`
/// and newlines), each a list of stages (at `|`), each a list of words.
/// Quotes group words and are removed; it is no shell parser, only enough
/// to find which program each stage runs.
pub fn pipelines(cmd: &str) -> Vec<Vec<Vec<String>>> {
    let mut out = vec![vec![vec![]]];
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = cmd.chars().peekable();
    let end_word = |word: &mut String, in_word: &mut bool, out: &mut Vec<Vec<Vec<String>>>| {
        if *in_word {
            let p = out.last_mut().expect("a pipeline");
            p.last_mut().expect("a stage").push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else {
                word.push(c);
            }
            continue;
        }
        match c {
            '\'' | '"' => {
                quote = Some(c);
                in_word = true;
            }
            '\\' => {
                if let Some(n) = chars.next() {
                    word.push(n);
                    in_word = true;
                }
            }
            ' ' | '\t' => end_word(&mut word, &mut in_word, &mut out),
            '|' => {
                end_word(&mut word, &mut in_word, &mut out);
                if chars.peek() == Some(&'|') {
                    chars.next();
                    out.push(vec![vec![]]);
                } else {
                    chars.next_if_eq(&'&');
                    out.last_mut().expect("a pipeline").push(vec![]);
                }
            }
            ';' | '&' | '\n' | '(' | ')' | '{' | '}' => {
                end_word(&mut word, &mut in_word, &mut out);
                chars.next_if(|&n| n == '&' && c == '&');
                out.push(vec![vec![]]);
            }
            _ => {
                word.push(c);
                in_word = true;
            }
        }
    }
    end_word(&mut word, &mut in_word, &mut out);
    out.retain(|p| p.iter().any(|s| !s.is_empty()));
    out
}

/// The program a stage runs and its arguments, looking through variable
/// assignments, redirections and wrappers (`sudo -u x bash` -> `bash`).
pub fn command_of(stage: &[String]) -> Option<(&str, &[String])> {
    let mut i = 0;
    while i < stage.len() {
        let w = stage[i].as_str();
        let is_assign = w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if is_assign || w.starts_with('>') || w.starts_with('<') || w.starts_with("2>") {
            i += 1;
            continue;
        }
        if is_wrapper(w) {
            // The wrapper's own options (and an option's value, for the
            // few that take one) come before the command.
            i += 1;
            while i < stage.len() {
                let a = stage[i].as_str();
                let is_duration = a.chars().next().is_some_and(|c| c.is_ascii_digit());
                if matches!(
                    a,
                    "-u" | "-g" | "-n" | "-c" | "-p" | "-o" | "-e" | "-s" | "-k"
                ) {
                    i += 2;
                } else if a.starts_with('-') || is_duration || a.contains('=') {
                    i += 1;
                } else {
                    break;
                }
            }
            continue;
        }
        if basename(w) == "busybox" && i + 1 < stage.len() {
            i += 1;
            continue;
        }
        return Some((w, &stage[i + 1..]));
    }
    None
}

/// How a command string feeds a shell with content it fetched or decoded:
/// a pipeline whose stage runs a downloader or decoder and a later stage
/// runs a shell reading its input (`curl -s URL | sudo bash`,
/// `base64 -d <<< X |/bin/sh`), or a shell, `eval` or interpreter handed
/// such content by command or process substitution (`sh -c "$(curl URL)"`,
/// `bash <(wget -O- URL)`). Returns "decode" or "download".
pub fn pipes_into_shell(cmd: &str) -> Option<&'static str> {
    let source_kind = |stage: &[String]| -> Option<&'static str> {
        let (prog, args) = command_of(stage)?;
        let mut argv = vec![prog.to_string()];
        argv.extend(args.iter().cloned());
        if is_decoder(prog, &argv) {
            Some("decode")
        } else if is_downloader(prog) {
            Some("download")
        } else {
            None
        }
    };
    let reads_input = |stage: &[String]| -> bool {
        command_of(stage).is_some_and(|(prog, args)| {
            is_shell(prog) && !args.iter().any(|a| is_command_flag(a))
                || (is_interpreter(prog) && args.iter().all(|a| a.starts_with('-') || a == "-"))
        })
    };
    for p in pipelines(cmd) {
        let mut fed: Option<&'static str> = None;
        for stage in &p {
            if let Some(k) = fed {
                if reads_input(stage) {
                    return Some(k);
                }
            }
            if let Some(k) = source_kind(stage) {
                fed = Some(k);
            }
        }
    }
    substituted_into_shell(cmd)
}

/// `-c` and the short option clusters that contain it (`-ec`, `-xc`).
fn is_command_flag(a: &str) -> bool {
    a.starts_with('-') && !a.starts_with("--") && a.contains('c') && a.len() <= 4
}

/// Content of a downloader or decoder run as code by command or process
/// substitution: `$(...)`, backquotes or `<(...)` around one, used where a
/// shell, `eval`, `source` or `.` takes code.
fn substituted_into_shell(cmd: &str) -> Option<&'static str> {
    for open in ["$(", "`", "<("] {
        let mut rest = cmd;
        while let Some(i) = rest.find(open) {
            let before = rest[..i]
                .trim_end()
                .trim_end_matches(['"', '\''])
                .trim_end();
            let inner_start = i + open.len();
            let close = if open == "`" { '`' } else { ')' };
            let inner_end = rest[inner_start..]
                .find(close)
                .map(|j| inner_start + j)
                .unwrap_or(rest.len());
            let inner = &rest[inner_start..inner_end];
            let last_word = before
                .rsplit([' ', '\t', ';', '|', '&'])
                .next()
                .unwrap_or("");
            let runs_code = before.is_empty()
                || matches!(last_word, "eval" | "source" | "." | "-c" | "<<<" | "<")
                || is_shell(last_word)
                || is_interpreter(last_word);
            if runs_code {
                for p in pipelines(inner) {
                    for stage in &p {
                        if let Some((prog, args)) = command_of(stage) {
                            let mut argv = vec![prog.to_string()];
                            argv.extend(args.iter().cloned());
                            if is_decoder(prog, &argv) {
                                return Some("decode");
                            }
                            if is_downloader(prog) {
                                return Some("download");
                            }
                        }
                    }
                }
            }
            rest = &rest[inner_end.min(rest.len())..];
            if rest.len() <= 1 {
                break;
            }
            rest = &rest[1..];
        }
    }
    None
}

/// Words in an interpreter one-liner that decode data.
const DECODE_WORDS: &[&str] = &[
    "b64decode",
    "base64.decode",
    "decode_base64",
    "decodebytes",
    "unhexlify",
    "fromhex",
    "frombase64string",
    "atob(",
    "'base64')",
    "\"base64\")",
    "codecs.decode",
    "zlib.decompress",
    "gzip.decompress",
    "marshal.loads",
    "unpack(\"h*",
    "unpack('h*",
    "pack(\"h*",
    "pack('h*",
    "unpack1(\"m",
    "unpack(\"m",
    "unpack('m",
    "base64_decode",
    "hex2bin",
    "gzinflate",
    "str_rot13",
];

/// Words in an interpreter one-liner that run code or commands.
const RUN_WORDS: &[&str] = &[
    "exec(",
    "eval(",
    "eval ",
    "system(",
    "popen(",
    "subprocess",
    "os.exec",
    "execsync",
    "child_process",
    "function(",
    "compile(",
    "pty.spawn",
    "assert(",
    "passthru(",
    "shell_exec(",
    "`",
];

/// An interpreter one-liner whose code decodes data.
pub fn is_decoding_one_liner(exe: &str, argv: &[String]) -> bool {
    one_liner_code(exe, argv).is_some_and(|c| {
        let c = c.to_ascii_lowercase();
        DECODE_WORDS.iter().any(|w| c.contains(w))
    })
}

/// An interpreter one-liner that decodes data and runs the result as code
/// or a command, without a file (`python3 -c "exec(b64decode(...))"`).
pub fn decodes_and_runs(exe: &str, argv: &[String]) -> bool {
    one_liner_code(exe, argv).is_some_and(|c| {
        let c = c.to_ascii_lowercase();
        DECODE_WORDS.iter().any(|w| c.contains(w)) && RUN_WORDS.iter().any(|w| c.contains(w))
    })
}

/// The code of an interpreter one-liner (`python3 -c CODE`, `perl -e
/// CODE`, `node -e CODE`, `php -r CODE`).
fn one_liner_code<'a>(exe: &str, argv: &'a [String]) -> Option<&'a str> {
    if !is_interpreter(exe) {
        return None;
    }
    let i = argv.iter().skip(1).position(|a| {
        matches!(
            a.as_str(),
            "-c" | "-e" | "-E" | "-r" | "--eval" | "-p" | "--print"
        )
    })?;
    argv.get(i + 2).map(String::as_str)
}

/// The script file a shell or interpreter is told to run (`sh FILE`,
/// `bash -x FILE`, `python3 -u FILE arg`), if its command line names one:
/// not for one-liners (`-c`, `-e`), modules (`-m`) or standard input.
pub fn script_operand<'a>(exe: &str, argv: &'a [String]) -> Option<&'a str> {
    let shell = is_shell(exe);
    if !shell && !is_interpreter(exe) {
        return None;
    }
    // Options that take the next word as their value.
    let takes_value: &[&str] = if shell {
        &["-o", "+o", "-O", "+O", "--rcfile", "--init-file"]
    } else {
        &[
            "-W",
            "-X",
            "-r",
            "--require",
            "-I",
            "-M",
            "--import",
            "--loader",
        ]
    };
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.as_str();
        if a == "--" {
            return it.next().map(String::as_str);
        }
        if a == "-" || a == "-s" || a == "-m" || a == "-i" {
            return None;
        }
        let php = basename(exe).starts_with("php");
        if (shell && is_command_flag(a))
            || (!shell && matches!(a, "-c" | "-e" | "-E" | "--eval" | "-p" | "--print"))
            || (php && a == "-r")
        {
            return None;
        }
        if takes_value.contains(&a) {
            it.next();
            continue;
        }
        if a.starts_with('-') || (shell && a.starts_with('+')) {
            continue;
        }
        return Some(a);
    }
    None
}

/// A decoder invocation: `base64 -d`, `base32 -d`, `xxd -r`, `openssl enc
/// -d` or `openssl base64 -d`, `uudecode`, `gpg --decrypt`, or an
/// interpreter one-liner that decodes data.
pub fn is_decoder(exe: &str, argv: &[String]) -> bool {
    let b = basename(exe);
    let has = |f: &str| argv.iter().skip(1).any(|a| a == f);
    let has_cluster = |c: char| {
        argv.iter()
            .skip(1)
            .any(|a| a.starts_with('-') && !a.starts_with("--") && a[1..].contains(c))
    };
    match b {
        "base64" | "base32" | "basenc" => has_cluster('d') || has("--decode") || has("-D"),
        "xxd" => has_cluster('r') || has("-revert"),
        "openssl" => has("-d") || has("-decrypt"),
        "uudecode" | "b64decode" => true,
        "gpg" | "gpg2" => has("-d") || has("--decrypt"),
        _ => is_decoding_one_liner(exe, argv),
    }
}

const DEBUGGERS: &[&str] = &[
    "gdb",
    "gdbserver",
    "lldb",
    "lldb-server",
    "rr",
    "criu",
    "strace",
    "ltrace",
    "valgrind",
    "perf",
];

/// A debugger or checkpointing tool installed by the system: attaching to
/// other processes and writing their memory is its job. The same name
/// elsewhere is not one.
pub fn is_system_debugger(exe: &str) -> bool {
    DEBUGGERS.contains(&basename(exe)) && in_system_dir(exe)
}

/// A shell or an interpreter that runs code without compiling it to
/// machine code (no JIT unless asked): executable memory it makes was not
/// loaded from a file it runs. Node, Java, .NET, LuaJIT and browsers
/// compile at run time and are not here; Ruby counts unless its JIT is
/// switched on.
pub fn is_jit_free_interpreter(exe: &str, argv: &[String]) -> bool {
    if is_shell(exe) {
        return true;
    }
    let b = basename(exe);
    let stem = b.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    match stem {
        "python" | "perl" | "php" | "lua" | "tclsh" | "awk" | "gawk" | "mawk" | "nawk" => true,
        "ruby" | "irb" => !argv.iter().any(|a| a.contains("jit")),
        _ => false,
    }
}

/// A path inside the system's kernel module trees.
pub fn in_module_tree(path: &str) -> bool {
    ["/lib/modules/", "/usr/lib/modules/"]
        .iter()
        .any(|d| path.starts_with(d))
}

/// The first argument naming a kernel module file (`insmod ./x.ko`,
/// `modprobe /tmp/x.ko.xz`) rather than a module by name.
pub fn module_file_operand(argv: &[String]) -> Option<&str> {
    argv.iter().skip(1).map(String::as_str).find(|a| {
        [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|ext| a.ends_with(ext))
    })
}

/// An assignment that switches shell history off: `HISTFILE=/dev/null`,
/// `HISTFILE=`, `HISTSIZE=0`, `HISTFILESIZE=0`.
fn history_off_assignment(word: &str) -> bool {
    match word.split_once('=') {
        Some(("HISTFILE", v)) => v.is_empty() || v == "/dev/null",
        Some(("HISTSIZE" | "HISTFILESIZE", v)) => v == "0",
        _ => false,
    }
}

/// The statement of a shell command string that switches its history off
/// (`unset HISTFILE`, `export HISTFILE=/dev/null`, `HISTSIZE=0`,
/// `set +o history`, `history -c`), read by structure, not by substring.
pub fn disables_history(cmd: &str) -> Option<String> {
    for pipeline in pipelines(cmd) {
        for stage in pipeline {
            let Some(first) = stage.first() else { continue };
            let found = match first.as_str() {
                "unset" => stage[1..]
                    .iter()
                    .any(|w| matches!(w.as_str(), "HISTFILE" | "HISTSIZE" | "HISTFILESIZE")),
                "export" | "declare" | "typeset" | "readonly" | "local" => {
                    stage[1..].iter().any(|w| history_off_assignment(w))
                }
                "set" => stage.len() >= 3 && stage[1] == "+o" && stage[2] == "history",
                "history" => stage.get(1).is_some_and(|a| a == "-c"),
                // A statement made only of assignments sets shell
                // variables (with a command after them they are that
                // command's environment only).
                w => history_off_assignment(w) && stage.iter().all(|x| x.contains('=')),
            };
            if found {
                return Some(stage.join(" "));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names() {
        assert!(is_shell("/usr/bin/dash"));
        assert!(!is_shell("/usr/bin/dashboard"));
        assert!(is_interpreter("/usr/bin/python3.11"));
        assert!(is_interpreter(
            "/root/.pyenv/versions/3.11.7/bin/python3.11"
        ));
        assert!(!is_interpreter("/usr/bin/pythonista-helper"));
        assert!(is_interpreter_one_liner(
            "/usr/bin/python3",
            &v(&["python3", "-c", "x"])
        ));
        assert!(!is_interpreter_one_liner(
            "/usr/bin/python3",
            &v(&["python3", "app.py"])
        ));
        assert!(in_system_dir("/usr/bin/vim"));
        assert!(!in_system_dir("/usr/binx/vim"));
        assert!(!in_system_dir("/home/u/.cache/.sys/vim"));
        assert!(is_borrowed_name("kworker/0:1"));
        assert!(looks_like_kernel_thread("[kworker/0:1]"));
        assert!(deceptive_name("invoice.pdf.sh"));
        assert!(deceptive_name("update "));
        assert!(!deceptive_name("libfoo.so.1"));
        assert!(!deceptive_name("archive.tar.gz"));
    }

    #[test]
    fn hidden_dirs() {
        assert_eq!(
            hidden_dir_component("/home/u/.cache/.sys/vim"),
            Some(".cache")
        );
        assert_eq!(
            hidden_dir_component("/var/tmp/.scn-1/updater"),
            Some(".scn-1")
        );
        assert_eq!(hidden_dir_component("/root/.cargo/bin/cargo"), None);
        assert_eq!(
            hidden_dir_component("/usr/bin/.hidden"),
            None,
            "a hidden file, not a dir"
        );
    }

    #[test]
    fn persistence() {
        assert_eq!(
            persistence_target("/etc/cron.d/job").unwrap().0,
            "T1053.003"
        );
        assert_eq!(persistence_target("/root/.bashrc").unwrap().0, "T1546.004");
        assert_eq!(
            persistence_target("/root/.ssh/authorized_keys").unwrap().0,
            "T1098.004"
        );
        assert_eq!(
            persistence_target("/etc/ld.so.preload").unwrap().0,
            "T1574.006"
        );
        assert!(persistence_target("/etc/hostname").is_none());
        assert!(persistence_target("/tmp/x.bashrc.bak").is_none());
        // One path of every location (the quick pre-filter keeps each).
        for (path, technique) in [
            ("/etc/crontab", "T1053.003"),
            ("/var/spool/cron/crontabs/root", "T1053.003"),
            ("/etc/anacrontab", "T1053.003"),
            ("/etc/systemd/system/x.service", "T1543.002"),
            ("/lib/systemd/system/x.service", "T1543.002"),
            ("/usr/lib/systemd/system/x.service", "T1543.002"),
            ("/run/systemd/system/x.service", "T1543.002"),
            ("/home/a/.config/systemd/user/x.service", "T1543.002"),
            ("/etc/init.d/x", "T1037.004"),
            ("/etc/rc.local", "T1037.004"),
            ("/home/a/.zshenv", "T1546.004"),
            ("/etc/profile.d/x.sh", "T1546.004"),
            ("/etc/environment", "T1546.004"),
            ("/home/a/.ssh/authorized_keys2", "T1098.004"),
            ("/etc/sudoers.d/x", "T1548.003"),
            ("/etc/shadow", "T1136.001"),
            ("/home/a/.config/autostart/x.desktop", "T1547.013"),
            ("/etc/xdg/autostart/x.desktop", "T1547.013"),
            ("/etc/update-motd.d/99-x", "T1037"),
            ("home/a/.config/autostart/x.desktop", "T1547.013"),
        ] {
            assert_eq!(
                persistence_target(path).map(|t| t.0),
                Some(technique),
                "{path}"
            );
        }
        for path in ["/srv/app/etc/cron.d/x", "/usr/share/doc/x", "/dev/shm/f1"] {
            assert_eq!(persistence_target(path), None, "{path}");
        }
    }

    #[test]
    fn shell_commands() {
        let argv = v(&["/bin/sh", "-c", "echo aWQ= | base64 -d | sh"]);
        let c = shell_command("/usr/bin/dash", &argv).unwrap();
        assert_eq!(pipes_into_shell(&c), Some("decode"));
        assert_eq!(
            pipes_into_shell("curl -s http://x/i.sh | bash"),
            Some("download")
        );
        assert_eq!(pipes_into_shell("git log | less"), None);
        assert!(is_decoder("/usr/bin/base64", &v(&["base64", "-d"])));
        assert!(!is_decoder("/usr/bin/base64", &v(&["base64", "file"])));
    }

    #[test]
    fn miners() {
        assert!(is_miner_name("XMRig"));
        assert!(miner_argument(&v(&["x", "-o", "stratum+tcp://pool:3333"])).is_some());
        assert!(miner_argument(&v(&["curl", "https://example.org"])).is_none());
    }
}
