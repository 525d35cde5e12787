//! Evidence on the analyst's side: downloading a bundle (resumable,
//! verified before it gets its final name) and verifying a bundle file.
//!
//! A bundle is checked against its id (SHA-256 of the file), then opened:
//! every artifact against the SHA-256 and size its `manifest.json` lists,
//! nothing missing, nothing unlisted (the agent's format, crate
//! `vigil-bundle`). Several bundles of one agent are also checked as a
//! chain of custody (each names its predecessor's id, seq consecutive).
//! The collector runs the same manifest check on every upload before it
//! stores it ([`manifest_facts`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use vigil_proto::query_client::QueryClient;
use vigil_proto::FetchEvidenceRequest;

use crate::blobs::{BundleId, UploadError};
use vigil_bundle::Manifest;

/// The bundle id a file name starts with (`<64 hex>`, `<64 hex>.zst`, ...).
pub fn id_from_file_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let head = name.get(..vigil_proto::BUNDLE_ID_LEN)?;
    let rest = &name[vigil_proto::BUNDLE_ID_LEN..];
    (vigil_proto::is_valid_bundle_id(head) && (rest.is_empty() || rest.starts_with('.')))
        .then(|| head.to_string())
}

/// Lowercase hex SHA-256 and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(h.finalize()), size))
}

/// What `vigil evidence verify` found.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    /// The id the file was checked against.
    pub expected: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// File size.
    pub size: u64,
    /// The manifest when every artifact matched it, else why not.
    pub manifest: Result<Box<Manifest>, String>,
}

impl VerifyReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.sha256 == self.expected && self.manifest.is_ok()
    }
}

/// What the collector keeps from a verified manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestFacts {
    /// The detected process (the one captured, or the one a stand-in
    /// ancestor was captured for).
    pub pid: u32,
    /// The rule of the detection that asked for the capture.
    pub rule: String,
    /// That detection's event time (matches the stored detection).
    pub detection_unix_nanos: i64,
    /// Position in the agent's chain.
    pub seq: u64,
    /// The previous bundle's id ("" for the first).
    pub prev_bundle_id: String,
    /// The agent id the manifest names.
    pub agent: String,
}

/// Opens the bundle at `path` and checks every artifact against its
/// manifest; returns what the collector records, or why it is refused
/// ([`UploadError::BadBundle`]; the collector's own I/O failures are
/// [`UploadError::Io`]).
pub fn manifest_facts(path: &Path) -> Result<ManifestFacts, UploadError> {
    manifest_facts_within(path, vigil_bundle::VerifyLimits::default())
}

/// [`manifest_facts`] within `limits` (artifact count, decompressed bytes:
/// a manifest over them is refused before any artifact is read).
pub fn manifest_facts_within(
    path: &Path,
    limits: vigil_bundle::VerifyLimits,
) -> Result<ManifestFacts, UploadError> {
    let m = match vigil_bundle::verify_bundle_with(path, limits) {
        Ok(v) => v.manifest,
        Err(vigil_bundle::BundleError::Io { source, .. }) => return Err(UploadError::Io(source)),
        Err(e) => {
            return Err(UploadError::BadBundle(format!(
                "manifest check failed: {e}"
            )))
        }
    };
    if m.format != vigil_bundle::FORMAT {
        return Err(UploadError::BadBundle(format!(
            "manifest format {:?}, this collector reads {:?}",
            m.format,
            vigil_bundle::FORMAT
        )));
    }
    let det = vigil_proto::Detection::from_agent_json(&m.detection.to_string()).ok();
    // The detected process (for a stand-in capture that is not the subject
    // captured): what links the bundle to its detection.
    let pid = det
        .as_ref()
        .map(|d| d.pid)
        .filter(|&p| p != 0)
        .or_else(|| {
            m.subject["pid"]
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
        })
        .unwrap_or(0);
    Ok(ManifestFacts {
        pid,
        rule: det.as_ref().map(|d| d.rule.clone()).unwrap_or_default(),
        detection_unix_nanos: det.as_ref().map(|d| d.time_unix_nanos).unwrap_or(0),
        seq: m.seq,
        prev_bundle_id: m.prev_bundle_sha256.unwrap_or_default(),
        agent: m.agent.id,
    })
}

/// `path` with `ext` appended (`x.zst` -> `x.zst.sig`): where a bundle's
/// detached signature (`sig`) and the collector's receipt (`receipt`) are
/// kept next to it.
pub fn sidecar(path: &Path, ext: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".");
    p.push(ext);
    PathBuf::from(p)
}

/// What a bundle file's signature and receipt (next to it) say, checked
/// offline.
#[derive(Clone, Debug, PartialEq)]
pub struct OriginCheck {
    /// `FILE.sig`: `None` when there is none (unsigned), else the signer's
    /// name or why it does not hold.
    pub signature: Option<Result<String, String>>,
    /// `FILE.receipt`: `None` when there is none, else the receipt or why
    /// it does not hold.
    pub receipt: Option<Result<vigil_bundle::sign::Receipt, String>>,
    /// Whether certificates were checked against a CA.
    pub ca_checked: bool,
}

impl OriginCheck {
    /// No check failed (an absent signature or receipt is no failure).
    pub fn ok(&self) -> bool {
        !matches!(self.signature, Some(Err(_))) && !matches!(self.receipt, Some(Err(_)))
    }
}

/// Checks the signature and receipt kept next to the bundle file `path`
/// whose SHA-256 is `sha256`: the signature must sign that id with a
/// certificate from `ca` (when given) whose name is the manifest's agent
/// id; the receipt must be the collector's (from `ca`) for that id.
pub fn check_origin(
    path: &Path,
    sha256: &str,
    manifest: Option<&Manifest>,
    ca: Option<&str>,
) -> OriginCheck {
    use vigil_bundle::sign;
    let read = |ext: &str| fs::read(sidecar(path, ext)).ok();
    let signature = read("sig").map(|b| {
        let sig = sign::Signature::parse(&b).map_err(|e| e.to_string())?;
        let who = sign::verify_signature(&sig, sha256, ca).map_err(|e| e.to_string())?;
        match manifest {
            Some(m) if m.agent.id != who.name => Err(format!(
                "signed by agent {:?} but the manifest names agent {:?}",
                who.name, m.agent.id
            )),
            _ => Ok(who.name),
        }
    });
    let receipt = read("receipt").map(|b| {
        let r = sign::Receipt::parse(&b).map_err(|e| e.to_string())?;
        sign::verify_receipt(&r, ca).map_err(|e| format!("receipt: {e}"))?;
        if r.bundle_id != sha256 {
            return Err(format!(
                "the receipt is for bundle {}, not this file ({sha256})",
                r.bundle_id
            ));
        }
        Ok(r)
    });
    OriginCheck {
        signature,
        receipt,
        ca_checked: ca.is_some(),
    }
}

/// Checks a bundle file against `expected` (its id).
pub fn verify_file(path: &Path, expected: &str) -> Result<VerifyReport> {
    if !vigil_proto::is_valid_bundle_id(expected) {
        bail!("{expected:?} is not a bundle id (64 lowercase hex digits)");
    }
    let (sha256, size) = sha256_file(path)?;
    let manifest = vigil_bundle::verify_bundle(path)
        .map(|v| Box::new(v.manifest))
        .map_err(|e| e.to_string());
    Ok(VerifyReport {
        expected: expected.to_string(),
        sha256,
        size,
        manifest,
    })
}

/// Verifies bundle files of one agent as a chain of custody, in seq order
/// (sorted here): each must verify, name its predecessor's id and follow
/// its seq. Returns the manifests in chain order.
pub fn verify_chain(paths: &[PathBuf]) -> Result<Vec<Manifest>> {
    let mut with_seq = Vec::with_capacity(paths.len());
    for p in paths {
        let v = vigil_bundle::verify_bundle(p).with_context(|| format!("{}", p.display()))?;
        with_seq.push((v.manifest.seq, p.clone()));
    }
    with_seq.sort();
    let ordered: Vec<PathBuf> = with_seq.into_iter().map(|(_, p)| p).collect();
    Ok(vigil_bundle::verify_chain(&ordered)?
        .into_iter()
        .map(|v| v.manifest)
        .collect())
}

/// Downloads bundle `id` to `out`. Bytes go to `out.part` first (resumed
/// when it exists from an earlier attempt); the file gets its final name
/// only once its SHA-256 equals the id. `progress(done, total)` is called
/// after each chunk.
pub async fn download(
    client: &mut QueryClient<Channel>,
    id: &str,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let id = BundleId::parse(id)?;
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    // Resume: re-hash what an earlier attempt left.
    let mut hasher = Sha256::new();
    let offset = match File::open(&part) {
        Ok(mut f) => io::copy(&mut f, &mut HashWriter(&mut hasher))
            .with_context(|| format!("reading {}", part.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("opening {}", part.display())),
    };
    let mut stream = client
        .fetch_evidence(FetchEvidenceRequest {
            bundle_id: id.to_string(),
            offset,
        })
        .await
        .map_err(crate::client::status_error)
        .with_context(|| format!("fetching bundle {id}"))?
        .into_inner();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&part)
        .with_context(|| format!("opening {}", part.display()))?;
    let mut done = offset;
    let mut total = 0;
    while let Some(m) = stream
        .message()
        .await
        .map_err(crate::client::status_error)
        .context("receiving the bundle (run the command again to resume)")?
    {
        if m.offset != done {
            bail!(
                "collector sent offset {} while {done} bytes were held",
                m.offset
            );
        }
        total = m.total_size;
        file.write_all(&m.data)
            .with_context(|| format!("writing {}", part.display()))?;
        hasher.update(&m.data);
        done += m.data.len() as u64;
        progress(done, total);
    }
    if total != 0 && done != total {
        bail!("download ended at {done} of {total} bytes; run the command again to resume");
    }
    file.sync_all()?;
    let actual = hex::encode(hasher.finalize());
    if actual != id.as_str() {
        let _ = fs::remove_file(&part);
        bail!("downloaded bytes hash to {actual}, not {id}: file discarded");
    }
    fs::rename(&part, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(done)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_names() {
        let id = "ab".repeat(32);
        assert_eq!(
            id_from_file_name(Path::new(&format!("/x/{id}"))),
            Some(id.clone())
        );
        assert_eq!(
            id_from_file_name(Path::new(&format!("{id}.zst"))),
            Some(id.clone())
        );
        assert_eq!(id_from_file_name(Path::new(&format!("{id}x"))), None);
        assert_eq!(id_from_file_name(Path::new("bundle.zst")), None);
    }

    /// A sealed bundle made by the agent's own code.
    fn sealed(root: &Path, n: usize) -> Vec<PathBuf> {
        let cfg = vigil_bundle::BundleConfig {
            out_dir: root.join("out"),
            state_dir: root.join("state"),
            agent_id: "agent-t".into(),
            zstd_level: 1,
            keep_dir: false,
        };
        (0..n)
            .map(|i| {
                let mut b =
                    vigil_bundle::BundleBuilder::create(&root.join(format!("b{i}"))).unwrap();
                fs::write(b.path_of("core"), format!("memory {i}")).unwrap();
                b.add_file("core", "core").unwrap();
                let m = Manifest {
                    format: String::new(),
                    seq: 0,
                    prev_bundle_sha256: None,
                    agent: vigil_bundle::AgentIdentity::current("agent-t"),
                    times: Default::default(),
                    acquisition: vigil_bundle::Acquisition {
                        method: "test".into(),
                        tool: "test".into(),
                        tool_version: "0".into(),
                        details: serde_json::Value::Null,
                    },
                    // A stand-in capture: the subject is an ancestor.
                    subject: serde_json::json!({"pid": 9000 + i, "stands_in_for": {"pid": 4242 + i}}),
                    detection: serde_json::json!({
                        "time": "2026-11-26T14:08:28.972144046Z",
                        "rule": "web_shell",
                        "process": {"pid": 4242 + i},
                    }),
                    artifacts: vec![],
                };
                b.seal(&cfg, m).unwrap().archive
            })
            .collect()
    }

    #[test]
    fn verify_checks_hash_and_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let p = sealed(dir.path(), 1).remove(0);
        let id = id_from_file_name(&p).unwrap();
        let r = verify_file(&p, &id).unwrap();
        assert!(r.ok(), "{r:?}");
        let facts = manifest_facts(&p).unwrap();
        // Linked by the detected process, not the captured stand-in.
        assert_eq!(facts.pid, 4242);
        assert_eq!(facts.rule, "web_shell");
        assert_eq!(facts.seq, 1);
        assert_eq!(facts.agent, "agent-t");
        assert!(facts.detection_unix_nanos > 0);

        // Truncated: wrong hash, and not a complete bundle.
        let good = fs::read(&p).unwrap();
        let t = dir.path().join("t.zst");
        fs::write(&t, &good[..good.len() - 3]).unwrap();
        let r = verify_file(&t, &id).unwrap();
        assert!(!r.ok());
        assert!(r.manifest.is_err());
        assert!(manifest_facts(&t).is_err());
        // A zstd stream that is no bundle: refused with the reason.
        let z = dir.path().join("z.zst");
        fs::write(&z, zstd::encode_all(&b"hello evidence"[..], 3).unwrap()).unwrap();
        let why = manifest_facts(&z).unwrap_err();
        assert!(why.to_string().contains("manifest check failed"), "{why}");
        assert!(verify_file(&p, "../x").is_err());
    }

    #[test]
    fn chains_verify_in_seq_order_and_gaps_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut ps = sealed(dir.path(), 3);
        ps.reverse();
        let ms = verify_chain(&ps).unwrap();
        assert_eq!(ms.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let gap = vec![ps[0].clone(), ps[2].clone()];
        let e = verify_chain(&gap).unwrap_err();
        assert!(format!("{e:#}").contains("chain broken"), "{e:#}");
    }
}
