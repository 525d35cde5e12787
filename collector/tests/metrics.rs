//! The Prometheus endpoint of a real collector.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Backend, Collector, Pki};
use vigil_proto::{Event, EventBatch};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn metrics_count_ingest_errors_and_storage(backend: Backend) {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let c = Collector::start(backend, &pki, data.path(), &["--metrics-addr", &addr]);
    let mut ingest = c.ingest(&pki, "agent-1").await;
    let ev =
        Event::from_agent_json(r#"{"time":"2026-11-26T14:08:28Z","type":"exec","pid":5}"#).unwrap();
    ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "1".into(),
            events: vec![ev.clone(); 10],
        }]))
        .await
        .unwrap();
    let mut bad = ev;
    bad.json = "[]".into();
    ingest
        .push_events(tokio_stream::iter(vec![EventBatch {
            batch_id: "2".into(),
            events: vec![bad],
        }]))
        .await
        .unwrap_err();

    // Storage gauges refresh in the background: wait for them.
    let mut body = String::new();
    for _ in 0..50 {
        body = scrape(port);
        if value(&body, "vigil_collector_stored_rows{table=\"events\"}") == Some(10.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "vigil_collector_ingested_items_total{stream=\"events\"}"
        ),
        Some(10.0),
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "vigil_collector_ingested_batches_total{stream=\"events\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        value(
            &body,
            "vigil_collector_ingested_bytes_total{stream=\"events\"}"
        )
        .unwrap()
            > 0.0,
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "vigil_collector_rpc_errors_total{method=\"PushEvents\",code=\"InvalidArgument\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&body, "vigil_collector_stored_rows{table=\"events\"}"),
        Some(10.0),
        "{body}"
    );
    assert!(
        value(&body, "vigil_collector_storage_bytes{kind=\"index\"}").unwrap() > 0.0,
        "{body}"
    );
}

on_both_stores!(metrics_count_ingest_errors_and_storage,);
