//! `deny_exec` on the real kernel, in a test binary of its own: on a kernel
//! with BPF LSM its agent refuses every server child shell on the machine,
//! which would break the other tests of a binary running in parallel.

use std::net::TcpListener;
use std::process::Command;

use vigil_tests::{marker, Agent, EventExt};

/// `deny_exec`: on a kernel with BPF LSM the server's child shell is refused
/// (EPERM) before it exists and reported as `exec_denied`; on one without
/// (this machine's 6.18 refuses LSM programs) the agent says so at start and
/// in its metrics and freezes the same exec instead, even with `freeze` off.
/// `cargo xtask vm-test` shows the deny on Debian's 6.1 and 6.12.
#[test]
fn deny_exec_refuses_the_exec_with_bpf_lsm_else_freezes_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "freeze = []\ndeny_exec = [\"server_child\"]\n").unwrap();
    let agent = Agent::start(&["-c", &cfg.to_string_lossy()]);
    let _l = TcpListener::bind("127.0.0.1:0").unwrap();
    let me = std::process::id() as u64;
    agent.expect_event("listen", |e| e.kind() == "listen" && e.pid() == me);
    let active = agent.metric("vigil_exec_deny_active");
    let attached = agent.metric(r#"vigil_hook_attached{hook="lsm/bprm_check_security"}"#);
    assert_eq!(active, attached, "{}", agent.metrics());
    let m = marker("deny");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("echo {m}"))
        .output();
    if active == 1.0 {
        let err = out.expect_err("the kernel refused the shell");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
        let e = agent.expect_event("exec_denied", |e| {
            e.kind() == "exec_denied" && e["ppid"].as_u64() == Some(me)
        });
        assert_eq!(e["policy"], "server_child", "{e}");
        assert!(e["exe"].as_str().unwrap_or("").starts_with('/'), "{e}");
        // The kernel's count follows (read every second).
        let mut denied = 0.0;
        for _ in 0..100 {
            denied = agent.metric("vigil_exec_denied_total");
            if denied >= 1.0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(denied >= 1.0, "{}", agent.metrics());
    } else {
        let out = out.expect("the shell ran (frozen, then released)");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), m);
        let e = agent.expect_event("frozen shell exec", |e| {
            e.kind() == "exec" && e.argv().iter().any(|a| a.contains(&m))
        });
        assert_eq!(e["frozen"], true, "deny_exec falls back to the freeze: {e}");
        // The hook is listed as unavailable (not just absent).
        let metrics = agent.metrics();
        assert!(
            metrics.contains(r#"vigil_hook_attached{hook="lsm/bprm_check_security"} 0"#),
            "{metrics}"
        );
    }
}
