//! The collector client: gRPC over mutual TLS, with the agent certificate
//! from a PKI directory as `vigil-collector init-pki` writes it
//! (`ca.pem`, `agents/NAME.pem`, `agents/NAME.key`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::client::Grpc;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::http::Uri;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic::{GrpcMethod, IntoStreamingRequest};
use vigil_proto::codec::VigilCodec;
use vigil_proto::ingest_client::IngestClient;
use vigil_proto::{
    Detection, DetectionBatch, EncodedEventBatch, EvidenceChunk, PushAck, UploadStatusRequest,
};

/// `Ingest.PushEvents`, as the generated client names it.
const PUSH_EVENTS: &str = "/vigil.v1.Ingest/PushEvents";

/// Bytes per evidence chunk (the collector accepts up to 4 MiB messages).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// How a failed attempt is handled.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// Transient (collector down, overloaded, network): retry later with
    /// back-off; the item stays in the spool.
    #[error("{0}")]
    Retry(String),
    /// The collector refuses who we are (certificate, role): logged as an
    /// error and retried with back-off; the item stays in the spool.
    #[error("collector refused the agent: {0}")]
    Auth(String),
    /// The collector refuses this item for good (malformed, hash
    /// mismatch): it is moved out of the queue so it cannot block it.
    #[error("collector rejected the item: {0}")]
    Rejected(String),
}

impl ShipError {
    /// Classifies a gRPC status.
    pub fn from_status(s: &Status) -> ShipError {
        let msg = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            Code::PermissionDenied | Code::Unauthenticated => ShipError::Auth(msg),
            Code::InvalidArgument | Code::DataLoss | Code::FailedPrecondition => {
                ShipError::Rejected(msg)
            }
            _ => {
                // TLS failures surface as Unknown/Unavailable with the
                // rustls error in the message.
                let m = s.message().to_ascii_lowercase();
                if m.contains("certificate") || m.contains("handshake") || m.contains("tls") {
                    ShipError::Auth(msg)
                } else {
                    ShipError::Retry(msg)
                }
            }
        }
    }
}

/// Where the agent finds its TLS files.
#[derive(Clone, Debug)]
pub struct PkiFiles {
    /// The collector's CA.
    pub ca: PathBuf,
    /// The agent certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

impl PkiFiles {
    /// The files of agent `name` in an init-pki directory.
    pub fn in_dir(dir: &Path, name: &str) -> PkiFiles {
        PkiFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("agents").join(format!("{name}.pem")),
            key: dir.join("agents").join(format!("{name}.key")),
        }
    }

    fn read(p: &Path) -> Result<String, ShipError> {
        std::fs::read_to_string(p).map_err(|e| {
            ShipError::Auth(format!(
                "reading {}: {e} (create it with `vigil-collector init-pki --agent NAME`)",
                p.display()
            ))
        })
    }
}

/// A connection to the collector's Ingest service.
pub struct Client {
    inner: IngestClient<Channel>,
    /// The same connection, for the call whose message is sent as already
    /// encoded bytes ([`Client::push_events`]).
    raw: Grpc<Channel>,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Client {
    /// Connects to `url` (e.g. `https://127.0.0.1:7443`) with mutual TLS.
    pub async fn connect(url: &str, files: &PkiFiles) -> Result<Client, ShipError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| ShipError::Auth(format!("invalid collector URL {url:?}: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| ShipError::Auth(format!("collector URL {url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(PkiFiles::read(&files.ca)?))
            .identity(Identity::from_pem(
                PkiFiles::read(&files.cert)?,
                PkiFiles::read(&files.key)?,
            ))
            .domain_name(host);
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| ShipError::Auth(format!("invalid collector URL {url:?}: {e}")))?
            .tls_config(tls)
            .map_err(|e| ShipError::Auth(format!("TLS configuration: {}", error_chain(&e))))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(300))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| {
            let chain = error_chain(&e);
            let lc = chain.to_ascii_lowercase();
            if lc.contains("certificate") || lc.contains("handshake") || lc.contains("tls") {
                ShipError::Auth(format!("connecting to {url}: {chain}"))
            } else {
                ShipError::Retry(format!("connecting to {url}: {chain}"))
            }
        })?;
        Ok(Client {
            inner: IngestClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            raw: Grpc::new(channel).max_decoding_message_size(16 << 20),
        })
    }

    /// Sends one batch of events (`batch_id` de-duplicates a resend),
    /// already encoded: `Ingest.PushEvents` with the body as it is (on the
    /// wire, an `EventBatch`).
    pub async fn push_events(&mut self, batch: EncodedEventBatch) -> Result<(), ShipError> {
        let not_ready = |e: tonic::transport::Error| {
            ShipError::Retry(format!("connection not ready: {}", error_chain(&e)))
        };
        self.raw.ready().await.map_err(not_ready)?;
        let mut req = tokio_stream::iter([batch]).into_streaming_request();
        req.extensions_mut()
            .insert(GrpcMethod::new("vigil.v1.Ingest", "PushEvents"));
        let codec = VigilCodec::<EncodedEventBatch, PushAck>::default();
        self.raw
            .client_streaming(req, PathAndQuery::from_static(PUSH_EVENTS), codec)
            .await
            .map_err(|s| ShipError::from_status(&s))?;
        Ok(())
    }

    /// Sends detections, one batch per spool item (`batch_id` de-duplicates
    /// a resend). Returns when the collector acknowledged all of them.
    pub async fn push_detections(
        &mut self,
        batches: Vec<(String, Detection)>,
    ) -> Result<(), ShipError> {
        let msgs: Vec<DetectionBatch> = batches
            .into_iter()
            .map(|(batch_id, d)| DetectionBatch {
                batch_id,
                detections: vec![d],
            })
            .collect();
        self.inner
            .push_detections(tokio_stream::iter(msgs))
            .await
            .map_err(|s| ShipError::from_status(&s))?;
        Ok(())
    }

    /// Commits to a sealed bundle before its upload (see
    /// `Ingest.CommitEvidence`). `Ok(false)`: the collector predates
    /// commitments (Unimplemented).
    pub async fn commit_bundle(
        &mut self,
        c: vigil_proto::EvidenceCommitment,
    ) -> Result<bool, ShipError> {
        match self.inner.commit_evidence(c).await {
            Ok(r) => {
                let r = r.into_inner();
                if !r.conflicts.is_empty() {
                    tracing::warn!(conflicts = ?r.conflicts, "the collector holds another commitment of this agent at the same place in its chain");
                }
                Ok(true)
            }
            Err(s) if s.code() == Code::Unimplemented => Ok(false),
            // Too many of this agent's commitments wait for their bundles:
            // refused for this one, which is uploaded anyway (retrying
            // would hold back the very uploads that close them).
            Err(s) if s.code() == Code::ResourceExhausted => Err(ShipError::Rejected(format!(
                "{:?}: {}",
                s.code(),
                s.message()
            ))),
            Err(s) => Err(ShipError::from_status(&s)),
        }
    }

    /// Uploads one bundle, resuming where the collector stands. Returns
    /// when the collector holds it complete and verified, with the
    /// collector's signed receipt for it ("" from a collector that issues
    /// none). `signature`: the bundle's detached signature document, sent
    /// with the first chunk of every attempt.
    pub async fn upload_bundle(
        &mut self,
        path: &Path,
        id: &str,
        signature: Option<Vec<u8>>,
    ) -> Result<String, ShipError> {
        let size = std::fs::metadata(path)
            .map_err(|e| ShipError::Rejected(format!("{}: {e}", path.display())))?
            .len();
        let mut offset = self.status(id).await?;
        for _ in 0..4 {
            let start = match offset {
                Resume::At(start) => start,
                Resume::Complete(receipt) => return Ok(receipt),
            };
            let start = if start > size { 0 } else { start };
            let mut chunks = ChunkIter::open(path, id, size, start)?;
            chunks.signature = signature.clone().unwrap_or_default();
            match self.inner.upload_evidence(tokio_stream::iter(chunks)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.complete {
                        return Ok(r.receipt);
                    }
                    offset = Resume::At(r.received);
                }
                Err(s) if s.code() == Code::OutOfRange => {
                    // "resume at N": ask where the collector stands.
                    offset = self.status(id).await?;
                }
                Err(s) => return Err(ShipError::from_status(&s)),
            }
        }
        Err(ShipError::Retry(format!(
            "bundle {id}: upload did not complete after resumes"
        )))
    }

    /// Where the collector stands with bundle `id`.
    async fn status(&mut self, id: &str) -> Result<Resume, ShipError> {
        let st = self
            .inner
            .upload_status(UploadStatusRequest {
                bundle_id: id.to_string(),
            })
            .await
            .map_err(|s| ShipError::from_status(&s))?
            .into_inner();
        Ok(if st.complete {
            Resume::Complete(st.receipt)
        } else {
            Resume::At(st.received)
        })
    }
}

/// Where an upload stands at the collector.
enum Resume {
    /// Send from this offset.
    At(u64),
    /// Stored: nothing to send; the collector's receipt ("" when none).
    Complete(String),
}

/// Reads a bundle lazily as upload chunks (a short read ends the stream:
/// the collector keeps the prefix and the next attempt resumes).
struct ChunkIter {
    file: std::fs::File,
    id: String,
    size: u64,
    pos: u64,
    first: bool,
    signature: Vec<u8>,
}

impl ChunkIter {
    fn open(path: &Path, id: &str, size: u64, start: u64) -> Result<ChunkIter, ShipError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| ShipError::Rejected(format!("{}: {e}", path.display())))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| ShipError::Retry(format!("{}: {e}", path.display())))?;
        Ok(ChunkIter {
            file,
            id: id.to_string(),
            size,
            pos: start,
            first: true,
            signature: Vec::new(),
        })
    }
}

impl Iterator for ChunkIter {
    type Item = EvidenceChunk;

    fn next(&mut self) -> Option<EvidenceChunk> {
        if !self.first && self.pos >= self.size {
            return None;
        }
        let want = (self.size - self.pos).min(CHUNK_BYTES as u64) as usize;
        let mut data = vec![0u8; want];
        if self.file.read_exact(&mut data).is_err() {
            return None;
        }
        let first = std::mem::replace(&mut self.first, false);
        let chunk = EvidenceChunk {
            bundle_id: if first {
                self.id.clone()
            } else {
                String::new()
            },
            total_size: self.size,
            offset: self.pos,
            data,
            label: if first {
                "vigil-agent capture".into()
            } else {
                String::new()
            },
            signature: if first {
                std::mem::take(&mut self.signature)
            } else {
                Vec::new()
            },
        };
        self.pos += want as u64;
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let c = |s: Status| ShipError::from_status(&s);
        assert!(matches!(
            c(Status::unavailable("down")),
            ShipError::Retry(_)
        ));
        assert!(matches!(
            c(Status::resource_exhausted("busy")),
            ShipError::Retry(_)
        ));
        assert!(matches!(
            c(Status::permission_denied("role")),
            ShipError::Auth(_)
        ));
        assert!(matches!(
            c(Status::unauthenticated("who")),
            ShipError::Auth(_)
        ));
        assert!(matches!(
            c(Status::unknown("invalid peer certificate: BadSignature")),
            ShipError::Auth(_)
        ));
        assert!(matches!(
            c(Status::data_loss("hash")),
            ShipError::Rejected(_)
        ));
        assert!(matches!(
            c(Status::invalid_argument("bad")),
            ShipError::Rejected(_)
        ));
    }

    #[test]
    fn chunks_cover_the_file_from_the_offset() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b");
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10)).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let id = "ab".repeat(32);
        let chunks: Vec<_> = ChunkIter::open(&p, &id, data.len() as u64, 5)
            .unwrap()
            .collect();
        assert_eq!(chunks[0].bundle_id, id);
        assert_eq!(chunks[0].offset, 5);
        assert!(chunks[1].bundle_id.is_empty());
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(joined, data[5..]);
        // Nothing left to send: one empty first chunk still names the bundle.
        let end: Vec<_> = ChunkIter::open(&p, &id, data.len() as u64, data.len() as u64)
            .unwrap()
            .collect();
        assert_eq!(end.len(), 1);
        assert!(end[0].data.is_empty());
    }
}
