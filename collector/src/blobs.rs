//! Evidence blobs on disk, content-addressed by SHA-256.
//!
//! ```text
//! DATA/blobs/sha256/ab/cdef...   complete, verified bundles (read-only)
//! DATA/partial/<id>.part          bytes received so far of an upload
//! DATA/partial/<id>.meta          its declared size, uploader and label
//! ```
//!
//! Invariants: a file appears under `blobs/` only by a rename of a fsynced
//! partial file whose SHA-256 equals its id, so a reader never sees a
//! partial or corrupt blob, whatever crashes when; partial files survive
//! restarts so uploads resume; every path is built from a [`BundleId`],
//! which is 64 lowercase hex digits and nothing else, so no name can escape
//! the data directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A validated bundle id: the lowercase hex SHA-256 of the bundle.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleId(String);

impl BundleId {
    /// Accepts exactly 64 lowercase hex digits.
    pub fn parse(s: &str) -> Result<BundleId, UploadError> {
        if vigil_proto::is_valid_bundle_id(s) {
            Ok(BundleId(s.to_string()))
        } else {
            Err(UploadError::InvalidId(s.chars().take(80).collect()))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BundleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an upload step failed. Each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Not 64 lowercase hex digits.
    #[error("invalid bundle id {0:?}: expected 64 lowercase hex digits (SHA-256)")]
    InvalidId(String),
    /// The declared size is over the limit.
    #[error("bundle of {size} bytes is over the collector's limit of {limit} bytes")]
    TooLarge {
        /// Declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The request contradicts itself or the upload in progress.
    #[error("{0}")]
    Invalid(String),
    /// A chunk starts after what the collector holds.
    #[error("chunk at offset {offset} but the collector holds {held} bytes of this bundle: resume at {held}")]
    Gap {
        /// The chunk's offset.
        offset: u64,
        /// Bytes held.
        held: u64,
    },
    /// Another agent started this upload.
    #[error("upload of this bundle was started by another agent")]
    OtherUploader,
    /// Too many partial uploads are kept already.
    #[error(
        "too many unfinished uploads ({0}, collector-wide limit); finish or abandon some first"
    )]
    TooManyPartials(usize),
    /// This agent keeps too many partial uploads already.
    #[error("agent {agent:?} has {count} unfinished uploads (per-agent limit); finish or abandon some first")]
    TooManyAgentPartials {
        /// The agent.
        agent: String,
        /// Its unfinished uploads.
        count: usize,
    },
    /// The bytes do not hash to the id; the upload was discarded.
    #[error("bundle hash mismatch: received {size} bytes hashing to {actual}, expected {expected}; upload discarded")]
    HashMismatch {
        /// The id.
        expected: String,
        /// What the bytes hash to.
        actual: String,
        /// Bytes received.
        size: u64,
    },
    /// A resumed upload does not hash to its id: the prefix held on disk
    /// may be at fault, so it was discarded and the upload starts over.
    #[error("the resumed upload (from byte {resumed_at}) does not hash to its id: the collector's copy was discarded, upload the bundle again from offset 0")]
    ResumeMismatch {
        /// Where this upload resumed.
        resumed_at: u64,
    },
    /// The bytes hash to the id but are not a well-formed bundle (its
    /// manifest does not match its artifacts); the upload was discarded.
    #[error("bundle refused: {0}; upload discarded")]
    BadBundle(String),
    /// The bundle's origin does not hold (signature, agent id); the upload
    /// was discarded.
    #[error("bundle refused: {0}; upload discarded")]
    Origin(String),
    /// Disk trouble.
    #[error("storage error: {0}")]
    Io(#[from] io::Error),
}

impl UploadError {
    /// The refusal label counted in metrics when this error protects the
    /// collector's resources (`agent_partials`, `partials`), else `None`.
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            UploadError::TooManyPartials(_) => Some("partials"),
            UploadError::TooManyAgentPartials { .. } => Some("agent_partials"),
            _ => None,
        }
    }
}

/// How many unfinished uploads may be kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialLimits {
    /// Over all agents.
    pub total: usize,
    /// For one agent.
    pub per_agent: usize,
}

impl PartialLimits {
    /// The same limit collector-wide and per agent.
    pub fn flat(n: usize) -> PartialLimits {
        PartialLimits {
            total: n,
            per_agent: n,
        }
    }
}

/// Sidecar of a partial upload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartialMeta {
    /// Declared size of the whole bundle.
    pub total_size: u64,
    /// Name of the agent that started the upload.
    pub agent: String,
    /// Free-form label from the first chunk.
    #[serde(default)]
    pub label: String,
    /// Bytes of the partial file known to be on disk (fsynced before this
    /// sidecar said so): what a resume may build on after a power cut.
    /// `None` in sidecars of collectors before 0.3, which fsynced at every
    /// suspension: the file's length counts then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<u64>,
}

/// What the collector holds of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Nothing.
    Absent,
    /// Part of it: `received` of `meta.total_size` bytes.
    Partial {
        /// Bytes held.
        received: u64,
        /// The upload's sidecar.
        meta: PartialMeta,
    },
    /// All of it, verified.
    Complete {
        /// Size in bytes.
        size: u64,
    },
}

/// The on-disk blob store of one data directory.
#[derive(Debug)]
pub struct BlobStore {
    blobs: PathBuf,
    partial: PathBuf,
}

impl BlobStore {
    /// Opens (creating when missing) the blob directories under `data_dir`.
    pub fn open(data_dir: &Path) -> io::Result<BlobStore> {
        let blobs = data_dir.join("blobs").join("sha256");
        let partial = data_dir.join("partial");
        for d in [&blobs, &partial] {
            vigil_bundle::private::secure_dir(d)?;
        }
        Ok(BlobStore { blobs, partial })
    }

    /// Where a complete blob lives: `blobs/sha256/ab/cdef...`.
    pub fn blob_path(&self, id: &BundleId) -> PathBuf {
        self.blobs.join(&id.0[..2]).join(&id.0[2..])
    }

    fn part_path(&self, id: &BundleId) -> PathBuf {
        self.partial.join(format!("{}.part", id.0))
    }

    fn meta_path(&self, id: &BundleId) -> PathBuf {
        self.partial.join(format!("{}.meta", id.0))
    }

    /// What the collector holds of `id`.
    pub fn state(&self, id: &BundleId) -> io::Result<BlobState> {
        match fs::metadata(self.blob_path(id)) {
            Ok(m) => return Ok(BlobState::Complete { size: m.len() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let Some(meta) = self.read_meta(id)? else {
            return Ok(BlobState::Absent);
        };
        let len = match fs::metadata(self.part_path(id)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        // Only what was fsynced counts: bytes past it may be torn (a power
        // cut), and a resume must never build on them.
        let received = meta.durable.map_or(len, |d| d.min(len));
        Ok(BlobState::Partial { received, meta })
    }

    fn read_meta(&self, id: &BundleId) -> io::Result<Option<PartialMeta>> {
        match fs::read(self.meta_path(id)) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(m) => Ok(Some(m)),
                Err(e) => {
                    // A torn sidecar (crash while writing it): start over.
                    tracing::warn!(bundle = %id, error = %e, "discarding unreadable partial upload");
                    self.discard(id);
                    Ok(None)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Number of unfinished uploads on disk.
    pub fn partial_count(&self) -> io::Result<usize> {
        Ok(self.partial_ids()?.len())
    }

    /// The ids of the unfinished uploads on disk.
    fn partial_ids(&self) -> io::Result<Vec<BundleId>> {
        Ok(fs::read_dir(&self.partial)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "meta"))
            .filter_map(|p| BundleId::parse(p.file_stem()?.to_str()?).ok())
            .collect())
    }

    /// Unfinished uploads on disk: (all, those started by `agent`). Reads
    /// each sidecar: bounded by the collector-wide limit.
    pub fn partial_counts(&self, agent: &str) -> io::Result<(usize, usize)> {
        let ids = self.partial_ids()?;
        let mut mine = 0;
        for id in &ids {
            if self.read_meta(id)?.is_some_and(|m| m.agent == agent) {
                mine += 1;
            }
        }
        Ok((ids.len(), mine))
    }

    /// Starts or resumes an upload at `offset` (which must not be past what
    /// is held; an earlier offset drops the bytes after it). The prefix held
    /// on disk is re-hashed so the final check covers every byte.
    pub fn begin(
        &self,
        id: &BundleId,
        meta: PartialMeta,
        offset: u64,
        max_partials: PartialLimits,
    ) -> Result<Upload, UploadError> {
        let (held, existing) = match self.state(id)? {
            BlobState::Complete { .. } => {
                return Err(UploadError::Invalid("bundle already stored".into()));
            }
            BlobState::Partial { received, meta } => (received, Some(meta)),
            BlobState::Absent => (0, None),
        };
        match &existing {
            Some(m) if m.agent != meta.agent => return Err(UploadError::OtherUploader),
            Some(m) if m.total_size != meta.total_size => {
                return Err(UploadError::Invalid(format!(
                    "total_size {} differs from the upload in progress ({} bytes)",
                    meta.total_size, m.total_size
                )));
            }
            Some(_) => {}
            None => {
                let (all, mine) = self.partial_counts(&meta.agent)?;
                if mine >= max_partials.per_agent {
                    return Err(UploadError::TooManyAgentPartials {
                        agent: meta.agent.clone(),
                        count: mine,
                    });
                }
                if all >= max_partials.total {
                    return Err(UploadError::TooManyPartials(all));
                }
            }
        }
        if offset > held {
            return Err(UploadError::Gap { offset, held });
        }
        let mut meta = existing.unwrap_or(meta);
        if meta.durable != Some(offset) {
            // Said before the file is cut to `offset`: the sidecar never
            // claims more than the file durably holds.
            meta.durable = Some(offset);
            write_meta(&self.meta_path(id), &meta)?;
            sync_dir(&self.partial)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.part_path(id))?;
        file.set_len(offset)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = offset;
        file.seek(SeekFrom::Start(0))?;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = file.read(&mut buf[..want])?;
            if n == 0 {
                return Err(UploadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "partial file shorter than expected",
                )));
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(Upload {
            id: id.clone(),
            file,
            hasher,
            position: offset,
            resumed_at: offset,
            durable: offset,
            total: meta.total_size,
            sidecar: meta,
            part: self.part_path(id),
            meta: self.meta_path(id),
            dest: self.blob_path(id),
            partial_dir: self.partial.clone(),
        })
    }

    /// Removes an unfinished upload.
    pub fn discard(&self, id: &BundleId) {
        let _ = fs::remove_file(self.part_path(id));
        let _ = fs::remove_file(self.meta_path(id));
    }

    /// Opens a complete blob for reading.
    pub fn open_blob(&self, id: &BundleId) -> io::Result<File> {
        File::open(self.blob_path(id))
    }

    /// Removes unfinished uploads not touched for `age`; returns how many.
    pub fn remove_stale_partials(&self, age: Duration) -> io::Result<usize> {
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&self.partial)? {
            let path = entry?.path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let Ok(id) = BundleId::parse(stem) else {
                continue;
            };
            if path.extension().is_none_or(|x| x != "meta") {
                continue;
            }
            let touched = [self.part_path(&id), path.clone()]
                .iter()
                .filter_map(|p| fs::metadata(p).and_then(|m| m.modified()).ok())
                .max();
            if touched.is_some_and(|t| now.duration_since(t).unwrap_or_default() > age) {
                self.discard(&id);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Total bytes of complete blobs and of partial uploads.
    pub fn disk_usage(&self) -> io::Result<(u64, u64)> {
        fn walk(dir: &Path, total: &mut u64) -> io::Result<()> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                let ft = entry.file_type()?;
                if ft.is_dir() {
                    walk(&entry.path(), total)?;
                } else if ft.is_file() {
                    *total += entry.metadata()?.len();
                }
            }
            Ok(())
        }
        let (mut blobs, mut partial) = (0, 0);
        walk(&self.blobs, &mut blobs)?;
        walk(&self.partial, &mut partial)?;
        Ok((blobs, partial))
    }
}

/// An upload in progress: append with [`Upload::write`], then
/// [`Upload::finish`] (verify and publish) or [`Upload::suspend`] (keep for
/// a later resume).
#[derive(Debug)]
pub struct Upload {
    id: BundleId,
    file: File,
    hasher: Sha256,
    position: u64,
    /// Where this upload started: bytes before it came from disk.
    resumed_at: u64,
    /// Bytes fsynced and recorded in the sidecar.
    durable: u64,
    total: u64,
    sidecar: PartialMeta,
    part: PathBuf,
    meta: PathBuf,
    dest: PathBuf,
    partial_dir: PathBuf,
}

impl Upload {
    /// Bytes held so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Declared size of the bundle.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether every declared byte arrived.
    pub fn is_full(&self) -> bool {
        self.position == self.total
    }

    /// Appends bytes; refuses to go past the declared size.
    pub fn write(&mut self, data: &[u8]) -> Result<(), UploadError> {
        let end = self.position + data.len() as u64;
        if end > self.total {
            return Err(UploadError::Invalid(format!(
                "chunk ends at {end}, past the declared size {}",
                self.total
            )));
        }
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.position = end;
        if self.position - self.durable >= COMMIT_BYTES {
            self.commit()?;
        }
        Ok(())
    }

    /// Makes what arrived durable: fsync the data, then record its length
    /// in the sidecar (a resume after a power cut starts there).
    fn commit(&mut self) -> Result<(), UploadError> {
        self.file.sync_data()?;
        self.sidecar.durable = Some(self.position);
        // No directory fsync: if the rename is lost, the older sidecar
        // claims less, which is still true.
        write_meta(&self.meta, &self.sidecar)?;
        self.durable = self.position;
        Ok(())
    }

    /// Bytes fsynced: what the collector may report as held.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Keeps what arrived for a later resume (fsynced, recorded); returns
    /// the bytes held.
    pub fn suspend(mut self) -> Result<u64, UploadError> {
        if self.position != self.durable {
            self.commit()?;
        }
        Ok(self.durable)
    }

    /// Verifies the hash and publishes the blob: fsync, rename into
    /// `blobs/`, fsync the directories. On a mismatch the upload is
    /// discarded and nothing becomes visible.
    pub fn finish(self) -> Result<u64, UploadError> {
        self.finish_checked(|_| Ok(())).map(|(n, ())| n)
    }

    /// [`Upload::finish`], with `check` run on the complete file (hash
    /// verified) before it is moved into place. A content error
    /// ([`UploadError::BadBundle`]) discards the upload and nothing is
    /// stored; any other error (the collector's own I/O) keeps the upload
    /// for a retry.
    pub fn finish_checked<T>(
        self,
        check: impl FnOnce(&Path) -> Result<T, UploadError>,
    ) -> Result<(u64, T), UploadError> {
        if !self.is_full() {
            return Err(UploadError::Invalid(format!(
                "bundle incomplete: {} of {} bytes",
                self.position, self.total
            )));
        }
        let actual = hex::encode(self.hasher.finalize());
        if actual != self.id.0 {
            let _ = fs::remove_file(&self.part);
            let _ = fs::remove_file(&self.meta);
            if self.resumed_at > 0 {
                // Part of the bytes came from the collector's disk: they
                // may be what is wrong (a torn write). Start over.
                return Err(UploadError::ResumeMismatch {
                    resumed_at: self.resumed_at,
                });
            }
            return Err(UploadError::HashMismatch {
                expected: self.id.0.clone(),
                actual,
                size: self.position,
            });
        }
        self.file.sync_all()?;
        let checked = match check(&self.part) {
            Ok(t) => t,
            Err(e @ (UploadError::BadBundle(_) | UploadError::Origin(_))) => {
                let _ = fs::remove_file(&self.part);
                let _ = fs::remove_file(&self.meta);
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let parent = self.dest.parent().expect("blob paths have a parent");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        fs::rename(&self.part, &self.dest)?;
        // Read-only from now on.
        fs::set_permissions(
            &self.dest,
            std::os::unix::fs::PermissionsExt::from_mode(0o400),
        )?;
        sync_dir(parent)?;
        let _ = fs::remove_file(&self.meta);
        sync_dir(&self.partial_dir)?;
        Ok((self.position, checked))
    }
}

/// Bytes written between two commits of an upload (fsync + sidecar).
pub const COMMIT_BYTES: u64 = 8 << 20;

fn write_meta(path: &Path, meta: &PartialMeta) -> io::Result<()> {
    write_atomic(path, &serde_json::to_vec(meta).map_err(io::Error::other)?)
}

/// Writes a small file atomically: temp file, fsync, rename.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = vigil_bundle::private::replace_new(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_of(data: &[u8]) -> BundleId {
        BundleId::parse(&hex::encode(Sha256::digest(data))).unwrap()
    }

    fn meta(total: usize) -> PartialMeta {
        PartialMeta {
            total_size: total as u64,
            agent: "a1".into(),
            label: String::new(),
            durable: None,
        }
    }

    #[test]
    fn upload_resume_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let id = id_of(&data);
        assert_eq!(store.state(&id).unwrap(), BlobState::Absent);

        let mut up = store
            .begin(&id, meta(data.len()), 0, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[..100_000]).unwrap();
        assert_eq!(up.suspend().unwrap(), 100_000);
        assert!(matches!(
            store.state(&id).unwrap(),
            BlobState::Partial {
                received: 100_000,
                ..
            }
        ));

        // A reopened store (restart) resumes; a gap is refused.
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(matches!(
            store.begin(&id, meta(data.len()), 100_001, PartialLimits::flat(8)),
            Err(UploadError::Gap { held: 100_000, .. })
        ));
        // Resuming earlier than held is allowed (the tail is dropped).
        let mut up = store
            .begin(&id, meta(data.len()), 50_000, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[50_000..]).unwrap();
        assert!(up.is_full());
        up.finish().unwrap();
        assert_eq!(
            store.state(&id).unwrap(),
            BlobState::Complete {
                size: data.len() as u64
            }
        );
        let mut back = Vec::new();
        store
            .open_blob(&id)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        assert_eq!(store.partial_count().unwrap(), 0);
        let path = store.blob_path(&id);
        assert!(path.starts_with(dir.path().join("blobs/sha256")));
        assert_eq!(
            path.parent().unwrap().file_name().unwrap(),
            &id.as_str()[..2]
        );
    }

    #[test]
    fn mismatch_discards_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let id = id_of(b"the real bundle");
        let mut up = store
            .begin(&id, meta(15), 0, PartialLimits::flat(8))
            .unwrap();
        up.write(b"another bundle!").unwrap();
        assert!(matches!(up.finish(), Err(UploadError::HashMismatch { .. })));
        assert_eq!(store.state(&id).unwrap(), BlobState::Absent);
        assert_eq!(store.disk_usage().unwrap(), (0, 0));
    }

    #[test]
    fn only_durable_bytes_are_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = vec![7u8; 1000];
        let id = id_of(&data);
        let mut up = store
            .begin(&id, meta(1000), 0, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[..600]).unwrap();
        assert_eq!(up.durable(), 0);
        // Dropped without a suspension (the process died): written, never
        // fsynced nor recorded, so not held.
        drop(up);
        assert_eq!(fs::metadata(store.part_path(&id)).unwrap().len(), 600);
        assert!(matches!(
            store.state(&id).unwrap(),
            BlobState::Partial { received: 0, .. }
        ));
        let mut up = store
            .begin(&id, meta(1000), 0, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[..400]).unwrap();
        assert_eq!(up.suspend().unwrap(), 400);
        // Garbage after the recorded length (a torn tail) is not held.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store.part_path(&id))
            .unwrap();
        f.write_all(&[1; 300]).unwrap();
        assert!(matches!(
            store.state(&id).unwrap(),
            BlobState::Partial { received: 400, .. }
        ));
        let mut up = store
            .begin(&id, meta(1000), 400, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[400..]).unwrap();
        up.finish().unwrap();
        assert!(matches!(
            store.state(&id).unwrap(),
            BlobState::Complete { size: 1000 }
        ));
    }

    #[test]
    fn a_resume_on_a_corrupt_prefix_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let id = id_of(&data);
        let mut up = store
            .begin(&id, meta(1000), 0, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[..500]).unwrap();
        up.suspend().unwrap();
        let mut held = fs::read(store.part_path(&id)).unwrap();
        held[10] ^= 1;
        fs::write(store.part_path(&id), held).unwrap();
        let mut up = store
            .begin(&id, meta(1000), 500, PartialLimits::flat(8))
            .unwrap();
        up.write(&data[500..]).unwrap();
        assert!(matches!(
            up.finish(),
            Err(UploadError::ResumeMismatch { resumed_at: 500 })
        ));
        assert_eq!(store.state(&id).unwrap(), BlobState::Absent);
    }

    #[test]
    fn limits_and_ownership() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = id_of(b"a");
        let b = id_of(b"b");
        let mut up = store
            .begin(&a, meta(10), 0, PartialLimits::flat(1))
            .unwrap();
        up.write(b"12345").unwrap();
        assert!(matches!(up.write(b"123456"), Err(UploadError::Invalid(_))));
        up.suspend().unwrap();
        assert!(matches!(
            store.begin(&b, meta(10), 0, PartialLimits::flat(1)),
            Err(UploadError::TooManyAgentPartials { count: 1, .. })
        ));
        let second = PartialMeta {
            agent: "a2".into(),
            ..meta(10)
        };
        let room_for_a2 = PartialLimits {
            total: 1,
            per_agent: 8,
        };
        assert!(matches!(
            store.begin(&b, second.clone(), 0, room_for_a2),
            Err(UploadError::TooManyPartials(1))
        ));
        assert_eq!(store.partial_counts("a2").unwrap(), (1, 0));
        assert_eq!(store.partial_counts("a1").unwrap(), (1, 1));
        let other = PartialMeta {
            agent: "intruder".into(),
            ..meta(10)
        };
        assert!(matches!(
            store.begin(&a, other, 0, PartialLimits::flat(8)),
            Err(UploadError::OtherUploader)
        ));
        assert!(matches!(
            store.begin(&a, meta(11), 0, PartialLimits::flat(8)),
            Err(UploadError::Invalid(_))
        ));
        assert_eq!(
            store
                .remove_stale_partials(Duration::from_secs(3600))
                .unwrap(),
            0
        );
        assert_eq!(store.remove_stale_partials(Duration::ZERO).unwrap(), 1);
        assert_eq!(store.state(&a).unwrap(), BlobState::Absent);
    }

    #[test]
    fn ids_cannot_escape() {
        for bad in [
            "../../etc/passwd",
            &format!("../{}", "a".repeat(61)),
            &"A".repeat(64),
            "",
        ] {
            assert!(matches!(
                BundleId::parse(bad),
                Err(UploadError::InvalidId(_))
            ));
        }
    }
}
