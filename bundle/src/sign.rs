//! Proof of origin: the agent signs each sealed bundle's id with the key
//! of its collector certificate (ECDSA P-256, the key `init-pki` issues),
//! and the collector signs a receipt for each bundle it stores, with its
//! server key.
//!
//! A bundle's signature is detached (`<archive>.sig`, JSON [`Signature`]):
//! the archive's bytes, and so its id, stay what older collectors and
//! verifiers read. It signs the id (the SHA-256 of the archive, which
//! holds the manifest, which holds every artifact's SHA-256, the agent id,
//! `seq` and the predecessor's id), so it covers everything in the bundle.
//! It carries the signer's certificate: whoever holds the CA certificate
//! checks it offline ([`verify_signature`]); the certificate's CN is the
//! agent's name, which the manifest's `agent.id` must equal.
//!
//! A [`Receipt`] is what the collector recorded: bundle id, uploading
//! agent, chain position and status, signed or not, when; signed by the
//! collector's certificate key ([`verify_receipt`]).

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Format of a bundle signature.
pub const SIGNATURE_FORMAT: &str = "vigil-evidence-signature/1";
/// Format of a collector receipt.
pub const RECEIPT_FORMAT: &str = "vigil-evidence-receipt/1";
/// The only algorithm: ECDSA P-256 with SHA-256, ASN.1 DER signature.
pub const ALGORITHM: &str = "ecdsa-p256-sha256";
/// A signature or receipt document larger than this is refused.
pub const MAX_DOCUMENT_BYTES: usize = 16 << 10;

/// Signing and checking failures.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A key or certificate that cannot be used.
    #[error("{0}")]
    Key(String),
    /// The document does not parse or is not one this code reads.
    #[error("signature document: {0}")]
    Format(String),
    /// The signature is not for this bundle.
    #[error("the signature is for bundle {signed}, not {actual}: the bundle was changed (or renamed) after it was signed")]
    WrongBundle {
        /// The id signed.
        signed: String,
        /// This bundle's id.
        actual: String,
    },
    /// The certificate was not issued by the CA.
    #[error("the signer's certificate ({0}) was not issued by this CA")]
    UntrustedCertificate(String),
    /// The signature does not verify.
    #[error("the signature does not verify with the certificate of {0}: forged or altered")]
    BadSignature(String),
    /// A receipt signed with a certificate that cannot authenticate a
    /// server (an agent's or an analyst's key from the same CA).
    #[error("the receipt is signed by {0}, whose certificate is not a collector's (no serverAuth usage): forged")]
    NotCollector(String),
}

/// A bundle's detached signature (`<archive>.sig`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Signature {
    /// [`SIGNATURE_FORMAT`].
    pub format: String,
    /// The bundle id signed (SHA-256 of the archive).
    pub bundle_id: String,
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// The signer's certificate, PEM.
    pub certificate: String,
    /// The signature, hex (ASN.1 DER ECDSA).
    pub signature: String,
}

impl Signature {
    /// Parses a signature document (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Signature, SignError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(SignError::Format(format!(
                "{} bytes, at most {MAX_DOCUMENT_BYTES}",
                bytes.len()
            )));
        }
        let s: Signature =
            serde_json::from_slice(bytes).map_err(|e| SignError::Format(e.to_string()))?;
        if s.format != SIGNATURE_FORMAT || s.algorithm != ALGORITHM {
            return Err(SignError::Format(format!(
                "format {:?} algorithm {:?}, this code reads {SIGNATURE_FORMAT} {ALGORITHM}",
                s.format, s.algorithm
            )));
        }
        Ok(s)
    }

    /// The document's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a signature serializes")
    }
}

/// What the collector recorded about one bundle, signed by it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Receipt {
    /// [`RECEIPT_FORMAT`].
    pub format: String,
    /// The bundle id.
    pub bundle_id: String,
    /// The uploading agent (its certificate name).
    pub agent: String,
    /// Position in the agent's chain (the manifest's `seq`).
    pub seq: u64,
    /// The predecessor the manifest names ("" for the first).
    pub prev_bundle_sha256: String,
    /// The chain status at ingest (`first`, `linked`, `gap`, `broken`,
    /// `fork`).
    pub chain: String,
    /// Whether the agent signed the bundle (and the signature verified).
    pub signed: bool,
    /// SHA-256 of the signer's certificate ("" when unsigned).
    pub signer_sha256: String,
    /// When the collector stored it, ns since the Unix epoch.
    pub stored_unix_nanos: i64,
    /// The collector's certificate, PEM.
    pub certificate: String,
    /// The collector's signature over this document with `signature`
    /// empty, hex.
    pub signature: String,
}

impl Receipt {
    /// The bytes signed: the document with `signature` empty.
    fn signed_bytes(&self) -> Vec<u8> {
        let mut r = self.clone();
        r.signature.clear();
        serde_json::to_vec(&r).expect("a receipt serializes")
    }

    /// Parses a receipt document (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Receipt, SignError> {
        if bytes.len() > MAX_DOCUMENT_BYTES {
            return Err(SignError::Format(format!(
                "{} bytes, at most {MAX_DOCUMENT_BYTES}",
                bytes.len()
            )));
        }
        let r: Receipt =
            serde_json::from_slice(bytes).map_err(|e| SignError::Format(e.to_string()))?;
        if r.format != RECEIPT_FORMAT {
            return Err(SignError::Format(format!(
                "receipt format {:?}, this code reads {RECEIPT_FORMAT}",
                r.format
            )));
        }
        Ok(r)
    }

    /// The document's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a receipt serializes")
    }
}

/// A certificate's facts after its checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signer {
    /// Subject CN (an agent's or the collector's name).
    pub name: String,
    /// Subject OU (`agent` for agents).
    pub role: String,
    /// SHA-256 of the DER certificate, hex.
    pub cert_sha256: String,
    /// The certificate may authenticate a server (extended key usage
    /// serverAuth): the collector's. `init-pki` issues agents and analysts
    /// client-only certificates.
    pub server: bool,
}

/// A signing key with its certificate.
pub struct SigningKey {
    key: EcdsaKeyPair,
    certificate: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}

fn pem_der(pem_text: &str, what: &str) -> Result<Vec<u8>, SignError> {
    pem::parse(pem_text)
        .map(|p| p.into_contents())
        .map_err(|e| SignError::Key(format!("{what}: not PEM: {e}")))
}

impl SigningKey {
    /// From a PEM certificate and its PEM PKCS#8 ECDSA P-256 key (the
    /// files `init-pki` writes). The key must belong to the certificate.
    pub fn from_pem(certificate: &str, key: &str) -> Result<SigningKey, SignError> {
        let rng = SystemRandom::new();
        let der = pem_der(key, "key")?;
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|e| SignError::Key(format!("key is not a PKCS#8 ECDSA P-256 key: {e}")))?;
        let cert_der = pem_der(certificate, "certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| SignError::Key(format!("certificate does not parse: {e}")))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key().as_ref() {
            return Err(SignError::Key(
                "the key does not belong to the certificate".into(),
            ));
        }
        Ok(SigningKey {
            key,
            certificate: certificate.to_string(),
            rng,
        })
    }

    /// Signs `msg`.
    fn sign(&self, msg: &[u8]) -> Result<String, SignError> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| hex::encode(s.as_ref()))
            .map_err(|e| SignError::Key(format!("signing failed: {e}")))
    }

    /// Signs bundle `id`.
    pub fn sign_bundle(&self, id: &str) -> Result<Signature, SignError> {
        Ok(Signature {
            format: SIGNATURE_FORMAT.into(),
            bundle_id: id.to_string(),
            algorithm: ALGORITHM.into(),
            certificate: self.certificate.clone(),
            signature: self.sign(&bundle_message(id))?,
        })
    }

    /// Completes and signs `receipt` (format, certificate, signature).
    pub fn sign_receipt(&self, mut receipt: Receipt) -> Result<Receipt, SignError> {
        receipt.format = RECEIPT_FORMAT.into();
        receipt.certificate = self.certificate.clone();
        receipt.signature = self.sign(&receipt.signed_bytes())?;
        Ok(receipt)
    }
}

fn bundle_message(id: &str) -> Vec<u8> {
    format!("{SIGNATURE_FORMAT}\nbundle {id}\n").into_bytes()
}

/// Checks `certificate` (PEM) against `ca` (PEM; `None`: not checked, the
/// caller says so) and `signature` over `msg` with its key.
fn check(
    certificate: &str,
    ca: Option<&str>,
    msg: &[u8],
    sig_hex: &str,
) -> Result<Signer, SignError> {
    use sha2::Digest;
    let der = pem_der(certificate, "certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| SignError::Key(format!("certificate does not parse: {e}")))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    let role = cert
        .subject()
        .iter_organizational_unit()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("")
        .to_string();
    if let Some(ca) = ca {
        let ca_der = pem_der(ca, "CA certificate")?;
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|e| SignError::Key(format!("CA certificate does not parse: {e}")))?;
        cert.verify_signature(Some(ca_cert.public_key()))
            .map_err(|_| SignError::UntrustedCertificate(name.clone()))?;
    }
    let server = cert
        .extended_key_usage()
        .ok()
        .flatten()
        .is_some_and(|e| e.value.server_auth);
    let sig = hex::decode(sig_hex).map_err(|_| SignError::BadSignature(name.clone()))?;
    UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    )
    .verify(msg, &sig)
    .map_err(|_| SignError::BadSignature(name.clone()))?;
    Ok(Signer {
        name,
        role,
        cert_sha256: hex::encode(sha2::Sha256::digest(&der)),
        server,
    })
}

/// Checks a bundle signature for bundle `id`: it names `id`, its
/// certificate was issued by `ca` (when given) and the signature verifies.
/// Returns the signer; the caller compares its name with the manifest's
/// agent id (and, at the collector, the uploader's).
pub fn verify_signature(sig: &Signature, id: &str, ca: Option<&str>) -> Result<Signer, SignError> {
    if sig.bundle_id != id {
        return Err(SignError::WrongBundle {
            signed: sig.bundle_id.clone(),
            actual: id.to_string(),
        });
    }
    check(&sig.certificate, ca, &bundle_message(id), &sig.signature)
}

/// Checks a collector receipt: its certificate was issued by `ca` (when
/// given) and its signature verifies. Returns the collector's identity.
/// The certificate must be a server's: an agent's key (which root on its
/// node holds) cannot make a receipt.
pub fn verify_receipt(r: &Receipt, ca: Option<&str>) -> Result<Signer, SignError> {
    let who = check(&r.certificate, ca, &r.signed_bytes(), &r.signature)?;
    if !who.server {
        return Err(SignError::NotCollector(who.name));
    }
    Ok(who)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA: (its PEM, an issuer for leaves).
    fn ca() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::default();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.clone().self_signed(&ca_key).unwrap();
        (ca_cert.pem(), rcgen::Issuer::new(ca, ca_key))
    }

    /// A leaf `name` issued by `issuer` as `init-pki` makes them: an
    /// agent's (OU agent, client auth) or the collector's (server auth):
    /// (cert pem, key pem).
    fn leaf(
        issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
        name: &str,
        server: bool,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        if server {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, "agent");
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = p.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A CA and an agent `name` it issued: (ca pem, cert pem, key pem).
    fn pki(name: &str) -> (String, String, String) {
        let (ca, issuer) = ca();
        let (cert, key) = leaf(&issuer, name, false);
        (ca, cert, key)
    }

    #[test]
    fn signatures_bind_the_bundle_id_and_the_signer() {
        let (ca, cert, key) = pki("web-1");
        let k = SigningKey::from_pem(&cert, &key).unwrap();
        let id = "ab".repeat(32);
        let sig = k.sign_bundle(&id).unwrap();
        let back = Signature::parse(&sig.to_bytes()).unwrap();
        let who = verify_signature(&back, &id, Some(&ca)).unwrap();
        assert_eq!((who.name.as_str(), who.role.as_str()), ("web-1", "agent"));
        // Another bundle (altered and renamed to its new hash).
        let e = verify_signature(&back, &"cd".repeat(32), Some(&ca)).unwrap_err();
        assert!(matches!(e, SignError::WrongBundle { .. }), "{e}");
        // The id field edited to match: the signature no longer verifies.
        let mut forged = back.clone();
        forged.bundle_id = "cd".repeat(32);
        let e = verify_signature(&forged, &"cd".repeat(32), Some(&ca)).unwrap_err();
        assert!(matches!(e, SignError::BadSignature(_)), "{e}");
        // Signed by a key of another CA, or with a self-made certificate.
        let (other_ca, other_cert, other_key) = pki("web-1");
        let o = SigningKey::from_pem(&other_cert, &other_key).unwrap();
        let e = verify_signature(&o.sign_bundle(&id).unwrap(), &id, Some(&ca)).unwrap_err();
        assert!(matches!(e, SignError::UntrustedCertificate(_)), "{e}");
        verify_signature(&o.sign_bundle(&id).unwrap(), &id, Some(&other_ca)).unwrap();
        // A key that is not the certificate's.
        assert!(SigningKey::from_pem(&cert, &other_key).is_err());
    }

    #[test]
    fn receipts_verify_and_edits_are_caught() {
        let (ca, issuer) = ca();
        let (cert, key) = leaf(&issuer, "vigil-collector", true);
        let k = SigningKey::from_pem(&cert, &key).unwrap();
        let receipt = Receipt {
            bundle_id: "ab".repeat(32),
            agent: "web-1".into(),
            seq: 3,
            chain: "linked".into(),
            signed: true,
            stored_unix_nanos: 1,
            ..Default::default()
        };
        let r = k.sign_receipt(receipt.clone()).unwrap();
        let back = Receipt::parse(&r.to_bytes()).unwrap();
        let who = verify_receipt(&back, Some(&ca)).unwrap();
        assert_eq!(who.name, "vigil-collector");
        assert!(who.server);
        let mut edited = back.clone();
        edited.seq = 4;
        assert!(matches!(
            verify_receipt(&edited, Some(&ca)),
            Err(SignError::BadSignature(_))
        ));
        // Root on a node holds its agent's key, issued by the same CA: a
        // receipt it makes for a rewritten bundle is no collector's.
        let (agent_cert, agent_key) = leaf(&issuer, "web-1", false);
        let a = SigningKey::from_pem(&agent_cert, &agent_key).unwrap();
        let forged = a.sign_receipt(receipt).unwrap();
        let e = verify_receipt(&forged, Some(&ca)).unwrap_err();
        assert!(matches!(e, SignError::NotCollector(_)), "{e}");
        // An agent's signature still names an agent.
        let sig = a.sign_bundle(&"ab".repeat(32)).unwrap();
        assert!(
            !verify_signature(&sig, &"ab".repeat(32), Some(&ca))
                .unwrap()
                .server
        );
    }
}
