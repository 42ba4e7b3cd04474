//! The worker refuses a transaction-log server set it cannot use yet, instead of writing a log
//! that recovery and the audit sweep would never read.

use std::process::Command;

#[test]
fn worker_refuses_txlog_servers_other_than_the_configuration_database() {
    let out = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["--role", "engine"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PROVISIO_SIGNING_KEY", "k")
        .env("PROVISIO_LOG__FORMAT", "text")
        // Nothing listens there: the refusal must come before any connection attempt.
        .env(
            "PROVISIO_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/config",
        )
        .env(
            "PROVISIO_TXLOG__SERVERS",
            "postgres://postgres@127.0.0.1:1/log1,postgres://postgres@127.0.0.1:1/log2",
        )
        .output()
        .expect("worker runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "txlog.servers with more than the configuration database is not supported yet"
        ),
        "{stderr}"
    );
}
