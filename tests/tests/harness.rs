//! The test harness itself: a `TestEnv` that is dropped without `cleanup` (a test that
//! failed half-way) still removes its database.

use provisio_tests::{TestEnv, pg_base};

#[tokio::test]
async fn a_test_env_dropped_without_cleanup_removes_its_database() -> anyhow::Result<()> {
    let env = TestEnv::new("harness-drop").await?;
    let name = env.db_url.rsplit('/').next().unwrap_or_default().to_owned();
    let (admin, conn) =
        tokio_postgres::connect(&format!("{}/postgres", pg_base()), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let exists = async || -> anyhow::Result<bool> {
        Ok(admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some())
    };
    assert!(exists().await?, "created");
    drop(env);
    assert!(!exists().await?, "dropped with the environment");
    Ok(())
}
