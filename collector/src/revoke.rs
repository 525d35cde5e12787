//! Revoked certificates: a deny-list the collector checks on every call.
//!
//! The list is a text file, `DATA/revoked` by default: one entry per line,
//! a certificate name (the subject CN: every certificate of that agent or
//! analyst) or `sha256:HEX` (one certificate, by the SHA-256 of its DER
//! form, as the `agents` table records it); `#` starts a comment.
//! `vigil-collector revoke|unrevoke|revoked` edit and list it (atomically:
//! temp file, fsync, rename). The collector re-reads it when its identity
//! (inode, size, modification time) changes, so a revocation takes effect
//! on the next call, without a restart. A file that cannot be read keeps
//! the last list read (logged); a missing file is an empty list.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::pki::{self, PeerIdentity};

/// The deny-list file in a data directory.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("revoked")
}

/// Most entries read from the file (the rest are ignored, logged).
pub const MAX_ENTRIES: usize = 100_000;

/// One deny-list entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    /// Every certificate with this subject CN.
    Name(String),
    /// One certificate: lowercase hex SHA-256 of its DER form.
    Fingerprint(String),
}

impl Entry {
    /// Parses `NAME` or `sha256:HEX`.
    pub fn parse(s: &str) -> Result<Entry> {
        let s = s.trim();
        if let Some(hex) = s.strip_prefix("sha256:") {
            let hex = hex.to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("{s:?}: a certificate fingerprint is sha256: and 64 hex digits");
            }
            return Ok(Entry::Fingerprint(hex));
        }
        pki::validate_name(s).with_context(|| format!("{s:?} is not a certificate name"))?;
        Ok(Entry::Name(s.to_string()))
    }

    /// Whether this entry revokes `id`.
    pub fn matches(&self, id: &PeerIdentity) -> bool {
        match self {
            Entry::Name(n) => *n == id.name,
            Entry::Fingerprint(f) => *f == id.cert_sha256,
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::Name(n) => f.write_str(n),
            Entry::Fingerprint(h) => write!(f, "sha256:{h}"),
        }
    }
}

/// What identifies one version of the file.
type Stamp = (u64, u64, i64, i64);

fn stamp(m: &fs::Metadata) -> Stamp {
    (m.ino(), m.size(), m.mtime(), m.mtime_nsec())
}

#[derive(Debug, Default)]
struct Cached {
    stamp: Option<Stamp>,
    entries: BTreeSet<Entry>,
}

/// The deny-list as the collector sees it, re-read when the file changes.
#[derive(Debug)]
pub struct DenyList {
    path: Option<PathBuf>,
    cached: Mutex<Cached>,
}

impl DenyList {
    /// The list in `path` (read on the first check).
    pub fn at(path: PathBuf) -> DenyList {
        DenyList {
            path: Some(path),
            cached: Mutex::default(),
        }
    }

    /// No list: nothing is revoked.
    pub fn none() -> DenyList {
        DenyList {
            path: None,
            cached: Mutex::default(),
        }
    }

    /// The entry revoking `id`, if any. One `stat` per call; the file is
    /// read again only when it changed.
    pub fn revoked(&self, id: &PeerIdentity) -> Option<Entry> {
        let path = self.path.as_ref()?;
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        match fs::metadata(path) {
            Ok(m) if c.stamp != Some(stamp(&m)) => match read(path) {
                Ok(entries) => {
                    tracing::info!(path = %path.display(), entries = entries.len(), "revocation list read");
                    c.entries = entries;
                    c.stamp = Some(stamp(&m));
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = format!("{e:#}"), "revocation list unreadable: keeping the last one read");
                }
            },
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                c.entries.clear();
                c.stamp = None;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "revocation list unreadable: keeping the last one read");
            }
        }
        c.entries.iter().find(|e| e.matches(id)).cloned()
    }
}

/// The entries of the file at `path` (empty when it does not exist).
/// Lines that do not parse are skipped (logged).
pub fn read(path: &Path) -> Result<BTreeSet<Entry>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if out.len() >= MAX_ENTRIES {
            tracing::warn!(path = %path.display(), "revocation list: more than {MAX_ENTRIES} entries, the rest ignored");
            break;
        }
        match Entry::parse(line) {
            Ok(e) => {
                out.insert(e);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), line = n + 1, error = format!("{e:#}"), "revocation list: entry skipped")
            }
        }
    }
    Ok(out)
}

fn write(path: &Path, entries: &BTreeSet<Entry>) -> Result<()> {
    let mut text = String::from(
        "# Revoked certificates (vigil-collector revoke): a name or sha256:FINGERPRINT per line.\n",
    );
    for e in entries {
        text.push_str(&e.to_string());
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    let mut f = vigil_bundle::private::replace_new(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Adds `entry` to the list at `path`; `false` when it was there already.
pub fn revoke(path: &Path, entry: Entry) -> Result<bool> {
    let mut entries = read(path)?;
    let added = entries.insert(entry);
    if added {
        write(path, &entries)?;
    }
    Ok(added)
}

/// Removes `entry` from the list at `path`; `false` when it was not there.
pub fn unrevoke(path: &Path, entry: &Entry) -> Result<bool> {
    let mut entries = read(path)?;
    let removed = entries.remove(entry);
    if removed {
        write(path, &entries)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;

    fn id(name: &str, fp: &str) -> PeerIdentity {
        PeerIdentity {
            name: name.into(),
            role: Some(Role::Agent),
            cert_sha256: fp.into(),
        }
    }

    #[test]
    fn entries_parse_and_match() {
        let fp = "ab".repeat(32);
        assert_eq!(
            Entry::parse(&format!("sha256:{}", fp.to_uppercase())).unwrap(),
            Entry::Fingerprint(fp.clone())
        );
        assert!(Entry::parse("sha256:12").is_err());
        assert!(Entry::parse("../x").is_err());
        assert!(Entry::parse("web-1").unwrap().matches(&id("web-1", "00")));
        assert!(!Entry::parse("web-1").unwrap().matches(&id("web-2", &fp)));
        assert!(Entry::Fingerprint(fp.clone()).matches(&id("web-2", &fp)));
    }

    #[test]
    fn changes_apply_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = default_path(dir.path());
        let list = DenyList::at(path.clone());
        let web1 = id("web-1", &"cd".repeat(32));
        assert_eq!(list.revoked(&web1), None);
        assert!(revoke(&path, Entry::parse("web-1").unwrap()).unwrap());
        assert!(!revoke(&path, Entry::parse("web-1").unwrap()).unwrap());
        assert_eq!(list.revoked(&web1), Some(Entry::Name("web-1".into())));
        assert!(unrevoke(&path, &Entry::parse("web-1").unwrap()).unwrap());
        assert_eq!(list.revoked(&web1), None);
        let by_fp = Entry::parse(&format!("sha256:{}", "cd".repeat(32))).unwrap();
        revoke(&path, by_fp.clone()).unwrap();
        assert_eq!(list.revoked(&web1), Some(by_fp));
        // Junk lines are skipped, comments ignored; a removed file is an
        // empty list.
        fs::write(&path, "# c\n../bad\nweb-9 # why\n").unwrap();
        assert_eq!(list.revoked(&web1), None);
        assert!(list.revoked(&id("web-9", "")).is_some());
        fs::remove_file(&path).unwrap();
        assert_eq!(list.revoked(&id("web-9", "")), None);
        assert!(DenyList::none().revoked(&web1).is_none());
    }
}
