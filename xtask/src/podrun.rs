//! `cargo xtask pod-run`: the Kubernetes manifests' own pod templates run
//! for real with podman on this machine, then an attack in another
//! container, detected and shipped with its evidence.
//!
//! The least-privilege overlay is rendered (`kubectl kustomize`), the PKI
//! Secrets made by `make-pki-secrets.sh`, and the collector StatefulSet's
//! and the agent DaemonSet's pod templates are translated field by field
//! into `podman run` (init containers first): no field is rewritten by
//! hand, and a field the translation does not know fails the run, so a
//! manifest change cannot slip past it.
//!
//! Why not `podman kube play`: podman 4.3 (Debian 12) ignores `hostPID`
//! (the container gets its own PID namespace: measured), `subPath`,
//! `lifecycle.preStop`, Secret volumes and StatefulSets, and the agent
//! needs every one of them. What the translation cannot honour here, and
//! does instead (each printed at the start of the run):
//!
//! - `hostNetwork: false` and the Service: both pods use the host's network
//!   and the Service name resolves to 127.0.0.1 (`--add-host`), so that
//!   traffic stays on loopback (no routed pod network here);
//! - writable hostPaths outside /sys (the agent's state), read-only ones
//!   missing here (kubelet's directories, other runtimes') and the
//!   collector's volume claim are directories in the run's work dir, so the
//!   run writes nothing of this machine's own (`/var/lib/vigil`) and needs
//!   no kubelet layout; read-only hostPaths that exist (podman's records,
//!   the cgroup tree) are the machine's own;
//! - `busybox:1.36` (the collector's init container) is built locally from
//!   Debian's busybox-static (no registry is reachable);
//! - probes are run by this command (`httpGet`, `tcpSocket`), scheduling
//!   fields (tolerations, priority) have no meaning on one machine.
//!
//! Then: the agent's PID namespace is the host's and its capabilities are
//! within the overlay's list; a host process and a process in another
//! podman container are detected; the container's detection names that
//! container (id, name, image, digest) at the collector and its evidence
//! bundle downloads from the collector verified; the preStop hook runs and
//! the agent stops within its grace period. Prints `N passed, N failed`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::image::podman;
use crate::util::{self, Report};

/// The node name the pods run as (the agent certificate's CN).
const NODE: &str = "podrun-node";
/// Host addresses the Service names resolve to.
const SERVICE_HOST: &str = "vigil-collector.vigil.svc";
/// Image the collector's init container names.
const BUSYBOX: &str = "busybox:1.36";
/// The attacked workload's image.
const VICTIM: &str = "localhost/vigil-podrun-victim:1";

/// Pod spec fields the translation honours or deliberately passes over.
const POD_FIELDS: &[&str] = &[
    "automountServiceAccountToken", // no token is mounted (none exists here)
    "serviceAccountName",           // no API server
    "containers",
    "initContainers",
    "hostPID",
    "hostNetwork",
    "priorityClassName", // scheduling: one machine
    "tolerations",       // scheduling: one machine
    "terminationGracePeriodSeconds",
    "securityContext",
    "volumes",
];

/// Container fields the translation honours.
const CONTAINER_FIELDS: &[&str] = &[
    "name",
    "image",
    "imagePullPolicy",
    "command",
    "args",
    "env",
    "ports",
    "resources",
    "securityContext",
    "volumeMounts",
    "livenessProbe",
    "readinessProbe",
    "startupProbe",
    "lifecycle",
];

/// Runs everything; an error when a check fails.
pub fn pod_run() -> Result<()> {
    let start = Instant::now();
    let work = util::target_dir().join("pod-run");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    println!(
        "==> pod-run: the manifests' pods under podman ({})",
        work.display()
    );
    let mut report = Report::default();
    let mut run = PodRun::new(work);
    let result = run.all(&mut report);
    if report.failed > 0 || result.is_err() {
        run.show_logs();
    }
    run.cleanup();
    if let Err(e) = &result {
        report.check("pod-run", Err(anyhow::anyhow!("{e:#}")));
    }
    println!(
        "==> pod-run: {} passed, {} failed in {:.1} s",
        report.passed,
        report.failed,
        start.elapsed().as_secs_f64()
    );
    if report.failed > 0 {
        bail!("{} pod-run check(s) failed", report.failed);
    }
    Ok(())
}

struct PodRun {
    work: PathBuf,
    /// Containers started, to remove at the end.
    started: Vec<String>,
    /// Images built, to remove at the end.
    images: Vec<String>,
}

/// A pod template with what it needs from the rest of the rendering.
struct Pod<'a> {
    /// "vigil-agent", "vigil-collector".
    name: &'a str,
    namespace: &'a str,
    spec: &'a Value,
    /// StatefulSet volume claim templates, by name.
    claims: Vec<String>,
}

impl PodRun {
    fn new(work: PathBuf) -> Self {
        Self {
            work,
            started: Vec::new(),
            images: Vec::new(),
        }
    }

    fn all(&mut self, report: &mut Report) -> Result<()> {
        let kubectl = util::which("kubectl").context("kubectl not found in PATH")?;
        let root = util::workspace_root().join("deploy/kubernetes");
        let yaml = crate::deploy::render(&kubectl, &root.join("overlays/least-privilege"))?;
        let mut docs = crate::deploy::parse(&yaml)?;
        let collector_bin = util::bin_path("vigil-collector", false);
        let cli = util::bin_path("vigil", false);
        for b in [&collector_bin, &cli] {
            if !b.exists() {
                bail!(
                    "{} is missing: build it (cargo build -p vigil-collector)",
                    b.display()
                );
            }
        }
        for image in ["vigil-agent", "vigil-collector"] {
            let tag = format!("{image}:{}", env!("CARGO_PKG_VERSION"));
            let ok = podman()
                .args(["image", "exists", &tag])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                bail!("image {tag} is missing: build it first (cargo xtask image --debug)");
            }
        }
        for note in [
            "hostNetwork: false -> host network, the Service name -> 127.0.0.1 (loopback only here)",
            "writable hostPaths outside /sys, missing read-only ones, volume claims -> directories in the work dir",
            "Secret volumes -> the Secrets make-pki-secrets.sh printed, as files with their modes",
            "busybox:1.36 -> built locally from Debian's busybox-static",
            "probes -> run by pod-run; tolerations, priorityClassName: scheduling, not applicable",
        ] {
            println!("  note  {note}");
        }

        // PKI: the documented script, for this "node".
        let pki = self.work.join("pki");
        let secrets = make_pki_secrets(&root, &collector_bin, &pki)?;
        report.check("make-pki-secrets.sh: two Secrets", {
            let n = secrets.len();
            crate::deploy::ensure(n == 2, || format!("{n} Secrets"))
        });
        docs.extend(secrets);
        // An analyst certificate for checking what reached the collector.
        run_out(
            Command::new(&collector_bin)
                .args(["init-pki", "--dir"])
                .arg(&pki)
                .args(["--analyst", "analyst"]),
        )?;

        self.build_busybox()?;

        // The collector.
        let sts = crate::deploy::find(&docs, "StatefulSet", "vigil-collector")
            .context("no collector StatefulSet")?;
        let claims = sts["spec"]["volumeClaimTemplates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["metadata"]["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let collector = Pod {
            name: "vigil-collector",
            namespace: sts["metadata"]["namespace"].as_str().unwrap_or("default"),
            spec: &sts["spec"]["template"]["spec"],
            claims,
        };
        let coll = self.start_pod(&collector, &docs)?;
        report.check(
            "collector pod: ready (its tcpSocket readiness probe)",
            probe_all(&collector, "readinessProbe", Duration::from_secs(60)),
        );
        report.check(
            "collector pod: runs as 65534 with no capability",
            proc_status_of(&coll).and_then(|st| {
                crate::deploy::ensure(
                    st.lines()
                        .any(|l| l.starts_with("Uid:") && l.contains("\t65534\t"))
                        && st.contains("CapEff:\t0000000000000000"),
                    || format!("status:\n{st}"),
                )
            }),
        );

        // The agent.
        let ds =
            crate::deploy::find(&docs, "DaemonSet", "vigil-agent").context("no agent DaemonSet")?;
        let agent = Pod {
            name: "vigil-agent",
            namespace: ds["metadata"]["namespace"].as_str().unwrap_or("default"),
            spec: &ds["spec"]["template"]["spec"],
            claims: Vec::new(),
        };
        let agent_ctr = self.start_pod(&agent, &docs)?;
        report.check(
            "agent pod: ready and live (its startup, readiness and liveness probes)",
            probe_all(&agent, "startupProbe", Duration::from_secs(180))
                .and_then(|()| probe_all(&agent, "readinessProbe", Duration::from_secs(30)))
                .and_then(|()| probe_all(&agent, "livenessProbe", Duration::from_secs(30))),
        );
        report.check(
            "agent pod: the host's PID namespace (hostPID)",
            // NSpid lists the pid in each namespace from the host's down:
            // one entry when the process lives in the host's (ours) only.
            proc_status_of(&agent_ctr).and_then(|st| {
                let nspid = st.lines().find(|l| l.starts_with("NSpid:")).unwrap_or("");
                let mine = std::fs::read_to_string("/proc/self/status")?;
                let depth = |s: &str| {
                    s.lines()
                        .find(|l| l.starts_with("NSpid:"))
                        .map_or(0, |l| l.split_whitespace().count())
                };
                crate::deploy::ensure(depth(&st) == depth(&mine), || {
                    format!("the agent's {nspid:?} has more levels than this process's")
                })
            }),
        );
        let allowed = caps_mask(crate::deploy::LEAST_PRIVILEGE_CAPS);
        report.check(
            "agent pod: capabilities within the overlay's list, no_new_privs",
            proc_status_of(&agent_ctr).and_then(|st| {
                let field = |k: &str| {
                    st.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_default()
                };
                let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX);
                let bnd = u64::from_str_radix(&field("CapBnd:"), 16).unwrap_or(u64::MAX);
                crate::deploy::ensure(
                    eff & !allowed == 0 && bnd & !allowed == 0 && field("NoNewPrivs:") == "1",
                    || format!("CapEff {eff:x}, CapBnd {bnd:x}, allowed {allowed:x}:\n{st}"),
                )
            }),
        );

        // A payload hiding under a system program's name, on the host and
        // in another container.
        let url = "https://127.0.0.1:7443";
        let host_tmp = tempfile_dir("/tmp", "vigil-podrun")?;
        let host_payload = host_tmp.join(".sys/sshd");
        std::fs::create_dir_all(host_payload.parent().unwrap_or(&host_tmp))?;
        std::fs::copy("/bin/sleep", &host_payload)?;
        run_out(Command::new(&host_payload).arg("1"))?;
        let victim = self.run_victim()?;
        report.check(
            "the agent detects a payload on the host, at the collector",
            wait_detection(&cli, url, &pki, |d| {
                d["process"]["exe"] == host_payload.to_string_lossy().as_ref()
                    && d["process"]["workload"]["kind"] != "container"
            })
            .map(|_| ()),
        );
        let _ = std::fs::remove_dir_all(&host_tmp);
        let det = wait_detection(&cli, url, &pki, |d| {
            d["process"]["workload"]["container_id"] == victim.id.as_str()
        });
        report.check(
            "the agent detects the attack in another podman container, at the collector, \
             naming that container and its image",
            det.as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))
                .and_then(|d| {
                    let w = &d["process"]["workload"];
                    println!("        {}: {}", d["rule"], w);
                    crate::deploy::ensure(
                        w["container_name"] == victim.name.as_str()
                            && w["image"] == VICTIM
                            && w["image_digest"] == victim.digest.as_str()
                            && w["runtime"] == "podman",
                        || format!("workload {w}"),
                    )
                }),
        );
        report.check(
            "the incident page shows the container (UI token from `vigil-collector ui-token`)",
            ui_shows_container(&coll, &victim),
        );
        let state = self.host_path_dir("/var/lib/vigil");
        report.check(
            "its evidence bundle reaches the collector (downloaded and verified)",
            self.fetch_bundle(&cli, url, &pki, &state, &victim.id),
        );

        // Stop as the kubelet would: preStop, then SIGTERM with the grace.
        report.check(
            "agent pod: preStop (resume-frozen) runs and reports",
            prestop(&agent, &agent_ctr),
        );
        let grace = agent.spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30);
        let t0 = Instant::now();
        report.check(
            &format!("agent pod: stops within its grace period ({grace} s)"),
            run_out(podman().args(["stop", "-t", &grace.to_string(), &agent_ctr])).and_then(|_| {
                let code = run_out(podman().args([
                    "inspect",
                    "--format",
                    "{{.State.ExitCode}}",
                    &agent_ctr,
                ]))?;
                crate::deploy::ensure(code.trim() == "0", || {
                    format!("exit code {code} after {:?}", t0.elapsed())
                })
            }),
        );
        Ok(())
    }

    /// Starts every container of `pod` (init containers to completion
    /// first); the name of its main container.
    fn start_pod(&mut self, pod: &Pod, docs: &[Value]) -> Result<String> {
        for k in obj_keys(pod.spec) {
            if !POD_FIELDS.contains(&k.as_str()) {
                bail!(
                    "{}: pod field `{k}` is not translated (pod-run knows: {POD_FIELDS:?})",
                    pod.name
                );
            }
        }
        let volumes = self.volumes(pod, docs)?;
        for ic in arr(&pod.spec["initContainers"]) {
            let name = self.container_name(pod, ic);
            let args = translate(pod, ic, &volumes)?;
            let mut cmd = podman();
            cmd.args(["run", "--name", &name]).args(&args);
            self.started.push(name.clone());
            run_out(&mut cmd).with_context(|| format!("init container {name}"))?;
        }
        let containers = arr(&pod.spec["containers"]);
        let [main] = containers else {
            bail!(
                "{}: one container expected, {} found",
                pod.name,
                containers.len()
            );
        };
        let name = self.container_name(pod, main);
        let args = translate(pod, main, &volumes)?;
        let mut cmd = podman();
        cmd.args(["run", "--detach", "--name", &name]).args(&args);
        self.started.push(name.clone());
        run_out(&mut cmd).with_context(|| format!("starting {name}"))?;
        Ok(name)
    }

    fn container_name(&self, pod: &Pod, c: &Value) -> String {
        format!("podrun-{}-{}", pod.name, c["name"].as_str().unwrap_or("c"))
    }

    /// Where a hostPath outside /sys and /proc lives for this run.
    fn host_path_dir(&self, path: &str) -> PathBuf {
        self.work.join("host").join(path.trim_start_matches('/'))
    }

    /// Each volume of `pod` as what to mount: a host path (file or
    /// directory), or a tmpfs.
    fn volumes(&self, pod: &Pod, docs: &[Value]) -> Result<BTreeMap<String, Volume>> {
        let mut out = BTreeMap::new();
        let fs_group = pod.spec["securityContext"]["fsGroup"].as_u64();
        let vols = arr(&pod.spec["volumes"]);
        let mut named: Vec<(String, Value)> = vols
            .iter()
            .map(|v| (v["name"].as_str().unwrap_or("").to_string(), v.clone()))
            .collect();
        for c in &pod.claims {
            named.push((
                c.clone(),
                serde_json::json!({"name": c, "persistentVolumeClaim": {"claimName": c}}),
            ));
        }
        for (name, v) in named {
            let dir = self.work.join("volumes").join(pod.name).join(&name);
            let vol = if let Some(hp) = v["hostPath"]["path"].as_str() {
                // The run writes nothing of this machine's but /sys (bpffs,
                // tracefs): other hostPaths are used as they are only when
                // they exist and every mount of them is read-only.
                let read_only = [&pod.spec["containers"], &pod.spec["initContainers"]]
                    .into_iter()
                    .flat_map(arr)
                    .flat_map(|c| arr(&c["volumeMounts"]))
                    .filter(|m| m["name"] == name.as_str())
                    .all(|m| m["readOnly"] == true);
                if hp.starts_with("/sys/")
                    || hp.starts_with("/proc")
                    || (read_only && Path::new(hp).exists())
                {
                    Volume::Path(PathBuf::from(hp))
                } else {
                    let d = self.host_path_dir(hp);
                    std::fs::create_dir_all(&d)?;
                    Volume::Path(d)
                }
            } else if v.get("persistentVolumeClaim").is_some() {
                std::fs::create_dir_all(&dir)?;
                Volume::Path(dir)
            } else if let Some(ed) = v.get("emptyDir") {
                if ed["medium"] == "Memory" {
                    Volume::Tmpfs(ed["sizeLimit"].as_str().map(podman_size))
                } else {
                    std::fs::create_dir_all(&dir)?;
                    Volume::Path(dir)
                }
            } else if let Some(cm) = v["configMap"]["name"].as_str() {
                let doc = crate::deploy::find(docs, "ConfigMap", cm)
                    .with_context(|| format!("ConfigMap {cm} is not in the rendering"))?;
                std::fs::create_dir_all(&dir)?;
                for (k, val) in doc["data"].as_object().into_iter().flatten() {
                    std::fs::write(dir.join(k), val.as_str().unwrap_or(""))?;
                }
                Volume::Path(dir)
            } else if let Some(sn) = v["secret"]["secretName"].as_str() {
                let doc = crate::deploy::find(docs, "Secret", sn)
                    .with_context(|| format!("Secret {sn} was not made"))?;
                let mode = v["secret"]["defaultMode"].as_u64().unwrap_or(0o644) as u32;
                write_secret(&dir, doc, mode, fs_group)?;
                Volume::Path(dir)
            } else {
                bail!("{}: volume {name}: type not translated: {v}", pod.name);
            };
            out.insert(name, vol);
        }
        Ok(out)
    }

    /// Builds `busybox:1.36` from Debian's busybox-static, as the collector's
    /// init container names it.
    fn build_busybox(&mut self) -> Result<()> {
        let bb = Path::new("/bin/busybox");
        if !bb.exists() {
            bail!("/bin/busybox is missing: apt-get install busybox-static (.ci/run does)");
        }
        let dir = self.work.join("busybox");
        let bin = dir.join("rootfs/bin");
        std::fs::create_dir_all(&bin)?;
        let tmp = dir.join("rootfs/tmp");
        std::fs::create_dir_all(&tmp)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        std::fs::copy(bb, bin.join("busybox"))?;
        let applets = run_out(Command::new(bb).arg("--list"))?;
        for a in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
            std::os::unix::fs::symlink("busybox", bin.join(a))?;
        }
        std::fs::write(dir.join("Containerfile"), "FROM scratch\nCOPY rootfs/ /\n")?;
        self.build(BUSYBOX, &dir)
    }

    fn build(&mut self, tag: &str, dir: &Path) -> Result<()> {
        run_out(
            podman()
                .args(["build", "--quiet", "--pull=never", "-t", tag])
                .arg(dir),
        )?;
        self.images.push(tag.to_string());
        Ok(())
    }

    /// Runs the attacked workload: a container whose shell drops a payload
    /// under a system program's name in a hidden directory and runs it (the
    /// seed incident's `~/.cache/.sys/vim`; a masquerade is reported even
    /// while the agent learns its baseline, as the deployed config does for
    /// 30 min). The payload is the host's `sleep`, so it lives to be
    /// captured.
    fn run_victim(&mut self) -> Result<Victim> {
        let dir = self.work.join("victim");
        let root = dir.join("rootfs");
        let sleep = std::fs::canonicalize("/bin/sleep")?;
        for f in crate::image::libraries(&sleep)?.iter().chain([&sleep]) {
            crate::image::copy_into(&root, f)?;
        }
        std::fs::write(
            dir.join("Containerfile"),
            format!(
                "FROM {BUSYBOX}\nCOPY rootfs/ /\n\
                 LABEL org.opencontainers.image.title=\"vigil pod-run victim\"\n"
            ),
        )?;
        self.build(VICTIM, &dir)?;
        let digest =
            run_out(podman().args(["image", "inspect", "--format", "{{.Digest}}", VICTIM]))?
                .trim()
                .to_string();
        let name = "podrun-victim".to_string();
        let cid = dir.join("cid");
        self.started.push(name.clone());
        run_out(
            podman()
                .args([
                    "run",
                    "--rm",
                    "--pull",
                    "never",
                    "--network",
                    "none",
                    "--name",
                    &name,
                ])
                .arg("--cidfile")
                .arg(&cid)
                .args([
                    VICTIM,
                    "sh",
                    "-c",
                    &format!(
                        "mkdir -p /tmp/.sys && cp {} /tmp/.sys/sshd && /tmp/.sys/sshd 3",
                        sleep.display()
                    ),
                ]),
        )?;
        let id = std::fs::read_to_string(&cid)?.trim().to_string();
        Ok(Victim { id, name, digest })
    }

    /// The bundle the agent sealed for the container's process (its
    /// evidence JSON, in the state volume), fetched from the collector.
    fn fetch_bundle(
        &self,
        cli: &Path,
        url: &str,
        pki: &Path,
        state: &Path,
        id: &str,
    ) -> Result<()> {
        let evidence = state.join("out/evidence.jsonl");
        let t0 = Instant::now();
        let bundle = loop {
            let text = std::fs::read_to_string(&evidence).unwrap_or_default();
            let found = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find_map(|e| {
                    (e["detection"]["process"]["workload"]["container_id"] == id)
                        .then(|| e["evidence"]["bundle_id"].as_str().map(String::from))
                        .flatten()
                });
            if let Some(b) = found {
                break b;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "no sealed bundle for the container in {}:\n{text}",
                    evidence.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let out = self.work.join(format!("{bundle}.zst"));
        loop {
            let mut cmd = Command::new(cli);
            cmd.args(["--collector", url, "--pki"])
                .arg(pki)
                .args(["evidence", "get", "--quiet", &bundle, "-o"])
                .arg(&out);
            if run_out(&mut cmd).is_ok() {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(90) {
                return run_out(&mut cmd).map(|_| ());
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The last lines each container wrote, for a failed run.
    fn show_logs(&self) {
        for c in &self.started {
            if let Ok(out) = podman().args(["logs", "--tail", "30", c]).output() {
                println!("--- podman logs {c} (last 30 lines)");
                print!("{}", String::from_utf8_lossy(&out.stdout));
                print!("{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }

    fn cleanup(&mut self) {
        for c in self.started.iter().rev() {
            let _ = podman().args(["rm", "-f", "-t", "5", c]).output();
        }
        for i in &self.images {
            let _ = podman().args(["rmi", "-f", i]).output();
        }
    }
}

struct Victim {
    id: String,
    name: String,
    digest: String,
}

/// What a volume is on this machine.
enum Volume {
    Path(PathBuf),
    /// A tmpfs of this size (podman's notation), or unbounded.
    Tmpfs(Option<String>),
}

/// `podman run` arguments (after `run --name N`) for container `c` of `pod`.
fn translate(pod: &Pod, c: &Value, volumes: &BTreeMap<String, Volume>) -> Result<Vec<String>> {
    let cname = c["name"].as_str().unwrap_or("?");
    for k in obj_keys(c) {
        if !CONTAINER_FIELDS.contains(&k.as_str()) {
            bail!(
                "{}/{cname}: container field `{k}` is not translated",
                pod.name
            );
        }
    }
    let spec = pod.spec;
    let mut a: Vec<String> = vec!["--pull".into(), "never".into()];
    if spec["hostPID"] == true {
        a.extend(["--pid".into(), "host".into()]);
    }
    a.extend(["--network".into(), "host".into()]);
    a.push(format!("--add-host={SERVICE_HOST}:127.0.0.1"));
    // Environment, with the downward API fields a pod on NODE gets.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in arr(&c["env"]) {
        let k = e["name"].as_str().unwrap_or_default().to_string();
        let v = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => NODE.to_string(),
                Some("metadata.namespace") => pod.namespace.to_string(),
                Some("metadata.name") => format!("{}-0", pod.name),
                other => bail!(
                    "{}/{cname}: env {k}: source {other:?} not translated",
                    pod.name
                ),
            }
        };
        env.push((k, v));
    }
    for (k, v) in &env {
        a.push(format!("--env={k}={v}"));
    }
    // Security context: the pod's, overridden by the container's.
    let psc = &spec["securityContext"];
    let sc = &c["securityContext"];
    let pick = |k: &str| {
        if sc.get(k).is_some() {
            sc[k].clone()
        } else {
            psc[k].clone()
        }
    };
    if let Some(u) = pick("runAsUser").as_u64() {
        let g = pick("runAsGroup").as_u64().unwrap_or(u);
        a.push(format!("--user={u}:{g}"));
    }
    if pick("runAsNonRoot") == true && pick("runAsUser").as_u64().unwrap_or(0) == 0 {
        bail!(
            "{}/{cname}: runAsNonRoot without a non-zero runAsUser",
            pod.name
        );
    }
    if let Some(g) = psc["fsGroup"].as_u64() {
        a.push(format!("--group-add={g}"));
    }
    if sc["readOnlyRootFilesystem"] == true {
        a.push("--read-only".into());
    }
    if sc["allowPrivilegeEscalation"] == false {
        a.push("--security-opt=no-new-privileges".into());
    }
    if sc["privileged"] == true {
        a.push("--privileged".into());
    }
    for d in arr(&sc["capabilities"]["drop"]) {
        a.push(format!("--cap-drop={}", d.as_str().unwrap_or_default()));
    }
    for d in arr(&sc["capabilities"]["add"]) {
        a.push(format!("--cap-add=CAP_{}", d.as_str().unwrap_or_default()));
    }
    match pick("seccompProfile")["type"].as_str() {
        Some("Unconfined") => a.push("--security-opt=seccomp=unconfined".into()),
        Some("RuntimeDefault") | None => {}
        Some(t) => bail!("{}/{cname}: seccompProfile {t} not translated", pod.name),
    }
    if sc["appArmorProfile"]["type"] == "Unconfined" {
        a.push("--security-opt=apparmor=unconfined".into());
    }
    for (k, flag) in [("memory", "--memory"), ("cpu", "--cpus")] {
        if let Some(v) = c["resources"]["limits"][k].as_str() {
            a.push(format!(
                "{flag}={}",
                if k == "memory" {
                    podman_size(v)
                } else {
                    v.to_string()
                }
            ));
        }
    }
    if let Some(v) = c["resources"]["requests"]["memory"].as_str() {
        a.push(format!("--memory-reservation={}", podman_size(v)));
    }
    for m in arr(&c["volumeMounts"]) {
        let vname = m["name"].as_str().unwrap_or_default();
        let target = m["mountPath"].as_str().unwrap_or_default();
        let ro = m["readOnly"] == true;
        match volumes.get(vname) {
            Some(Volume::Path(p)) => {
                let src = match m["subPath"].as_str() {
                    Some(sp) => p.join(sp),
                    None => p.clone(),
                };
                let mut opts = vec![if ro { "ro" } else { "rw" }];
                match m["mountPropagation"].as_str() {
                    Some("Bidirectional") => opts.push("rshared"),
                    Some("HostToContainer") => opts.push("rslave"),
                    _ => {}
                }
                a.push(format!(
                    "--volume={}:{target}:{}",
                    src.display(),
                    opts.join(",")
                ));
            }
            Some(Volume::Tmpfs(size)) => {
                let mut opts = vec!["rw".to_string(), "mode=1777".to_string()];
                if let Some(s) = size {
                    opts.push(format!("size={s}"));
                }
                a.push(format!("--tmpfs={target}:{}", opts.join(",")));
            }
            None => bail!("{}/{cname}: mount of unknown volume {vname}", pod.name),
        }
    }
    // Command and args, $(VAR) expanded from the environment (kubelet does).
    let expand = |s: &str| {
        env.iter().fold(s.to_string(), |acc, (k, v)| {
            acc.replace(&format!("$({k})"), v)
        })
    };
    let command: Vec<String> = arr(&c["command"])
        .iter()
        .filter_map(|s| s.as_str())
        .map(expand)
        .collect();
    if !command.is_empty() {
        a.push(format!("--entrypoint={}", serde_json::to_string(&command)?));
    }
    a.push(
        c["image"]
            .as_str()
            .context("container without image")?
            .to_string(),
    );
    a.extend(
        arr(&c["args"])
            .iter()
            .filter_map(|s| s.as_str())
            .map(expand),
    );
    Ok(a)
}

/// Runs the pod's main container's probes of one kind until one passes.
fn probe_all(pod: &Pod, kind: &str, limit: Duration) -> Result<()> {
    for c in arr(&pod.spec["containers"]) {
        let p = &c[kind];
        if p.is_null() {
            continue;
        }
        let port_of = |v: &Value| -> Option<u64> {
            match v {
                Value::Number(n) => n.as_u64(),
                Value::String(name) => arr(&c["ports"])
                    .iter()
                    .find(|p| p["name"] == name.as_str())?["containerPort"]
                    .as_u64(),
                _ => None,
            }
        };
        let t0 = Instant::now();
        loop {
            let (ok, what) = if let Some(path) = p["httpGet"]["path"].as_str() {
                let port = port_of(&p["httpGet"]["port"]).context("probe port")?;
                (http_get_ok(port, path), format!("GET :{port}{path}"))
            } else if !p["tcpSocket"].is_null() {
                let port = port_of(&p["tcpSocket"]["port"]).context("probe port")?;
                (
                    std::net::TcpStream::connect(("127.0.0.1", port as u16)).is_ok(),
                    format!("tcp :{port}"),
                )
            } else {
                bail!("{kind}: probe type not translated: {p}");
            };
            if ok {
                break;
            }
            if t0.elapsed() > limit {
                bail!("{kind} ({what}) did not pass within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
}

/// GET http://127.0.0.1:PORT/PATH answered 200.
fn http_get_ok(port: u64, path: &str) -> bool {
    http_get(port, path, None).is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// The whole HTTP/1.1 response to GET http://127.0.0.1:PORT/PATH.
fn http_get(port: u64, path: &str, bearer: Option<&str>) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The collector's incident page for the victim's detection names its
/// container and image, read as an analyst would: the token printed by
/// `vigil-collector ui-token` in the collector's container (its image has
/// no shell), the UI port from the StatefulSet's command line.
fn ui_shows_container(coll: &str, victim: &Victim) -> Result<()> {
    let token = run_out(podman().args(["exec", coll, "/usr/bin/vigil-collector", "ui-token"]))?;
    let token = token.trim();
    let port = 7480;
    let body = |r: String| {
        r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    };
    let list = body(http_get(port, "/api/incidents", Some(token))?);
    let incidents: Value =
        serde_json::from_str(list.trim()).with_context(|| format!("/api/incidents: {list}"))?;
    let short = &victim.id[..12];
    let id = incidents
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["workload"].as_str().is_some_and(|w| w.contains(short)))
        .and_then(|i| i["id"].as_i64())
        .with_context(|| format!("no incident for container {short}: {incidents}"))?;
    let page = body(http_get(port, &format!("/incidents/{id}"), Some(token))?);
    crate::deploy::ensure(
        page.contains(&format!("container {}", victim.name)) && page.contains(VICTIM),
        || format!("incident {id} does not name the container and image"),
    )
}

/// The preStop exec hook of the pod's main container, in that container.
fn prestop(pod: &Pod, ctr: &str) -> Result<()> {
    let c = &arr(&pod.spec["containers"])[0];
    let cmd: Vec<&str> = arr(&c["lifecycle"]["preStop"]["exec"]["command"])
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    crate::deploy::ensure(!cmd.is_empty(), || "no preStop exec hook".into())?;
    let out = run_out(podman().args(["exec", ctr]).args(&cmd))?;
    let v: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("preStop printed no JSON summary: {out}"))?;
    println!("        preStop: {v}");
    Ok(())
}

fn make_pki_secrets(root: &Path, collector: &Path, pki: &Path) -> Result<Vec<Value>> {
    let out = run_out(
        Command::new("bash")
            .arg(root.join("make-pki-secrets.sh"))
            .arg(pki)
            .arg(NODE)
            .env("VIGIL_COLLECTOR", collector),
    )?;
    crate::deploy::parse(&out)
}

/// A Secret's data as files with `mode`, group `fs_group` (as the kubelet
/// writes them).
fn write_secret(dir: &Path, doc: &Value, mode: u32, fs_group: Option<u64>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    for (k, v) in doc["data"].as_object().into_iter().flatten() {
        let bytes = base64_decode(v.as_str().unwrap_or_default())
            .with_context(|| format!("Secret key {k}: not base64"))?;
        let p = dir.join(k);
        std::fs::write(&p, bytes)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        if let Some(g) = fs_group {
            std::os::unix::fs::chown(&p, None, Some(g as u32))?;
        }
    }
    if let Some(g) = fs_group {
        std::os::unix::fs::chown(dir, None, Some(g as u32))?;
    }
    Ok(())
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running base64 (coreutils)")?;
    {
        use std::io::Write;
        child.stdin.take().expect("piped").write_all(s.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("base64 -d failed");
    }
    Ok(out.stdout)
}

/// Kubernetes quantity (`512Mi`, `1Gi`, `64Mi`) in podman's notation.
fn podman_size(q: &str) -> String {
    for (suffix, unit) in [("Ki", "k"), ("Mi", "m"), ("Gi", "g")] {
        if let Some(n) = q.strip_suffix(suffix) {
            return format!("{n}{unit}");
        }
    }
    q.to_string()
}

/// Bit mask of capability names (without `CAP_`).
fn caps_mask(names: &[&str]) -> u64 {
    const ALL: &[(&str, u32)] = &[
        ("CHOWN", 0),
        ("DAC_OVERRIDE", 1),
        ("DAC_READ_SEARCH", 2),
        ("FOWNER", 3),
        ("KILL", 5),
        ("SETGID", 6),
        ("SETUID", 7),
        ("SETPCAP", 8),
        ("NET_ADMIN", 12),
        ("SYS_PTRACE", 19),
        ("SYS_ADMIN", 21),
        ("SYS_RESOURCE", 24),
        ("PERFMON", 38),
        ("BPF", 39),
    ];
    names
        .iter()
        .filter_map(|n| ALL.iter().find(|(a, _)| a == n).map(|(_, b)| 1u64 << b))
        .fold(0, |m, b| m | b)
}

fn inspect_pid(ctr: &str) -> Result<u32> {
    let out = run_out(podman().args(["inspect", "--format", "{{.State.Pid}}", ctr]))?;
    out.trim()
        .parse()
        .with_context(|| format!("pid of {ctr}: {out}"))
}

fn proc_status_of(ctr: &str) -> Result<String> {
    let pid = inspect_pid(ctr)?;
    Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?)
}

/// The first detection at the collector (as the agent wrote it) matching
/// `pred`, waiting up to 90 s.
fn wait_detection(
    cli: &Path,
    url: &str,
    pki: &Path,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let t0 = Instant::now();
    loop {
        let out = run_out(
            Command::new(cli)
                .args(["--collector", url, "--pki"])
                .arg(pki)
                .args(["detections", "list", "--json", "--limit", "1000"]),
        )?;
        let list: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
        if let Some(d) = list.iter().map(|d| &d["detection"]).find(|d| pred(d)) {
            return Ok(d.clone());
        }
        if t0.elapsed() > Duration::from_secs(90) {
            bail!(
                "not at the collector after 90 s ({} detections there)",
                list.len()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn tempfile_dir(parent: &str, prefix: &str) -> Result<PathBuf> {
    let p = Path::new(parent).join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn obj_keys(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn run_out(cmd: &mut Command) -> Result<String> {
    let (status, out) = util::capture(cmd, Duration::from_secs(300))?;
    if !status.success() {
        bail!(
            "`{}` failed ({}): {}",
            util::display_cmd(cmd),
            util::describe_status(status),
            out.trim()
        );
    }
    Ok(out)
}
