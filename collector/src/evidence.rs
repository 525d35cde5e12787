//! Evidence on the analyst's side: downloading a bundle (resumable,
//! verified before it gets its final name) and verifying a bundle file.
//!
//! For now a bundle is checked against its id (SHA-256 of the file) and as
//! a complete zstd stream; the manifest and its chain of custody come with
//! the evidence capture work (issue 4).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use vigil_proto::query_client::QueryClient;
use vigil_proto::FetchEvidenceRequest;

use crate::blobs::BundleId;

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    /// The id the file was checked against.
    pub expected: String,
    /// SHA-256 of the file.
    pub sha256: String,
    /// File size.
    pub size: u64,
    /// Uncompressed size when the file is a complete zstd stream, else the
    /// decoder's error.
    pub zstd: Result<u64, String>,
}

impl VerifyReport {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.sha256 == self.expected && self.zstd.is_ok()
    }
}

/// Checks a bundle file against `expected` (its id).
pub fn verify_file(path: &Path, expected: &str) -> Result<VerifyReport> {
    if !vigil_proto::is_valid_bundle_id(expected) {
        bail!("{expected:?} is not a bundle id (64 lowercase hex digits)");
    }
    let (sha256, size) = sha256_file(path)?;
    let zstd = (|| -> io::Result<u64> {
        let f = File::open(path)?;
        let mut d = zstd::stream::read::Decoder::new(f)?;
        io::copy(&mut d, &mut io::sink())
    })()
    .map_err(|e| e.to_string());
    Ok(VerifyReport {
        expected: expected.to_string(),
        sha256,
        size,
        zstd,
    })
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

    #[test]
    fn verify_checks_hash_and_zstd() {
        let dir = tempfile::tempdir().unwrap();
        let good = zstd::encode_all(&b"hello evidence"[..], 3).unwrap();
        let id = hex::encode(Sha256::digest(&good));
        let p = dir.path().join("b.zst");
        fs::write(&p, &good).unwrap();
        let r = verify_file(&p, &id).unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.zstd, Ok(14));

        // Truncated: wrong hash, and not a complete zstd stream.
        fs::write(&p, &good[..good.len() - 3]).unwrap();
        let r = verify_file(&p, &id).unwrap();
        assert!(!r.ok());
        assert!(r.zstd.is_err());
        assert!(verify_file(&p, "../x").is_err());
    }
}
