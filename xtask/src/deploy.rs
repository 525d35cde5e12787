//! `cargo xtask deploy-check`: the Kubernetes manifests in
//! `deploy/kubernetes/` rendered and validated for real.
//!
//! Renders the kustomize base and every overlay with `kubectl kustomize`,
//! validates each rendered document with `kubernetes-validate --strict`
//! against a pinned Kubernetes version, then checks the invariants the
//! design depends on (hostPID, tolerations, the preStop release, probes, no
//! CPU limit, the exact capability list, an unprivileged collector, ...).
//! When the agent and collector binaries are at hand (VIGIL_AGENT_BIN /
//! VIGIL_COLLECTOR_BIN, else target/debug), it also checks that the
//! ConfigMap and the arguments load, that the collector takes every flag
//! the StatefulSet passes, and runs `make-pki-secrets.sh` for real.
//! Prints `N passed, N failed` and fails on any failure.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util;

/// The Kubernetes version the manifests are validated against (kubectl on
/// the project's machines is 1.32; `kubernetes-validate -k`).
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// What `.ci/run` installs (pip, in its own virtualenv).
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The least-privilege overlay's capabilities, exactly (the comments in
/// `overlays/least-privilege/agent-security.yaml` say why each).
pub const LEAST_PRIVILEGE_CAPS: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "KILL",
    "DAC_READ_SEARCH",
    "SYS_RESOURCE",
    "SETPCAP",
];

/// Host paths the agent mounts, and whether read-only.
const AGENT_HOST_MOUNTS: &[(&str, bool)] = &[
    ("/sys/kernel/btf", true),
    ("/sys/kernel/tracing", false),
    ("/sys/fs/bpf", false),
    ("/sys/fs/cgroup", true),
    ("/run/containerd", true),
    ("/run/crio", true),
    ("/var/lib/containers/storage/overlay-containers", true),
    ("/var/lib/containers/storage/overlay-images", true),
    ("/run/containers/storage/overlay-containers", true),
    ("/var/lib/docker/containers", true),
    ("/var/lib/docker/image", true),
    ("/var/lib/kubelet/pods", true),
    ("/var/log/pods", true),
    ("/var/lib/vigil", false),
];

const PRESTOP: &[&str] = &["/usr/bin/vigil-agent", "resume-frozen", "--include-running"];

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Base,
    LeastPrivilege,
    Privileged,
}

const RENDERINGS: &[(&str, Flavor)] = &[
    ("base", Flavor::Base),
    ("overlays/least-privilege", Flavor::LeastPrivilege),
    ("overlays/privileged", Flavor::Privileged),
];

use crate::util::Report;

pub(crate) fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        bail!("{}", msg())
    }
}

/// Runs every check; an error when one fails or a tool is missing.
pub fn deploy_check() -> Result<()> {
    let start = Instant::now();
    let root = util::workspace_root().join("deploy/kubernetes");
    let kubectl = util::which("kubectl").context(
        "kubectl not found in PATH: deploy-check renders the manifests with `kubectl kustomize` \
         (kubectl >= 1.27 has kustomize built in; https://kubernetes.io/docs/tasks/tools/)",
    )?;
    let validate = util::which("kubernetes-validate").with_context(|| {
        format!(
            "kubernetes-validate not found in PATH: install it with `pip install {KUBERNETES_VALIDATE}` \
             (.ci/run does, in a virtualenv)"
        )
    })?;
    println!(
        "==> deploy-check: {} (Kubernetes {KUBERNETES_VERSION})",
        root.display()
    );
    let mut report = Report::default();
    let mut least_privilege: Option<Vec<Value>> = None;
    for (dir, flavor) in RENDERINGS {
        let rendered = render(&kubectl, &root.join(dir));
        let yaml = match rendered {
            Ok(y) => {
                report.check(&format!("{dir}: kubectl kustomize"), Ok(()));
                y
            }
            Err(e) => {
                report.check(&format!("{dir}: kubectl kustomize"), Err(e));
                continue;
            }
        };
        report.check(
            &format!("{dir}: kubernetes-validate --strict -k {KUBERNETES_VERSION}"),
            kubernetes_validate(&validate, &yaml),
        );
        let docs = match parse(&yaml) {
            Ok(d) => d,
            Err(e) => {
                report.check(&format!("{dir}: parse"), Err(e));
                continue;
            }
        };
        check_rendering(&mut report, dir, *flavor, &docs);
        if *flavor == Flavor::LeastPrivilege {
            least_privilege = Some(docs);
        }
    }
    match &least_privilege {
        Some(docs) => check_binaries(&mut report, &root, docs, &validate),
        None => report.skip("binaries", "the least-privilege overlay did not render"),
    }
    println!(
        "==> deploy-check: {} passed, {} failed{} in {:.1} s",
        report.passed,
        report.failed,
        if report.skipped > 0 {
            format!(", {} skipped", report.skipped)
        } else {
            String::new()
        },
        start.elapsed().as_secs_f64()
    );
    if report.failed > 0 {
        bail!("{} deploy check(s) failed", report.failed);
    }
    Ok(())
}

pub(crate) fn render(kubectl: &Path, dir: &Path) -> Result<String> {
    let mut cmd = Command::new(kubectl);
    cmd.arg("kustomize").arg(dir);
    let (status, out) = util::capture(&mut cmd, Duration::from_secs(60))?;
    ensure(status.success(), || {
        format!(
            "`kubectl kustomize {}` failed ({})",
            dir.display(),
            util::describe_status(status)
        )
    })?;
    Ok(out)
}

/// `kubernetes-validate --strict` over a multi-document YAML on stdin; its
/// messages are shown when it fails.
fn kubernetes_validate(validate: &Path, yaml: &str) -> Result<()> {
    let mut child = Command::new(validate)
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", validate.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = yaml.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure(out.status.success() && !text.contains("ERROR"), || {
        format!("\n{}", text.trim_end())
    })
}

pub(crate) fn parse(yaml: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(de).context("parsing the rendered YAML")?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

pub(crate) fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| {
        d["kind"] == kind
            && d["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(name))
    })
}

fn container<'a>(workload: &'a Value, name: &str) -> Option<&'a Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A probe's (path, port number), a named port resolved through the
/// container's ports.
fn http_probe(c: &Value, probe: &str) -> Option<(String, u64)> {
    let get = &c[probe]["httpGet"];
    let path = get["path"].as_str()?.to_string();
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64()?,
        Value::String(name) => c["ports"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name.as_str())?["containerPort"]
            .as_u64()?,
        _ => return None,
    };
    Some((path, port))
}

/// The agent container's mount of a hostPath: (volume, mount).
fn host_mount<'a>(ds: &'a Value, c: &'a Value, path: &str) -> Option<(&'a Value, &'a Value)> {
    let vol = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["hostPath"]["path"] == path)?;
    let mount = c["volumeMounts"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == vol["name"])?;
    Some((vol, mount))
}

fn check_rendering(report: &mut Report, dir: &str, flavor: Flavor, docs: &[Value]) {
    let name = |what: &str| format!("{dir}: {what}");
    let Some(ds) = find(docs, "DaemonSet", "vigil-agent") else {
        report.check(
            &name("DaemonSet vigil-agent"),
            Err(anyhow::anyhow!("missing")),
        );
        return;
    };
    let pod = &ds["spec"]["template"]["spec"];
    let Some(agent) = container(ds, "agent") else {
        report.check(&name("agent container"), Err(anyhow::anyhow!("missing")));
        return;
    };
    report.check(
        &name("agent: hostPID, no hostNetwork"),
        ensure(pod["hostPID"] == true && pod["hostNetwork"] != true, || {
            format!(
                "hostPID {} hostNetwork {}",
                pod["hostPID"], pod["hostNetwork"]
            )
        }),
    );
    report.check(
        &name("agent: tolerates every taint (operator Exists)"),
        ensure(
            pod["tolerations"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["operator"] == "Exists" && t["key"].is_null())
            }),
            || format!("tolerations {}", pod["tolerations"]),
        ),
    );
    report.check(
        &name("agent: preStop runs resume-frozen --include-running"),
        ensure(
            strs(&agent["lifecycle"]["preStop"]["exec"]["command"]) == PRESTOP,
            || format!("preStop {}", agent["lifecycle"]["preStop"]),
        ),
    );
    report.check(
        &name("agent: terminationGracePeriodSeconds 40"),
        ensure(pod["terminationGracePeriodSeconds"] == 40, || {
            format!("{}", pod["terminationGracePeriodSeconds"])
        }),
    );
    let all_containers: Vec<&Value> = docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("DaemonSet" | "StatefulSet")))
        .flat_map(|d| {
            let spec = &d["spec"]["template"]["spec"];
            spec["containers"]
                .as_array()
                .into_iter()
                .chain(spec["initContainers"].as_array())
                .flatten()
        })
        .collect();
    report.check(
        &name("no CPU limit on any container"),
        ensure(
            all_containers
                .iter()
                .all(|c| c["resources"]["limits"]["cpu"].is_null()),
            || "a container has resources.limits.cpu".into(),
        ),
    );
    let res = &agent["resources"];
    report.check(
        &name("agent: requests 100m/128Mi, memory limit 512Mi"),
        ensure(
            res["requests"]["cpu"] == "100m"
                && res["requests"]["memory"] == "128Mi"
                && res["limits"]["memory"] == "512Mi",
            || format!("resources {res}"),
        ),
    );
    let live = http_probe(agent, "livenessProbe");
    let lp = &agent["livenessProbe"];
    report.check(
        &name("agent: liveness GET /healthz :9108 (period 10, failures 6, timeout 5)"),
        ensure(
            live == Some(("/healthz".into(), 9108))
                && lp["periodSeconds"] == 10
                && lp["failureThreshold"] == 6
                && lp["timeoutSeconds"] == 5,
            || format!("livenessProbe {lp}"),
        ),
    );
    report.check(
        &name("agent: readiness GET /readyz :9108"),
        ensure(
            http_probe(agent, "readinessProbe") == Some(("/readyz".into(), 9108)),
            || format!("readinessProbe {}", agent["readinessProbe"]),
        ),
    );
    report.check(
        &name("agent: never two on a node (maxSurge 0)"),
        ensure(
            ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0
                || ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == "0",
            || format!("updateStrategy {}", ds["spec"]["updateStrategy"]),
        ),
    );
    let pc = pod["priorityClassName"].as_str().unwrap_or("");
    report.check(
        &name("agent: priorityClassName defined"),
        ensure(
            pc.starts_with("system-")
                || (!pc.is_empty() && find(docs, "PriorityClass", pc).is_some()),
            || format!("priorityClassName {pc:?} (no such PriorityClass in the rendering)"),
        ),
    );
    let mut mounts = Ok(());
    for (path, ro) in AGENT_HOST_MOUNTS {
        let ok = match host_mount(ds, agent, path) {
            None => Err(anyhow::anyhow!("{path} is not mounted")),
            Some((_, m)) if *ro && m["readOnly"] != true => {
                Err(anyhow::anyhow!("{path} must be read-only"))
            }
            Some((v, _))
                if *path == "/var/lib/vigil" && v["hostPath"]["type"] != "DirectoryOrCreate" =>
            {
                Err(anyhow::anyhow!("{path} must be DirectoryOrCreate"))
            }
            _ => Ok(()),
        };
        if ok.is_err() {
            mounts = ok;
            break;
        }
    }
    report.check(
        &name("agent: host mounts (read-only where they should be)"),
        mounts,
    );
    let args = strs(&agent["args"]);
    let env_node = agent["env"].as_array().is_some_and(|e| {
        e.iter().any(|e| {
            e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        })
    });
    report.check(
        &name("agent: --agent-name $(NODE_NAME) from spec.nodeName"),
        ensure(
            env_node
                && args
                    .windows(2)
                    .any(|w| w[0] == "--agent-name" && w[1] == "$(NODE_NAME)"),
            || format!("args {args:?}"),
        ),
    );
    let toml = agent_toml(docs).unwrap_or_default();
    let keys = toml_keys(&toml);
    report.check(
        &name("agent.toml: metrics on 0.0.0.0:9108, no collector/agent_name (preStop loads it)"),
        ensure(
            toml.lines()
                .any(|l| l.trim() == r#"metrics_addr = "0.0.0.0:9108""#)
                && !keys
                    .iter()
                    .any(|k| k == "collector" || k == "agent_name" || k == "collector_pki"),
            || format!("keys {keys:?}"),
        ),
    );
    let mut no_token = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|sa| sa["automountServiceAccountToken"] == false)
        .collect::<Vec<_>>();
    no_token.extend(
        docs.iter()
            .filter(|d| matches!(d["kind"].as_str(), Some("DaemonSet" | "StatefulSet")))
            .map(|w| w["spec"]["template"]["spec"]["automountServiceAccountToken"] == false),
    );
    let rbac: Vec<&str> = docs
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .filter(|k| k.ends_with("Role") || k.ends_with("RoleBinding"))
        .collect();
    report.check(
        &name("no service account token, no RBAC"),
        ensure(
            no_token.len() >= 4 && no_token.iter().all(|b| *b) && rbac.is_empty(),
            || format!("automount flags {no_token:?}, RBAC objects {rbac:?}"),
        ),
    );
    check_collector(report, dir, docs);
    let sc = &agent["securityContext"];
    let added: Vec<String> = strs(&sc["capabilities"]["add"]);
    match flavor {
        Flavor::Base => report.check(
            &name("agent: base grants no privilege"),
            ensure(sc["privileged"] != true && added.is_empty(), || {
                format!("securityContext {sc}")
            }),
        ),
        Flavor::LeastPrivilege => {
            let want: BTreeSet<&str> = LEAST_PRIVILEGE_CAPS.iter().copied().collect();
            let have: BTreeSet<&str> = added.iter().map(String::as_str).collect();
            report.check(
                &name("agent: not privileged, runAsUser 0, no privilege escalation"),
                ensure(
                    sc["privileged"] != true
                        && sc["runAsUser"] == 0
                        && sc["allowPrivilegeEscalation"] == false,
                    || format!("securityContext {sc}"),
                ),
            );
            report.check(
                &name("agent: capabilities exactly the documented list, drop ALL"),
                ensure(
                    have == want
                        && added.len() == want.len()
                        && strs(&sc["capabilities"]["drop"]) == ["ALL"],
                    || {
                        format!(
                            "add {added:?} drop {} (want {want:?}, drop [ALL])",
                            sc["capabilities"]["drop"]
                        )
                    },
                ),
            );
            report.check(
                &name("agent: capabilities cover SECURITY.md's runtime set"),
                security_md_caps().and_then(|kept| {
                    let missing: Vec<&String> =
                        kept.iter().filter(|c| !have.contains(c.as_str())).collect();
                    ensure(missing.is_empty(), || format!("{missing:?} not granted"))
                }),
            );
            report.check(
                &name("agent: host tracefs/bpffs (type Directory), no Bidirectional mount"),
                ensure(
                    ["/sys/kernel/tracing", "/sys/fs/bpf"].iter().all(|p| {
                        host_mount(ds, agent, p)
                            .is_some_and(|(v, _)| v["hostPath"]["type"] == "Directory")
                    }) && agent["volumeMounts"].as_array().is_some_and(|m| {
                        m.iter().all(|m| m["mountPropagation"] != "Bidirectional")
                    }),
                    || "tracefs/bpffs hostPath type or propagation".into(),
                ),
            );
        }
        Flavor::Privileged => report.check(
            &name("agent: privileged, bpffs mount Bidirectional"),
            ensure(
                sc["privileged"] == true
                    && host_mount(ds, agent, "/sys/fs/bpf")
                        .is_some_and(|(_, m)| m["mountPropagation"] == "Bidirectional"),
                || format!("securityContext {sc}"),
            ),
        ),
    }
}

fn check_collector(report: &mut Report, dir: &str, docs: &[Value]) {
    let name = |what: &str| format!("{dir}: {what}");
    let Some(sts) = find(docs, "StatefulSet", "vigil-collector") else {
        report.check(
            &name("StatefulSet vigil-collector"),
            Err(anyhow::anyhow!("missing")),
        );
        return;
    };
    let pod = &sts["spec"]["template"]["spec"];
    let Some(c) = container(sts, "collector") else {
        report.check(
            &name("collector container"),
            Err(anyhow::anyhow!("missing")),
        );
        return;
    };
    let sc = &c["securityContext"];
    let seccomp = if sc["seccompProfile"].is_null() {
        &pod["securityContext"]["seccompProfile"]
    } else {
        &sc["seccompProfile"]
    };
    report.check(
        &name("collector: non-root 65534, read-only root, no escalation, drop ALL, RuntimeDefault"),
        ensure(
            sc["runAsNonRoot"] == true
                && sc["runAsUser"] == 65534
                && sc["readOnlyRootFilesystem"] == true
                && sc["allowPrivilegeEscalation"] == false
                && strs(&sc["capabilities"]["drop"]) == ["ALL"]
                && sc["capabilities"]["add"].is_null()
                && sc["privileged"] != true
                && seccomp["type"] == "RuntimeDefault",
            || format!("securityContext {sc}"),
        ),
    );
    let res = &c["resources"];
    report.check(
        &name("collector: requests 100m/256Mi, memory limit 1Gi"),
        ensure(
            res["requests"]["cpu"] == "100m"
                && res["requests"]["memory"] == "256Mi"
                && res["limits"]["memory"] == "1Gi",
            || format!("resources {res}"),
        ),
    );
    let cmd = strs(&c["command"]);
    let data = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .and_then(|v| v.first())
        .cloned()
        .unwrap_or_default();
    let data_mounted = c["volumeMounts"].as_array().is_some_and(|m| {
        m.iter().any(|m| {
            m["name"] == data["metadata"]["name"] && m["mountPath"] == "/var/lib/vigil-collector"
        })
    });
    report.check(
        &name("collector: 10Gi claim at /var/lib/vigil-collector = --data-dir"),
        ensure(
            data["spec"]["resources"]["requests"]["storage"] == "10Gi"
                && data_mounted
                && cmd
                    .windows(2)
                    .any(|w| w[0] == "--data-dir" && w[1] == "/var/lib/vigil-collector"),
            || format!("claim {data}, command {cmd:?}"),
        ),
    );
    let init_ok = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|i| {
            let isc = &i["securityContext"];
            let add: BTreeSet<String> = strs(&isc["capabilities"]["add"]).into_iter().collect();
            isc["privileged"] != true
                && isc["allowPrivilegeEscalation"] == false
                && strs(&isc["capabilities"]["drop"]) == ["ALL"]
                && add.iter().all(|a| a == "CHOWN" || a == "FOWNER")
        });
    report.check(
        &name("collector: init container holds CHOWN/FOWNER at most"),
        ensure(init_ok, || {
            format!("initContainers {}", pod["initContainers"])
        }),
    );
    let ports: BTreeSet<u64> = find(docs, "Service", "vigil-collector")
        .and_then(|s| s["spec"]["ports"].as_array())
        .map(|p| p.iter().filter_map(|p| p["port"].as_u64()).collect())
        .unwrap_or_default();
    report.check(
        &name("collector: Service ports 7443, 7480, 9109"),
        ensure(ports == BTreeSet::from([7443, 7480, 9109]), || {
            format!("ports {ports:?}")
        }),
    );
}

fn agent_toml(docs: &[Value]) -> Option<String> {
    find(docs, "ConfigMap", "vigil-agent-config")?["data"]["agent.toml"]
        .as_str()
        .map(String::from)
}

/// Top-level keys of a flat TOML file (enough for agent.toml).
fn toml_keys(toml: &str) -> Vec<String> {
    toml.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_string()))
        .collect()
}

/// The capabilities SECURITY.md lists between its `capabilities` markers,
/// without the CAP_ prefix.
pub fn security_md_caps() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(util::workspace_root().join("SECURITY.md"))
        .context("reading SECURITY.md")?;
    let start = text
        .find("<!-- capabilities")
        .context("SECURITY.md has no capabilities marker")?;
    let end = text[start..]
        .find("<!-- /capabilities -->")
        .context("SECURITY.md has no closing capabilities marker")?;
    let caps: Vec<String> = text[start..start + end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `CAP_"))
        .filter_map(|l| l.split('`').next().map(String::from))
        .collect();
    ensure(!caps.is_empty(), || {
        "no capability listed in SECURITY.md".into()
    })?;
    Ok(caps)
}

fn binary(env: &str, name: &str) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => Some(util::bin_path(name, false)),
    }
    .filter(|p| util::is_executable(p))
}

/// Checks that need the real binaries; skipped when they are not built.
fn check_binaries(report: &mut Report, root: &Path, docs: &[Value], validate: &Path) {
    let work = util::target_dir().join("deploy-check");
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = std::fs::create_dir_all(&work) {
        report.check("work directory", Err(e.into()));
        return;
    }
    let ds = find(docs, "DaemonSet", "vigil-agent");
    let agent_c = ds.and_then(|d| container(d, "agent"));
    match binary("VIGIL_AGENT_BIN", "vigil-agent") {
        None => report.skip(
            "vigil-agent loads agent.toml",
            "no vigil-agent binary (VIGIL_AGENT_BIN or target/debug)",
        ),
        Some(bin) => {
            let toml_path = work.join("agent.toml");
            let written = agent_toml(docs)
                .context("no agent.toml in the ConfigMap")
                .and_then(|t| std::fs::write(&toml_path, t).map_err(Into::into));
            report.check(
                "vigil-agent: agent.toml as preStop loads it (--print-config)",
                written.and_then(|_| {
                    let mut cmd = Command::new(&bin);
                    cmd.arg("--config").arg(&toml_path).arg("--print-config");
                    run_ok(&mut cmd)
                }),
            );
            let args: Vec<String> = agent_c
                .map(|c| strs(&c["args"]))
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.replace("$(NODE_NAME)", "node-1"))
                .collect();
            report.check(
                "vigil-agent: agent.toml with the DaemonSet's args (--print-config)",
                {
                    let mut cmd = Command::new(&bin);
                    cmd.arg("--config")
                        .arg(&toml_path)
                        .args(&args)
                        .arg("--print-config");
                    run_output(&mut cmd).and_then(|out| {
                        ensure(out.contains(r#"agent_name = "node-1""#), || {
                            format!("agent_name not node-1 in\n{out}")
                        })
                    })
                },
            );
            report.check("vigil-agent: resume-frozen --include-running exists", {
                let mut cmd = Command::new(&bin);
                cmd.args(["resume-frozen", "--help"]);
                run_output(&mut cmd).and_then(|out| {
                    ensure(out.contains("--include-running"), || {
                        "no --include-running flag".into()
                    })
                })
            });
        }
    }
    match binary("VIGIL_COLLECTOR_BIN", "vigil-collector") {
        None => {
            report.skip(
                "vigil-collector flags",
                "no vigil-collector binary (VIGIL_COLLECTOR_BIN or target/debug)",
            );
            report.skip("make-pki-secrets.sh", "no vigil-collector binary");
        }
        Some(bin) => {
            let sts = find(docs, "StatefulSet", "vigil-collector");
            let c = sts.and_then(|s| container(s, "collector"));
            let flags: Vec<String> = c
                .map(|c| [strs(&c["command"]), strs(&c["args"])].concat())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.starts_with("--"))
                .collect();
            report.check(
                "vigil-collector: serve takes every flag the StatefulSet passes",
                {
                    let mut cmd = Command::new(&bin);
                    cmd.args(["serve", "--help"]);
                    run_output(&mut cmd).and_then(|help| {
                        let unknown: Vec<&String> = flags
                            .iter()
                            .filter(|f| !help.contains(&format!("{f} ")))
                            .collect();
                        ensure(!flags.is_empty() && unknown.is_empty(), || {
                            format!("unknown flags {unknown:?}")
                        })
                    })
                },
            );
            report.check(
                "make-pki-secrets.sh: Secrets for two nodes, then a third (CA kept)",
                pki_script(root, &bin, &work, validate),
            );
        }
    }
}

fn pki_script(root: &Path, collector: &Path, work: &Path, validate: &Path) -> Result<()> {
    let dir = work.join("pki");
    let script = root.join("make-pki-secrets.sh");
    let run = |nodes: &[&str]| -> Result<String> {
        let mut cmd = Command::new(&script);
        cmd.arg(&dir).args(nodes).env("VIGIL_COLLECTOR", collector);
        run_output(&mut cmd)
    };
    let first = run(&["node-a", "ip-10-0-1-7.ec2.internal"])?;
    kubernetes_validate(validate, &first)?;
    let ca = std::fs::read(dir.join("ca.pem"))?;
    let second = run(&["node-c"])?;
    kubernetes_validate(validate, &second)?;
    ensure(std::fs::read(dir.join("ca.pem"))? == ca, || {
        "the CA changed".into()
    })?;
    let docs = parse(&second)?;
    let keys = |name: &str| -> BTreeSet<String> {
        find(&docs, "Secret", name)
            .and_then(|s| s["data"].as_object())
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default()
    };
    let want_agent: BTreeSet<String> = [
        "ca.pem",
        "node-a.pem",
        "node-a.key",
        "ip-10-0-1-7.ec2.internal.pem",
        "ip-10-0-1-7.ec2.internal.key",
        "node-c.pem",
        "node-c.key",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let want_collector: BTreeSet<String> = ["ca.pem", "server.pem", "server.key"]
        .into_iter()
        .map(String::from)
        .collect();
    ensure(keys("vigil-agent-pki") == want_agent, || {
        format!("vigil-agent-pki keys {:?}", keys("vigil-agent-pki"))
    })?;
    ensure(keys("vigil-collector-pki") == want_collector, || {
        format!("vigil-collector-pki keys {:?}", keys("vigil-collector-pki"))
    })?;
    ensure(!second.contains("ca.key"), || {
        "ca.key went into a Secret".into()
    })
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    run_output(cmd).map(|_| ())
}

/// Runs a quick command; its stdout, or an error with its stderr.
fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", util::display_cmd(cmd)))?;
    ensure(out.status.success(), || {
        format!(
            "`{}` failed ({}): {}",
            util::display_cmd(cmd),
            util::describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim_end()
        )
    })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
