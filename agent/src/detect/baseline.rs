//! The learned per-workload baseline: which parent starts which child (with
//! which command-line shape), and which behaviour findings are normal there.
//!
//! Learned during a window (`learn` in the config / `--learn DURATION`),
//! persisted as JSON (the file is the export/import format), bounded per
//! workload and in number of workloads; what does not fit is counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Most entries kept per workload.
pub const MAX_ENTRIES_PER_WORKLOAD: usize = 20_000;
/// Most workloads kept.
pub const MAX_WORKLOADS: usize = 4_096;
/// Command-line shapes a parent must have started one child program with
/// while learning for that pair to be known whatever its command line
/// (see [`Baseline::knows_edge`]).
pub const VARIED_SHAPES: usize = 4;

/// On-disk format (version 1).
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct BaselineFile {
    version: u32,
    /// workload key -> learned keys.
    workloads: BTreeMap<String, BTreeSet<String>>,
}

/// The baseline.
#[derive(Debug)]
pub struct Baseline {
    learned: BTreeMap<String, BTreeSet<String>>,
    learning_until: Option<Instant>,
    dropped: u64,
    dirty: bool,
}

impl Baseline {
    /// An empty baseline, learning until `learning_until` (None: not learning).
    pub fn new(learning_until: Option<Instant>) -> Self {
        Self {
            learned: BTreeMap::new(),
            learning_until,
            dropped: 0,
            dirty: false,
        }
    }

    /// Loads a baseline file (export of an earlier run), keeping
    /// `learning_until`.
    pub fn load(path: &Path, learning_until: Option<Instant>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading baseline {}", path.display()))?;
        let f: BaselineFile = serde_json::from_str(&text)
            .with_context(|| format!("parsing baseline {}", path.display()))?;
        anyhow::ensure!(
            f.version == 1,
            "baseline {} has version {}, this agent reads version 1",
            path.display(),
            f.version
        );
        let mut b = Self::new(learning_until);
        for (w, keys) in f.workloads {
            for k in keys {
                b.insert(&w, k);
            }
        }
        b.dirty = false;
        Ok(b)
    }

    /// Writes the baseline atomically (temp file + rename).
    pub fn save(&mut self, path: &Path) -> anyhow::Result<()> {
        let f = BaselineFile {
            version: 1,
            workloads: self.learned.clone(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            vigil_bundle::private::create_missing_dirs(dir)?;
        }
        // 0600, via NAME.tmp.
        vigil_bundle::private::write_atomic(path, &serde_json::to_vec_pretty(&f)?)
            .with_context(|| format!("writing {}", path.display()))?;
        self.dirty = false;
        Ok(())
    }

    /// True while the learning window is open.
    pub fn is_learning(&self, now: Instant) -> bool {
        self.learning_until.is_some_and(|t| now < t)
    }

    /// Closes the learning window now.
    pub fn stop_learning(&mut self) {
        self.learning_until = None;
    }

    /// Records `key` as normal for `workload`.
    pub fn learn(&mut self, workload: &str, key: String) {
        self.insert(workload, key);
    }

    fn insert(&mut self, workload: &str, key: String) {
        if !self.learned.contains_key(workload) && self.learned.len() >= MAX_WORKLOADS {
            self.dropped += 1;
            return;
        }
        let set = self.learned.entry(workload.to_string()).or_default();
        if set.len() >= MAX_ENTRIES_PER_WORKLOAD {
            if !set.contains(&key) {
                self.dropped += 1;
            }
            return;
        }
        if set.insert(key) {
            self.dirty = true;
        }
    }

    /// Whether `key` was learned as normal for `workload`.
    pub fn knows(&self, workload: &str, key: &str) -> bool {
        self.learned.get(workload).is_some_and(|s| s.contains(key))
    }

    /// Whether the exec edge `edge` (`PARENT>CHILD|ARGV`, shapes) is normal
    /// for `workload`: learned as it is, or, when `by_program()` (asked
    /// only then), its parent
    /// started this child program with at least [`VARIED_SHAPES`]
    /// different command lines while learning. A build's compiler run on
    /// each source file, a test runner on each test: what varied while
    /// learning is learned at the level of the two programs, so a new
    /// source file is more of the same, while a pair seen with one command
    /// line (a web server's one `convert` call) keeps its exact shape.
    pub fn knows_edge(
        &self,
        workload: &str,
        edge: &str,
        by_program: impl FnOnce() -> bool,
    ) -> bool {
        let Some(set) = self.learned.get(workload) else {
            return false;
        };
        if set.contains(edge) {
            return true;
        }
        if !by_program() {
            return false;
        }
        let Some((pair, _)) = edge.split_once('|') else {
            return false;
        };
        let prefix = format!("{pair}|");
        set.range(prefix.clone()..)
            .take_while(|k| k.starts_with(&prefix))
            .take(VARIED_SHAPES)
            .count()
            >= VARIED_SHAPES
    }

    /// Entries that did not fit.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Total learned entries.
    pub fn len(&self) -> usize {
        self.learned.values().map(|s| s.len()).sum()
    }

    /// True when nothing was learned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changed since the last save.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn learn_save_load() {
        let mut b = Baseline::new(Some(Instant::now() + Duration::from_secs(60)));
        assert!(b.is_learning(Instant::now()));
        b.learn("host", "a>b|x".into());
        assert!(b.knows("host", "a>b|x"));
        assert!(!b.knows("container:abc", "a>b|x"), "per workload");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        b.save(&p).unwrap();
        let c = Baseline::load(&p, None).unwrap();
        assert!(c.knows("host", "a>b|x"));
        assert!(!c.is_learning(Instant::now()));
        std::fs::write(&p, "{\"version\": 9, \"workloads\": {}}").unwrap();
        assert!(Baseline::load(&p, None).is_err());
        std::fs::write(&p, "garbage").unwrap();
        assert!(Baseline::load(&p, None).is_err());
    }

    #[test]
    fn an_edge_whose_command_line_varied_while_learning_is_known_by_its_programs() {
        let mut b = Baseline::new(None);
        for f in ["main", "util", "parse", "scan"] {
            b.learn("w", format!("/usr/bin/make>/usr/bin/cc|cc -c {f}.c"));
        }
        b.learn(
            "w",
            "/srv/app>/usr/bin/convert|convert in.png out.jpg".into(),
        );
        b.learn("w", "/usr/bin/make>/usr/bin/ccache|ccache -s".into());
        let new_file = "/usr/bin/make>/usr/bin/cc|cc -c lexer.c";
        assert!(b.knows_edge("w", new_file, || true));
        assert!(
            !b.knows_edge("w", new_file, || false),
            "not for programs whose arguments are the behaviour"
        );
        assert!(!b.knows_edge("other", new_file, || true), "per workload");
        // Seen with one command line: exact.
        assert!(!b.knows_edge("w", "/srv/app>/usr/bin/convert|convert x y z", || true));
        assert!(b.knows_edge(
            "w",
            "/srv/app>/usr/bin/convert|convert in.png out.jpg",
            || true
        ));
        // Three shapes are not enough; a prefix of another program is not
        // it.
        b.learn("w", "/usr/bin/make>/usr/bin/ccache|ccache -z".into());
        b.learn("w", "/usr/bin/make>/usr/bin/ccache|ccache -C".into());
        assert!(!b.knows_edge("w", "/usr/bin/make>/usr/bin/ccache|ccache -M N", || true));
        assert!(!b.knows_edge("w", "/usr/bin/make>/usr/bin/c|c -c lexer.c", || true));
    }

    #[test]
    fn bounded() {
        let mut b = Baseline::new(None);
        for i in 0..MAX_ENTRIES_PER_WORKLOAD + 10 {
            b.learn("w", format!("k{i}"));
        }
        assert_eq!(b.len(), MAX_ENTRIES_PER_WORKLOAD);
        assert_eq!(b.dropped(), 10);
    }
}
