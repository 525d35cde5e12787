//! The collector's private PKI: one CA, one server certificate, one client
//! certificate per agent and per analyst (rcgen), and the TLS settings built
//! from them for the server and for clients.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! ca.pem  ca.key                      the CA (keep ca.key offline when you can)
//! server.pem  server.key              the collector (serverAuth)
//! agents/NAME.pem  agents/NAME.key    one per agent (clientAuth, OU=agent)
//! analysts/NAME.pem  analysts/NAME.key  one per analyst (clientAuth, OU=analyst)
//! ```
//!
//! A client certificate says who its holder is: the subject CN is the name
//! (recorded with everything an agent sends) and the OU its role; the
//! collector accepts only certificates signed by its CA, with the clientAuth
//! extended key usage.
//!
//! Rotation: a new agent or analyst certificate (`init-pki --agent NAME
//! --renew`) is signed by the same CA, so nothing else changes; the old one
//! stays valid until it expires. A new CA (`init-pki --rotate-ca`) re-issues
//! the server certificate and every agent and analyst certificate found in
//! the directory; every agent then needs its new files and the CA.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// What a client certificate allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends events, detections and evidence (the Ingest service).
    Agent,
    /// Reads incidents, detections and evidence (the Query service).
    Analyst,
}

impl Role {
    /// The subject OU that carries the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Analyst => "analyst",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Role::Agent => "agents",
            Role::Analyst => "analysts",
        }
    }
}

/// The identity a verified client certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject CN: the agent's (or analyst's) name.
    pub name: String,
    /// The role from the subject OU, `None` when the OU is missing or
    /// unknown.
    pub role: Option<Role>,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub cert_sha256: String,
}

/// Why a certificate name is refused.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        bail!("invalid name {name:?}: use 1-64 of [A-Za-z0-9._-], starting with a letter or digit");
    }
    Ok(())
}

/// Reads the identity from the leaf certificate of a verified peer (the
/// chain was already checked against the CA by rustls).
pub fn peer_identity(leaf_der: &[u8]) -> Result<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| anyhow::anyhow!("client certificate does not parse: {e}"))?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .context("client certificate has no subject CN")?;
    validate_name(&name).context("client certificate CN")?;
    let role = subject
        .iter_organizational_unit()
        .filter_map(|ou| ou.as_str().ok())
        .find_map(|ou| match ou {
            "agent" => Some(Role::Agent),
            "analyst" => Some(Role::Analyst),
            _ => None,
        });
    Ok(PeerIdentity {
        name,
        role,
        cert_sha256: hex::encode(Sha256::digest(leaf_der)),
    })
}

/// Options of `vigil-collector init-pki`.
#[derive(Clone, Debug, Default)]
pub struct InitPki {
    /// The PKI directory (created when missing).
    pub dir: PathBuf,
    /// Extra server SANs besides localhost, 127.0.0.1 and ::1 (DNS names or
    /// IP addresses).
    pub extra_sans: Vec<String>,
    /// Agent certificates to issue.
    pub agents: Vec<String>,
    /// Analyst certificates to issue.
    pub analysts: Vec<String>,
    /// Re-issue the named certificates (and the server's) even when they
    /// exist.
    pub renew: bool,
    /// Make a new CA and re-issue everything in the directory.
    pub rotate_ca: bool,
    /// Validity of issued leaf certificates, in days.
    pub leaf_days: u32,
}

/// What `init_pki` did, for the operator.
#[derive(Clone, Debug, Default)]
pub struct InitPkiReport {
    /// Files written, in order.
    pub written: Vec<PathBuf>,
    /// Files that existed and were kept.
    pub kept: Vec<PathBuf>,
}

const CA_DAYS: i64 = 3650;
const CA_CN: &str = "vigil collector CA";

/// Creates or completes a PKI directory. Idempotent: existing files are kept
/// unless `renew` or `rotate_ca` asks otherwise.
pub fn init_pki(opts: &InitPki) -> Result<InitPkiReport> {
    for n in opts.agents.iter().chain(&opts.analysts) {
        validate_name(n)?;
    }
    let dir = &opts.dir;
    create_private_dir(dir)?;
    create_private_dir(&dir.join(Role::Agent.dir()))?;
    create_private_dir(&dir.join(Role::Analyst.dir()))?;
    let mut report = InitPkiReport::default();
    let leaf_days = if opts.leaf_days == 0 {
        365
    } else {
        opts.leaf_days
    };

    let ca_pem = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let new_ca = opts.rotate_ca || !ca_pem.exists() || !ca_key_path.exists();
    let issuer = if new_ca {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, CA_CN);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "vigil");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params, CA_DAYS);
        let cert = params.self_signed(&key).context("self-signing the CA")?;
        write_file(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
        write_file(&ca_pem, cert.pem().as_bytes(), false)?;
        report.written.extend([ca_pem.clone(), ca_key_path.clone()]);
        Issuer::new(params, key)
    } else {
        let key_pem = read(&ca_key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("parsing {}", ca_key_path.display()))?;
        let cert_pem = read(&ca_pem)?;
        report.kept.push(ca_pem.clone());
        Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("parsing {}", ca_pem.display()))?
    };

    // Server certificate.
    let server_pem = dir.join("server.pem");
    let server_key = dir.join("server.key");
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    for s in &opts.extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    if new_ca || opts.renew || !opts.extra_sans.is_empty() || !server_pem.exists() {
        let mut params = CertificateParams::new(sans.clone())
            .with_context(|| format!("server SANs {sans:?}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "vigil-collector");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "vigil");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, i64::from(leaf_days));
        issue(&params, &issuer, &server_pem, &server_key, &mut report)?;
    } else {
        report.kept.push(server_pem);
    }

    // Client certificates: the requested ones, plus every existing one when
    // the CA changed.
    for role in [Role::Agent, Role::Analyst] {
        let requested = match role {
            Role::Agent => &opts.agents,
            Role::Analyst => &opts.analysts,
        };
        let mut names = requested.clone();
        if new_ca {
            for n in existing_names(&dir.join(role.dir()))? {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for name in names {
            let (pem, key) = client_paths(dir, role, &name);
            if pem.exists() && !new_ca && !opts.renew {
                report.kept.push(pem);
                continue;
            }
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, name.as_str());
            params
                .distinguished_name
                .push(DnType::OrganizationName, "vigil");
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, role.as_str());
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            set_validity(&mut params, i64::from(leaf_days));
            issue(&params, &issuer, &pem, &key, &mut report)?;
        }
    }
    Ok(report)
}

/// Paths of a client certificate and key in a PKI directory.
pub fn client_paths(dir: &Path, role: Role, name: &str) -> (PathBuf, PathBuf) {
    let base = dir.join(role.dir());
    (
        base.join(format!("{name}.pem")),
        base.join(format!("{name}.key")),
    )
}

fn existing_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(names),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pem") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                if validate_name(stem).is_ok() {
                    names.push(stem.to_string());
                }
            }
        }
    }
    names.sort();
    Ok(names)
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Tolerate some clock skew between the machines.
    params.not_before = now - Duration::minutes(10);
    params.not_after = now + Duration::days(days);
}

fn issue(
    params: &CertificateParams,
    issuer: &Issuer<'_, KeyPair>,
    pem: &Path,
    key_path: &Path,
    report: &mut InitPkiReport,
) -> Result<()> {
    let key = KeyPair::generate().context("generating a key")?;
    let cert = params
        .signed_by(&key, issuer)
        .with_context(|| format!("signing {}", pem.display()))?;
    write_file(key_path, key.serialize_pem().as_bytes(), true)?;
    write_file(pem, cert.pem().as_bytes(), false)?;
    report
        .written
        .extend([pem.to_path_buf(), key_path.to_path_buf()]);
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Writes atomically (temp file, fsync, rename); keys are 0600.
fn write_file(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    // New file, O_EXCL | O_NOFOLLOW, 0600; certificates are public (0644
    // in the 0700 directory).
    let mut f = vigil_bundle::private::replace_new(&tmp)
        .and_then(|f| {
            if !secret {
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(fs::Permissions::from_mode(0o644))?;
            }
            Ok(f)
        })
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} (create the PKI with `vigil-collector init-pki --dir {}`)",
            path.display(),
            path.parent().unwrap_or(Path::new(".")).display()
        )
    })
}

/// The server's TLS settings from a PKI directory: its certificate and key,
/// and the CA that client certificates must chain to (client certificates
/// are required).
pub fn server_tls(dir: &Path) -> Result<ServerTlsConfig> {
    let ca = read(&dir.join("ca.pem"))?;
    let cert = read(&dir.join("server.pem"))?;
    let key = read(&dir.join("server.key"))?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .timeout(std::time::Duration::from_secs(10)))
}

/// TLS for the web UI: the collector's server certificate and key (the
/// ones its gRPC listener presents), no client certificates, ring crypto.
pub fn ui_tls_config(dir: &Path) -> Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_path = dir.join("server.pem");
    let key_path = dir.join("server.key");
    let certs = CertificateDer::pem_slice_iter(read(&cert_path)?.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("reading the certificates in {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {} (made by `vigil-collector init-pki`)",
        cert_path.display()
    );
    let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes())
        .with_context(|| format!("reading the private key {}", key_path.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the web UI's TLS certificate and key")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(cfg))
}

/// Where a client finds its CA, certificate and key.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    /// The CA that signed the collector's certificate.
    pub ca: PathBuf,
    /// The client certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl ClientFiles {
    /// The files of `name` with `role` in a PKI directory.
    pub fn in_pki(dir: &Path, role: Role, name: &str) -> ClientFiles {
        let (cert, key) = client_paths(dir, role, name);
        ClientFiles {
            ca: dir.join("ca.pem"),
            cert,
            key,
        }
    }

    /// Client TLS settings; `domain` is the name the server certificate
    /// must carry (a DNS name or an IP address).
    pub fn tls_config(&self, domain: &str) -> Result<ClientTlsConfig> {
        let ca = read(&self.ca)?;
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_der(path: &Path) -> Vec<u8> {
        let text = fs::read(path).unwrap();
        x509_parser::pem::parse_x509_pem(&text).unwrap().1.contents
    }

    #[test]
    fn init_issues_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitPki {
            dir: dir.path().to_path_buf(),
            agents: vec!["web-1".into()],
            analysts: vec!["alice".into()],
            extra_sans: vec![],
            ..Default::default()
        };
        let r = init_pki(&opts).unwrap();
        assert_eq!(r.written.len(), 8, "{r:?}");
        let mode = fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let id = peer_identity(&pem_der(&dir.path().join("agents/web-1.pem"))).unwrap();
        assert_eq!(id.name, "web-1");
        assert_eq!(id.role, Some(Role::Agent));
        let id = peer_identity(&pem_der(&dir.path().join("analysts/alice.pem"))).unwrap();
        assert_eq!(id.role, Some(Role::Analyst));

        // Second run keeps everything.
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();
        let r = init_pki(&opts).unwrap();
        assert!(r.written.is_empty(), "{r:?}");
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);

        // A new agent with the same CA.
        let r = init_pki(&InitPki {
            agents: vec!["db-2".into()],
            ..opts.clone()
        })
        .unwrap();
        assert_eq!(r.written.len(), 2);
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);

        // CA rotation re-issues every certificate in the directory.
        let old_agent = fs::read(dir.path().join("agents/web-1.pem")).unwrap();
        let r = init_pki(&InitPki {
            rotate_ca: true,
            agents: vec![],
            analysts: vec![],
            ..opts.clone()
        })
        .unwrap();
        assert_eq!(r.written.len(), 2 + 2 + 3 * 2, "{r:?}");
        assert_ne!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        assert_ne!(
            fs::read(dir.path().join("agents/web-1.pem")).unwrap(),
            old_agent
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("web-1.example_2").is_ok());
        for bad in ["", "../x", "a/b", "-x", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
