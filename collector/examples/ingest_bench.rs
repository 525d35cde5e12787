//! Ingest throughput against a running collector: events/s (agent-shaped
//! exec events in batches over parallel streams, in the structured form
//! agents from 0.2 on send, or `--form json`, the JSON text older agents
//! send) and evidence MB/s (upload and fetch of one bundle).
//!
//! ```sh
//! vigil-collector init-pki --dir /tmp/pki --agent bench
//! taskset -c 0 vigil-collector serve --listen 127.0.0.1:7443 --data-dir /tmp/data --pki /tmp/pki &
//! taskset -c 1 cargo run --release -p vigil-collector --example ingest_bench -- \
//!     --pki /tmp/pki --events 200000 --batch 1000 --streams 2 --bundle-mib 256
//! ```

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use sha2::{Digest, Sha256};
use vigil_collector::client;
use vigil_collector::pki::{ClientFiles, Role};
use vigil_proto::event::Payload;
use vigil_proto::ingest_client::IngestClient;
use vigil_proto::query_client::QueryClient;
use vigil_proto::{
    Ancestor, Event, EventBatch, EvidenceChunk, ExecPayload, FetchEvidenceRequest, Process,
    Workload,
};

/// How the bench's events travel.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Form {
    /// Structured fields (agents >= 0.2): what an agent sends today.
    Structured,
    /// One JSON line per event (agents before 0.2).
    Json,
}

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    collector: String,
    #[arg(long)]
    pki: std::path::PathBuf,
    #[arg(long, default_value = "bench")]
    agent: String,
    #[arg(long, default_value = "analyst")]
    analyst: String,
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    #[arg(long, default_value_t = 2)]
    streams: usize,
    #[arg(long, default_value_t = 256)]
    bundle_mib: usize,
    #[arg(long, default_value_t = 1 << 20)]
    chunk: usize,
    /// The events' form.
    #[arg(long, value_enum, default_value = "structured")]
    form: Form,
    /// Events only: no evidence upload and fetch.
    #[arg(long)]
    events_only: bool,
}

/// Exec event `i` in the structured form an agent sends.
fn structured(i: usize) -> Event {
    let pid = 10_000 + (i % 5000) as u32;
    let argv: Vec<String> = vec![
        "curl".into(),
        "-s".into(),
        format!("https://example.invalid/{i}"),
    ];
    let exe = "/usr/bin/curl".to_string();
    Event {
        time_unix_nanos: 1_795_000_000_000_000_000 + i as i64,
        kind: "exec".into(),
        pid,
        ppid: pid - 1,
        exe: exe.clone(),
        argv: argv.clone(),
        workload_key: "systemd:app.service".into(),
        uid: 1000,
        boot_ns: 1_000_000_000 + i as u64,
        tid: pid,
        gid: 1000,
        start_boot_ns: 999_000_000 + i as u64,
        cgroup_id: 4242,
        comm: "curl".into(),
        process: Some(Process {
            pid,
            ppid: pid - 1,
            exe: exe.clone(),
            comm: "curl".into(),
            argv: argv.clone(),
            uid: 1000,
            euid: 1000,
            workload: Some(Workload {
                kind: "systemd".into(),
                cgroup: "/system.slice/app.service".into(),
                systemd_unit: "app.service".into(),
                ..Workload::default()
            }),
        }),
        ancestry: vec![
            // Events carry no argv in their ancestry (detections do).
            Ancestor {
                pid: pid - 1,
                exe: "/usr/bin/bash".into(),
                argv: Vec::new(),
            },
            Ancestor {
                pid: 1,
                exe: "/sbin/init".into(),
                argv: Vec::new(),
            },
        ],
        ancestry_argv: false,
        payload: Some(Payload::Exec(ExecPayload {
            ppid: pid - 1,
            euid: 1000,
            egid: 1000,
            exe,
            argv,
            exe_ino: 131_313,
            exe_dev: 2049,
            stdio: vec!["pipe".into(), "pipe".into(), "file".into()],
            ..ExecPayload::default()
        })),
        ..Event::default()
    }
}

/// The same event as one JSON line, the form agents before 0.2 send (the
/// document the collector builds from the structured form).
fn json_form(i: usize) -> Event {
    let json = vigil_proto::document::event_json(&structured(i)).expect("a structured event");
    Event::from_agent_json(&json).expect("valid event")
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    let agent = ClientFiles::in_pki(&a.pki, Role::Agent, &a.agent);
    let analyst = ClientFiles::in_pki(&a.pki, Role::Analyst, &a.analyst);

    // Events.
    let per_stream = a.events / a.streams;
    let mut prepared = Vec::new();
    let mut wire_bytes = 0usize;
    for s in 0..a.streams {
        let mut batches = Vec::new();
        for (b, start) in (0..per_stream).step_by(a.batch).enumerate() {
            let events: Vec<Event> = (start..(start + a.batch).min(per_stream))
                .map(|i| match a.form {
                    Form::Structured => structured(s * per_stream + i),
                    Form::Json => json_form(s * per_stream + i),
                })
                .collect();
            wire_bytes += events
                .iter()
                .map(prost::Message::encoded_len)
                .sum::<usize>();
            batches.push(EventBatch {
                batch_id: format!("{}-{s}-{b}", std::process::id()),
                events,
            });
        }
        prepared.push(batches);
    }
    let mut clients = Vec::new();
    for _ in 0..a.streams {
        clients.push(IngestClient::new(
            client::connect(&a.collector, &agent, None).await?,
        ));
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (mut c, batches) in clients.into_iter().zip(prepared) {
        tasks.push(tokio::spawn(async move {
            c.push_events(tokio_stream::iter(batches)).await
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await??.into_inner().accepted;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "events ({:?}): {accepted} in {secs:.2} s = {:.0} events/s ({:.1} MB/s of protobuf, {} B per event, {} streams, batches of {})",
        a.form,
        accepted as f64 / secs,
        wire_bytes as f64 / secs / 1e6,
        wire_bytes / accepted.max(1) as usize,
        a.streams,
        a.batch
    );

    if a.events_only {
        return Ok(());
    }

    // Evidence.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut bundle = Vec::with_capacity(a.bundle_mib << 20);
    while bundle.len() < a.bundle_mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bundle.extend_from_slice(&x.to_le_bytes());
    }
    let id = hex::encode(Sha256::digest(&bundle));
    let chunks: Vec<EvidenceChunk> = bundle
        .chunks(a.chunk)
        .enumerate()
        .map(|(i, c)| EvidenceChunk {
            bundle_id: id.clone(),
            total_size: bundle.len() as u64,
            offset: (i * a.chunk) as u64,
            data: c.to_vec(),
            label: "bench".into(),
            signature: Vec::new(),
        })
        .collect();
    let mut c = IngestClient::new(client::connect(&a.collector, &agent, None).await?);
    let t = Instant::now();
    let r = c
        .upload_evidence(tokio_stream::iter(chunks))
        .await?
        .into_inner();
    let secs = t.elapsed().as_secs_f64();
    assert!(r.complete);
    println!(
        "evidence upload: {} MiB in {secs:.2} s = {:.0} MB/s (chunks of {} KiB, hash verified, fsynced)",
        a.bundle_mib,
        bundle.len() as f64 / secs / 1e6,
        a.chunk >> 10
    );

    let mut q = QueryClient::new(client::connect(&a.collector, &analyst, None).await?)
        .max_decoding_message_size(client::MAX_CLIENT_MESSAGE);
    let t = Instant::now();
    let mut s = q
        .fetch_evidence(FetchEvidenceRequest {
            bundle_id: id.clone(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut h = Sha256::new();
    let mut n = 0usize;
    while let Some(m) = s.message().await? {
        n += m.data.len();
        h.update(&m.data);
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(hex::encode(h.finalize()), id);
    println!(
        "evidence fetch: {} MiB in {secs:.2} s = {:.0} MB/s",
        n >> 20,
        n as f64 / secs / 1e6
    );
    Ok(())
}
