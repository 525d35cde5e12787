//! The collector's receipts for the bundles it acknowledged, kept on the
//! node: the agent's own record of what the collector took responsibility
//! for, when, and where in this agent's chain.
//!
//! Each acknowledged bundle gets one line in `receipts.jsonl` in the spool
//! directory (bounded: past [`MAX_LOG_BYTES`] the file becomes
//! `receipts.jsonl.1`, replacing the one before). A receipt is checked
//! before it is trusted: signed by a certificate of the agent's CA that is
//! a server's (a collector's), for this bundle, naming this agent. A
//! receipt that fails is still logged, marked with why; the bundle was
//! acknowledged either way and leaves the spool.
//!
//! An archive kept on the node after shipping gets its signature and its
//! verified receipt next to it (`ID.tar.zst.sig`, `ID.tar.zst.receipt`):
//! `vigil evidence verify ARCHIVE --ca ca.pem` then checks, offline, that
//! this agent signed it and that the collector stored exactly these bytes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use vigil_bundle::sign::{self, Receipt};

/// Size past which the receipt log is rotated.
pub const MAX_LOG_BYTES: u64 = 4 << 20;

/// The log's file name in the spool directory.
pub const LOG_NAME: &str = "receipts.jsonl";

/// Checks and keeps receipts.
#[derive(Debug)]
pub struct Receipts {
    log: PathBuf,
    /// The CA (PEM) receipts must chain to; `None` when it could not be
    /// read (then no receipt verifies).
    ca: Option<String>,
    agent: String,
    max_log_bytes: u64,
    /// The bundle logged last and whether its receipt verified: an upload
    /// acknowledged again (its spool entry could not be removed the first
    /// time, so it was sent again) is logged once, unless its outcome
    /// changed.
    last: std::sync::Mutex<Option<(String, bool)>>,
}

/// Why a receipt is not trusted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReceiptError {
    /// The collector sent none (an older collector, or one without a key
    /// that can sign).
    #[error("the collector sent no receipt")]
    Missing,
    /// It does not parse, is not signed by a collector of the CA, or
    /// names another bundle or agent.
    #[error("{0}")]
    Invalid(String),
}

impl ReceiptError {
    /// The metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            ReceiptError::Missing => "none",
            ReceiptError::Invalid(_) => "invalid",
        }
    }
}

impl Receipts {
    /// Receipts of agent `agent`, logged in `spool_dir`, checked against
    /// the CA in `ca_pem` (its text, or why it could not be read).
    pub fn new(spool_dir: &Path, agent: &str, ca_pem: Result<String, String>) -> Receipts {
        let ca = match ca_pem {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "the CA cannot be read: the collector's receipts will not be verified");
                None
            }
        };
        Receipts {
            log: spool_dir.join(LOG_NAME),
            ca,
            agent: agent.to_string(),
            max_log_bytes: MAX_LOG_BYTES,
            last: Default::default(),
        }
    }

    /// Checks the receipt the collector returned for bundle `id`.
    pub fn check(&self, id: &str, receipt: &str) -> Result<Receipt, ReceiptError> {
        if receipt.is_empty() {
            return Err(ReceiptError::Missing);
        }
        let invalid = |m: String| ReceiptError::Invalid(m);
        let r = Receipt::parse(receipt.as_bytes()).map_err(|e| invalid(e.to_string()))?;
        let Some(ca) = &self.ca else {
            return Err(invalid("no CA to check it against".into()));
        };
        sign::verify_receipt(&r, Some(ca)).map_err(|e| invalid(e.to_string()))?;
        if r.bundle_id != id {
            return Err(invalid(format!(
                "the receipt is for bundle {}, not {id}",
                r.bundle_id
            )));
        }
        if r.agent != self.agent {
            return Err(invalid(format!(
                "the receipt names agent {:?}, not this agent ({:?})",
                r.agent, self.agent
            )));
        }
        Ok(r)
    }

    /// Appends one line for bundle `id`: its receipt as received and the
    /// outcome of its check (nothing when it is the bundle logged last);
    /// rotates the log past its bound.
    pub fn log(
        &self,
        id: &str,
        receipt: &str,
        checked: &Result<Receipt, ReceiptError>,
    ) -> std::io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let this = (id.to_string(), checked.is_ok());
        if last.as_ref() == Some(&this) {
            return Ok(());
        }
        if std::fs::metadata(&self.log).is_ok_and(|m| m.len() >= self.max_log_bytes) {
            let mut old = self.log.clone().into_os_string();
            old.push(".1");
            std::fs::rename(&self.log, old)?;
        }
        let parsed: serde_json::Value =
            serde_json::from_str(receipt).unwrap_or(serde_json::Value::Null);
        let line = serde_json::json!({
            "bundle_id": id,
            "acknowledged_unix_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "verified": checked.is_ok(),
            "problem": checked.as_ref().err().map(|e| e.to_string()),
            "receipt": parsed,
        });
        let mut f = vigil_bundle::private::open_append(&self.log)?;
        let mut bytes = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        f.write_all(&bytes)?;
        f.sync_data()?;
        *last = Some(this);
        Ok(())
    }
}

/// `path` with `.ext` appended: where a kept archive's signature (`sig`)
/// and receipt (`receipt`) go, as `vigil evidence verify` looks for them.
pub fn sidecar(path: &Path, ext: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".");
    p.push(ext);
    PathBuf::from(p)
}

/// Writes `data` as a private file at `path`, atomically (a partial
/// receipt would make `vigil evidence verify` fail the archive).
pub fn write_sidecar(path: &Path, data: &[u8]) -> std::io::Result<()> {
    vigil_bundle::private::write_atomic(path, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA with a collector (server) and an agent certificate, as
    /// `init-pki` makes them.
    struct Pki {
        ca: String,
        collector: sign::SigningKey,
        agent: sign::SigningKey,
    }

    fn pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |name: &str, eku: rcgen::ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.extended_key_usages = vec![eku];
            let cert = p.signed_by(&key, &issuer).unwrap();
            sign::SigningKey::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
        };
        Pki {
            ca: ca_cert.pem(),
            collector: leaf(
                "vigil-collector",
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            ),
            agent: leaf("node-7", rcgen::ExtendedKeyUsagePurpose::ClientAuth),
        }
    }

    fn receipt(k: &sign::SigningKey, id: &str, agent: &str) -> String {
        let r = k
            .sign_receipt(Receipt {
                bundle_id: id.into(),
                agent: agent.into(),
                seq: 2,
                chain: "linked".into(),
                signed: true,
                stored_unix_nanos: 1,
                ..Default::default()
            })
            .unwrap();
        String::from_utf8(r.to_bytes()).unwrap()
    }

    #[test]
    fn a_collector_receipt_for_this_bundle_and_agent_verifies() {
        let p = pki();
        let dir = tempfile::tempdir().unwrap();
        let rs = Receipts::new(dir.path(), "node-7", Ok(p.ca.clone()));
        let id = "ab".repeat(32);
        let good = receipt(&p.collector, &id, "node-7");
        assert_eq!(rs.check(&id, &good).unwrap().seq, 2);
        // Near misses: another bundle, another agent, an agent's own key
        // (root on the node), nothing at all, garbage.
        assert!(matches!(
            rs.check(&"cd".repeat(32), &good),
            Err(ReceiptError::Invalid(_))
        ));
        let other = receipt(&p.collector, &id, "node-8");
        assert!(matches!(
            rs.check(&id, &other),
            Err(ReceiptError::Invalid(_))
        ));
        let forged = receipt(&p.agent, &id, "node-7");
        let e = rs.check(&id, &forged).unwrap_err();
        assert!(e.to_string().contains("not a collector's"), "{e}");
        assert_eq!(rs.check(&id, ""), Err(ReceiptError::Missing));
        assert!(matches!(rs.check(&id, "{"), Err(ReceiptError::Invalid(_))));
        // Without a CA nothing verifies.
        let blind = Receipts::new(dir.path(), "node-7", Err("gone".into()));
        assert!(matches!(
            blind.check(&id, &good),
            Err(ReceiptError::Invalid(_))
        ));
    }

    #[test]
    fn the_log_keeps_every_outcome_once_and_stays_bounded() {
        let p = pki();
        let dir = tempfile::tempdir().unwrap();
        let mut rs = Receipts::new(dir.path(), "node-7", Ok(p.ca.clone()));
        let id = "ab".repeat(32);
        let other = "cd".repeat(32);
        let good = receipt(&p.collector, &id, "node-7");
        rs.log(&id, &good, &rs.check(&id, &good)).unwrap();
        // Acknowledged again (its spool entry outlived the first time):
        // not logged twice.
        rs.log(&id, &good, &rs.check(&id, &good)).unwrap();
        rs.log(&other, "", &rs.check(&other, "")).unwrap();
        let text = std::fs::read_to_string(dir.path().join(LOG_NAME)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["verified"], true);
        assert_eq!(lines[0]["receipt"]["bundle_id"], id.as_str());
        assert_eq!(lines[1]["bundle_id"], other.as_str());
        assert_eq!(lines[1]["verified"], false);
        assert_eq!(lines[1]["problem"], "the collector sent no receipt");
        // Rotation: one previous generation, the live log starts again.
        rs.max_log_bytes = 1;
        rs.log(&id, &good, &rs.check(&id, &good)).unwrap();
        rs.log(&other, "", &rs.check(&other, "")).unwrap();
        let live = std::fs::read_to_string(dir.path().join(LOG_NAME)).unwrap();
        assert_eq!(live.lines().count(), 1);
        assert!(dir.path().join("receipts.jsonl.1").exists());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(LOG_NAME))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the log is private");
    }
}
