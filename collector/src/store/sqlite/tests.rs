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
