use super::*;
use crate::store::conformance::{self, conformance_tests};

fn fresh() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("vigil.db"), Grouping::default()).unwrap();
    (dir, Arc::new(s))
}

conformance_tests!(fresh());

#[tokio::test]
async fn persists_across_a_reopen() {
    let (dir, s) = fresh();
    conformance::batches_are_atomic_and_deduplicated(&*s).await;
    drop(s);
    let s = SqliteStore::open(&dir.path().join("vigil.db"), Grouping::default()).unwrap();
    assert_eq!(s.stats().await.unwrap().events, 6);
}

#[tokio::test]
async fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vigil.db");
    drop(SqliteStore::open(&path, Grouping::default()).unwrap());
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(&path, Grouping::default()).unwrap_err();
    assert!(err.to_string().contains("newer collector"), "{err}");
}

#[tokio::test]
async fn a_version_1_database_is_migrated_and_keeps_its_evidence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vigil.db");
    {
        // A database as the version-1 collector left it.
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
        c.execute(
            "INSERT INTO agents (id, name, first_seen_ns, last_seen_ns) VALUES (1, 'a1', 1, 1)",
            [],
        )
        .unwrap();
        c.execute(
            "INSERT INTO evidence VALUES (?1, 1, 10, 5, 'old')",
            [&"ab".repeat(32)],
        )
        .unwrap();
    }
    let s = SqliteStore::open(&path, Grouping::default()).unwrap();
    let old = s.evidence(&"ab".repeat(32)).await.unwrap().unwrap();
    assert_eq!((old.size, old.label.as_str(), old.seq), (10, "old", 0));
    assert_eq!(old.chain, "");
    // New records carry the manifest columns.
    conformance::evidence_links_to_its_detection_in_either_order(&s).await;
    drop(s);
    let v: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

#[test]
fn commits_are_fsynced_before_they_return() {
    // WAL with synchronous=FULL on both connections: what the collector
    // acknowledged survives a power cut (NORMAL loses the last commits).
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("vigil.db"), Grouping::default()).unwrap();
    for conn in [&s.writer, &s.reader] {
        let c = conn.lock().unwrap();
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL (2)");
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
