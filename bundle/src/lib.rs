#![deny(missing_docs)]
//! The evidence bundle: a directory of artifacts, a `manifest.json` (sha256
//! and size of every artifact, agent and host identity, times, acquisition
//! method, the detection, and `prev_bundle_sha256` chaining each bundle to
//! the agent's previous one), sealed as `<id>.tar.zst` whose sha256 is `id`.
//!
//! Chain of custody: the chain state (`STATE_DIR/chain.json`: last sequence
//! number and bundle id) is read and advanced under an exclusive `flock`, so
//! concurrent captures (threads or processes) line up. It is written after
//! the archive is renamed into place; an agent that dies in between leaves a
//! bundle whose successor names the same predecessor, which
//! [`verify_chain`] reports as a fork, not a silent gap.
//!
//! In the archive `manifest.json` comes first, then the artifacts in manifest
//! order, with fixed owner, mode and mtime (the capture time), so the same
//! inputs give the same archive.

pub mod private;
pub mod sign;

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sha2::{Digest, Sha256};

/// Manifest format name.
pub const FORMAT: &str = "vigil-evidence/1";
/// The manifest's name in a bundle.
pub const MANIFEST: &str = "manifest.json";
/// A manifest larger than this is refused (it is read whole).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Zero bytes allowed after the archive's end (tar pads to its record size).
pub const MAX_TRAILING_ZEROS: u64 = 64 << 10;
const CHAIN_STATE: &str = "chain.json";
const CHAIN_LOCK: &str = "chain.lock";

/// Where bundles go and who makes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleConfig {
    /// Sealed archives (`<id>.tar.zst`) go here.
    pub out_dir: PathBuf,
    /// The chain state (`chain.json`, `chain.lock`).
    pub state_dir: PathBuf,
    /// This agent's id (in every manifest; the chain is per agent).
    pub agent_id: String,
    /// zstd level (1 fast .. 19 small; the capture default is 1: on process
    /// memory it compresses about as well as 3, twice as fast).
    pub zstd_level: i32,
    /// Keep the bundle directory after sealing (else removed).
    pub keep_dir: bool,
}

/// One file of the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Artifact {
    /// File name in the bundle (no directories).
    pub name: String,
    /// What it is: `core`, `core_report`, `exe`, `context`, ...
    pub kind: String,
    /// sha256, hex.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// Who sealed the bundle, on what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentIdentity {
    /// Agent id.
    pub id: String,
    /// Hostname.
    pub hostname: String,
    /// /proc/sys/kernel/random/boot_id.
    pub boot_id: String,
    /// Kernel release (uname -r).
    pub kernel_release: String,
    /// CPU architecture.
    pub machine: String,
}

impl AgentIdentity {
    /// This machine, with `id`.
    pub fn current(id: &str) -> AgentIdentity {
        let read = |p: &str| {
            fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        AgentIdentity {
            id: id.to_string(),
            hostname: read("/proc/sys/kernel/hostname"),
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            machine: std::env::consts::ARCH.to_string(),
        }
    }
}

/// When: wall clock (RFC 3339) and the kernel's clocks (ns), which order
/// bundles and events of one boot whatever the wall clock does.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Times {
    /// Capture start, wall clock.
    pub started: String,
    /// Capture end (before sealing), wall clock.
    pub ended: String,
    /// Capture start, CLOCK_MONOTONIC.
    pub monotonic_start_ns: u64,
    /// Capture end, CLOCK_MONOTONIC.
    pub monotonic_end_ns: u64,
    /// Capture start, CLOCK_BOOTTIME (the clock of the sensor's event times).
    pub boottime_start_ns: u64,
    /// Sealing, wall clock.
    pub sealed: String,
}

/// How the evidence was acquired.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Acquisition {
    /// e.g. `sigstop+ptrace+process_vm_readv`.
    pub method: String,
    /// `vigil-agent`.
    pub tool: String,
    /// The agent's version.
    pub tool_version: String,
    /// Free-form details (freeze info, step timings, what was left out).
    pub details: serde_json::Value,
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// Position in this agent's chain (1 for the first bundle).
    pub seq: u64,
    /// Id (archive sha256) of this agent's previous bundle; `None` for the
    /// first.
    pub prev_bundle_sha256: Option<String>,
    /// Agent and host.
    pub agent: AgentIdentity,
    /// Times.
    pub times: Times,
    /// Acquisition method and tool.
    pub acquisition: Acquisition,
    /// The process captured (pid, start time, exe, ...).
    pub subject: serde_json::Value,
    /// The detection that asked for the capture.
    pub detection: serde_json::Value,
    /// Every artifact, in archive order after the manifest.
    pub artifacts: Vec<Artifact>,
}

/// Bundle and verification failures.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// File system.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An artifact name with a directory part or nothing in it.
    #[error("bad artifact name {0:?}")]
    BadName(String),
    /// Reading inside an archive (decompression, tar).
    #[error("{path}: reading {artifact}: {source}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// The entry being read (or "archive").
        artifact: String,
        /// The error.
        source: io::Error,
    },
    /// No manifest.json.
    #[error("{path}: no {MANIFEST}")]
    MissingManifest {
        /// The bundle.
        path: PathBuf,
    },
    /// manifest.json does not parse.
    #[error("{path}: bad {MANIFEST}: {source}")]
    BadManifest {
        /// The bundle.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// An artifact listed in the manifest is missing.
    #[error("{path}: artifact {name} is missing")]
    MissingArtifact {
        /// The bundle.
        path: PathBuf,
        /// The artifact.
        name: String,
    },
    /// An artifact's bytes do not match the manifest.
    #[error("{path}: artifact {name} does not match the manifest: sha256 {actual} ({actual_size} bytes), manifest says {expected} ({expected_size} bytes)")]
    HashMismatch {
        /// The bundle.
        path: PathBuf,
        /// The artifact.
        name: String,
        /// sha256 in the manifest.
        expected: String,
        /// sha256 of the bytes.
        actual: String,
        /// Size in the manifest.
        expected_size: u64,
        /// Size of the bytes.
        actual_size: u64,
    },
    /// A file in the bundle the manifest does not list.
    #[error("{path}: artifact {name} is not in the manifest")]
    UnlistedArtifact {
        /// The bundle.
        path: PathBuf,
        /// The entry.
        name: String,
    },
    /// The archive's sha256 is not the id in its name.
    #[error("{path}: archive sha256 is {actual}, not the id in its name")]
    IdMismatch {
        /// The archive.
        path: PathBuf,
        /// Its sha256.
        actual: String,
    },
    /// A chain link points elsewhere.
    #[error("chain broken at #{index} ({path}): prev_bundle_sha256 is {found:?}, previous bundle is {expected:?}")]
    ChainBroken {
        /// Position in the list.
        index: usize,
        /// The bundle.
        path: PathBuf,
        /// The previous bundle's id.
        expected: Option<String>,
        /// What the manifest says.
        found: Option<String>,
    },
    /// Sequence numbers not consecutive (a bundle missing, or a fork).
    #[error("chain broken at #{index} ({path}): seq {found}, expected {expected}")]
    SeqGap {
        /// Position in the list.
        index: usize,
        /// The bundle.
        path: PathBuf,
        /// Previous seq + 1.
        expected: u64,
        /// What the manifest says.
        found: u64,
    },
    /// A chain mixes agents.
    #[error("chain broken at #{index} ({path}): agent {found}, chain of {expected}")]
    AgentChanged {
        /// Position in the list.
        index: usize,
        /// The bundle.
        path: PathBuf,
        /// The chain's agent.
        expected: String,
        /// This bundle's agent.
        found: String,
    },
    /// Chains link sealed archives, not directories.
    #[error("{0}: not a sealed archive")]
    NotAnArchive(PathBuf),
    /// Serializing a JSON artifact.
    #[error("serializing {name}: {source}")]
    Json {
        /// The artifact.
        name: String,
        /// The error.
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn check_name(name: &str) -> Result<(), BundleError> {
    if name.is_empty()
        || name == MANIFEST
        || name.contains('/')
        || name == "."
        || name == ".."
        || name.contains('\0')
    {
        return Err(BundleError::BadName(name.to_string()));
    }
    Ok(())
}

/// Artifacts being gathered in a bundle directory.
#[derive(Debug)]
pub struct BundleBuilder {
    dir: PathBuf,
    artifacts: Vec<Artifact>,
}

/// A sealed bundle.
#[derive(Debug, Clone)]
pub struct SealedBundle {
    /// sha256 of the archive, hex: the bundle id.
    pub id: String,
    /// `<out_dir>/<id>.tar.zst`.
    pub archive: PathBuf,
    /// Archive size.
    pub archive_size: u64,
    /// Bytes of all artifacts and the manifest, uncompressed.
    pub content_size: u64,
    /// The manifest sealed in it.
    pub manifest: Manifest,
    /// The bundle directory, when kept.
    pub dir: Option<PathBuf>,
}

impl BundleBuilder {
    /// A new, empty bundle directory (created; must not exist).
    pub fn create(dir: &Path) -> Result<BundleBuilder, BundleError> {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            private::secure_dir(parent).map_err(io_err(parent))?;
        }
        private::create_dir(dir).map_err(io_err(dir))?;
        Ok(BundleBuilder {
            dir: dir.to_path_buf(),
            artifacts: Vec::new(),
        })
    }

    /// The directory, where artifacts are written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path an artifact named `name` goes to.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Adds a file already written in the directory, hashing it.
    pub fn add_file(&mut self, name: &str, kind: &str) -> Result<&Artifact, BundleError> {
        check_name(name)?;
        let path = self.dir.join(name);
        let (sha256, size) = hash_file(&path)?;
        self.push(name, kind, sha256, size)
    }

    /// Adds a file already written in the directory whose hash the writer
    /// computed (no second read).
    pub fn add_hashed(
        &mut self,
        name: &str,
        kind: &str,
        sha256: &str,
        size: u64,
    ) -> Result<&Artifact, BundleError> {
        check_name(name)?;
        self.push(name, kind, sha256.to_string(), size)
    }

    /// Writes `value` as pretty JSON to `name` and adds it.
    pub fn add_json<T: Serialize>(
        &mut self,
        name: &str,
        kind: &str,
        value: &T,
    ) -> Result<&Artifact, BundleError> {
        check_name(name)?;
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| BundleError::Json {
            name: name.to_string(),
            source,
        })?;
        let path = self.dir.join(name);
        private::replace_new(&path)
            .and_then(|mut f| f.write_all(&bytes))
            .map_err(io_err(&path))?;
        let mut h = HashingWriter::new(io::sink());
        h.write_all(&bytes).map_err(io_err(&path))?;
        let (sha, size, _) = h.finish();
        self.push(name, kind, sha, size)
    }

    fn push(
        &mut self,
        name: &str,
        kind: &str,
        sha256: String,
        size: u64,
    ) -> Result<&Artifact, BundleError> {
        self.artifacts.retain(|a| a.name != name);
        self.artifacts.push(Artifact {
            name: name.to_string(),
            kind: kind.to_string(),
            sha256,
            size,
        });
        Ok(self.artifacts.last().expect("just pushed"))
    }

    /// Writes the manifest (taking the next link of the agent's chain) and
    /// the archive `<id>.tar.zst`. `manifest` is completed here: format,
    /// seq, prev_bundle_sha256, artifacts, times.sealed.
    pub fn seal(
        self,
        cfg: &BundleConfig,
        mut manifest: Manifest,
    ) -> Result<SealedBundle, BundleError> {
        private::secure_dir(&cfg.out_dir).map_err(io_err(&cfg.out_dir))?;
        private::secure_dir(&cfg.state_dir).map_err(io_err(&cfg.state_dir))?;
        let lock_path = cfg.state_dir.join(CHAIN_LOCK);
        let lock_file = private::open_rw(&lock_path).map_err(io_err(&lock_path))?;
        let _lock = flock_exclusive(&lock_file).map_err(io_err(&lock_path))?;

        let state_path = cfg.state_dir.join(CHAIN_STATE);
        let state: ChainState = match fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| BundleError::BadManifest {
                path: state_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ChainState::default(),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        manifest.format = FORMAT.to_string();
        manifest.seq = state.seq + 1;
        manifest.prev_bundle_sha256 = state.last_bundle_sha256.clone();
        manifest.artifacts = self.artifacts.clone();
        manifest.times.sealed = now_rfc3339();
        let manifest_path = self.dir.join(MANIFEST);
        let manifest_bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| BundleError::Json {
                name: MANIFEST.to_string(),
                source,
            })?;
        private::replace_new(&manifest_path)
            .and_then(|mut f| f.write_all(&manifest_bytes))
            .map_err(io_err(&manifest_path))?;

        let tmp = cfg.out_dir.join(format!(
            ".sealing-{}-{}.tar.zst",
            std::process::id(),
            manifest.seq
        ));
        let mtime = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let (id, archive_size, content_size) = (|| -> Result<_, BundleError> {
            // Under the chain lock: a leftover of a crashed run with the
            // same pid and seq is stale.
            let file = private::replace_new(&tmp).map_err(io_err(&tmp))?;
            let hw = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
            let mut enc = zstd::Encoder::new(hw, cfg.zstd_level).map_err(io_err(&tmp))?;
            enc.include_checksum(true).map_err(io_err(&tmp))?;
            let mut tar = tar::Builder::new(enc);
            let mut content = 0u64;
            let names =
                std::iter::once(MANIFEST).chain(self.artifacts.iter().map(|a| a.name.as_str()));
            for name in names {
                let path = self.dir.join(name);
                let mut f = File::open(&path).map_err(io_err(&path))?;
                let size = f.metadata().map_err(io_err(&path))?.len();
                let mut h = tar::Header::new_gnu();
                h.set_size(size);
                h.set_mode(0o600); // extracted private, like the files it holds
                h.set_uid(0);
                h.set_gid(0);
                h.set_mtime(mtime);
                h.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut h, name, &mut f)
                    .map_err(io_err(&path))?;
                content += size;
            }
            let enc = tar.into_inner().map_err(io_err(&tmp))?;
            let hw = enc.finish().map_err(io_err(&tmp))?;
            let (id, size, buf) = hw.finish();
            let file = buf.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
            file.sync_all().map_err(io_err(&tmp))?;
            Ok((id, size, content))
        })()
        .inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        let archive = cfg.out_dir.join(format!("{id}.tar.zst"));
        fs::rename(&tmp, &archive).map_err(io_err(&archive))?;
        sync_dir(&cfg.out_dir);

        let next = ChainState {
            agent_id: cfg.agent_id.clone(),
            seq: manifest.seq,
            last_bundle_sha256: Some(id.clone()),
        };
        let tmp_state = cfg.state_dir.join("chain.json.tmp");
        let bytes = serde_json::to_vec_pretty(&next).map_err(|source| BundleError::Json {
            name: CHAIN_STATE.into(),
            source,
        })?;
        (|| {
            let mut f = private::replace_new(&tmp_state)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp_state, &state_path)
        })()
        .map_err(io_err(&state_path))?;
        sync_dir(&cfg.state_dir);

        let dir = if cfg.keep_dir {
            Some(self.dir.clone())
        } else {
            let _ = fs::remove_dir_all(&self.dir);
            None
        };
        Ok(SealedBundle {
            id,
            archive,
            archive_size,
            content_size,
            manifest,
            dir,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ChainState {
    agent_id: String,
    seq: u64,
    last_bundle_sha256: Option<String>,
}

/// The chain state of an agent: (last seq, last bundle id).
pub fn chain_head(state_dir: &Path) -> Option<(u64, String)> {
    let s: ChainState =
        serde_json::from_slice(&fs::read(state_dir.join(CHAIN_STATE)).ok()?).ok()?;
    Some((s.seq, s.last_bundle_sha256?))
}

struct FlockGuard<'a>(std::os::fd::BorrowedFd<'a>);

impl Drop for FlockGuard<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a valid fd.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

fn flock_exclusive(f: &File) -> io::Result<FlockGuard<'_>> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(FlockGuard(f.as_fd()));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Now, wall clock, RFC 3339 with nanoseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

/// (sha256 hex, size) of a file.
pub fn hash_file(path: &Path) -> Result<(String, u64), BundleError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = HashingWriter::new(io::sink());
    io::copy(&mut f, &mut h).map_err(io_err(path))?;
    let (sha, n, _) = h.finish();
    Ok((sha, n))
}

/// A bundle that verified.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    /// The bundle (archive or directory).
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The archive's sha256 (its id); `None` for a directory.
    pub id: Option<String>,
}

/// Bounds on what verifying an archive may read: a bundle's sizes come
/// from its own manifest, and a small zstd stream can expand to terabytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyLimits {
    /// Artifacts a manifest may list.
    pub max_artifacts: usize,
    /// Bytes the artifacts may add up to, decompressed.
    pub max_expanded_bytes: u64,
}

impl Default for VerifyLimits {
    /// 256 artifacts (an agent's bundle has about a dozen) and 16 GiB (an
    /// agent's core is at most `max_core_mib`, 512 MiB by default).
    fn default() -> Self {
        Self {
            max_artifacts: 256,
            max_expanded_bytes: 16 << 30,
        }
    }
}

/// Checks every artifact of a bundle against its manifest: sizes, sha256,
/// nothing missing, nothing unlisted; for an archive also that its sha256 is
/// the id in its name (when named `<64 hex>.tar.zst`). `path` is a sealed
/// archive or a bundle directory. Within [`VerifyLimits::default`].
pub fn verify_bundle(path: &Path) -> Result<VerifiedBundle, BundleError> {
    verify_bundle_with(path, VerifyLimits::default())
}

/// The manifest of a sealed archive, read from its first entry and not
/// checked against the artifacts (see [`verify_bundle`] for that).
pub fn read_manifest(path: &Path) -> Result<Manifest, BundleError> {
    let archive_err = |source| BundleError::Archive {
        path: path.to_path_buf(),
        artifact: MANIFEST.to_string(),
        source,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let dec = zstd::Decoder::new(BufReader::new(file)).map_err(archive_err)?;
    let mut tar = tar::Archive::new(dec);
    let mut entries = tar.entries().map_err(archive_err)?.raw(true);
    let Some(entry) = entries.next() else {
        return Err(BundleError::MissingManifest {
            path: path.to_path_buf(),
        });
    };
    let entry = entry.map_err(archive_err)?;
    if &*entry.path_bytes() != MANIFEST.as_bytes() || entry.size() > MAX_MANIFEST_BYTES {
        return Err(BundleError::MissingManifest {
            path: path.to_path_buf(),
        });
    }
    let mut b = Vec::new();
    entry
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut b)
        .map_err(archive_err)?;
    serde_json::from_slice(&b).map_err(|source| BundleError::BadManifest {
        path: path.to_path_buf(),
        source,
    })
}

/// [`verify_bundle`] within `limits`: a manifest over them is refused
/// before any artifact is read (so no more than `max_expanded_bytes` is
/// ever decompressed).
pub fn verify_bundle_with(
    path: &Path,
    limits: VerifyLimits,
) -> Result<VerifiedBundle, BundleError> {
    if path.is_dir() {
        return verify_dir(path);
    }
    let archive_err = |artifact: &str| {
        let artifact = artifact.to_string();
        move |source| BundleError::Archive {
            path: path.to_path_buf(),
            artifact,
            source,
        }
    };
    let refuse = |artifact: &str, why: String| BundleError::Archive {
        path: path.to_path_buf(),
        artifact: artifact.to_string(),
        source: io::Error::other(why),
    };
    let file = File::open(path).map_err(io_err(path))?;
    let dec = zstd::Decoder::new(BufReader::new(file)).map_err(archive_err("archive"))?;
    let mut tar = tar::Archive::new(dec);
    let mut manifest: Option<Manifest> = None;
    let mut seen: Vec<(String, String, u64)> = Vec::new();
    // Raw entries: GNU long names and PAX headers are not interpreted (the
    // tar crate would read them whole into memory); a bundle has neither.
    let entries = tar.entries().map_err(archive_err("archive"))?.raw(true);
    let mut last = String::from("archive");
    for entry in entries {
        let mut entry = entry.map_err(archive_err(&format!("the entry after {last}")))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(refuse(
                &name,
                format!(
                    "entry type {:?}: a bundle holds regular files only",
                    entry.header().entry_type()
                ),
            ));
        }
        let size = entry.size();
        match &manifest {
            None if name == MANIFEST => {
                if size > MAX_MANIFEST_BYTES {
                    return Err(refuse(
                        MANIFEST,
                        format!("{size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit"),
                    ));
                }
                let mut b = Vec::with_capacity(size as usize);
                (&mut entry)
                    .take(MAX_MANIFEST_BYTES)
                    .read_to_end(&mut b)
                    .map_err(archive_err(MANIFEST))?;
                let m: Manifest =
                    serde_json::from_slice(&b).map_err(|source| BundleError::BadManifest {
                        path: path.to_path_buf(),
                        source,
                    })?;
                if m.artifacts.len() > limits.max_artifacts {
                    return Err(refuse(
                        MANIFEST,
                        format!(
                            "lists {} artifacts, over the limit of {}",
                            m.artifacts.len(),
                            limits.max_artifacts
                        ),
                    ));
                }
                let expanded = m
                    .artifacts
                    .iter()
                    .fold(0u64, |t, a| t.saturating_add(a.size));
                if expanded > limits.max_expanded_bytes {
                    return Err(refuse(
                        MANIFEST,
                        format!(
                            "its artifacts add up to {expanded} bytes, over the limit of {} (a decompression bomb?)",
                            limits.max_expanded_bytes
                        ),
                    ));
                }
                manifest = Some(m);
            }
            None => {
                return Err(BundleError::MissingManifest {
                    path: path.to_path_buf(),
                })
            }
            Some(m) => {
                // Listed, once, with the size the manifest says: the bytes
                // read are bounded by the manifest.
                let listed = m.artifacts.iter().find(|a| a.name == name);
                if check_name(&name).is_err() || listed.is_none() {
                    return Err(BundleError::UnlistedArtifact {
                        path: path.to_path_buf(),
                        name,
                    });
                }
                if seen.iter().any(|(n, _, _)| *n == name) {
                    return Err(refuse(&name, "appears twice in the archive".into()));
                }
                let expected = listed.map(|a| a.size).unwrap_or(0);
                if size != expected {
                    return Err(BundleError::HashMismatch {
                        path: path.to_path_buf(),
                        name: name.clone(),
                        expected: listed.map(|a| a.sha256.clone()).unwrap_or_default(),
                        actual: "(not read)".into(),
                        expected_size: expected,
                        actual_size: size,
                    });
                }
                let mut h = HashingWriter::new(io::sink());
                io::copy(&mut (&mut entry).take(size), &mut h).map_err(archive_err(&name))?;
                let (sha, n, _) = h.finish();
                seen.push((name.clone(), sha, n));
            }
        }
        last = name;
    }
    let manifest = manifest.ok_or_else(|| BundleError::MissingManifest {
        path: path.to_path_buf(),
    })?;
    check_artifacts(path, &manifest, &seen)?;
    // The rest of the stream: the end of the zstd frame carries its
    // checksum; after the archive only tar's zero padding may follow, and
    // not much of it.
    let mut dec = tar.into_inner();
    let mut buf = [0u8; 8192];
    let mut trailing = 0u64;
    loop {
        let n = match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(archive_err("the archive's end")(e)),
        };
        trailing += n as u64;
        if buf[..n].iter().any(|&b| b != 0) || trailing > MAX_TRAILING_ZEROS {
            return Err(refuse(
                "the archive's end",
                "data after the end of the archive".into(),
            ));
        }
    }
    let (id, _) = hash_file(path)?;
    let stem = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.zst"));
    if let Some(stem) = stem {
        if stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit()) && stem != id {
            return Err(BundleError::IdMismatch {
                path: path.to_path_buf(),
                actual: id,
            });
        }
    }
    Ok(VerifiedBundle {
        path: path.to_path_buf(),
        manifest,
        id: Some(id),
    })
}

fn verify_dir(path: &Path) -> Result<VerifiedBundle, BundleError> {
    let mp = path.join(MANIFEST);
    let bytes = match fs::read(&mp) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BundleError::MissingManifest {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err(&mp)(e)),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| BundleError::BadManifest {
            path: path.to_path_buf(),
            source,
        })?;
    let mut seen = Vec::new();
    for e in fs::read_dir(path).map_err(io_err(path))? {
        let e = e.map_err(io_err(path))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name == MANIFEST {
            continue;
        }
        let (sha, size) = hash_file(&e.path())?;
        seen.push((name, sha, size));
    }
    check_artifacts(path, &manifest, &seen)?;
    Ok(VerifiedBundle {
        path: path.to_path_buf(),
        manifest,
        id: None,
    })
}

fn check_artifacts(
    path: &Path,
    manifest: &Manifest,
    seen: &[(String, String, u64)],
) -> Result<(), BundleError> {
    for a in &manifest.artifacts {
        let Some((_, sha, size)) = seen.iter().find(|(n, _, _)| *n == a.name) else {
            return Err(BundleError::MissingArtifact {
                path: path.to_path_buf(),
                name: a.name.clone(),
            });
        };
        if *sha != a.sha256 || *size != a.size {
            return Err(BundleError::HashMismatch {
                path: path.to_path_buf(),
                name: a.name.clone(),
                expected: a.sha256.clone(),
                actual: sha.clone(),
                expected_size: a.size,
                actual_size: *size,
            });
        }
    }
    if let Some((name, _, _)) = seen
        .iter()
        .find(|(n, _, _)| !manifest.artifacts.iter().any(|a| a.name == *n))
    {
        return Err(BundleError::UnlistedArtifact {
            path: path.to_path_buf(),
            name: name.clone(),
        });
    }
    Ok(())
}

/// Verifies each archive and that they form one agent's chain, in the order
/// given: each names the previous one's id as `prev_bundle_sha256`, with
/// consecutive `seq`. The first may start anywhere in the chain.
pub fn verify_chain(paths: &[PathBuf]) -> Result<Vec<VerifiedBundle>, BundleError> {
    let mut out: Vec<VerifiedBundle> = Vec::with_capacity(paths.len());
    for (index, p) in paths.iter().enumerate() {
        if p.is_dir() {
            return Err(BundleError::NotAnArchive(p.clone()));
        }
        let v = verify_bundle(p)?;
        if let Some(prev) = out.last() {
            if v.manifest.agent.id != prev.manifest.agent.id {
                return Err(BundleError::AgentChanged {
                    index,
                    path: p.clone(),
                    expected: prev.manifest.agent.id.clone(),
                    found: v.manifest.agent.id.clone(),
                });
            }
            if v.manifest.prev_bundle_sha256 != prev.id {
                return Err(BundleError::ChainBroken {
                    index,
                    path: p.clone(),
                    expected: prev.id.clone(),
                    found: v.manifest.prev_bundle_sha256.clone(),
                });
            }
            if v.manifest.seq != prev.manifest.seq + 1 {
                return Err(BundleError::SeqGap {
                    index,
                    path: p.clone(),
                    expected: prev.manifest.seq + 1,
                    found: v.manifest.seq,
                });
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// A writer that hashes (sha256) and counts what goes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// (hex sha256, bytes written, the inner writer).
    pub fn finish(self) -> (String, u64, W) {
        (hex::encode(self.hasher.finalize()), self.len, self.inner)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, keep_dir: bool) -> BundleConfig {
        BundleConfig {
            out_dir: root.join("out"),
            state_dir: root.join("state"),
            agent_id: "agent-test".into(),
            zstd_level: 3,
            keep_dir,
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format: String::new(),
            seq: 0,
            prev_bundle_sha256: None,
            agent: AgentIdentity::current("agent-test"),
            times: Times::default(),
            acquisition: Acquisition {
                method: "test".into(),
                tool: "vigil-agent".into(),
                tool_version: env!("CARGO_PKG_VERSION").into(),
                details: serde_json::Value::Null,
            },
            subject: serde_json::json!({"pid": 1}),
            detection: serde_json::json!({"rule": "test"}),
            artifacts: Vec::new(),
        }
    }

    /// Builds an archive by hand: `manifest_lists` goes into the manifest,
    /// `entries` (header kind, name, data) into the tar, `padding` zero bytes
    /// after it.
    fn hand_made(
        dir: &Path,
        manifest_lists: &[(&str, &[u8])],
        entries: &[(tar::EntryType, &str, &[u8])],
        manifest_first: bool,
        padding: usize,
    ) -> PathBuf {
        let mut m = manifest();
        m.format = FORMAT.into();
        m.seq = 1;
        for (name, data) in manifest_lists {
            let (sha, size) = {
                let mut h = HashingWriter::new(io::sink());
                h.write_all(data).unwrap();
                let (s, n, _) = h.finish();
                (s, n)
            };
            m.artifacts.push(Artifact {
                name: name.to_string(),
                kind: "x".into(),
                sha256: sha,
                size,
            });
        }
        let mbytes = serde_json::to_vec(&m).unwrap();
        let mut t = tar::Builder::new(Vec::new());
        let add = |t: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            // Names are set raw (no long-name extension from the builder).
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            t.append(&h, data).unwrap();
        };
        if manifest_first {
            add(&mut t, tar::EntryType::Regular, MANIFEST, &mbytes);
        }
        for (kind, name, data) in entries {
            add(&mut t, *kind, name, data);
        }
        if !manifest_first {
            add(&mut t, tar::EntryType::Regular, MANIFEST, &mbytes);
        }
        let mut raw = t.into_inner().unwrap();
        raw.extend(std::iter::repeat_n(0u8, padding));
        let p = dir.join(format!("hand-{}.tar.zst", raw.len()));
        fs::write(&p, zstd::encode_all(raw.as_slice(), 3).unwrap()).unwrap();
        p
    }

    #[test]
    fn hostile_archives_are_refused_before_reading_much() {
        use tar::EntryType as K;
        let d = tempfile::tempdir().unwrap();
        let core: &[u8] = b"core bytes";
        // The honest shape verifies.
        let ok = hand_made(
            d.path(),
            &[("core", core)],
            &[(K::Regular, "core", core)],
            true,
            1024,
        );
        verify_bundle(&ok).unwrap();
        // Limits: the manifest's count and sizes are checked before any
        // artifact is read.
        let big = vec![0u8; 1 << 20];
        let bomb = d.path().join("bomb");
        std::fs::create_dir_all(&bomb).unwrap();
        let bomb = hand_made(
            &bomb,
            &[("core", &big), ("exe", &big)],
            &[(K::Regular, "core", &big), (K::Regular, "exe", &big)],
            true,
            1024,
        );
        verify_bundle(&bomb).unwrap();
        let tight = VerifyLimits {
            max_artifacts: 256,
            max_expanded_bytes: (3 << 20) / 2,
        };
        let e = verify_bundle_with(&bomb, tight).unwrap_err().to_string();
        assert!(e.contains("add up to 2097152 bytes, over the limit"), "{e}");
        let few = VerifyLimits {
            max_artifacts: 1,
            ..VerifyLimits::default()
        };
        let e = verify_bundle_with(&bomb, few).unwrap_err().to_string();
        assert!(e.contains("lists 2 artifacts, over the limit of 1"), "{e}");
        let refused = |p: &Path, what: &str| {
            let e = verify_bundle(p).unwrap_err().to_string();
            eprintln!("{what}: {e}");
            e
        };
        // A GNU long-name entry (would be read whole by a non-raw reader).
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[
                    (K::GNULongName, "././@LongLink", &vec![b'a'; 100_000]),
                    (K::Regular, "core", core),
                ],
                true,
                0,
            ),
            "long name",
        );
        assert!(e.contains("regular files only"), "{e}");
        // A symlink entry.
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[(K::Symlink, "core", b"")],
                true,
                0,
            ),
            "symlink",
        );
        assert!(e.contains("regular files only"), "{e}");
        // The same artifact twice (the second would be what an extractor keeps).
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[
                    (K::Regular, "core", core),
                    (K::Regular, "core", b"evil bytes"),
                ],
                true,
                0,
            ),
            "duplicate",
        );
        assert!(e.contains("appears twice"), "{e}");
        // Larger than the manifest says: refused from the header, unread.
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[(K::Regular, "core", &vec![7u8; 1 << 20])],
                true,
                0,
            ),
            "oversized entry",
        );
        assert!(e.contains("does not match the manifest"), "{e}");
        // Manifest not first.
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[(K::Regular, "core", core)],
                false,
                0,
            ),
            "manifest last",
        );
        assert!(e.contains("no manifest.json"), "{e}");
        // A zero-padding bomb after the archive.
        let e = refused(
            &hand_made(
                d.path(),
                &[("core", core)],
                &[(K::Regular, "core", core)],
                true,
                8 << 20,
            ),
            "padding",
        );
        assert!(e.contains("data after the end"), "{e}");
    }

    fn make(root: &Path, n: usize, keep_dir: bool) -> SealedBundle {
        let mut b = BundleBuilder::create(&root.join(format!("work-{n}"))).unwrap();
        let big: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        fs::write(b.path_of("core"), &big).unwrap();
        b.add_file("core", "core").unwrap();
        b.add_json("context.json", "context", &serde_json::json!({"n": n}))
            .unwrap();
        b.seal(&cfg(root, keep_dir), manifest()).unwrap()
    }

    #[test]
    fn capture_bundle_seal_verify_and_chain() {
        let root = tempfile::tempdir().unwrap();
        let a = make(root.path(), 1, true);
        let b = make(root.path(), 2, false);
        let c = make(root.path(), 3, false);
        assert_eq!(a.manifest.seq, 1);
        assert_eq!(a.manifest.prev_bundle_sha256, None);
        assert_eq!(
            b.manifest.prev_bundle_sha256.as_deref(),
            Some(a.id.as_str())
        );
        assert_eq!(c.manifest.seq, 3);
        assert_eq!(
            chain_head(&root.path().join("state")),
            Some((3, c.id.clone()))
        );
        assert_eq!(
            a.archive.file_name().unwrap().to_str().unwrap(),
            format!("{}.tar.zst", a.id)
        );
        assert!(a.dir.is_some() && b.dir.is_none());
        assert!(!root.path().join("work-2").exists());
        // Identity and times.
        let m = &a.manifest;
        assert_eq!(m.format, FORMAT);
        assert_eq!(m.agent.boot_id.len(), 36);
        assert!(!m.agent.kernel_release.is_empty());
        assert!(!m.times.sealed.is_empty());
        assert_eq!(m.artifacts.len(), 2);

        let v = verify_bundle(&a.archive).unwrap();
        assert_eq!(v.id.as_deref(), Some(a.id.as_str()));
        assert_eq!(&read_manifest(&c.archive).unwrap(), &c.manifest);
        assert_eq!(&v.manifest, m);
        verify_bundle(a.dir.as_ref().unwrap()).unwrap();
        let chain = [a.archive.clone(), b.archive.clone(), c.archive.clone()];
        assert_eq!(verify_chain(&chain).unwrap().len(), 3);
        // Order matters; a missing link is caught.
        let e = verify_chain(&[a.archive.clone(), c.archive.clone()]).unwrap_err();
        assert!(
            matches!(e, BundleError::ChainBroken { index: 1, .. }),
            "{e}"
        );
        let e = verify_chain(&[b.archive.clone(), a.archive.clone()]).unwrap_err();
        assert!(matches!(e, BundleError::ChainBroken { .. }), "{e}");
    }

    #[test]
    fn capture_bundle_corruption_names_the_artifact() {
        let root = tempfile::tempdir().unwrap();
        let a = make(root.path(), 1, true);
        let b = make(root.path(), 2, false);
        // One byte of an artifact in the directory.
        let dir = a.dir.clone().unwrap();
        let core = dir.join("core");
        let mut bytes = fs::read(&core).unwrap();
        bytes[1000] ^= 1;
        fs::write(&core, &bytes).unwrap();
        let e = verify_bundle(&dir).unwrap_err();
        assert!(
            matches!(&e, BundleError::HashMismatch { name, .. } if name == "core"),
            "{e}"
        );
        eprintln!("corrupted directory: {e}");
        assert!(
            e.to_string().contains("artifact core does not match"),
            "{e}"
        );
        // An extra file.
        bytes[1000] ^= 1;
        fs::write(&core, &bytes).unwrap();
        verify_bundle(&dir).unwrap();
        fs::write(dir.join("planted"), b"x").unwrap();
        let e = verify_bundle(&dir).unwrap_err();
        assert!(
            matches!(&e, BundleError::UnlistedArtifact { name, .. } if name == "planted"),
            "{e}"
        );

        // One byte of the archive, in the middle (compressed: where it
        // lands in the content varies with the content; the zstd checksum
        // or an artifact's hash catches it either way).
        let mut arch = fs::read(&a.archive).unwrap();
        let mid = arch.len() / 2;
        arch[mid] ^= 0x40;
        fs::write(&a.archive, &arch).unwrap();
        let e = verify_bundle(&a.archive).unwrap_err();
        let msg = e.to_string();
        eprintln!("corrupted archive: {msg}");
        assert!(
            msg.contains("core") || msg.contains("corrupt") || msg.contains("checksum"),
            "{msg}"
        );
        // And the chain through it is no longer valid.
        assert!(verify_chain(&[a.archive.clone(), b.archive.clone()]).is_err());

        // A forged archive (artifact and manifest both changed, repacked)
        // verifies alone but breaks the chain: b names the original id.
        arch[mid] ^= 0x40;
        fs::write(&a.archive, &arch).unwrap();
        let forged_root = tempfile::tempdir().unwrap();
        let mut f = BundleBuilder::create(&forged_root.path().join("w")).unwrap();
        fs::write(f.path_of("core"), b"innocent").unwrap();
        f.add_file("core", "core").unwrap();
        let forged = f.seal(&cfg(forged_root.path(), false), manifest()).unwrap();
        verify_bundle(&forged.archive).unwrap();
        let e = verify_chain(&[forged.archive.clone(), b.archive.clone()]).unwrap_err();
        assert!(matches!(e, BundleError::ChainBroken { .. }), "{e}");
        // Renamed archive: id mismatch.
        let renamed = root.path().join(format!("{}.tar.zst", "0".repeat(64)));
        fs::copy(&b.archive, &renamed).unwrap();
        assert!(matches!(
            verify_bundle(&renamed),
            Err(BundleError::IdMismatch { .. })
        ));
    }

    #[test]
    fn capture_bundle_concurrent_seals_form_one_chain() {
        let root = tempfile::tempdir().unwrap();
        let sealed: Vec<SealedBundle> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|i| {
                    let r = root.path();
                    s.spawn(move || make(r, 10 + i, false))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sealed = sealed;
        sealed.sort_by_key(|b| b.manifest.seq);
        let seqs: Vec<u64> = sealed.iter().map(|b| b.manifest.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        let paths: Vec<PathBuf> = sealed.iter().map(|b| b.archive.clone()).collect();
        verify_chain(&paths).unwrap();
    }

    #[test]
    fn capture_bundle_rejects_bad_names() {
        let root = tempfile::tempdir().unwrap();
        let mut b = BundleBuilder::create(&root.path().join("w")).unwrap();
        for bad in ["", "../x", "a/b", MANIFEST, ".."] {
            assert!(matches!(
                b.add_hashed(bad, "x", "00", 0),
                Err(BundleError::BadName(_))
            ));
        }
    }
}
