//! End-to-end over TLS: a request goes in over HTTPS, through RabbitMQ over `amqps://` and
//! into a PostgreSQL that refuses clear connections, with `sslmode=verify-full` against a CA
//! generated here; and a client that trusts another CA is refused by each of them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use provisio_shared::config::Secret;
use provisio_shared::db::PgTarget;
use provisio_tests::tls::{Certs, PrivatePostgres, TlsProxy};
use provisio_tests::{TestEnv, amqp_url, demo_namespace, request};
use serde_json::json;

/// The shared broker's address, from the test's AMQP URL.
async fn broker_addr() -> anyhow::Result<SocketAddr> {
    let url = reqwest::Url::parse(&amqp_url())?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port().unwrap_or(5672);
    tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("broker address does not resolve"))
}

/// The test's AMQP URL pointed at `proxy` over `amqps`, trusting `ca`.
fn amqps_url(proxy: SocketAddr, ca: &std::path::Path) -> anyhow::Result<String> {
    let mut url = reqwest::Url::parse(&amqp_url())?;
    url.set_scheme("amqps")
        .map_err(|()| anyhow::anyhow!("amqps scheme"))?;
    url.set_host(Some("localhost"))?;
    url.set_port(Some(proxy.port()))
        .map_err(|()| anyhow::anyhow!("port"))?;
    url.query_pairs_mut()
        .append_pair("cacertfile", &ca.to_string_lossy());
    Ok(url.to_string())
}

#[tokio::test]
async fn a_request_travels_over_tls_to_postgresql_and_rabbitmq() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("provisio-tls-{}", uuid::Uuid::new_v4().simple()));
    let certs = Certs::generate(&dir.join("certs"), "provisio test CA")?;
    let stranger = Certs::generate(&dir.join("other"), "someone else's CA")?;
    let pg = PrivatePostgres::start(&dir.join("pg"), &certs).await?;
    let ca = certs.ca.to_string_lossy().into_owned();
    let db_url = pg
        .url_with(&format!("sslmode=verify-full&sslrootcert={ca}"))
        .replace("/postgres?", "/provisio?");

    // The server refuses clear connections; a client that trusts another CA refuses the server.
    let clear = PgTarget::parse(&Secret::new(pg.url_with("sslmode=disable")))?;
    assert!(clear.connect().await.is_err(), "the server takes TLS only");
    let wrong = PgTarget::parse(&Secret::new(pg.url_with(&format!(
        "sslmode=verify-full&sslrootcert={}",
        stranger.ca.display()
    ))))?;
    let refused = wrong.connect().await.err().map(|e| format!("{e:?}"));
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("UnknownIssuer")),
        "a certificate from an untrusted CA is refused: {refused:?}"
    );
    provisio_shared::db::create_database_if_missing(&Secret::new(db_url.clone())).await?;

    let proxy = TlsProxy::start(broker_addr().await?, certs.server_config()?).await?;
    let amqps = amqps_url(proxy.addr, &certs.ca)?;
    let wrong_ca = amqps_url(proxy.addr, &stranger.ca)?;
    let refused =
        provisio_shared::amqp::connect(&wrong_ca, std::time::Duration::from_secs(5)).await;
    assert!(refused.is_err(), "the broker's certificate is checked");
    let sessions_before = proxy.sessions.load(Ordering::SeqCst);

    let mut env = TestEnv::new("tls").await?;
    env.extra_env.extend([
        ("PROVISIO_DATABASE_URL".to_owned(), db_url.clone()),
        ("PROVISIO_AMQP_URL".to_owned(), amqps),
        (
            "PROVISIO_QUEUE_MANAGER__TLS_CERT_FILE".to_owned(),
            certs.cert.to_string_lossy().into_owned(),
        ),
        (
            "PROVISIO_QUEUE_MANAGER__TLS_KEY_FILE".to_owned(),
            certs.key.to_string_lossy().into_owned(),
        ),
    ]);
    env.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&certs.ca)?)?)
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let qm = env.queue_manager().await?;
    assert!(qm.url.starts_with("https://"), "{}", qm.url);
    let clear_http = reqwest::get(qm.url.replace("https://", "http://") + "/healthz").await;
    assert!(clear_http.is_err(), "no clear HTTP on the HTTPS port");

    assert_eq!(env.apply(&qm, "demo", &demo_namespace()).await?.0, 201);
    let mut outcomes = env.outcomes().await?;
    let engine = env.engine().await?;
    let (status, body) = env
        .submit(&qm, &request("demo", "hello", json!({"name": "Ada"})))
        .await?;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    let outcome = outcomes.wait_for(&id).await?;
    assert_eq!(outcome["status"], "succeeded", "{outcome}");

    // The request's rows are in the TLS-only database, reached by TLS sessions only.
    let (client, conn) = PgTarget::parse(&Secret::new(db_url))?.connect().await?;
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT status FROM requests WHERE id = $1", &[&id])
        .await?;
    assert_eq!(row.get::<_, String>(0), "succeeded");
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = 'provisio' AND a.application_name = 'provisio'",
            &[],
        )
        .await?;
    let (sessions, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(sessions > 0, "the fleet's sessions are visible");
    assert_eq!(sessions, encrypted, "every session of the fleet is TLS");
    // The queue manager's publisher and the engine's consumer came through the TLS proxy.
    assert!(
        proxy.sessions.load(Ordering::SeqCst) >= sessions_before + 2,
        "broker sessions over TLS"
    );

    drop((qm, engine));
    env.cleanup().await;
    drop(pg);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Where TLS is not spoken: a PostgreSQL on this machine reached through its Unix-domain
/// socket, with the default `sslmode=prefer` and with `require` (libpq ignores `sslmode` on a
/// socket, and so does Provisio). tokio-postgres asks for a TLS connector even there, with an
/// empty host name that rustls refused, so a socket URL used to fail to connect at all.
#[tokio::test]
async fn a_local_postgresql_is_reached_through_its_unix_socket() -> anyhow::Result<()> {
    // Where the test server keeps its socket, asked over the test's own URL.
    let tcp = PgTarget::parse(&Secret::new(provisio_tests::pg_url("postgres")))?;
    let user = tcp.config().get_user().unwrap_or("postgres").to_owned();
    let (client, conn) = tcp.connect().await?;
    let driver = tokio::spawn(conn);
    let dirs: String = client
        .query_one("SHOW unix_socket_directories", &[])
        .await?
        .get(0);
    let port: String = client.query_one("SHOW port", &[]).await?.get(0);
    drop(client);
    let _ = driver.await;
    let socket = dirs.split(',').map(str::trim).find(|d| {
        std::path::Path::new(d)
            .join(format!(".s.PGSQL.{port}"))
            .exists()
    });
    let Some(dir) = socket else {
        // A test server on another machine (PROVISIO_TEST_PG) has no socket here.
        eprintln!("skipped: no socket of the test server on this machine ({dirs})");
        return Ok(());
    };

    for mode in ["", " sslmode=require"] {
        let url = format!("host={dir} port={port} user={user} dbname=postgres{mode}");
        // The pool is how every binary connects.
        let pool = provisio_shared::db::pool(&Secret::new(url.clone()), 1)?;
        let client = pool.get().await?;
        let row = client
            .query_one(
                "SELECT inet_server_addr() IS NULL, \
                        (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid())",
                &[],
            )
            .await?;
        let (on_socket, tls): (bool, bool) = (row.get(0), row.get(1));
        assert!(on_socket, "{url}: connected through the socket");
        assert!(!tls, "{url}: no TLS on a socket");
    }
    Ok(())
}
