//! Who is calling: the identity in the client certificate that rustls
//! verified against the collector's CA during the handshake, and whether
//! its role allows the call.

use tonic::{Request, Status};

use crate::pki::{self, PeerIdentity, Role};

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
