//! Who a container is beyond its cgroup: its name, its image (name and
//! digest) and, for Kubernetes, its pod (name, namespace) and container
//! name, read from the container runtime's own state on this node. No API
//! server, no runtime socket: files the runtimes keep for themselves, read
//! once per container (the first time a process of it is seen, which is
//! before a short-lived container can vanish) and cached.
//!
//! Sources, for one container id; each fills only what the earlier ones
//! left empty:
//!
//! 1. **The OCI bundle** the runtime handed to runc, `config.json`, whose
//!    annotations carry the Kubernetes identity: containerd's CRI plugin
//!    (`io.kubernetes.cri.sandbox-name`, `…sandbox-namespace`,
//!    `…container-name`, `…image-name`) in
//!    `run/containerd/io.containerd.runtime.v2.task/<namespace>/<id>/`;
//!    CRI-O (`io.kubernetes.pod.name`, `io.kubernetes.pod.namespace`,
//!    `io.kubernetes.container.name`, `io.kubernetes.cri-o.ImageName`,
//!    `io.kubernetes.cri-o.ImageRef`) and podman in
//!    `{run,var/lib}/containers/storage/overlay-containers/<id>/userdata/`.
//! 2. **containers/storage** (podman, CRI-O, buildah):
//!    `overlay-containers/containers.json` gives the container's names, its
//!    image id and metadata (image name, container name, and for CRI-O the
//!    pod); `overlay-images/images.json` gives that image's names and
//!    digest. Both are parsed again only when they change.
//! 3. **Docker**: `var/lib/docker/containers/<id>/config.v2.json` (name,
//!    image as run, image id, labels: `io.kubernetes.*` under cri-dockerd)
//!    and `var/lib/docker/image/<driver>/repositories.json` for the digest.
//!
//! Every path is taken below `root` (`runtime_state_root`: `/` on a host
//! and in the DaemonSet, which mounts exactly these directories read-only
//! at their host paths).
//! Every read is bounded in size; a file that is missing, too large or
//! malformed leaves its fields empty and is never an error for the event.
//!
//! Not known from these files: the image digest under containerd (it lives
//! in containerd's bolt database; the image name is given).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

use crate::model::Workload;

/// Largest OCI `config.json` / docker `config.v2.json` read.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Largest containers/storage index (`containers.json`, `images.json`) or
/// docker `repositories.json` read.
const MAX_INDEX_BYTES: u64 = 64 << 20;
/// containerd namespaces looked at.
const MAX_NAMESPACES: usize = 64;

/// A container's identity from its runtime's state; every field optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    /// The container's name: the Kubernetes container name in a pod, else
    /// the runtime's name (podman/docker `--name`).
    pub name: Option<String>,
    /// Image as it was run, e.g. `docker.io/library/nginx:1.27`.
    pub image: Option<String>,
    /// Image digest, `sha256:<64 hex>`.
    pub image_digest: Option<String>,
    /// Kubernetes pod name.
    pub pod_name: Option<String>,
    /// Kubernetes namespace.
    pub pod_namespace: Option<String>,
}

impl ContainerMeta {
    /// True when nothing is known.
    pub fn is_empty(&self) -> bool {
        *self == ContainerMeta::default()
    }

    /// Fills the fields still empty from `other`.
    fn fill(&mut self, other: ContainerMeta) {
        let pairs = [
            (&mut self.name, other.name),
            (&mut self.image, other.image),
            (&mut self.image_digest, other.image_digest),
            (&mut self.pod_name, other.pod_name),
            (&mut self.pod_namespace, other.pod_namespace),
        ];
        for (mine, theirs) in pairs {
            if mine.is_none() {
                *mine = theirs;
            }
        }
    }

    /// `w` with this container's name, image and pod; its identity from
    /// the cgroup (and so its key) stays.
    pub fn apply_to(self, mut w: Workload) -> Workload {
        w.container_name = self.name;
        w.image = self.image;
        w.image_digest = self.image_digest;
        w.pod_name = self.pod_name;
        w.pod_namespace = self.pod_namespace;
        w
    }

    fn complete(&self) -> bool {
        self.name.is_some() && self.image.is_some() && self.image_digest.is_some()
    }
}

/// A parsed JSON file, kept while its modification time and size stay.
struct Parsed {
    stamp: (SystemTime, u64),
    value: Value,
}

/// Reads runtime state below one root; caches the large index files.
pub struct RuntimeState {
    root: PathBuf,
    parsed: HashMap<PathBuf, Parsed>,
}

impl RuntimeState {
    /// Runtime state below `root` (`/` on the host).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            parsed: HashMap::new(),
        }
    }

    /// What the runtimes' files say of container `id` (64 hex digits;
    /// anything else is looked up nowhere).
    pub fn lookup(&mut self, id: &str) -> ContainerMeta {
        let mut meta = ContainerMeta::default();
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return meta;
        }
        for bundle in self.bundle_configs(id) {
            if let Some(v) = read_json(&bundle, MAX_CONFIG_BYTES) {
                meta.fill(from_oci_annotations(&v["annotations"]));
                break;
            }
        }
        if !meta.complete() {
            for storage in ["run/containers/storage", "var/lib/containers/storage"] {
                let m = self.read_containers_storage(storage, id);
                if !m.is_empty() {
                    meta.fill(m);
                    break;
                }
            }
        }
        if !meta.complete() {
            meta.fill(self.read_docker(id));
        }
        meta
    }

    /// Candidate OCI bundle `config.json` files of `id`, most likely first.
    fn bundle_configs(&self, id: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let tasks = self
            .root
            .join("run/containerd/io.containerd.runtime.v2.task");
        if let Ok(rd) = std::fs::read_dir(&tasks) {
            for ns in rd.flatten().take(MAX_NAMESPACES) {
                out.push(ns.path().join(id).join("config.json"));
            }
        }
        for storage in ["run/containers/storage", "var/lib/containers/storage"] {
            out.push(
                self.root
                    .join(storage)
                    .join("overlay-containers")
                    .join(id)
                    .join("userdata/config.json"),
            );
        }
        out
    }

    fn read_containers_storage(&mut self, storage: &str, id: &str) -> ContainerMeta {
        let base = self.root.join(storage);
        let mut meta = ContainerMeta::default();
        let containers = base.join("overlay-containers/containers.json");
        let Some(entry) = self
            .index(&containers)
            .and_then(|v| v.as_array())
            .and_then(|a| a.iter().find(|c| c["id"] == id))
            .cloned()
        else {
            return meta;
        };
        // Podman's and CRI-O's own record, a JSON string.
        let md: Value = entry["metadata"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        // CRI-O: the Kubernetes container name and the pod's namespace;
        // podman: the container's name.
        meta.name = text(&md["metadata-name"])
            .or_else(|| text(&md["name"]))
            .or_else(|| entry["names"].get(0).and_then(text));
        meta.pod_namespace = text(&md["namespace"]);
        meta.image = text(&md["image-name"]);
        let image_id = text(&entry["image"]).or_else(|| text(&md["image-id"]));
        if let Some(image_id) = image_id {
            let images = base.join("overlay-images/images.json");
            if let Some(img) = self
                .index(&images)
                .and_then(|v| v.as_array())
                .and_then(|a| a.iter().find(|i| i["id"] == image_id.as_str()))
            {
                meta.image_digest = text(&img["digest"]).filter(|d| is_digest(d));
                if meta.image.is_none() {
                    meta.image = img["names"].get(0).and_then(text);
                }
            }
        }
        meta
    }

    fn read_docker(&mut self, id: &str) -> ContainerMeta {
        let mut meta = ContainerMeta::default();
        let cfg = self
            .root
            .join("var/lib/docker/containers")
            .join(id)
            .join("config.v2.json");
        let Some(v) = read_json(&cfg, MAX_CONFIG_BYTES) else {
            return meta;
        };
        let labels = &v["Config"]["Labels"];
        meta.pod_name = text(&labels["io.kubernetes.pod.name"]);
        meta.pod_namespace = text(&labels["io.kubernetes.pod.namespace"]);
        meta.name = text(&labels["io.kubernetes.container.name"])
            .or_else(|| text(&v["Name"]).map(|n| n.trim_start_matches('/').to_string()));
        meta.image = text(&v["Config"]["Image"]);
        // A directory name, never a path: the file is the runtime's, not ours.
        let driver = text(&v["Driver"])
            .filter(|d| {
                d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
            .unwrap_or_else(|| "overlay2".into());
        if let Some(image_id) = text(&v["Image"]) {
            let repos = self
                .root
                .join("var/lib/docker/image")
                .join(driver)
                .join("repositories.json");
            meta.image_digest = self.index(&repos).and_then(|r| {
                r["Repositories"].as_object()?.values().find_map(|refs| {
                    refs.as_object()?.iter().find_map(|(name, target)| {
                        let (_, digest) = name.split_once('@')?;
                        (target == image_id.as_str() && is_digest(digest))
                            .then(|| digest.to_string())
                    })
                })
            });
        }
        meta
    }

    /// A large index file, parsed again only when it changed.
    fn index(&mut self, path: &Path) -> Option<&Value> {
        let md = std::fs::metadata(path).ok()?;
        let stamp = (md.modified().ok()?, md.len());
        let stale = self.parsed.get(path).is_none_or(|p| p.stamp != stamp);
        if stale {
            let value = read_json(path, MAX_INDEX_BYTES)?;
            if self.parsed.len() >= 16 {
                self.parsed.clear();
            }
            self.parsed
                .insert(path.to_path_buf(), Parsed { stamp, value });
        }
        self.parsed.get(path).map(|p| &p.value)
    }
}

/// The Kubernetes identity and image in an OCI spec's annotations.
fn from_oci_annotations(a: &Value) -> ContainerMeta {
    let first = |keys: &[&str]| keys.iter().find_map(|k| text(&a[*k]));
    ContainerMeta {
        name: first(&[
            "io.kubernetes.cri.container-name",
            "io.kubernetes.container.name",
        ]),
        image: first(&[
            "io.kubernetes.cri.image-name",
            "io.kubernetes.cri-o.ImageName",
        ]),
        image_digest: first(&["io.kubernetes.cri-o.ImageRef"]).and_then(|r| digest_of_ref(&r)),
        pod_name: first(&["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
        pod_namespace: first(&[
            "io.kubernetes.cri.sandbox-namespace",
            "io.kubernetes.pod.namespace",
        ]),
    }
}

/// `sha256:<hex>` from an image reference (`name@sha256:…`, or the digest
/// or a bare 64-hex image id).
fn digest_of_ref(r: &str) -> Option<String> {
    let d = r.rsplit_once('@').map_or(r, |(_, d)| d);
    if is_digest(d) {
        Some(d.to_string())
    } else if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(format!("sha256:{d}"))
    } else {
        None
    }
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A non-empty string, bounded to 256 bytes.
fn text(v: &Value) -> Option<String> {
    let s = v.as_str()?.trim();
    if s.is_empty() {
        return None;
    }
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(s[..end].to_string())
}

/// A JSON file of at most `max` bytes (opened without following a final
/// symlink), or `None`.
fn read_json(path: &Path, max: u64) -> Option<Value> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::new();
    f.take(max + 1).read_to_end(&mut buf).ok()?;
    if buf.len() as u64 > max {
        tracing::debug!(path = %path.display(), "runtime state file too large, skipped");
        return None;
    }
    serde_json::from_slice(&buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const IMG: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
    const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn put(root: &Path, rel: &str, v: &Value) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, serde_json::to_vec(v).unwrap()).unwrap();
    }

    #[test]
    fn containerd_cri_annotations() {
        let t = tempfile::tempdir().unwrap();
        put(
            t.path(),
            &format!("run/containerd/io.containerd.runtime.v2.task/k8s.io/{ID}/config.json"),
            &serde_json::json!({"annotations": {
                "io.kubernetes.cri.container-type": "container",
                "io.kubernetes.cri.container-name": "web",
                "io.kubernetes.cri.image-name": "registry.example/shop/web:2.1",
                "io.kubernetes.cri.sandbox-name": "web-7d9c-xk2p",
                "io.kubernetes.cri.sandbox-namespace": "shop"
            }}),
        );
        let m = RuntimeState::new(t.path()).lookup(ID);
        assert_eq!(m.name.as_deref(), Some("web"));
        assert_eq!(m.image.as_deref(), Some("registry.example/shop/web:2.1"));
        assert_eq!(m.pod_name.as_deref(), Some("web-7d9c-xk2p"));
        assert_eq!(m.pod_namespace.as_deref(), Some("shop"));
        assert_eq!(m.image_digest, None);
    }

    #[test]
    fn crio_annotations_and_storage() {
        let t = tempfile::tempdir().unwrap();
        put(
            t.path(),
            &format!("run/containers/storage/overlay-containers/{ID}/userdata/config.json"),
            &serde_json::json!({"annotations": {
                "io.kubernetes.pod.name": "api-0",
                "io.kubernetes.pod.namespace": "prod",
                "io.kubernetes.container.name": "api",
                "io.kubernetes.cri-o.ImageName": "quay.example/api:1",
                "io.kubernetes.cri-o.ImageRef": IMG
            }}),
        );
        let m = RuntimeState::new(t.path()).lookup(ID);
        assert_eq!(m.name.as_deref(), Some("api"));
        assert_eq!(m.pod_name.as_deref(), Some("api-0"));
        assert_eq!(m.pod_namespace.as_deref(), Some("prod"));
        assert_eq!(m.image.as_deref(), Some("quay.example/api:1"));
        assert_eq!(m.image_digest, Some(format!("sha256:{IMG}")));
    }

    #[test]
    fn podman_from_containers_storage() {
        let t = tempfile::tempdir().unwrap();
        let md = serde_json::json!({"image-name": "localhost/app:latest", "image-id": IMG, "name": "app1", "created-at": 1});
        put(
            t.path(),
            "var/lib/containers/storage/overlay-containers/containers.json",
            &serde_json::json!([
                {"id": "1".repeat(64), "names": ["other"], "image": IMG},
                {"id": ID, "names": ["app1"], "image": IMG, "metadata": md.to_string()}
            ]),
        );
        put(
            t.path(),
            "var/lib/containers/storage/overlay-images/images.json",
            &serde_json::json!([{"id": IMG, "digest": DIGEST, "names": ["localhost/app:latest"]}]),
        );
        let mut st = RuntimeState::new(t.path());
        let m = st.lookup(ID);
        assert_eq!(m.name.as_deref(), Some("app1"));
        assert_eq!(m.image.as_deref(), Some("localhost/app:latest"));
        assert_eq!(m.image_digest.as_deref(), Some(DIGEST));
        assert_eq!(m.pod_name, None);
        // An unknown container: nothing, and no error.
        assert!(st.lookup(&"2".repeat(64)).is_empty());
    }

    #[test]
    fn docker_config_and_repo_digest() {
        let t = tempfile::tempdir().unwrap();
        put(
            t.path(),
            &format!("var/lib/docker/containers/{ID}/config.v2.json"),
            &serde_json::json!({"ID": ID, "Name": "/nginx-1", "Image": format!("sha256:{IMG}"),
                "Driver": "overlay2", "Config": {"Image": "nginx:1.27", "Labels": {}}}),
        );
        put(
            t.path(),
            "var/lib/docker/image/overlay2/repositories.json",
            &serde_json::json!({"Repositories": {"nginx": {
                "nginx:1.27": format!("sha256:{IMG}"),
                format!("nginx@{DIGEST}"): format!("sha256:{IMG}")
            }}}),
        );
        let m = RuntimeState::new(t.path()).lookup(ID);
        assert_eq!(m.name.as_deref(), Some("nginx-1"));
        assert_eq!(m.image.as_deref(), Some("nginx:1.27"));
        assert_eq!(m.image_digest.as_deref(), Some(DIGEST));
    }

    #[test]
    fn hostile_state_is_ignored() {
        let t = tempfile::tempdir().unwrap();
        // Not JSON, a symlink, and an id that is no id.
        let p = t.path().join(format!(
            "run/containers/storage/overlay-containers/{ID}/userdata/config.json"
        ));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        let docker = t.path().join(format!("var/lib/docker/containers/{ID}"));
        std::fs::create_dir_all(&docker).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", docker.join("config.v2.json")).unwrap();
        let mut st = RuntimeState::new(t.path());
        assert!(st.lookup(ID).is_empty());
        assert!(st.lookup("../../etc").is_empty());
        // A huge string is cut, not kept whole.
        let id2 = "3".repeat(64);
        put(
            t.path(),
            &format!("var/lib/docker/containers/{id2}/config.v2.json"),
            &serde_json::json!({"Name": "x".repeat(10_000)}),
        );
        assert_eq!(st.lookup(&id2).name.map(|n| n.len()), Some(256));
    }
}
