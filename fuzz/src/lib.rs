//! Fuzzing harness for vigil's parsers of untrusted input.
//!
//! Each function takes arbitrary bytes and drives one parser the way the
//! product does; none may panic, hang or allocate without bound, whatever the
//! bytes. They are called by the `cargo fuzz` targets in `fuzz_targets/`
//! (`cargo xtask fuzz`) and, on stable, by `tests/corpus.rs`, which replays
//! every committed input under `corpus/<target>/` and `regressions/<target>/`
//! (every crash a fuzzer found becomes a file there).
//!
//! | target | input | what it drives |
//! |---|---|---|
//! | [`decode_record`] | a ring buffer record | the agent's kernel record decoder, then the event's JSON line |
//! | [`bundle_reader`] | mode byte + a tar stream (compressed here) or a raw archive | `verify_bundle_with` and `read_manifest` (ingest and `vigil evidence verify`), signature and receipt parsing and checking |
//! | [`ingest`] | mode byte + a protobuf `DetectionBatch` or `EventBatch` | ingest's checks, the SQLite store, incident grouping, the incident's tree, text, JSON and SVG |
//! | [`agent_json`] | a JSON line | the conversion of the agent's JSON lines (old spool files) into wire messages and their documents |
//! | [`rules`] | a YAML or TOML text | the Sigma rule loader (and one evaluation), the agent's configuration parser |

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use prost::Message as _;
use vigil_collector::store::{SqliteStore, Store};
use vigil_proto::{DetectionBatch, EventBatch, ListIncidentsRequest};

/// A harness function: takes any bytes.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name (the files in `fuzz_targets/`, the corpus
/// directories).
pub const TARGETS: &[(&str, Harness)] = &[
    ("decode_record", decode_record),
    ("bundle_reader", bundle_reader),
    ("ingest", ingest),
    ("agent_json", agent_json),
    ("rules", rules),
];

/// A ring buffer record, as the agent's reader hands it to the decoder.
/// Whatever decodes must also serialize as the agent's JSON line.
pub fn decode_record(data: &[u8]) {
    if let Ok(ev) = vigil_agent::decode::decode(data) {
        serde_json::to_vec(&ev).expect("a decoded event serializes");
    }
}

/// First byte even: the rest is a tar stream, compressed here (so the
/// fuzzer works on the archive's structure, not on zstd's); odd: the rest
/// is the archive file as is. Then what ingest and `vigil evidence verify`
/// do with a bundle file, and with the signature and receipt files next to
/// it.
pub fn bundle_reader(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let archive = if mode & 1 == 0 {
        zstd::encode_all(rest, 1).expect("zstd compresses a buffer")
    } else {
        rest.to_vec()
    };
    let path = scratch().join("bundle.tar.zst");
    std::fs::write(&path, &archive).expect("writing the scratch archive");
    // Small bounds, so that a bomb is refused quickly here too.
    let limits = vigil_bundle::VerifyLimits {
        max_artifacts: 64,
        max_expanded_bytes: 64 << 20,
    };
    let _ = vigil_bundle::verify_bundle_with(&path, limits);
    let _ = vigil_bundle::read_manifest(&path);
    use vigil_bundle::sign;
    if let Ok(sig) = sign::Signature::parse(rest) {
        let _ = sig.to_bytes();
        let _ = sign::verify_signature(&sig, &sig.bundle_id.clone(), None);
    }
    if let Ok(r) = sign::Receipt::parse(rest) {
        let _ = r.to_bytes();
        let _ = sign::verify_receipt(&r, None);
    }
}

/// Items per batch the harness stores (the collector's own per-batch bound
/// is of this order; more only slows the fuzzer down).
const MAX_ITEMS: usize = 64;
/// Inputs stored before the database is started afresh (it would grow for
/// the whole run otherwise).
const STORE_ROUNDS: u32 = 2_000;

/// First byte even: the rest is a `DetectionBatch`, odd: an `EventBatch`,
/// as a hostile agent could send them. Each item goes through ingest's
/// checks; what passes is stored in a real SQLite store, grouped into
/// incidents, and each incident is rendered the ways the CLI and the UI do
/// (tree, text, JSON, SVG), as an analyst would look at it.
pub fn ingest(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (rt, store) = store();
    rt.block_on(async {
        if mode & 1 == 0 {
            let Ok(batch) = DetectionBatch::decode(rest) else {
                return;
            };
            let mut items = batch.detections;
            if items.len() > MAX_ITEMS {
                return;
            }
            for (i, d) in items.iter_mut().enumerate() {
                if vigil_collector::ingest::check_detection(i, d).is_err() {
                    return;
                }
                // What passed is stored as JSON: the document written for
                // a structured message must be JSON too.
                assert_json(&d.json);
            }
            let _ = store
                .insert_detections("fuzz-agent", &batch.batch_id, items, now_ns())
                .await;
        } else {
            let Ok(batch) = EventBatch::decode(rest) else {
                return;
            };
            let mut items = batch.events;
            if items.len() > MAX_ITEMS {
                return;
            }
            for (i, e) in items.iter_mut().enumerate() {
                if vigil_collector::ingest::check_event(i, e).is_err() {
                    return;
                }
                assert_json(&e.json);
            }
            let _ = store
                .insert_events("fuzz-agent", &batch.batch_id, items, now_ns())
                .await;
        }
        let Ok(list) = store.list_incidents(&ListIncidentsRequest::default()).await else {
            return;
        };
        for summary in list.iter().take(4) {
            let Ok(Some(detail)) = store.incident(summary.id).await else {
                continue;
            };
            let roots = vigil_collector::incident::build_tree(&detail.detections, &detail.events);
            let _ = vigil_collector::render::tree_text(&roots);
            let _ = vigil_collector::web::tree_svg(&roots);
            let _ = vigil_collector::render::incident_text(&detail, 50);
            let _ = vigil_collector::render::incident_json(&detail);
        }
    });
}

/// One line of an agent's JSON output (the form of spool files written
/// before the wire form), read as an event and as a detection, and each
/// result turned into the document the UI and the CLI show.
pub fn agent_json(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(e) = vigil_proto::Event::from_agent_json(line) {
        if let Some(text) = vigil_proto::document::event_json(&e) {
            assert_json(&text);
        }
    }
    if let Ok(d) = vigil_proto::Detection::from_agent_json(line) {
        if let Some(text) = vigil_proto::document::detection_json(&d) {
            assert_json(&text);
        }
    }
}

/// `text` is one JSON object.
fn assert_json(text: &str) {
    let v: serde_json::Value =
        serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    assert!(v.is_object(), "{text}");
}

/// A Sigma rule file's text (loaded, and evaluated once when it loads) and
/// the same text as the agent's configuration file.
pub fn rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = vigil_agent::detect::sigma::check_rule_text(text);
    let _ = vigil_agent::config::AgentConfig::parse(text);
}

/// A private directory for the files a target writes, one per process.
fn scratch() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory"))
        .path()
        .to_path_buf()
}

struct StoreState {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    rounds: u32,
}

/// The runtime and a SQLite store, made afresh every [`STORE_ROUNDS`]
/// inputs.
fn store() -> (&'static tokio::runtime::Runtime, Arc<SqliteStore>) {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    static STATE: Mutex<Option<StoreState>> = Mutex::new(None);
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    });
    let mut state = STATE.lock().unwrap_or_else(|p| p.into_inner());
    if state.as_ref().is_none_or(|s| s.rounds >= STORE_ROUNDS) {
        *state = None;
        let dir = tempfile::tempdir().expect("a store directory");
        let store = SqliteStore::open(&dir.path().join("fuzz.db"), Default::default())
            .expect("opening a SQLite store");
        *state = Some(StoreState {
            _dir: dir,
            store: Arc::new(store),
            rounds: 0,
        });
    }
    let s = state.as_mut().expect("just made");
    s.rounds += 1;
    (rt, s.store.clone())
}

fn now_ns() -> i64 {
    vigil_collector::ingest::now_ns()
}
