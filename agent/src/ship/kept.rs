//! Archives kept on the node after the collector acknowledged them
//! (`keep_shipped_bytes`), bounded: each acknowledged archive gets a mark
//! (`shipped/<id>` in the archive directory), and past the budget the
//! oldest marked archives go, with their signature and receipt sidecars
//! (after the archive, never before it) and their mark. An archive without
//! a mark (not acknowledged yet, never queued) is never touched. A mark
//! whose archive is gone (removed by hand) goes too, so marks stay as
//! bounded as the archives.

use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::receipts;

/// The archive directory's kept, acknowledged archives.
#[derive(Debug)]
pub struct Kept<'a> {
    dir: &'a Path,
    /// Bytes of acknowledged archives to keep; 0: none (each goes as soon
    /// as it is acknowledged).
    keep_bytes: u64,
}

impl<'a> Kept<'a> {
    /// The archives of `dir`, keeping up to `keep_bytes` of acknowledged
    /// ones.
    pub fn new(dir: &'a Path, keep_bytes: u64) -> Kept<'a> {
        Kept { dir, keep_bytes }
    }

    fn archive(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.tar.zst"))
    }

    fn marks(&self) -> PathBuf {
        self.dir.join("shipped")
    }

    /// Bundle `id` was acknowledged: marks its archive (or removes it when
    /// nothing is kept), then removes the oldest marked archives past the
    /// budget. Returns how many archives were removed.
    pub fn acknowledged(&self, id: &str) -> usize {
        if self.keep_bytes == 0 {
            return usize::from(self.remove(id));
        }
        let marks = self.marks();
        let marked = vigil_bundle::private::create_missing_dirs(&marks)
            .and_then(|()| vigil_bundle::private::create_new(&marks.join(id)).map(drop));
        if let Err(e) = marked {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                warn!(bundle = id, error = %e, "could not mark an archive as shipped");
            }
        }
        let Ok(rd) = std::fs::read_dir(&marks) else {
            return 0;
        };
        let mut shipped: Vec<(std::time::SystemTime, u64, String)> = Vec::new();
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !vigil_proto::is_valid_bundle_id(&id) {
                continue;
            }
            match std::fs::metadata(self.archive(&id)) {
                Ok(m) => {
                    let Ok(t) = m.modified() else { continue };
                    shipped.push((t, m.len(), id));
                }
                // Removed by hand: its sidecars and mark go too.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.remove(&id);
                }
                Err(_) => {}
            }
        }
        shipped.sort();
        let mut total: u64 = shipped.iter().map(|(_, n, _)| n).sum();
        let mut removed = 0;
        for (_, n, id) in shipped {
            if total <= self.keep_bytes {
                break;
            }
            if self.remove(&id) {
                removed += 1;
            }
            // Counted as gone even when it could not be removed (or
            // vanished meanwhile): one stuck archive must not take every
            // newer one with it.
            total -= n;
        }
        removed
    }

    /// Removes the archive of `id`, then its sidecars and mark. True when
    /// an archive was removed; an archive that cannot be removed keeps its
    /// sidecars and mark.
    fn remove(&self, id: &str) -> bool {
        let p = self.archive(id);
        let removed = match std::fs::remove_file(&p) {
            Ok(()) => {
                debug!(archive = %p.display(), "shipped archive removed from the node");
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                warn!(archive = %p.display(), error = %e, "could not remove a shipped archive");
                return false;
            }
        };
        for ext in ["sig", "receipt"] {
            let _ = std::fs::remove_file(receipts::sidecar(&p, ext));
        }
        let _ = std::fs::remove_file(self.marks().join(id));
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    /// An archive of `len` bytes with its two sidecars, modified `age`
    /// seconds ago.
    fn archive(dir: &Path, n: u8, len: usize, age: u64) -> PathBuf {
        let p = dir.join(format!("{}.tar.zst", id(n)));
        std::fs::write(&p, vec![n; len]).unwrap();
        for ext in ["sig", "receipt"] {
            std::fs::write(receipts::sidecar(&p, ext), b"x").unwrap();
        }
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(t)
            .unwrap();
        p
    }

    fn gone(p: &Path) -> bool {
        !p.exists()
            && !receipts::sidecar(p, "sig").exists()
            && !receipts::sidecar(p, "receipt").exists()
    }

    #[test]
    fn nothing_kept_removes_each_archive_once_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let a = archive(dir.path(), 1, 10, 0);
        let b = archive(dir.path(), 2, 10, 0);
        let kept = Kept::new(dir.path(), 0);
        assert_eq!(kept.acknowledged(&id(1)), 1);
        assert!(gone(&a));
        assert!(b.exists(), "an archive not acknowledged stays");
        assert_eq!(kept.acknowledged(&id(1)), 0, "already gone");
    }

    #[test]
    fn the_oldest_acknowledged_archives_go_past_the_budget_and_unmarked_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let old = archive(dir.path(), 1, 100, 300);
        let unacked = archive(dir.path(), 2, 100, 400);
        let mid = archive(dir.path(), 3, 100, 200);
        let new = archive(dir.path(), 4, 100, 100);
        let kept = Kept::new(dir.path(), 250);
        assert_eq!(kept.acknowledged(&id(1)), 0);
        assert_eq!(kept.acknowledged(&id(3)), 0);
        assert_eq!(kept.acknowledged(&id(4)), 1, "300 bytes marked, 250 kept");
        assert!(gone(&old), "the oldest acknowledged one went");
        assert!(!dir.path().join("shipped").join(id(1)).exists());
        assert!(mid.exists() && new.exists());
        assert!(
            unacked.exists() && receipts::sidecar(&unacked, "sig").exists(),
            "older, but never acknowledged: untouched"
        );
    }

    #[test]
    fn an_archive_that_cannot_be_removed_does_not_take_newer_ones_with_it() {
        let dir = tempfile::tempdir().unwrap();
        // The oldest "archive" is a directory: removing it as a file fails.
        let stuck = dir.path().join(format!("{}.tar.zst", id(1)));
        std::fs::create_dir(&stuck).unwrap();
        let stuck_len = std::fs::metadata(&stuck).unwrap().len();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(500);
        std::fs::File::open(&stuck)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let a = archive(dir.path(), 2, 100, 200);
        let b = archive(dir.path(), 3, 100, 100);
        let kept = Kept::new(dir.path(), 250);
        kept.acknowledged(&id(2));
        std::fs::create_dir_all(dir.path().join("shipped")).unwrap();
        std::fs::write(dir.path().join("shipped").join(id(1)), b"").unwrap();
        assert!(stuck_len + 200 > 250);
        assert_eq!(kept.acknowledged(&id(3)), 0);
        assert!(stuck.exists());
        assert!(a.exists() && b.exists(), "the newer archives stay");
    }

    #[test]
    fn marks_of_archives_removed_by_hand_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let a = archive(dir.path(), 1, 10, 100);
        let kept = Kept::new(dir.path(), 1 << 20);
        kept.acknowledged(&id(1));
        let mark = dir.path().join("shipped").join(id(1));
        assert!(mark.exists());
        // An operator removes the archive (not its sidecars).
        std::fs::remove_file(&a).unwrap();
        archive(dir.path(), 2, 10, 0);
        assert_eq!(kept.acknowledged(&id(2)), 0);
        assert!(!mark.exists(), "the mark of the removed archive went");
        assert!(gone(&a), "and its sidecars");
        assert!(dir.path().join("shipped").join(id(2)).exists());
    }
}
