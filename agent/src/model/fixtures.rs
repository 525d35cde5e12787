//! Test fixtures shared by the stages' tests: an enriched event of every
//! kind, in every workload shape.

use std::net::IpAddr;
use std::sync::Arc;

use super::event::{
    Chmod, Connect, Event as ModelEvent, Exec, ExecDenied, FileOpen, Listen, Payload, Rename, Stdio,
};
use super::{Ancestor, EnrichedEvent, Image, ProcessView, Workload};

/// An event of `curl` (run by `sh`, run by init) carrying `payload`.
pub fn enriched(payload: Payload, workload: Workload) -> EnrichedEvent {
    let image = Image::new("/usr/bin/curl".into(), vec!["curl".into(), "x y".into()]);
    let parent = Image::new(
        "/bin/sh".into(),
        vec![
            "sh".into(),
            "-c".into(),
            "echo \"a\\b\"\n\t\u{7f}é\u{1b}[0m".into(),
        ],
    );
    EnrichedEvent {
        time_unix_nanos: 1_796_205_600_000_000_123,
        event: Arc::new(ModelEvent {
            boot_ns: 5,
            tid: 42,
            pid: 41,
            uid: 1000,
            gid: 1001,
            start_boot_ns: 4,
            cgroup_id: 9,
            comm: "curl".into(),
            payload,
        }),
        process: ProcessView {
            pid: 41,
            ppid: 40,
            image,
            comm: "curl".into(),
            uid: 1000,
            euid: 0,
            workload: Arc::new(workload),
        },
        ancestry: vec![
            Ancestor {
                pid: 40,
                image: parent,
            },
            Ancestor {
                pid: 1,
                image: Image::new("/sbin/in\"it\\\u{1}".into(), Vec::new()),
            },
        ],
    }
}

/// One event of every kind, optional fields both set and unset.
pub fn payloads() -> Vec<Payload> {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let exec = Exec {
        ppid: 40,
        euid: 2,
        egid: 3,
        exe: "/usr/bin/curl".into(),
        // As the tree's image of the process (a fixture's exec is
        // the process's current image).
        argv: vec!["curl".into(), "x y".into()],
        argv_truncated: false,
        exe_ino: 77,
        exe_dev: 8,
        exe_memfd: false,
        exe_deleted: false,
        script: None,
        ld_preload: None,
        copy_of: None,
        history_off: false,
        stdio: [Stdio::CharDevice, Stdio::Pipe, Stdio::InetSocket],
        frozen: false,
        ..Default::default()
    };
    vec![
        Payload::Exec(exec.clone()),
        Payload::Exec(Exec {
            argv_truncated: true,
            exe_memfd: true,
            exe_deleted: true,
            script: Some("/tmp/x.sh".into()),
            ld_preload: Some("/tmp/evil.so".into()),
            copy_of: Some("/usr/bin/dash".into()),
            history_off: true,
            frozen: true,
            stdio: [Stdio::Closed, Stdio::UnixSocket, Stdio::Other],
            argv: vec!["curl".into(), "\"quoted\"\n\u{1b}[31m".into()],
            ..exec
        }),
        Payload::Fork { ppid: 40 },
        Payload::Exit {
            exit_code: Some(3),
            signal: None,
        },
        Payload::Exit {
            exit_code: None,
            signal: Some(9),
        },
        Payload::Exit {
            exit_code: Some(255),
            signal: Some(31),
        },
        // Optional fields set to zero: present, not left out.
        Payload::Exit {
            exit_code: Some(0),
            signal: Some(0),
        },
        Payload::Connect(Connect {
            protocol: "tcp".into(),
            daddr: ip("203.0.113.9"),
            dport: 443,
            saddr: ip("::1"),
            sport: 5555,
            ret: Some(-111),
            send_to: false,
            rewritten_argv: Some(vec!["[kworker/1:0]".into()]),
        }),
        Payload::Connect(Connect {
            protocol: "udp".into(),
            daddr: ip("2001:db8::1"),
            dport: 53,
            saddr: ip("0.0.0.0"),
            sport: 0,
            ret: None,
            send_to: true,
            rewritten_argv: None,
        }),
        Payload::Connect(Connect {
            protocol: "tcp".into(),
            daddr: ip("10.0.0.1"),
            dport: 80,
            saddr: ip("10.0.0.2"),
            sport: 40000,
            ret: Some(0),
            send_to: false,
            rewritten_argv: None,
        }),
        Payload::FileOpen(FileOpen {
            path: "/srv/app/uploads/a b\"c.txt".into(),
            flags: 0o2001101,
            mode: 0o100600,
            ino: 4_000_000_123,
            dev: 0xfd00001,
            io_uring: false,
        }),
        Payload::FileOpen(FileOpen {
            path: "/etc/cron.d/x".into(),
            flags: 577,
            mode: 0o100644,
            ino: 12,
            dev: 3,
            io_uring: true,
        }),
        Payload::Chmod(Chmod {
            path: "/tmp/x".into(),
            mode: 0o755,
        }),
        Payload::Utimes(crate::model::event::Utimes {
            path: "/usr/local/bin/x".into(),
        }),
        Payload::Comm(crate::model::event::CommChange {
            new_comm: "kworker/0:2".into(),
            argv: vec!["[kworker/0:2]".into()],
        }),
        Payload::Rename(Rename {
            old_path: "/tmp/a".into(),
            new_path: "/usr/local/bin/a".into(),
        }),
        Payload::Listen(Listen {
            protocol: "tcp".into(),
            addr: ip("0.0.0.0"),
            port: 8080,
            rewritten_argv: None,
        }),
        Payload::ExecDenied(ExecDenied {
            ppid: 40,
            exe: "/bin/sh".into(),
            filename: "/bin/sh".into(),
            policy: "server_child",
            exe_ino: 5,
            exe_dev: 6,
        }),
        Payload::ProcessAccess(crate::model::event::ProcessAccess {
            op: "poke_text",
            target: 7,
            target_pid: Some(1007),
            ret: 0,
            addr: 0x7f00_0000_1000,
        }),
        Payload::ProcessAccess(crate::model::event::ProcessAccess {
            op: "attach",
            target: 8,
            target_pid: None,
            ret: -1,
            addr: 0,
        }),
        Payload::ModuleLoad(crate::model::event::ModuleLoad {
            path: "/tmp/r.ko".into(),
            from_memory: false,
            flags: 2,
            ret: -1,
        }),
        Payload::BpfLoad(crate::model::event::BpfLoad {
            prog_type: "kprobe".into(),
            attach_type: 0,
            name: "hide".into(),
            insn_cnt: 12,
            ret: 5,
        }),
        Payload::Unlink(crate::model::event::Unlink {
            path: "/var/log/auth.log".into(),
        }),
        Payload::ExecMem(crate::model::event::ExecMem {
            op: "mmap",
            prot: 7,
            map_flags: 0x22,
            addr: 0x7f00_0000_0000,
            len: 4096,
            ret: 0,
        }),
    ]
}

/// The host, a systemd unit, and a pod with every name known.
pub fn workloads() -> Vec<Workload> {
    let mut pod = Workload::from_cgroup_path(
        "/kubepods/besteffort/pod0a1b2c3d-1111-2222-3333-444455556666/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    );
    pod.container_name = Some("web".into());
    pod.image = Some("docker.io/library/nginx:1.27".into());
    pod.image_digest = Some("sha256:00".into());
    pod.pod_name = Some("web-0".into());
    pod.pod_namespace = Some("shop".into());
    vec![
        Workload::from_cgroup_path("/"),
        Workload::from_cgroup_path("/system.slice/nginx.service"),
        pod,
    ]
}
