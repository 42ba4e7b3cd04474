//! The namespace cache against a real database: a version is compiled once, however many
//! requests ask for it at the same moment.

use std::sync::Arc;

use provisio_providers::catalog::OfflineCatalog;
use provisio_providers::testing::TempDb;
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::procedure;

#[tokio::test]
async fn a_cold_version_is_compiled_once_for_concurrent_requests() {
    let db = TempDb::new(4).await;
    let text = include_str!("../../schemas/examples/demo.yaml");
    let doc = procedure::parse_document(text).expect("the demo namespace parses");
    db.pool
        .get()
        .await
        .expect("connection")
        .execute(
            "INSERT INTO namespaces (name, version, document) VALUES ('demo', 1, $1)",
            &[&doc],
        )
        .await
        .expect("namespace stored");
    let cache = Arc::new(NamespaceCache::new(
        db.pool.clone(),
        Box::new(OfflineCatalog),
    ));
    // On this single-threaded runtime every task misses the cache and waits on the database
    // before any of them compiles: without one compilation per version, each compiles its own.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get("demo", 1).await })
        })
        .collect();
    let mut compiled = Vec::new();
    for t in tasks {
        let ns = t.await.expect("task").expect("loads").expect("exists");
        compiled.push(ns);
    }
    assert!(
        compiled.iter().all(|ns| Arc::ptr_eq(ns, &compiled[0])),
        "every request got the one compiled namespace"
    );
}
