//! Container identity on the real kernel with a real container runtime
//! (podman, from Debian's package, image built offline from the host's own
//! binaries): a process in a container carries its container's id, name,
//! image and image digest in `process.workload`, read from the runtime's
//! state, also when the container is gone a moment later (`--rm`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vigil_tests::{marker, Agent, EventExt};

/// podman with the project's containers.conf (runc, no default ulimits:
/// see ../shared/TOOLCHAIN.md).
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env(
        "CONTAINERS_CONF",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/podman/containers.conf"),
    );
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("running {c:?}: {e} (podman is installed by .ci/run)"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `bin` and the libraries it loads, copied under `root` at their paths.
fn stage(root: &Path, bin: &str) {
    let real = std::fs::canonicalize(bin).unwrap();
    let out = Command::new("ldd").arg(&real).output().unwrap();
    let mut files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let p = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next(),
                None => l.split_whitespace().next(),
            }?;
            p.starts_with('/').then(|| PathBuf::from(p))
        })
        .collect();
    files.push(real.clone());
    for f in files {
        let dst = root.join(f.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&f, &dst).unwrap();
    }
    // Also under the name asked for (/bin/sh -> dash).
    let dst = root.join(bin.trim_start_matches('/'));
    if !dst.exists() {
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&real, &dst).unwrap();
    }
}

/// Removes the image at the end of the test, whatever happens.
struct ImageGuard(String);
impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "-f", &self.0]).output();
    }
}

#[test]
fn a_containers_processes_carry_its_name_and_image() {
    let m = marker("ctr");
    let tag = format!("localhost/vigil-e2e-{}:1", std::process::id());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    for b in ["/bin/sh", "/bin/true"] {
        stage(&root, b);
    }
    std::fs::write(
        dir.path().join("Containerfile"),
        "FROM scratch\nCOPY rootfs/ /\n",
    )
    .unwrap();
    run_ok(
        podman()
            .args(["build", "--quiet", "--pull=never", "-t", &tag])
            .arg(dir.path()),
    );
    let _img = ImageGuard(tag.clone());
    let digest = run_ok(podman().args(["image", "inspect", "--format", "{{.Digest}}", &tag]));
    assert!(digest.starts_with("sha256:"), "{digest}");

    let agent = Agent::start(&[]);
    let name = format!("vigil-e2e-{}", std::process::id());
    let cidfile = dir.path().join("cid");
    // The container ends (and --rm removes its state) right after its
    // one command: its identity must have been taken when it started.
    run_ok(
        podman()
            .args([
                "run",
                "--rm",
                "--network",
                "none",
                "--name",
                &name,
                "--cidfile",
            ])
            .arg(&cidfile)
            .args([&tag, "/bin/sh", "-c", &format!("/bin/true {m}")]),
    );
    let id = std::fs::read_to_string(&cidfile)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(id.len(), 64, "{id}");

    let ev = agent.expect_event("the exec in the container", |e| {
        e.kind() == "exec" && e.argv().iter().any(|a| a == &m)
    });
    let w: &Value = &ev["process"]["workload"];
    eprintln!("workload of the container's process: {w}");
    assert_eq!(w["kind"], "container", "{w}");
    assert_eq!(w["runtime"], "podman", "{w}");
    assert_eq!(w["container_id"], id.as_str(), "{w}");
    assert_eq!(w["container_name"], name.as_str(), "{w}");
    assert_eq!(w["image"], tag.as_str(), "{w}");
    assert_eq!(w["image_digest"], digest.as_str(), "{w}");
    // Every event of that container is named the same way, its exits
    // (after --rm removed the state) included.
    let evs = agent.wait_until(std::time::Duration::from_secs(20), |evs| {
        evs.iter()
            .any(|e| e.kind() == "exit" && e["process"]["workload"]["container_id"] == id.as_str())
    });
    let mine: Vec<&Value> = evs
        .iter()
        .filter(|e| e["process"]["workload"]["container_id"] == id.as_str())
        .collect();
    assert!(
        mine.iter().any(|e| e.kind() == "exit"),
        "no exit seen in the container"
    );
    for e in &mine {
        assert_eq!(
            e["process"]["workload"]["container_name"],
            name.as_str(),
            "{e}"
        );
    }
    // A host process is not.
    let host = agent.expect_event("a host exec", |e| {
        e.kind() == "exec" && e["process"]["workload"]["kind"] != "container"
    });
    assert!(host["process"]["workload"].get("image").is_none(), "{host}");
}
