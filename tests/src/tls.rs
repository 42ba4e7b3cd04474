//! TLS fixtures generated per test: a private CA with a server certificate for `localhost` and
//! `127.0.0.1`, a PostgreSQL server of the test's own that accepts TLS connections only, and a
//! TLS-terminating proxy in front of the shared RabbitMQ (whose configuration a test must not
//! change: other tests use it at the same time).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_rustls::TlsAcceptor;

/// A CA and a server certificate it signed, as PEM files in a directory of their own.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certs {
    /// `dir` is created; the files are readable by everyone except the key (0600), which
    /// PostgreSQL insists on.
    pub fn generate(dir: &Path, ca_name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &issuer)?;
        let certs = Self {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        };
        std::fs::write(&certs.ca, ca_cert.pem())?;
        std::fs::write(&certs.cert, cert.pem())?;
        std::fs::write(&certs.key, key.serialize_pem())?;
        set_mode(&certs.key, 0o600)?;
        Ok(certs)
    }

    pub fn server_config(&self) -> anyhow::Result<tokio_rustls::rustls::ServerConfig> {
        Ok(provisio_shared::tls::server_config(&self.cert, &self.key)?)
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A free port on 127.0.0.1 (bound, then released for the server to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A PostgreSQL server of the test's own, from the installed server binaries, that refuses
/// every connection without TLS. Stopped and removed on drop, also when the test fails.
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PrivatePostgres {
    pub async fn start(dir: &Path, certs: &Certs) -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let data = dir.join("data");
        std::fs::create_dir_all(dir)?;
        let as_root = nix_uid_is_root();
        if as_root {
            // initdb and postgres refuse to run as root.
            chown_postgres(dir)?;
        }
        let mut this = Self {
            port: free_port()?,
            dir: dir.to_owned(),
            child: None,
        };
        let status = server_command(as_root, &bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .context("running initdb")?;
        if !status.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&status.stderr));
        }
        for (from, to) in [(&certs.cert, "server.crt"), (&certs.key, "server.key")] {
            let target = data.join(to);
            std::fs::copy(from, &target)?;
            set_mode(&target, 0o600)?;
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            "hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n\
             local all all trust\n",
        )?;
        if as_root {
            chown_postgres(dir)?;
        }
        let log = std::fs::File::create(dir.join("postgres.log"))?;
        let child = server_command(as_root, &bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", "listen_addresses=127.0.0.1", "-p"])
            .arg(this.port.to_string())
            .arg("-k")
            .arg(dir)
            .args([
                "-c",
                "ssl=on",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=60",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("starting postgres")?;
        this.child = Some(child);
        let url = this.url_with("sslmode=require");
        crate::eventually(Duration::from_secs(30), "the private PostgreSQL", || {
            let url = url.clone();
            async move {
                let target = provisio_shared::db::PgTarget::parse(
                    &provisio_shared::config::Secret::new(url),
                )?;
                Ok(target.connect().await.ok().map(|_| ()))
            }
        })
        .await
        .with_context(|| std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default())?;
        Ok(this)
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres?PARAMS`.
    pub fn url_with(&self, params: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{params}",
            self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nix_uid_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn chown_postgres(dir: &Path) -> anyhow::Result<()> {
    let ok = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()?
        .success();
    if !ok {
        bail!("chown postgres {} failed", dir.display());
    }
    Ok(())
}

fn server_command(as_root: bool, program: &Path) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// The newest installed PostgreSQL server binaries (Debian's layout, as `ops/` installs them).
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context(
            "no PostgreSQL server binaries under /usr/lib/postgresql (ops/test installs them)",
        )?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .context("no initdb under /usr/lib/postgresql/*/bin")
}

/// Terminates TLS and forwards the clear stream to `upstream`; counts finished handshakes.
pub struct TlsProxy {
    pub addr: SocketAddr,
    pub sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    pub async fn start(
        upstream: SocketAddr,
        config: tokio_rustls::rustls::ServerConfig,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sessions = Arc::new(AtomicUsize::new(0));
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let count = sessions.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let (acceptor, count) = (acceptor.clone(), count.clone());
                conns.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut out) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut out).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            sessions,
            task,
        })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
