//! Proof of origin of evidence at ingest: the agent's signature of a
//! bundle (`vigil_bundle::sign`) is checked against a certificate of the
//! uploading agent issued by the collector's CA, the manifest's agent id
//! is bound to the uploader's certificate name, and each stored bundle
//! gets a receipt signed with the collector's key.
//!
//! Unsigned bundles (agents before signatures, bundles still in their
//! spools) are kept and marked `unsigned` unless `--require-signed-evidence`;
//! their manifest's agent id may then differ from the uploader (older
//! agents used the host name), which is recorded and shown.

use std::path::Path;

use anyhow::{Context, Result};
use tracing::warn;
use vigil_bundle::sign::{self, Receipt, Signature, SigningKey};

use crate::blobs::UploadError;

/// What the collector checks evidence origin with.
#[derive(Debug)]
pub struct OriginPolicy {
    /// The collector's CA (PEM): signers' certificates must come from it.
    pub ca_pem: String,
    /// The collector's key and certificate, for receipts (`None`: a key
    /// type that cannot sign receipts; none are issued).
    pub receipts: Option<SigningKey>,
    /// Refuse bundles without a signature.
    pub require_signed: bool,
}

impl OriginPolicy {
    /// From a PKI directory (`ca.pem`, `server.pem`, `server.key`).
    pub fn from_pki(dir: &Path, require_signed: bool) -> Result<OriginPolicy> {
        let read = |n: &str| {
            std::fs::read_to_string(dir.join(n))
                .with_context(|| format!("reading {}", dir.join(n).display()))
        };
        let receipts = match SigningKey::from_pem(&read("server.pem")?, &read("server.key")?) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "the server key cannot sign evidence receipts: none will be issued");
                None
            }
        };
        Ok(OriginPolicy {
            ca_pem: read("ca.pem")?,
            receipts,
            require_signed,
        })
    }

    /// Checks a bundle's origin: `sig` (if any) signs `id` with a
    /// certificate of `uploader` from the CA, and a signed manifest names
    /// `uploader`. Refusals are [`UploadError::Origin`] (nothing kept).
    pub fn check(
        &self,
        id: &str,
        uploader: &str,
        manifest_agent: &str,
        sig: Option<&Signature>,
    ) -> Result<Origin, UploadError> {
        let Some(sig) = sig else {
            if self.require_signed {
                return Err(UploadError::Origin(format!(
                    "bundle {id} is not signed and this collector requires signed evidence (--require-signed-evidence)"
                )));
            }
            return Ok(Origin::default());
        };
        let signer = sign::verify_signature(sig, id, Some(&self.ca_pem))
            .map_err(|e| UploadError::Origin(format!("signature of bundle {id}: {e}")))?;
        if signer.name != uploader || signer.role != "agent" {
            return Err(UploadError::Origin(format!(
                "bundle {id} is signed by {:?} (role {:?}) but uploaded by agent {uploader:?}: an agent uploads only what it signed",
                signer.name, signer.role
            )));
        }
        if manifest_agent != uploader {
            return Err(UploadError::Origin(format!(
                "bundle {id}: its manifest names agent {manifest_agent:?} but it was signed and uploaded by agent {uploader:?}: a bundle must come from the agent it names"
            )));
        }
        Ok(Origin {
            signed: true,
            signature: String::from_utf8_lossy(&sig.to_bytes()).into_owned(),
            signer_sha256: signer.cert_sha256,
        })
    }

    /// A signed receipt for what was recorded (`None` without a key).
    pub fn receipt(&self, r: Receipt) -> Option<String> {
        let k = self.receipts.as_ref()?;
        match k.sign_receipt(r) {
            Ok(r) => Some(String::from_utf8_lossy(&r.to_bytes()).into_owned()),
            Err(e) => {
                warn!(error = %e, "signing an evidence receipt failed");
                None
            }
        }
    }
}

/// A bundle's origin as checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The agent's signature verified.
    pub signed: bool,
    /// The signature document (JSON), empty when unsigned.
    pub signature: String,
    /// SHA-256 of the signer's certificate, empty when unsigned.
    pub signer_sha256: String,
}

impl Origin {
    /// `signed` or `unsigned` (what `EvidenceInfo.origin` says).
    pub fn label(&self) -> &'static str {
        if self.signed {
            "signed"
        } else {
            "unsigned"
        }
    }
}
