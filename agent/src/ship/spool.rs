//! The spool: a bounded on-disk queue of items waiting for the collector.
//!
//! One file per item, named `SEQ.det.pb` (one detection in its wire form,
//! a protobuf `vigil.v1.Detection`) or `SEQ.BUNDLEID.tar.zst` (a sealed
//! evidence archive, hard-linked or copied from the capture directory); SEQ
//! is a zero-padded sequence number, so the directory listing is the
//! delivery order and survives restarts. A spool written before 0.2 holds
//! `SEQ.det.json` (the detection's JSON line): [`Spool::open`] converts each
//! once, in place and in order.
//!
//! Invariants:
//! - Enqueue is atomic: the item is written as `.tmp-SEQ`, synced, then
//!   renamed; a crash leaves either nothing or a whole item (leftover
//!   temporaries are removed at open).
//! - An item leaves the spool only when the shipper removes it, after the
//!   collector acknowledged it (or refused it for good: then it is moved to
//!   `rejected/`, never silently deleted).
//! - Bounded: at most `max_items` items and `max_bytes` bytes. A full spool
//!   refuses the new item (counted in `vigil_spool_dropped_total`); nothing
//!   already queued is ever evicted to make room.
//!
//! Only detections and evidence bundles are spooled: events are shipped
//! best effort from memory (`ship::events`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// What an item is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// One detection, protobuf.
    Detection,
    /// An evidence bundle with its id (SHA-256 of the archive).
    Bundle(String),
}

/// One queued item.
#[derive(Clone, Debug)]
pub struct Item {
    /// Position in the delivery order.
    pub seq: u64,
    /// What it is.
    pub kind: ItemKind,
    /// Its file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Why an item was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool is at its item or byte limit.
    #[error(
        "spool full ({items} items, {bytes} bytes; limits {max_items} items, {max_bytes} bytes)"
    )]
    Full {
        /// Items held.
        items: u64,
        /// Bytes held.
        bytes: u64,
        /// Item limit.
        max_items: u64,
        /// Byte limit.
        max_bytes: u64,
    },
    /// Not a valid bundle id.
    #[error("invalid bundle id {0:?}")]
    InvalidId(String),
    /// A file operation failed.
    #[error("spool I/O: {0}")]
    Io(#[from] std::io::Error),
}

struct State {
    next_seq: u64,
    items: u64,
    bytes: u64,
}

/// The spool directory; shared by the capture worker and the shipper.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    max_items: u64,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

fn parse_name(name: &str) -> Option<(u64, ItemKind)> {
    let (seq, rest) = name.split_once('.')?;
    if seq.len() != 20 {
        return None;
    }
    let seq: u64 = seq.parse().ok()?;
    if rest == "det.pb" {
        return Some((seq, ItemKind::Detection));
    }
    let id = rest.strip_suffix(".tar.zst")?;
    vigil_proto::is_valid_bundle_id(id).then(|| (seq, ItemKind::Bundle(id.to_string())))
}

/// Writes `bytes` to a new private file at `path`, synced.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = vigil_bundle::private::replace_new(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// How much of the spool an item may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Below high: up to 4/5 of the limits.
    Normal,
    /// High and critical detections and their bundles: all of it.
    High,
}

impl Spool {
    /// Opens (creating) the spool directory, removing leftover temporaries
    /// and counting what is queued.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        max_items: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Spool, SpoolError> {
        vigil_bundle::private::secure_dir(dir)?;
        let spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            max_items,
            state: Mutex::new(State {
                next_seq: 0,
                items: 0,
                bytes: 0,
            }),
            metrics,
        };
        let mut legacy = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(seq) = name
                .strip_suffix(".det.json")
                .filter(|s| s.len() == 20)
                .and_then(|s| s.parse::<u64>().ok())
            {
                legacy.push((seq, entry.path()));
            }
        }
        // New items come after every old one, converted or not.
        let after_legacy = legacy.iter().map(|(seq, _)| seq + 1).max().unwrap_or(0);
        for (seq, path) in legacy {
            // A failure (disk full) keeps the line where it is, for the
            // next start; it does not keep this one from shipping.
            if let Err(e) = spool.upgrade(seq, &path) {
                tracing::warn!(path = %path.display(), error = %e, "a spooled detection from an earlier version could not be converted yet; it stays in the spool");
            }
        }
        let items = spool.list()?;
        {
            let mut st = spool.lock();
            st.next_seq = items.last().map_or(0, |i| i.seq + 1).max(after_legacy);
            st.items = items.len() as u64;
            st.bytes = items.iter().map(|i| i.size).sum();
            spool.publish(&st);
        }
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, st: &State) {
        self.metrics.spool_items.set(st.items as i64);
        self.metrics.spool_bytes.set(st.bytes as i64);
    }

    /// Reserves room and a sequence number for an item of `size` bytes.
    /// Items below high priority may fill only 4/5 of the limits: the rest
    /// is kept for high and critical detections and their bundles.
    fn reserve(&self, size: u64, prio: Priority) -> Result<u64, SpoolError> {
        let mut st = self.lock();
        let (max_items, max_bytes) = match prio {
            Priority::High => (self.max_items, self.max_bytes),
            Priority::Normal => (self.max_items / 5 * 4, self.max_bytes / 5 * 4),
        };
        if st.items + 1 > max_items || st.bytes + size > max_bytes {
            self.metrics.spool_dropped.inc();
            return Err(SpoolError::Full {
                items: st.items,
                bytes: st.bytes,
                max_items: self.max_items,
                max_bytes: self.max_bytes,
            });
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.items += 1;
        st.bytes += size;
        self.publish(&st);
        Ok(seq)
    }

    fn unreserve(&self, size: u64) {
        let mut st = self.lock();
        st.items = st.items.saturating_sub(1);
        st.bytes = st.bytes.saturating_sub(size);
        self.publish(&st);
    }

    fn commit(
        &self,
        seq: u64,
        size: u64,
        name: &str,
        fill: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<PathBuf, SpoolError> {
        let tmp = self.dir.join(format!(".tmp-{seq:020}"));
        let dst = self.dir.join(name);
        let r = fill(&tmp).and_then(|()| fs::rename(&tmp, &dst));
        match r {
            Ok(()) => {
                if let Ok(d) = fs::File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(dst)
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                self.unreserve(size);
                Err(e.into())
            }
        }
    }

    /// Queues one detection (its protobuf encoding).
    pub fn enqueue_detection(&self, wire: &[u8], prio: Priority) -> Result<PathBuf, SpoolError> {
        let size = wire.len() as u64;
        let seq = self.reserve(size, prio)?;
        self.commit(seq, size, &format!("{seq:020}.det.pb"), |tmp| {
            write_synced(tmp, wire)
        })
    }

    /// A detection spooled as a JSON line (before 0.2) rewritten in its
    /// wire form under the same sequence number; one that does not parse
    /// goes to `rejected/` (kept, never deleted).
    fn upgrade(&self, seq: u64, path: &Path) -> Result<(), SpoolError> {
        use prost::Message as _;
        let text = fs::read_to_string(path)?;
        match vigil_proto::Detection::from_agent_json(&text) {
            // Its `json` is the line: the collector stores it as an old
            // agent's.
            Ok(d) => {
                let tmp = self.dir.join(format!(".tmp-{seq:020}"));
                write_synced(&tmp, &d.encode_to_vec())?;
                fs::rename(&tmp, self.dir.join(format!("{seq:020}.det.pb")))?;
                fs::remove_file(path)?;
            }
            Err(e) => {
                let dir = self.dir.join("rejected");
                vigil_bundle::private::secure_dir(&dir)?;
                fs::rename(path, dir.join(path.file_name().unwrap_or_default()))?;
                tracing::warn!(path = %path.display(), error = %e, "a spooled detection from an earlier version does not parse: moved to rejected/");
            }
        }
        Ok(())
    }

    /// Queues a sealed evidence archive (hard link when on the same file
    /// system, else a copy). `id` is its SHA-256.
    pub fn enqueue_bundle(
        &self,
        archive: &Path,
        id: &str,
        prio: Priority,
    ) -> Result<PathBuf, SpoolError> {
        if !vigil_proto::is_valid_bundle_id(id) {
            return Err(SpoolError::InvalidId(id.to_string()));
        }
        let size = fs::metadata(archive)?.len();
        let seq = self.reserve(size, prio)?;
        self.commit(seq, size, &format!("{seq:020}.{id}.tar.zst"), |tmp| {
            // A link shares the archive's inode (0600); a copy is a new
            // 0600 file.
            if fs::hard_link(archive, tmp).is_err() {
                let mut f = vigil_bundle::private::replace_new(tmp)?;
                std::io::copy(&mut fs::File::open(archive)?, &mut f)?;
                f.sync_all()?;
            }
            Ok(())
        })
    }

    /// Stores bundle `id`'s detached signature (`<id>.sig` in the spool,
    /// synced; not an item: it travels with the bundle's upload and leaves
    /// with it).
    pub fn put_signature(&self, id: &str, sig: &[u8]) -> Result<PathBuf, SpoolError> {
        if !vigil_proto::is_valid_bundle_id(id) {
            return Err(SpoolError::InvalidId(id.to_string()));
        }
        let tmp = self.dir.join(format!(".tmp-sig-{id}"));
        let dst = self.dir.join(format!("{id}.sig"));
        let r = write_synced(&tmp, sig).and_then(|()| fs::rename(&tmp, &dst));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r?;
        Ok(dst)
    }

    /// Bundle `id`'s signature, when it has one (bundles spooled by agents
    /// before signatures have none).
    pub fn signature(&self, id: &str) -> Option<Vec<u8>> {
        if !vigil_proto::is_valid_bundle_id(id) {
            return None;
        }
        fs::read(self.dir.join(format!("{id}.sig"))).ok()
    }

    fn signature_path(&self, item: &Item) -> Option<PathBuf> {
        match &item.kind {
            ItemKind::Bundle(id) => Some(self.dir.join(format!("{id}.sig"))),
            ItemKind::Detection => None,
        }
    }

    /// Every queued item, in delivery order.
    pub fn list(&self) -> Result<Vec<Item>, SpoolError> {
        let mut items = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some((seq, kind)) = parse_name(&name.to_string_lossy()) else {
                continue;
            };
            let meta = entry.metadata()?;
            if !meta.is_file() {
                continue;
            }
            items.push(Item {
                seq,
                kind,
                path: entry.path(),
                size: meta.len(),
            });
        }
        items.sort_by_key(|i| i.seq);
        Ok(items)
    }

    /// Removes an acknowledged item.
    pub fn remove(&self, item: &Item) -> Result<(), SpoolError> {
        fs::remove_file(&item.path)?;
        if let Some(sig) = self.signature_path(item) {
            let _ = fs::remove_file(sig);
        }
        self.unreserve(item.size);
        Ok(())
    }

    /// Moves an item the collector refused for good to `rejected/` (kept
    /// for an operator; no longer counted against the limits).
    pub fn reject(&self, item: &Item) -> Result<PathBuf, SpoolError> {
        let dir = self.dir.join("rejected");
        vigil_bundle::private::secure_dir(&dir)?;
        let dst = dir.join(item.path.file_name().unwrap_or_default());
        fs::rename(&item.path, &dst)?;
        if let Some(sig) = self.signature_path(item).filter(|p| p.exists()) {
            let mut name = dst.clone().into_os_string();
            name.push(".sig");
            let _ = fs::rename(sig, name);
        }
        self.unreserve(item.size);
        Ok(dst)
    }

    /// Items and bytes held.
    pub fn usage(&self) -> (u64, u64) {
        let st = self.lock();
        (st.items, st.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_bounded_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let s = Spool::open(d.path(), 1000, 3, m.clone()).unwrap();
        s.enqueue_detection(b"{\"a\":1}", Priority::High).unwrap();
        let arch = d.path().join("x.tar.zst");
        fs::write(&arch, b"bundle").unwrap();
        let id = "ab".repeat(32);
        s.enqueue_bundle(&arch, &id, Priority::High).unwrap();
        s.enqueue_detection(b"{\"a\":2}", Priority::High).unwrap();
        assert!(matches!(
            s.enqueue_detection(b"{\"a\":3}", Priority::High),
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(m.spool_dropped.get(), 1);
        drop(s);
        let s = Spool::open(d.path(), 1000, 10, m.clone()).unwrap();
        let items = s.list().unwrap();
        assert_eq!(items.len(), 3);
        assert_eq!(items[1].kind, ItemKind::Bundle(id));
        assert_eq!(fs::read(&items[1].path).unwrap(), b"bundle");
        assert_eq!(fs::read_to_string(&items[2].path).unwrap(), "{\"a\":2}");
        s.remove(&items[0]).unwrap();
        let p = s.enqueue_detection(b"{\"a\":4}", Priority::High).unwrap();
        assert!(p.to_string_lossy().contains("00000000000000000003.det.pb"));
        assert_eq!(s.usage().0, 3);
        assert_eq!(m.spool_items.get(), 3);
        assert!(s.enqueue_bundle(&arch, "../x", Priority::High).is_err());
    }

    /// A bundle's signature is no item, travels with it and leaves with
    /// it (removed when shipped, set aside when rejected); a bundle of an
    /// older agent has none.
    #[test]
    fn signatures_go_with_their_bundles() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let s = Spool::open(d.path(), 1 << 20, 10, m).unwrap();
        let arch = d.path().join("x.tar.zst");
        fs::write(&arch, b"bundle").unwrap();
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        s.put_signature(&a, b"sig a").unwrap();
        s.enqueue_bundle(&arch, &a, Priority::High).unwrap();
        s.enqueue_bundle(&arch, &b, Priority::High).unwrap();
        assert!(s.put_signature("../x", b"x").is_err());
        let items = s.list().unwrap();
        assert_eq!(items.len(), 2, "a signature is not an item");
        assert_eq!(s.signature(&a).as_deref(), Some(&b"sig a"[..]));
        assert_eq!(s.signature(&b), None);
        s.put_signature(&b, b"sig b").unwrap();
        s.remove(&items[0]).unwrap();
        assert_eq!(s.signature(&a), None);
        let rejected = s.reject(&items[1]).unwrap();
        assert_eq!(s.signature(&b), None);
        let kept = format!("{}.sig", rejected.display());
        assert_eq!(fs::read(kept).unwrap(), b"sig b");
    }

    #[test]
    fn room_is_kept_for_high_priority_items() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        // 10 items: those below high may use 8.
        let s = Spool::open(d.path(), 1 << 20, 10, m.clone()).unwrap();
        for i in 0..8 {
            s.enqueue_detection(format!("{{\"n\":{i}}}").as_bytes(), Priority::Normal)
                .unwrap();
        }
        assert!(matches!(
            s.enqueue_detection(b"{\"n\":8}", Priority::Normal),
            Err(SpoolError::Full { .. })
        ));
        s.enqueue_detection(b"{\"critical\":1}", Priority::High)
            .unwrap();
        s.enqueue_detection(b"{\"critical\":2}", Priority::High)
            .unwrap();
        assert!(s
            .enqueue_detection(b"{\"critical\":3}", Priority::High)
            .is_err());
        assert_eq!(s.usage().0, 10);
    }

    /// A spool written before 0.2 (JSON lines) is converted once at open:
    /// same order, the line kept as the collector's document; a line that
    /// does not parse is set aside in `rejected/`, never deleted.
    #[test]
    fn a_spool_of_json_lines_is_converted_once_at_open() {
        use prost::Message as _;
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let line = r#"{"time":"2026-12-02T10:00:00Z","rule":"reverse_shell","severity":"critical","process":{"pid":7,"exe":"/bin/sh"}}"#;
        fs::write(d.path().join("00000000000000000004.det.json"), line).unwrap();
        fs::write(d.path().join("00000000000000000005.det.json"), "not json").unwrap();
        let arch = d
            .path()
            .join("00000000000000000006.".to_string() + &"cd".repeat(32) + ".tar.zst");
        fs::write(&arch, b"bundle").unwrap();
        let s = Spool::open(d.path(), 1 << 20, 10, m.clone()).unwrap();
        let items = s.list().unwrap();
        assert_eq!(items.len(), 2, "{items:?}");
        assert_eq!((items[0].seq, &items[0].kind), (4, &ItemKind::Detection));
        let det = vigil_proto::Detection::decode(&fs::read(&items[0].path).unwrap()[..]).unwrap();
        assert_eq!(
            (det.rule.as_str(), det.pid, det.json.as_str()),
            ("reverse_shell", 7, line)
        );
        assert_eq!(items[1].seq, 6);
        assert!(d
            .path()
            .join("rejected/00000000000000000005.det.json")
            .exists());
        assert_eq!(s.usage().0, 2);
        // Nothing is left to convert the next time.
        drop(s);
        let s = Spool::open(d.path(), 1 << 20, 10, m).unwrap();
        assert_eq!(s.list().unwrap().len(), 2);
        let p = s.enqueue_detection(b"x", Priority::High).unwrap();
        assert!(p.ends_with("00000000000000000007.det.pb"));
    }

    /// A conversion that fails (here its temporary path is taken by a
    /// directory; on a node, a full disk) keeps the old line, does not
    /// keep the spool from opening, and no new item takes its number.
    #[test]
    fn a_failed_conversion_keeps_the_line_and_its_number() {
        let d = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let line = r#"{"time":"2026-12-02T10:00:00Z","rule":"r","severity":"high"}"#;
        let old = d.path().join("00000000000000000009.det.json");
        fs::write(&old, line).unwrap();
        fs::create_dir(d.path().join(".tmp-00000000000000000009")).unwrap();
        let s = Spool::open(d.path(), 1 << 20, 10, m).unwrap();
        assert!(old.exists());
        let p = s.enqueue_detection(b"x", Priority::High).unwrap();
        assert!(
            p.ends_with("00000000000000000010.det.pb"),
            "{}",
            p.display()
        );
    }
}
