//! Proof of origin of evidence (issue 13) against the real collector with
//! real agent certificates: a signed bundle is bound to the agent that
//! signed and uploaded it and gets a receipt signed by the collector; an
//! altered and renamed bundle, a bundle claiming another agent's id, one
//! signed by another agent or under another CA are refused; a rewritten
//! chain tail is stored as a fork and reported; a replayed bundle gets its
//! first receipt, not a new one; unsigned bundles of older agents are kept
//! and marked unsigned (or refused with --require-signed-evidence).

mod common;

use common::{sha256_hex, sign, AgentChain, Backend, Collector, Pki};
use tonic::Code;
use vigil_bundle::sign::{verify_receipt, Receipt};
use vigil_proto::{
    CommitEvidenceReply, EvidenceChunk, EvidenceCommitment, EvidenceStatusReply,
    EvidenceStatusRequest, UploadResult,
};

async fn upload(
    c: &Collector,
    pki: &Pki,
    agent: &str,
    bytes: &[u8],
    sig: Option<Vec<u8>>,
) -> Result<UploadResult, tonic::Status> {
    let chunk = EvidenceChunk {
        bundle_id: sha256_hex(bytes),
        total_size: bytes.len() as u64,
        offset: 0,
        data: bytes.to_vec(),
        label: String::new(),
        signature: sig.unwrap_or_default(),
    };
    c.ingest(pki, agent)
        .await
        .upload_evidence(tokio_stream::iter(vec![chunk]))
        .await
        .map(|r| r.into_inner())
}

async fn status(c: &Collector, pki: &Pki, id: &str) -> EvidenceStatusReply {
    c.query(pki)
        .await
        .evidence_status(EvidenceStatusRequest {
            bundle_id: id.to_string(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn refused(r: Result<UploadResult, tonic::Status>, what: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(what), "{e:?}");
}

async fn signed_evidence_is_bound_to_its_agent(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let ca = std::fs::read_to_string(pki.path().join("ca.pem")).unwrap();
    let agent1 = AgentChain::new("agent-1");

    // The first bundle, signed: stored "signed", with a receipt.
    let b1 = agent1.next(1);
    let id1 = sha256_hex(&b1);
    let r1 = upload(
        &c,
        &pki,
        "agent-1",
        &b1,
        Some(sign(pki.path(), "agent-1", &id1)),
    )
    .await
    .unwrap();
    assert!(r1.complete);
    let receipt = Receipt::parse(r1.receipt.as_bytes()).unwrap();
    assert_eq!(
        verify_receipt(&receipt, Some(&ca)).unwrap().name,
        "vigil-collector"
    );
    assert_eq!(
        (
            receipt.bundle_id.as_str(),
            receipt.agent.as_str(),
            receipt.seq
        ),
        (id1.as_str(), "agent-1", 1)
    );
    assert!(receipt.signed);
    assert_eq!(receipt.chain, "first");
    // The signer is the certificate agent-1 connects with.
    let cert = std::fs::read(pki.path().join("agents/agent-1.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert).unwrap();
    assert_eq!(receipt.signer_sha256, sha256_hex(&pem.contents));
    let st = status(&c, &pki, &id1).await;
    let info = st.info.unwrap();
    assert_eq!(
        (info.origin.as_str(), info.chain.as_str()),
        ("signed", "first")
    );
    assert_eq!(info.receipt, r1.receipt);
    // The agent asking where its upload stands is handed the same receipt
    // (an agent that finds its bundle already stored still keeps one).
    let up = c
        .ingest(&pki, "agent-1")
        .await
        .upload_status(vigil_proto::UploadStatusRequest {
            bundle_id: id1.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(up.complete);
    assert_eq!(up.receipt, r1.receipt);

    // Altered and renamed to its new hash: the signature names the old id.
    let altered = AgentChain::new("agent-1").next(666);
    let alt_id = sha256_hex(&altered);
    refused(
        upload(
            &c,
            &pki,
            "agent-1",
            &altered,
            Some(sign(pki.path(), "agent-1", &id1)),
        )
        .await,
        "changed (or renamed) after it was signed",
    );
    assert!(!status(&c, &pki, &alt_id).await.found, "nothing kept");

    // A bundle claiming another agent's id, signed with agent-1's key.
    let claims = AgentChain::new("agent-2").next(2);
    let claims_id = sha256_hex(&claims);
    refused(
        upload(
            &c,
            &pki,
            "agent-1",
            &claims,
            Some(sign(pki.path(), "agent-1", &claims_id)),
        )
        .await,
        "its manifest names agent \"agent-2\"",
    );
    // Signed by agent-2, uploaded by agent-1.
    refused(
        upload(
            &c,
            &pki,
            "agent-1",
            &claims,
            Some(sign(pki.path(), "agent-2", &claims_id)),
        )
        .await,
        "signed by \"agent-2\"",
    );
    // Signed with a certificate of another CA (same name).
    let other = Pki::new();
    let own = agent1.fork().next(3);
    let own_id = sha256_hex(&own);
    refused(
        upload(
            &c,
            &pki,
            "agent-1",
            &own,
            Some(sign(other.path(), "agent-1", &own_id)),
        )
        .await,
        "not issued by this CA",
    );
    assert!(!status(&c, &pki, &claims_id).await.found);
    // Garbage as a signature: INVALID_ARGUMENT.
    let e = upload(&c, &pki, "agent-1", &own, Some(b"{not json".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // The chain goes on: linked.
    let before_b2 = agent1.fork();
    let b2 = agent1.next(4);
    let id2 = sha256_hex(&b2);
    upload(
        &c,
        &pki,
        "agent-1",
        &b2,
        Some(sign(pki.path(), "agent-1", &id2)),
    )
    .await
    .unwrap();
    assert_eq!(status(&c, &pki, &id2).await.info.unwrap().chain, "linked");

    // A rewritten tail (the stolen key re-seals seq 2 after #1): stored,
    // but as a fork, and both ends report it.
    let b2x = before_b2.next(5);
    let id2x = sha256_hex(&b2x);
    let r = upload(
        &c,
        &pki,
        "agent-1",
        &b2x,
        Some(sign(pki.path(), "agent-1", &id2x)),
    )
    .await
    .unwrap();
    assert_eq!(Receipt::parse(r.receipt.as_bytes()).unwrap().chain, "fork");
    let st = status(&c, &pki, &id2x).await;
    assert_eq!(st.info.as_ref().unwrap().chain, "fork");
    assert_eq!(st.forks, vec![id2.clone()]);
    assert_eq!(status(&c, &pki, &id2).await.forks, vec![id2x.clone()]);
    assert_eq!((st.head_seq, st.head_bundle_id.as_str()), (2, id2.as_str()));

    // A replay of the first bundle: acknowledged with its first receipt.
    let again = upload(
        &c,
        &pki,
        "agent-1",
        &b1,
        Some(sign(pki.path(), "agent-1", &id1)),
    )
    .await
    .unwrap();
    assert_eq!(again.receipt, r1.receipt);

    // An unsigned bundle of an older agent (its manifest names the host):
    // kept, marked unsigned, the name it claims recorded.
    let old = AgentChain::new("web-1.example").next(7);
    let old_id = sha256_hex(&old);
    let r = upload(&c, &pki, "agent-2", &old, None).await.unwrap();
    let receipt = Receipt::parse(r.receipt.as_bytes()).unwrap();
    assert!(!receipt.signed);
    let info = status(&c, &pki, &old_id).await.info.unwrap();
    assert_eq!(
        (
            info.origin.as_str(),
            info.agent.as_str(),
            info.manifest_agent.as_str()
        ),
        ("unsigned", "agent-2", "web-1.example")
    );
}

async fn unsigned_evidence_can_be_required(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &["--require-signed-evidence"]);
    let chain = AgentChain::new("agent-1");
    let b = chain.next(1);
    refused(
        upload(&c, &pki, "agent-1", &b, None).await,
        "requires signed evidence",
    );
    let id = sha256_hex(&b);
    upload(
        &c,
        &pki,
        "agent-1",
        &b,
        Some(sign(pki.path(), "agent-1", &id)),
    )
    .await
    .unwrap();
}

/// `agent` commits to `bytes` as bundle `seq` of its chain after `prev`,
/// signed by `signer`'s key.
async fn commit(
    c: &Collector,
    pki: &Pki,
    agent: &str,
    signer: &str,
    bytes: &[u8],
    seq: u64,
    prev: &str,
) -> Result<CommitEvidenceReply, tonic::Status> {
    let id = sha256_hex(bytes);
    c.ingest(pki, agent)
        .await
        .commit_evidence(EvidenceCommitment {
            bundle_id: id.clone(),
            seq,
            prev_bundle_id: prev.to_string(),
            size: bytes.len() as u64,
            signature: sign(pki.path(), signer, &id),
        })
        .await
        .map(|r| r.into_inner())
}

async fn signed_upload(c: &Collector, pki: &Pki, agent: &str, bytes: &[u8]) -> UploadResult {
    let sig = sign(pki.path(), agent, &sha256_hex(bytes));
    upload(c, pki, agent, bytes, Some(sig)).await.unwrap()
}

/// A bundle committed when sealed and changed on the node before its
/// upload arrives under another id at a place the collector already knows:
/// stored "contradicted", and the committed one is reported never received.
async fn commitments_expose_a_bundle_changed_before_its_upload(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let c = Collector::start(backend, &pki, data.path(), &[]);
    let chain = AgentChain::new("agent-1");
    let b1 = chain.next(1);
    let id1 = sha256_hex(&b1);
    let r = commit(&c, &pki, "agent-1", "agent-1", &b1, 1, "")
        .await
        .unwrap();
    assert!(r.recorded && r.conflicts.is_empty(), "{r:?}");
    let again = commit(&c, &pki, "agent-1", "agent-1", &b1, 1, "")
        .await
        .unwrap();
    assert!(!again.recorded, "a resend is recorded once");
    let st = status(&c, &pki, &id1).await;
    assert!(
        !st.found && st.committed,
        "committed, not received yet: {st:?}"
    );
    assert_eq!(st.committed_by, "agent-1");
    assert!(signed_upload(&c, &pki, "agent-1", &b1).await.complete);
    let st = status(&c, &pki, &id1).await;
    assert_eq!(st.info.unwrap().commitment, "committed");

    // Bundle 2 is committed when sealed; what arrives at seq 2 is another
    // bundle (the spooled one rewritten, re-sealed from the same chain
    // state).
    let before = chain.fork();
    let b2 = chain.next(2);
    let id2 = sha256_hex(&b2);
    commit(&c, &pki, "agent-1", "agent-1", &b2, 2, &id1)
        .await
        .unwrap();
    let b2x = before.next(666);
    let id2x = sha256_hex(&b2x);
    assert!(signed_upload(&c, &pki, "agent-1", &b2x).await.complete);
    let st = status(&c, &pki, &id2x).await;
    assert_eq!(st.info.unwrap().commitment, "contradicted");
    let st = status(&c, &pki, &id2).await;
    assert!(
        !st.found && st.committed,
        "the committed one never arrived: {st:?}"
    );
    // Committing the rewritten one now is reported as a conflict.
    let r = commit(&c, &pki, "agent-1", "agent-1", &b2x, 2, &id1)
        .await
        .unwrap();
    assert_eq!(r.conflicts, vec![id2.clone()]);

    // An upload nobody committed to (an older agent, or one cut off from
    // the collector until then).
    let b3 = before.next(3);
    assert!(signed_upload(&c, &pki, "agent-1", &b3).await.complete);
    let st = status(&c, &pki, &sha256_hex(&b3)).await;
    assert_eq!(st.info.unwrap().commitment, "uncommitted");

    // Refused: a commitment signed by another agent, a bad id, no seq.
    let other = AgentChain::new("agent-2").next(9);
    let e = commit(&c, &pki, "agent-2", "agent-1", &other, 1, "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = commit(&c, &pki, "agent-2", "agent-2", &other, 0, "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .ingest(&pki, "agent-2")
        .await
        .commit_evidence(EvidenceCommitment {
            bundle_id: "not-an-id".into(),
            seq: 1,
            size: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!status(&c, &pki, &sha256_hex(&other)).await.committed);
}

on_both_stores!(
    signed_evidence_is_bound_to_its_agent,
    unsigned_evidence_can_be_required,
    commitments_expose_a_bundle_changed_before_its_upload,
);
