//! Workload identity: which container, pod, systemd unit or login session a
//! process belongs to, derived from its cgroup membership.
//!
//! The input is either one cgroup path ([`Workload::from_cgroup_path`]) or the
//! whole text of `/proc/PID/cgroup` ([`Workload::from_proc_cgroup`],
//! [`Workload::read_for_pid`]). The output is a [`Workload`], and
//! [`Workload::key`] turns it into a short stable string for baselines and
//! logs.
//!
//! # How a path is read
//!
//! The path is split into `/`-separated segments and read by hand (no regex):
//!
//! 1. **Container.** The *deepest* segment that names a container wins (so a
//!    pod inside a kind node, or docker-in-docker, resolves to the innermost
//!    container). A segment names a container when it is
//!    - a bare 64-hex id: `/docker/<id>` (runtime `docker` when the parent
//!      segment is `docker`, otherwise unknown, e.g. the kubelet cgroupfs
//!      driver `/kubepods/besteffort/pod<uid>/<id>`, containerd's
//!      `/default/<id>`, or a custom `--cgroup-parent`);
//!    - `<prefix>-<64hex>` with an optional `.scope` suffix, for a known
//!      prefix: `docker` (docker), `cri-containerd` and `nerdctl`
//!      (containerd), `crio` and `crio-conmon` (cri-o), `libpod` and
//!      `libpod-conmon` (podman). Under a `kubepods` hierarchy any prefix is
//!      accepted (runtime unknown), since a hex-64 scope in a pod is a
//!      container whatever created it. Elsewhere an unknown prefix is *not* a
//!      container: `/system.slice/foo-<64hex>.scope` is the systemd unit it
//!      looks like;
//!    - containerd's systemd-style cgroupfs form
//!      `<slice>:<prefix>:<64hex>`, e.g.
//!      `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`.
//!
//!    Sub-cgroups below a container (podman's `libpod-<id>.scope/container`
//!    with a cgroup namespace, containerd's `/default/<id>/init.scope`) are
//!    ignored because they name no container themselves.
//!
//!    **conmon.** `crio-conmon-<id>.scope` and `libpod-conmon-<id>.scope` hold
//!    conmon, the runtime's monitor process, not the container's own
//!    processes. They are reported as the container they monitor (same id,
//!    runtime `cri-o` / `podman`): conmon belongs to that workload's
//!    lifecycle, and a separate identity for it would only split baselines.
//!
//! 2. **Pod.** Only on paths with a `kubepods` segment (this covers kind's
//!    `kubelet-kubepods.slice` too): the nearest pod segment at or above the
//!    container, either `pod<uid>` (cgroupfs driver, dashed uid) or
//!    `kubepods[-<qos>]-pod<uid>.slice` (systemd driver, `_` in the uid turned
//!    into `-`). The UID must look like one: a UUID (8-4-4-4-12 hex) or the
//!    32-hex config hash that static pods use. A pod segment with no
//!    container below it (a process left in the pod's own cgroup) gives kind
//!    `pod` without a container id.
//!
//! 3. **systemd unit / session.** Otherwise the deepest segment ending in
//!    `.service`, `.scope`, `.socket`, `.mount` or `.swap` (the unit types
//!    that can hold processes) is the unit; slices are containers of units,
//!    not units. `session-*.scope` is kind `session`. A user manager's own
//!    `user@UID.service/init.scope` is reported as `user@UID.service`.
//!    Delegated sub-cgroups below a unit (`nginx.service/worker`) stay that
//!    unit.
//!
//! 4. **Host.** Anything else (`/`, empty, a bare slice, garbage).
//!
//! Segments `.` and `..` are ignored: a reader inside a private cgroup
//! namespace sees paths such as `/../docker-<id>.scope`. The ` (deleted)`
//! suffix the kernel appends for a removed cgroup (zombie processes) is
//! stripped.
//!
//! Container ids must be exactly 64 *lowercase* hex digits; runtimes never
//! print them otherwise, and the strict check keeps ids from being invented
//! out of other hex names (e.g. 32-hex job ids).
//!
//! # Limits
//!
//! - The identity is only as good as the cgroup namespace it is read in: an
//!   agent in a private cgroup namespace sees `0::/` for every process of its
//!   own container and relative paths for others. Read `/proc` of the host's
//!   cgroup namespace (e.g. `--cgroupns=host`, [`Workload::read_for_pid_in`]
//!   with the host's `/proc`).
//! - A user manager's unit and a system unit with the same name get the same
//!   key (`systemd:foo.service`); `cgroup` tells them apart.
//! - Session keys (`session:session-3.scope`) change at every login.

use std::fmt;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What kind of workload a process belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadKind {
    /// A container outside Kubernetes (docker, podman, containerd, ...).
    Container,
    /// A Kubernetes pod's container (or the pod's own cgroup).
    Pod,
    /// A systemd unit (system or user manager), e.g. `nginx.service`.
    Systemd,
    /// A login session scope, e.g. `session-3.scope`.
    Session,
    /// None of the above: the host itself.
    #[default]
    Host,
}

impl WorkloadKind {
    /// The serialized name: `"container"`, `"pod"`, `"systemd"`,
    /// `"session"` or `"host"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Container => "container",
            WorkloadKind::Pod => "pod",
            WorkloadKind::Systemd => "systemd",
            WorkloadKind::Session => "session",
            WorkloadKind::Host => "host",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The workload identity of a process, derived from its cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    /// "container", "pod" (k8s container), "systemd" (a unit), "session"
    /// (user session scope), "host".
    pub kind: WorkloadKind,
    /// The cgroup path used (v2 path, or name=systemd path on hybrid hosts;
    /// whichever line of `/proc/PID/cgroup` gave the identity), without any
    /// ` (deleted)` suffix. `"/"` for an empty input.
    pub cgroup: String,
    /// Full 64-hex container id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Container runtime: "docker", "containerd", "cri-o", "podman"; `None`
    /// when the path does not say (e.g. the kubelet cgroupfs driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Kubernetes pod UID with dashes (`_` from systemd-driver slices
    /// converted to `-`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// systemd unit, e.g. "nginx.service"; for kind `session` the session
    /// scope, e.g. "session-3.scope".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
    /// The container's name: the Kubernetes container name in a pod, else
    /// the runtime's (`--name`). From the runtime's state, see
    /// `agent::container_meta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    /// The image the container runs, as it was named, e.g.
    /// `docker.io/library/nginx:1.27`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// That image's digest, `sha256:<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// Kubernetes pod name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Kubernetes namespace of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
}

impl Workload {
    /// Derives the workload from one cgroup path, e.g.
    /// `/system.slice/docker-<64hex>.scope`. Never fails: anything
    /// unrecognised is kind `host`. See the module docs for the rules.
    pub fn from_cgroup_path(path: &str) -> Workload {
        let cgroup = normalize_path(path);
        let segs: Vec<&str> = cgroup
            .split('/')
            .filter(|s| !s.is_empty() && *s != "." && *s != "..")
            .collect();
        let in_kube = segs.iter().any(|s| s.contains("kubepods"));

        let mut workload = Workload {
            cgroup: cgroup.to_string(),
            ..Workload::default()
        };

        // 1. The deepest container.
        let container = segs.iter().enumerate().rev().find_map(|(i, seg)| {
            let parent = i.checked_sub(1).map(|p| segs[p]);
            container_in_segment(seg, parent, in_kube).map(|c| (i, c))
        });

        // 2. The pod: nearest at or above the container, else the deepest.
        let pod_scan_end = container.as_ref().map_or(segs.len(), |(i, _)| i + 1);
        let pod_uid = if in_kube {
            segs[..pod_scan_end]
                .iter()
                .rev()
                .find_map(|seg| pod_uid_in_segment(seg))
        } else {
            None
        };

        if let Some((_, (id, runtime))) = container {
            workload.kind = if pod_uid.is_some() {
                WorkloadKind::Pod
            } else {
                WorkloadKind::Container
            };
            workload.container_id = Some(id.to_string());
            workload.runtime = runtime.map(str::to_string);
            workload.pod_uid = pod_uid;
            return workload;
        }
        if pod_uid.is_some() {
            workload.kind = WorkloadKind::Pod;
            workload.pod_uid = pod_uid;
            return workload;
        }

        // 3. The deepest systemd unit.
        if let Some(i) = segs.iter().rposition(|s| is_unit_name(s)) {
            let mut unit = segs[i];
            if unit == "init.scope" {
                // A manager's own scope: name the manager if there is one
                // (`user@1000.service/init.scope`); `/init.scope` is PID 1.
                if let Some(owner) = segs[..i].iter().rfind(|s| is_unit_name(s)) {
                    unit = *owner;
                }
            }
            workload.kind = if unit.starts_with("session-") && unit.ends_with(".scope") {
                WorkloadKind::Session
            } else {
                WorkloadKind::Systemd
            };
            workload.systemd_unit = Some(unit.to_string());
            return workload;
        }

        // 4. Nothing recognised.
        workload
    }

    /// Parses the text of /proc/PID/cgroup: prefers the cgroup v2 line
    /// ("0::/..."), but on hybrid hosts where the v2 path is "/" or
    /// uninformative, also looks at the "name=systemd" v1 line and the other
    /// v1 lines, and picks the most specific identity (a container id
    /// anywhere wins over a unit).
    ///
    /// Specificity, highest first: pod container, container, pod without a
    /// container, systemd unit or session, host. Between lines of equal
    /// specificity the v2 line wins, then `name=systemd`, then the other v1
    /// lines in file order. Lines that are not `<number>:<controllers>:/<path>`
    /// are skipped (the path itself may contain `:`). With no usable line the
    /// result is kind `host` with cgroup `"/"`.
    pub fn from_proc_cgroup(text: &str) -> Workload {
        let mut v2 = Vec::new();
        let mut named_systemd = Vec::new();
        let mut v1 = Vec::new();
        for line in text.lines() {
            let mut parts = line.trim().splitn(3, ':');
            let (Some(hierarchy), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if hierarchy.is_empty()
                || !hierarchy.bytes().all(|b| b.is_ascii_digit())
                || !path.starts_with('/')
            {
                continue;
            }
            if hierarchy == "0" && controllers.is_empty() {
                v2.push(path);
            } else if controllers.split(',').any(|c| c == "name=systemd") {
                named_systemd.push(path);
            } else {
                v1.push(path);
            }
        }

        let mut best: Option<(u8, Workload)> = None;
        for path in v2.into_iter().chain(named_systemd).chain(v1) {
            let candidate = Workload::from_cgroup_path(path);
            let rank = candidate.specificity();
            if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                best = Some((rank, candidate));
            }
        }
        best.map_or_else(|| Workload::from_cgroup_path("/"), |(_, w)| w)
    }

    /// Reads `/proc/PID/cgroup` and parses it with
    /// [`Workload::from_proc_cgroup`].
    ///
    /// # Errors
    ///
    /// The read's error, e.g. `NotFound` once the process is gone. Parsing
    /// never fails.
    pub fn read_for_pid(pid: u32) -> io::Result<Workload> {
        Self::read_for_pid_in(Path::new("/proc"), pid)
    }

    /// Like [`Workload::read_for_pid`] with another procfs mount, e.g. the
    /// host's `/proc` mounted at `/host/proc` in an agent container.
    ///
    /// # Errors
    ///
    /// As [`Workload::read_for_pid`].
    pub fn read_for_pid_in(proc_root: &Path, pid: u32) -> io::Result<Workload> {
        let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?;
        Ok(Self::from_proc_cgroup(&text))
    }

    /// A short stable key for baselines and logs: `"container:<12 hex>"`,
    /// `"pod:<uid>/<12hex>"`, `"systemd:<unit>"`, `"session:<scope>"`,
    /// `"host"`.
    ///
    /// A pod without a container id gives `"pod:<uid>"`. Fields missing for
    /// the kind (only possible for a hand-built or deserialized value) fall
    /// back to the cgroup path, e.g. "systemd:/some/path".
    pub fn key(&self) -> String {
        self.key_display().to_string()
    }

    /// [`Workload::key`] without building a string (written straight into
    /// an output buffer).
    pub fn key_display(&self) -> impl std::fmt::Display + '_ {
        KeyDisplay(self)
    }

    /// How much this identity says; used to pick between the lines of
    /// `/proc/PID/cgroup`.
    fn specificity(&self) -> u8 {
        match (&self.container_id, &self.pod_uid, &self.systemd_unit) {
            (Some(_), Some(_), _) => 4,
            (Some(_), None, _) => 3,
            (None, Some(_), _) => 2,
            (None, None, Some(_)) => 1,
            (None, None, None) => 0,
        }
    }
}

impl fmt::Display for Workload {
    /// Writes [`Workload::key`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// True if `s` is exactly 64 lowercase hexadecimal digits, the form of a
/// full container id.
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Trims whitespace and the kernel's ` (deleted)` suffix; empty becomes "/".
fn normalize_path(path: &str) -> &str {
    let path = path.trim();
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    if path.is_empty() {
        "/"
    } else {
        path
    }
}

/// The formatting of [`Workload::key`].
struct KeyDisplay<'a>(&'a Workload);

impl<'a> std::fmt::Display for KeyDisplay<'a> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.0;
        let or_cgroup = |v: &'a Option<String>| v.as_deref().unwrap_or(&w.cgroup);
        match w.kind {
            WorkloadKind::Host => f.write_str("host"),
            WorkloadKind::Container => match &w.container_id {
                Some(id) => write!(f, "container:{}", short_id(id)),
                None => write!(f, "container:{}", w.cgroup),
            },
            WorkloadKind::Pod => match (&w.pod_uid, &w.container_id) {
                (Some(uid), Some(id)) => write!(f, "pod:{uid}/{}", short_id(id)),
                (Some(uid), None) => write!(f, "pod:{uid}"),
                (None, Some(id)) => write!(f, "container:{}", short_id(id)),
                (None, None) => write!(f, "pod:{}", w.cgroup),
            },
            WorkloadKind::Systemd => write!(f, "systemd:{}", or_cgroup(&w.systemd_unit)),
            WorkloadKind::Session => write!(f, "session:{}", or_cgroup(&w.systemd_unit)),
        }
    }
}

/// The first 12 characters of a container id (the whole id if shorter).
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Runtime named by a `<prefix>-<id>` cgroup name prefix.
fn runtime_for_prefix(prefix: &str) -> Option<&'static str> {
    match prefix {
        "docker" => Some("docker"),
        "cri-containerd" | "nerdctl" => Some("containerd"),
        "crio" | "crio-conmon" => Some("cri-o"),
        "libpod" | "libpod-conmon" => Some("podman"),
        _ => None,
    }
}

/// The container id and runtime a single segment names, if any.
fn container_in_segment<'a>(
    seg: &'a str,
    parent: Option<&str>,
    in_kube: bool,
) -> Option<(&'a str, Option<&'static str>)> {
    // containerd's "<slice>:<prefix>:<id>" (systemd-style parent, cgroupfs).
    if seg.contains(':') {
        let mut parts = seg.splitn(3, ':');
        let (_slice, prefix, id) = (parts.next()?, parts.next()?, parts.next()?);
        return is_hex64(id).then(|| (id, runtime_for_prefix(prefix)));
    }
    // Bare id: "/docker/<id>", "/kubepods/.../pod<uid>/<id>".
    if is_hex64(seg) {
        let runtime = (parent == Some("docker")).then_some("docker");
        return Some((seg, runtime));
    }
    // "<prefix>-<id>" or "<prefix>-<id>.scope".
    let base = seg.strip_suffix(".scope").unwrap_or(seg);
    let split = base.len().checked_sub(65)?;
    if base.as_bytes()[split] != b'-' {
        return None;
    }
    // `split` is the byte of an ASCII '-', so both slices are on boundaries.
    let (prefix, id) = (&base[..split], &base[split + 1..]);
    if prefix.is_empty() || !is_hex64(id) {
        return None;
    }
    match runtime_for_prefix(prefix) {
        Some(runtime) => Some((id, Some(runtime))),
        None if in_kube => Some((id, None)),
        None => None,
    }
}

/// The pod UID a single segment names, if any: `pod<uid>` (cgroupfs) or
/// `...kubepods...-pod<uid>.slice` (systemd), also as the slice part of
/// containerd's `<slice>:<prefix>:<id>`.
fn pod_uid_in_segment(seg: &str) -> Option<String> {
    let seg = seg.split(':').next().unwrap_or(seg);
    let uid = if let Some(stem) = seg.strip_suffix(".slice") {
        let at = stem.rfind("-pod")?;
        if !stem[..at].contains("kubepods") {
            return None;
        }
        &stem[at + 4..]
    } else {
        seg.strip_prefix("pod")?
    };
    is_pod_uid(uid).then(|| uid.replace('_', "-"))
}

/// True for a pod UID as it appears in a cgroup name: a UUID with `-` or `_`
/// separators (8-4-4-4-12 hex), or the 32-hex config hash that is the UID of
/// a static pod.
fn is_pod_uid(uid: &str) -> bool {
    let b = uid.as_bytes();
    match b.len() {
        32 => b.iter().all(u8::is_ascii_hexdigit),
        36 => b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-' || *c == b'_',
            _ => c.is_ascii_hexdigit(),
        }),
        _ => false,
    }
}

/// True for a systemd unit type that can hold processes.
fn is_unit_name(seg: &str) -> bool {
    [".service", ".scope", ".socket", ".mount", ".swap"]
        .iter()
        .any(|suffix| seg.len() > suffix.len() && seg.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a9c1b04de5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";
    const ID2: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "0b3c2e7f-5a1d-4c8e-9f6a-1d2e3f4a5b6c";
    const UID_US: &str = "0b3c2e7f_5a1d_4c8e_9f6a_1d2e3f4a5b6c";

    fn container(path: &str, id: &str, runtime: Option<&str>) -> Workload {
        Workload {
            kind: WorkloadKind::Container,
            cgroup: path.to_string(),
            container_id: Some(id.to_string()),
            runtime: runtime.map(str::to_string),
            ..Workload::default()
        }
    }

    fn pod(path: &str, uid: &str, id: &str, runtime: Option<&str>) -> Workload {
        Workload {
            kind: WorkloadKind::Pod,
            pod_uid: Some(uid.to_string()),
            ..container(path, id, runtime)
        }
    }

    fn unit(kind: WorkloadKind, path: &str, unit: &str) -> Workload {
        Workload {
            kind,
            cgroup: path.to_string(),
            systemd_unit: Some(unit.to_string()),
            ..Workload::default()
        }
    }

    fn host(path: &str) -> Workload {
        Workload {
            cgroup: path.to_string(),
            ..Workload::default()
        }
    }

    #[test]
    fn hex64() {
        assert!(is_hex64(ID));
        assert!(!is_hex64(&ID[1..]));
        assert!(!is_hex64(&format!("{ID}0")));
        assert!(!is_hex64(&ID.to_uppercase()));
        assert!(!is_hex64(&ID.replace('a', "g")));
        assert!(!is_hex64(""));
        // 64 bytes, but not ASCII hex.
        assert!(!is_hex64(&"é".repeat(32)));
    }

    #[test]
    fn docker_cgroupfs() {
        let p = format!("/docker/{ID}");
        let w = Workload::from_cgroup_path(&p);
        assert_eq!(w, container(&p, ID, Some("docker")));
        assert_eq!(w.key(), "container:3f2a9c1b04de");
    }

    #[test]
    fn docker_systemd() {
        let p = format!("/system.slice/docker-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("docker"))
        );
    }

    #[test]
    fn docker_rootless() {
        let p =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("docker"))
        );
    }

    #[test]
    fn docker_in_docker_innermost_wins() {
        let p = format!("/docker/{ID2}/docker/{ID}");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("docker"))
        );
    }

    #[test]
    fn containerd_colon_form() {
        let p = format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{UID_US}.slice:cri-containerd:{ID}"
        );
        let w = Workload::from_cgroup_path(&p);
        assert_eq!(w, pod(&p, UID, ID, Some("containerd")));
        assert_eq!(w.key(), format!("pod:{UID}/3f2a9c1b04de"));
    }

    #[test]
    fn containerd_systemd_driver() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("containerd"))
        );
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        let p = format!("/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(Workload::from_cgroup_path(&p), pod(&p, UID, ID, None));
        let p = format!("/kubepods/burstable/pod{UID}/{ID}");
        assert_eq!(Workload::from_cgroup_path(&p), pod(&p, UID, ID, None));
    }

    #[test]
    fn kubelet_guaranteed_qos() {
        let p = format!("/kubepods/pod{UID}/{ID}");
        assert_eq!(Workload::from_cgroup_path(&p), pod(&p, UID, ID, None));
        let p = format!("/kubepods.slice/kubepods-pod{UID_US}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("containerd"))
        );
    }

    #[test]
    fn static_pod_hash_uid() {
        let uid = "6f1b1b0ae4a5c9d7e8f9a0b1c2d3e4f5";
        let p = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, uid, ID, Some("containerd"))
        );
    }

    #[test]
    fn crio() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("cri-o"))
        );
        // cgroupfs manager: no ".scope".
        let p = format!("/kubepods/burstable/pod{UID}/crio-{ID}");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("cri-o"))
        );
    }

    #[test]
    fn crio_conmon_is_reported_as_its_container() {
        let p = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_US}.slice/crio-conmon-{ID}.scope"
        );
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("cri-o"))
        );
    }

    #[test]
    fn podman() {
        let p = format!("/machine.slice/libpod-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("podman"))
        );
        let p =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("podman"))
        );
        // With a cgroup namespace, podman runs the container in a sub-cgroup.
        let p = format!("/machine.slice/libpod-{ID}.scope/container");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("podman"))
        );
        // cgroupfs manager.
        let p = format!("/libpod_parent/libpod-{ID}");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("podman"))
        );
        let p = format!("/machine.slice/libpod-conmon-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("podman"))
        );
    }

    #[test]
    fn nerdctl_and_plain_containerd() {
        let p = format!("/system.slice/nerdctl-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("containerd"))
        );
        // containerd namespace "default", cgroupfs, nested init cgroup.
        let p = format!("/default/{ID}/init.scope");
        assert_eq!(Workload::from_cgroup_path(&p), container(&p, ID, None));
    }

    #[test]
    fn kind_nested() {
        // As seen inside the kind node (cgroupns).
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("containerd"))
        );
        // As seen from the host: the node container wraps the pod.
        let p = format!(
            "/system.slice/docker-{ID2}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_US}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            Workload::from_cgroup_path(&p),
            pod(&p, UID, ID, Some("containerd"))
        );
        // Older kind, cgroupfs with --cgroup-root=/kubelet, host view.
        let p = format!("/docker/{ID2}/kubelet/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(Workload::from_cgroup_path(&p), pod(&p, UID, ID, None));
        // The node's own services are the node container.
        let p = format!("/system.slice/docker-{ID2}.scope/system.slice/kubelet.service");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID2, Some("docker"))
        );
    }

    #[test]
    fn pod_without_container() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_US}.slice"
        );
        let w = Workload::from_cgroup_path(&p);
        assert_eq!(w.kind, WorkloadKind::Pod);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id, None);
        assert_eq!(w.key(), format!("pod:{UID}"));
    }

    #[test]
    fn unknown_prefix_in_pod_is_a_container() {
        let p = format!("/kubepods.slice/kubepods-pod{UID_US}.slice/newruntime-{ID}.scope");
        assert_eq!(Workload::from_cgroup_path(&p), pod(&p, UID, ID, None));
    }

    #[test]
    fn systemd_units() {
        let p = "/system.slice/nginx.service";
        let w = Workload::from_cgroup_path(p);
        assert_eq!(w, unit(WorkloadKind::Systemd, p, "nginx.service"));
        assert_eq!(w.key(), "systemd:nginx.service");

        let p = "/system.slice/system-getty.slice/getty@tty1.service";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "getty@tty1.service")
        );

        let p = "/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "foo.service")
        );

        // The container engines themselves are units, not containers.
        let p = "/system.slice/docker.service";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "docker.service")
        );
        let p = "/system.slice/containerd.service";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "containerd.service")
        );
    }

    #[test]
    fn systemd_sub_cgroups_and_managers() {
        let p = "/system.slice/nginx.service/workers";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "nginx.service")
        );
        let p = "/user.slice/user-1000.slice/user@1000.service/init.scope";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "user@1000.service")
        );
        let p = "/init.scope";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "init.scope")
        );
        let p = "/system.slice/systemd-journald.socket";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "systemd-journald.socket")
        );
    }

    #[test]
    fn sessions() {
        let p = "/user.slice/user-0.slice/session-3.scope";
        let w = Workload::from_cgroup_path(p);
        assert_eq!(w, unit(WorkloadKind::Session, p, "session-3.scope"));
        assert_eq!(w.key(), "session:session-3.scope");
        let p = "/user.slice/user-1000.slice/session-c2.scope";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Session, p, "session-c2.scope")
        );
    }

    #[test]
    fn host_and_garbage() {
        assert_eq!(Workload::from_cgroup_path(""), host("/"));
        assert_eq!(Workload::from_cgroup_path("   \n"), host("/"));
        assert_eq!(Workload::from_cgroup_path("/"), host("/"));
        assert_eq!(Workload::from_cgroup_path("/").key(), "host");
        assert_eq!(Workload::from_cgroup_path("//"), host("//"));
        assert_eq!(
            Workload::from_cgroup_path("/user.slice"),
            host("/user.slice")
        );
        assert_eq!(
            Workload::from_cgroup_path("/kubepods.slice/kubepods-besteffort.slice"),
            host("/kubepods.slice/kubepods-besteffort.slice")
        );
        for garbage in [
            "not a path",
            ":::",
            "/.service",
            "/-",
            "/docker-",
            "/docker/",
            "/pod",
            "/\u{0}\u{1}/é/ü.scope-",
        ] {
            let w = Workload::from_cgroup_path(garbage);
            assert_eq!(w.kind, WorkloadKind::Host, "{garbage:?}");
            assert_eq!(w.key(), "host");
        }
    }

    #[test]
    fn hex_looking_segments_that_are_not_containers() {
        // A mount unit whose name embeds a container id.
        let p = format!("/system.slice/var-lib-docker-overlay2-{ID}-merged.mount");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            unit(
                WorkloadKind::Systemd,
                &p,
                &format!("var-lib-docker-overlay2-{ID}-merged.mount")
            )
        );
        // Unknown prefix outside Kubernetes: the transient unit it looks like.
        let p = format!("/system.slice/run-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            unit(WorkloadKind::Systemd, &p, &format!("run-{ID}.scope"))
        );
        // A known prefix with a non-scope unit type is still just a unit.
        let p = format!("/system.slice/docker-{ID}.mount");
        assert_eq!(Workload::from_cgroup_path(&p).kind, WorkloadKind::Systemd);
        // Almost ids: one digit short, one too many, uppercase, a 'g'.
        for id in [
            ID[1..].to_string(),
            format!("{ID}0"),
            ID.to_uppercase(),
            ID.replace('a', "g"),
        ] {
            for p in [
                format!("/docker/{id}"),
                format!("/system.slice/docker-{id}.scope"),
            ] {
                let w = Workload::from_cgroup_path(&p);
                assert_eq!(w.container_id, None, "{p}");
                assert_ne!(w.kind, WorkloadKind::Container, "{p}");
            }
        }
        // A 32-hex job id (seen on real hosts in a v1 memory hierarchy).
        let p = "/process_api/1dff2f570b69772a7bff4347b3a91e91";
        assert_eq!(Workload::from_cgroup_path(p), host(p));
        // "pod"-prefixed names outside kubepods are not pods.
        let p = format!("/pod{UID}/x");
        assert_eq!(Workload::from_cgroup_path(&p), host(&p));
        let p = "/system.slice/podman.service";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "podman.service")
        );
        // A colon form whose id is not an id.
        let p = "/system.slice/containerd.service/kubepods-pod1.slice:cri-containerd:abc";
        assert_eq!(
            Workload::from_cgroup_path(p),
            unit(WorkloadKind::Systemd, p, "containerd.service")
        );
    }

    #[test]
    fn bare_hex_under_unknown_parent_is_a_container_of_unknown_runtime() {
        // `docker run --cgroup-parent=/ci` and similar.
        let p = format!("/ci/{ID}");
        assert_eq!(Workload::from_cgroup_path(&p), container(&p, ID, None));
    }

    #[test]
    fn cgroup_namespace_relative_and_deleted() {
        let p = format!("/../docker-{ID}.scope");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(&p, ID, Some("docker"))
        );
        let p = format!("/system.slice/docker-{ID}.scope (deleted)");
        assert_eq!(
            Workload::from_cgroup_path(&p),
            container(
                &format!("/system.slice/docker-{ID}.scope"),
                ID,
                Some("docker")
            )
        );
    }

    #[test]
    fn proc_cgroup_pure_v2() {
        let text = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(
            Workload::from_proc_cgroup(&text),
            container(
                &format!("/system.slice/docker-{ID}.scope"),
                ID,
                Some("docker")
            )
        );
        let text = "0::/system.slice/nginx.service\n";
        assert_eq!(
            Workload::from_proc_cgroup(text),
            unit(
                WorkloadKind::Systemd,
                "/system.slice/nginx.service",
                "nginx.service"
            )
        );
    }

    #[test]
    fn proc_cgroup_path_with_colons() {
        let path = format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{UID_US}.slice:cri-containerd:{ID}"
        );
        let text = format!("0::{path}\n");
        assert_eq!(
            Workload::from_proc_cgroup(&text),
            pod(&path, UID, ID, Some("containerd"))
        );
    }

    #[test]
    fn proc_cgroup_hybrid_uses_name_systemd() {
        // Hybrid host, docker cgroupfs driver: the unified line says nothing.
        let text = format!(
            "12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/\n"
        );
        assert_eq!(
            Workload::from_proc_cgroup(&text),
            container(&format!("/docker/{ID}"), ID, Some("docker"))
        );
        // A service: v2 "/" but name=systemd knows the unit.
        let text = "9:name=systemd:/system.slice/nginx.service\n8:pids:/system.slice/nginx.service\n4:memory:/\n0::/\n";
        assert_eq!(
            Workload::from_proc_cgroup(text),
            unit(
                WorkloadKind::Systemd,
                "/system.slice/nginx.service",
                "nginx.service"
            )
        );
    }

    #[test]
    fn proc_cgroup_container_anywhere_beats_unit() {
        let text = format!(
            "9:name=systemd:/system.slice/foo.service\n4:memory:/docker/{ID}\n0::/system.slice/foo.service\n"
        );
        assert_eq!(
            Workload::from_proc_cgroup(&text),
            container(&format!("/docker/{ID}"), ID, Some("docker"))
        );
    }

    #[test]
    fn proc_cgroup_ties_prefer_v2_then_name_systemd() {
        let text = "4:cpu:/system.slice/c.service\n1:name=systemd:/system.slice/b.service\n0::/system.slice/a.service\n";
        assert_eq!(
            Workload::from_proc_cgroup(text).systemd_unit.as_deref(),
            Some("a.service")
        );
        let text = "4:cpu:/system.slice/c.service\n1:name=systemd:/system.slice/b.service\n0::/\n";
        assert_eq!(
            Workload::from_proc_cgroup(text).systemd_unit.as_deref(),
            Some("b.service")
        );
        // cgroup v1 only (no "0::" line).
        let text = "4:cpu,cpuacct:/system.slice/c.service\n1:name=systemd:/user.slice/user-0.slice/session-3.scope\n";
        assert_eq!(
            Workload::from_proc_cgroup(text),
            unit(
                WorkloadKind::Session,
                "/user.slice/user-0.slice/session-3.scope",
                "session-3.scope"
            )
        );
    }

    #[test]
    fn proc_cgroup_real_hybrid_host() {
        // Captured on a hybrid-layout host: nothing but a 32-hex job cgroup.
        let text = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n4:memory:/process_api/1dff2f570b69772a7bff4347b3a91e91\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";
        assert_eq!(Workload::from_proc_cgroup(text), host("/"));
    }

    #[test]
    fn proc_cgroup_empty_and_garbage() {
        assert_eq!(Workload::from_proc_cgroup(""), host("/"));
        assert_eq!(Workload::from_proc_cgroup("\n\n"), host("/"));
        let text =
            format!("garbage\nx:y:/docker/{ID}\n:cpu:/docker/{ID}\n3:cpu:docker/{ID}\n0:/docker\n");
        assert_eq!(Workload::from_proc_cgroup(&text), host("/"));
        // A valid line among garbage is still found.
        let text = "junk line\n0::/system.slice/nginx.service\n\u{0}\u{0}\n";
        assert_eq!(
            Workload::from_proc_cgroup(text).key(),
            "systemd:nginx.service"
        );
    }

    #[test]
    fn read_for_pid_self_and_missing() {
        let w = Workload::read_for_pid(std::process::id()).expect("own /proc/self/cgroup");
        assert!(!w.cgroup.is_empty());
        let err = Workload::read_for_pid(u32::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn read_for_pid_in_other_proc_root() {
        let root = std::env::temp_dir().join(format!("vigil-workload-test-{}", std::process::id()));
        let dir = root.join("4242");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cgroup"),
            format!("0::/system.slice/docker-{ID}.scope\n"),
        )
        .unwrap();
        let w = Workload::read_for_pid_in(&root, 4242);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(w.unwrap().key(), "container:3f2a9c1b04de");
    }

    #[test]
    fn keys_for_incomplete_values() {
        let w = Workload {
            kind: WorkloadKind::Systemd,
            cgroup: "/x".into(),
            ..Workload::default()
        };
        assert_eq!(w.key(), "systemd:/x");
        let w = Workload {
            kind: WorkloadKind::Pod,
            container_id: Some(ID.into()),
            ..Workload::default()
        };
        assert_eq!(w.key(), "container:3f2a9c1b04de");
        let w = Workload {
            kind: WorkloadKind::Container,
            container_id: Some("abc".into()),
            ..Workload::default()
        };
        assert_eq!(w.key(), "container:abc");
        assert_eq!(Workload::default().key(), "host");
        assert_eq!(Workload::default().to_string(), "host");
    }

    #[test]
    fn serde_shape() {
        let w = Workload::from_cgroup_path("/system.slice/nginx.service");
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"systemd","cgroup":"/system.slice/nginx.service","systemd_unit":"nginx.service"}"#
        );
        let back: Workload = serde_json::from_str(&json).unwrap();
        assert_eq!(back, w);

        let p = format!("/kubepods/pod{UID}/{ID}");
        let w = Workload::from_cgroup_path(&p);
        let back: Workload = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back, w);
        assert_eq!(WorkloadKind::Pod.to_string(), "pod");
        assert_eq!(
            serde_json::to_string(&WorkloadKind::Host).unwrap(),
            r#""host""#
        );
    }
}
