//! Connecting to a collector over mutual TLS, for the `vigil` CLI, agents'
//! shippers and tests.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::pki::ClientFiles;

/// Largest message a client accepts (a FetchEvidence chunk is 1 MiB; an
/// incident with its events can be a few MiB).
pub const MAX_CLIENT_MESSAGE: usize = 64 << 20;

/// Opens a channel to `url` (e.g. `https://127.0.0.1:7443`) presenting the
/// certificate in `files`. The server certificate must carry the URL's host
/// (a DNS name or an IP address) unless `server_name` overrides it.
pub async fn connect(url: &str, files: &ClientFiles, server_name: Option<&str>) -> Result<Channel> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("invalid collector URL {url:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("collector URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = files.tls_config(server_name.unwrap_or(&host))?;
    let endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("invalid collector URL {url:?}"))?
        .tls_config(tls)
        .context("TLS configuration")?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to the collector at {url}"))
}

/// A gRPC status as a one-line error: `collector said NotFound: ...`.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("collector said {:?}: {}", s.code(), s.message())
}
