//! Who is calling: the identity in the client certificate that rustls
//! verified against the collector's CA during the handshake, whether its
//! role allows the call, and whether it is revoked ([`Gate`]).

use std::sync::Arc;

use tonic::{Request, Status};

use crate::metrics::Metrics;
use crate::pki::{self, PeerIdentity, Role};
use crate::revoke::DenyList;

/// The verified caller of `req`, if its certificate has role `need`.
///
/// `UNAUTHENTICATED` when there is no usable certificate (only possible
/// when TLS is misconfigured: the handshake already requires one),
/// `PERMISSION_DENIED` when the role does not allow the call.
pub fn caller<T>(req: &Request<T>, need: Role) -> Result<PeerIdentity, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "no client certificate: connect with mutual TLS and a certificate issued by the collector's CA",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let id = pki::peer_identity(leaf)
        .map_err(|e| Status::unauthenticated(format!("unusable client certificate: {e:#}")))?;
    match id.role {
        Some(role) if role == need => Ok(id),
        Some(role) => Err(Status::permission_denied(format!(
            "certificate {:?} has role {}, this call needs role {}",
            id.name,
            role.as_str(),
            need.as_str()
        ))),
        None => Err(Status::permission_denied(format!(
            "certificate {:?} carries no role (subject OU agent or analyst)",
            id.name
        ))),
    }
}

/// The remote address of `req` as text (empty when unknown).
pub fn peer_addr<T>(req: &Request<T>) -> String {
    req.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// [`caller`] plus the deny-list: what every call of the collector's
/// services goes through.
#[derive(Debug)]
pub struct Gate {
    deny: DenyList,
    metrics: Arc<Metrics>,
}

impl Gate {
    /// Checks roles, and certificates against `deny` (a revoked one is
    /// counted as refusal `revoked`).
    pub fn new(deny: DenyList, metrics: Arc<Metrics>) -> Gate {
        Gate { deny, metrics }
    }

    /// The verified, unrevoked caller of `req` with role `need`:
    /// `PERMISSION_DENIED` when the certificate is revoked, else as
    /// [`caller`].
    pub fn caller<T>(&self, req: &Request<T>, need: Role) -> Result<PeerIdentity, Status> {
        let id = caller(req, need)?;
        if let Some(entry) = self.deny.revoked(&id) {
            self.metrics.refused("revoked");
            tracing::warn!(name = id.name, cert_sha256 = id.cert_sha256, peer = peer_addr(req), %entry, "call refused: certificate revoked");
            return Err(Status::permission_denied(format!(
                "certificate {:?} is revoked on this collector (entry {entry}): ask an operator",
                id.name
            )));
        }
        Ok(id)
    }
}
