//! End-to-end: RabbitMQ itself restarted under load (`rabbitmqctl stop_app` / `start_app`:
//! every connection drops, the quorum queues are reloaded from disk). Every request that got
//! a 2xx finishes; the others got 503.
//!
//! Alone in its test binary on purpose: cargo runs test binaries one after the other, so no
//! other test shares the broker while it is down. A guard starts the broker again even when
//! the test fails. Needs `rabbitmqctl` for the local broker (`ops/test` runs as the user that
//! installed it); where the tests use a remote broker (`PROVISIO_TEST_AMQP` not on this
//! machine), the proxy-cut variant in `broker_outage.rs` covers the same path.

use std::process::Command;
use std::time::Duration;

use provisio_tests::TestEnv;

/// Starts the broker application again if the test ends while it is stopped.
struct StartOnDrop;

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn local_broker() -> bool {
    let url = provisio_tests::amqp_url();
    (url.contains("@127.0.0.1:") || url.contains("@localhost:"))
        && Command::new("rabbitmqctl")
            .arg("status")
            .output()
            .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn rabbitmq_restarted_under_load_loses_no_accepted_request() -> anyhow::Result<()> {
    use futures_util::FutureExt;
    if !local_broker() {
        eprintln!("skipped: the tests' broker is not a local RabbitMQ that rabbitmqctl controls");
        return Ok(());
    }
    let env = TestEnv::new("rabbit-restart").await?;
    let guard = StartOnDrop;
    let url = env.amqp_url.clone();
    let result = std::panic::AssertUnwindSafe(provisio_tests::load::outage_under_load(
        &env,
        &url,
        || async {
            tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"])).await??;
            Ok(())
        },
        || async {
            tokio::task::spawn_blocking(|| rabbitmqctl(&["start_app"])).await??;
            // Bounded wait until the broker accepts connections again.
            let deadline = tokio::time::Instant::now() + Duration::from_mins(1);
            loop {
                let url = provisio_tests::amqp_url();
                if lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "RabbitMQ did not come back within a minute"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    ))
    .catch_unwind()
    .await;
    drop(guard);
    env.cleanup().await;
    match result {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
