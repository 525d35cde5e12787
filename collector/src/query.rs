//! The Query service: what analysts' tools read. Every call needs a
//! certificate of role `analyst`.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::warn;
use vigil_proto::query_server::Query;
use vigil_proto::{
    EvidenceData, EvidenceStatusReply, EvidenceStatusRequest, FetchEvidenceRequest,
    GetIncidentRequest, IncidentDetail, ListDetectionsReply, ListDetectionsRequest,
    ListIncidentsReply, ListIncidentsRequest,
};

use crate::auth::Gate;
use crate::blobs::{BlobState, BlobStore, BundleId};
use crate::metrics::Metrics;
use crate::pki::Role;
use crate::store::{Store, StoreError};

/// Bytes per message of FetchEvidence.
pub const FETCH_CHUNK: usize = 1 << 20;
/// Messages buffered ahead of a slow reader.
const FETCH_QUEUE: usize = 4;

/// The Query service.
pub struct QueryService {
    store: Arc<dyn Store>,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    gate: Arc<Gate>,
}

impl QueryService {
    /// A service reading `store` and `blobs`.
    pub fn new(
        store: Arc<dyn Store>,
        blobs: Arc<BlobStore>,
        metrics: Arc<Metrics>,
        gate: Arc<Gate>,
    ) -> QueryService {
        QueryService {
            store,
            blobs,
            metrics,
            gate,
        }
    }

    fn check<T>(&self, req: &Request<T>, method: &str) -> Result<(), Status> {
        self.gate
            .caller(req, Role::Analyst)
            .map(|_| ())
            .inspect_err(|s| self.metrics.error(method, s))
    }

    fn store_error(&self, method: &str, e: StoreError) -> Status {
        warn!(method, error = %e, "store failure");
        let s = Status::internal(format!("collector storage failure: {e}"));
        self.metrics.error(method, &s);
        s
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_incidents(
        &self,
        req: Request<ListIncidentsRequest>,
    ) -> Result<Response<ListIncidentsReply>, Status> {
        const M: &str = "ListIncidents";
        self.check(&req, M)?;
        let incidents = self
            .store
            .list_incidents(req.get_ref())
            .await
            .map_err(|e| self.store_error(M, e))?;
        Ok(Response::new(ListIncidentsReply { incidents }))
    }

    async fn get_incident(
        &self,
        req: Request<GetIncidentRequest>,
    ) -> Result<Response<IncidentDetail>, Status> {
        const M: &str = "GetIncident";
        self.check(&req, M)?;
        let id = req.get_ref().id;
        if id <= 0 {
            return Err(Status::invalid_argument("incident id must be > 0"));
        }
        match self
            .store
            .incident(id)
            .await
            .map_err(|e| self.store_error(M, e))?
        {
            Some(d) => Ok(Response::new(d)),
            None => Err(Status::not_found(format!("no incident {id}"))),
        }
    }

    async fn list_detections(
        &self,
        req: Request<ListDetectionsRequest>,
    ) -> Result<Response<ListDetectionsReply>, Status> {
        const M: &str = "ListDetections";
        self.check(&req, M)?;
        let detections = self
            .store
            .list_detections(req.get_ref())
            .await
            .map_err(|e| self.store_error(M, e))?;
        Ok(Response::new(ListDetectionsReply { detections }))
    }

    async fn evidence_status(
        &self,
        req: Request<EvidenceStatusRequest>,
    ) -> Result<Response<EvidenceStatusReply>, Status> {
        const M: &str = "EvidenceStatus";
        self.check(&req, M)?;
        let id = BundleId::parse(&req.get_ref().bundle_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let committed = self
            .store
            .commitment(id.as_str())
            .await
            .map_err(|e| self.store_error(M, e))?;
        let (committed, committed_unix_nanos, committed_by) = match committed {
            Some(c) => (true, c.committed_ns, c.agent),
            None => (false, 0, String::new()),
        };
        let Some(info) = self
            .store
            .evidence(id.as_str())
            .await
            .map_err(|e| self.store_error(M, e))?
        else {
            return Ok(Response::new(EvidenceStatusReply {
                committed,
                committed_unix_nanos,
                committed_by,
                ..Default::default()
            }));
        };
        let head = self
            .store
            .chain_head(&info.agent)
            .await
            .map_err(|e| self.store_error(M, e))?;
        let mut forks = if info.seq == 0 {
            Vec::new()
        } else {
            self.store
                .successors(&info.agent, &info.prev_bundle_id)
                .await
                .map_err(|e| self.store_error(M, e))?
        };
        forks.retain(|b| b != id.as_str());
        Ok(Response::new(EvidenceStatusReply {
            found: true,
            head_seq: head.as_ref().map(|h| h.seq).unwrap_or(0),
            head_bundle_id: head.map(|h| h.bundle_id).unwrap_or_default(),
            info: Some(info),
            forks,
            committed,
            committed_unix_nanos,
            committed_by,
        }))
    }

    type FetchEvidenceStream = ReceiverStream<Result<EvidenceData, Status>>;

    async fn fetch_evidence(
        &self,
        req: Request<FetchEvidenceRequest>,
    ) -> Result<Response<Self::FetchEvidenceStream>, Status> {
        const M: &str = "FetchEvidence";
        self.check(&req, M)?;
        let FetchEvidenceRequest { bundle_id, offset } = req.into_inner();
        let id =
            BundleId::parse(&bundle_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let blobs = Arc::clone(&self.blobs);
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            match blobs.state(&id)? {
                BlobState::Complete { size } => Ok(Some((blobs.open_blob(&id)?, size))),
                _ => Ok(None),
            }
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("opening the bundle: {e}")))?;
        let Some((mut file, size)) = opened else {
            return Err(Status::not_found(format!("no complete bundle {bundle_id}")));
        };
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of the bundle ({size} bytes)"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(FETCH_QUEUE);
        tokio::task::spawn_blocking(move || {
            let mut pos = offset;
            if let Err(e) = file.seek(SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(Status::internal(format!("reading the bundle: {e}"))));
                return;
            }
            while pos < size {
                let mut buf = vec![0u8; FETCH_CHUNK.min((size - pos) as usize)];
                if let Err(e) = file.read_exact(&mut buf) {
                    let _ =
                        tx.blocking_send(Err(Status::internal(format!("reading the bundle: {e}"))));
                    return;
                }
                let n = buf.len() as u64;
                let msg = EvidenceData {
                    offset: pos,
                    data: buf,
                    total_size: size,
                };
                if tx.blocking_send(Ok(msg)).is_err() {
                    return; // the reader went away
                }
                pos += n;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
