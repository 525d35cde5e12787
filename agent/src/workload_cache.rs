//! cgroup id -> workload identity, bounded.
//!
//! A process's workload is read from /proc/PID/cgroup the first time its
//! cgroup is seen; when the process is already gone, the cgroup v2 directory
//! whose inode number is the cgroup id is looked up instead. A container's
//! name, image and pod come from its runtime's state
//! ([`crate::container_meta`]), read once per container id.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::container_meta::{ContainerMeta, RuntimeState};
use crate::model::workload::Workload;

/// Bounded cache of workloads by cgroup id; identical workloads share one
/// allocation.
pub struct WorkloadCache {
    by_cgroup: HashMap<u64, Arc<Workload>, foldhash::fast::RandomState>,
    interned: HashMap<Workload, Arc<Workload>>,
    cap: usize,
    cgroup2_root: Option<PathBuf>,
    host: Arc<Workload>,
    runtime: Option<RuntimeState>,
    /// Container id -> what its runtime's state says (also when nothing:
    /// a container is looked up once).
    meta: HashMap<String, ContainerMeta>,
}

impl WorkloadCache {
    /// A cache holding at most `cap` cgroups (cleared when full).
    pub fn new(cap: usize) -> Self {
        Self {
            by_cgroup: HashMap::default(),
            interned: HashMap::new(),
            cap: cap.max(16),
            cgroup2_root: find_cgroup2_root(),
            host: Arc::new(Workload::from_cgroup_path("/")),
            runtime: None,
            meta: HashMap::new(),
        }
    }

    /// Also names containers from the runtimes' state below `root` (`/` on
    /// the host and in the DaemonSet, which mounts them at their host paths).
    pub fn with_runtime_state(mut self, root: impl Into<PathBuf>) -> Self {
        self.runtime = Some(RuntimeState::new(root));
        self
    }

    /// A shared handle for `w`.
    pub fn intern(&mut self, w: Workload) -> Arc<Workload> {
        if let Some(a) = self.interned.get(&w) {
            return a.clone();
        }
        if self.interned.len() >= self.cap {
            self.interned.clear();
        }
        let a = Arc::new(w.clone());
        self.interned.insert(w, a.clone());
        a
    }

    /// The workload of `pid`, whose cgroup v2 id is `cgroup_id`.
    pub fn resolve(&mut self, pid: u32, cgroup_id: u64) -> Arc<Workload> {
        if let Some(w) = self.by_cgroup.get(&cgroup_id) {
            return w.clone();
        }
        let w = match Workload::read_for_pid(pid) {
            Ok(w) => w,
            Err(_) => match self.path_of_cgroup(cgroup_id) {
                Some(p) => Workload::from_cgroup_path(&p),
                None => return self.host.clone(),
            },
        };
        let w = self.named(w);
        let w = self.intern(w);
        if self.by_cgroup.len() >= self.cap {
            self.by_cgroup.clear();
        }
        self.by_cgroup.insert(cgroup_id, w.clone());
        w
    }

    /// `w` with its container's name, image and pod, when it is a container
    /// and the runtime's state says.
    fn named(&mut self, w: Workload) -> Workload {
        let (Some(rt), Some(id)) = (self.runtime.as_mut(), w.container_id.as_deref()) else {
            return w;
        };
        let m = match self.meta.get(id) {
            Some(m) => m.clone(),
            None => {
                let m = rt.lookup(id);
                if self.meta.len() >= self.cap {
                    self.meta.clear();
                }
                self.meta.insert(id.to_string(), m.clone());
                m
            }
        };
        m.apply_to(w)
    }

    /// Finds the cgroup v2 directory whose inode is `id` (bounded walk).
    fn path_of_cgroup(&self, id: u64) -> Option<String> {
        let root = self.cgroup2_root.as_ref()?;
        let mut stack = vec![(root.clone(), 0u32)];
        let mut visited = 0;
        while let Some((dir, depth)) = stack.pop() {
            visited += 1;
            if visited > 20_000 {
                return None;
            }
            let Ok(md) = std::fs::metadata(&dir) else {
                continue;
            };
            if md.ino() == id {
                let rel = dir.strip_prefix(root).ok()?;
                return Some(format!("/{}", rel.display()));
            }
            if depth >= 16 {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
        None
    }
}

/// The cgroup2 mount point: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub(crate) fn find_cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_src, dst, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dst))
        })
        .find(|p| Path::new(p).is_dir())
}
