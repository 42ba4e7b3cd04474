//! Process-wide state shared by handlers.

use deadpool_postgres::Pool;
use provisio_shared::amqp::Publisher;
use provisio_shared::config::Config;
use provisio_shared::namespaces::NamespaceCache;
use provisio_shared::telemetry::Readiness;

use crate::auth::KeyStore;

pub struct App {
    pub cfg: Config,
    pub pool: Pool,
    pub publisher: Publisher,
    pub keys: std::sync::Arc<KeyStore>,
    /// Refused calls: counted, and stored in `security_events` off the answer's path.
    pub security: crate::denials::SecurityEvents,
    pub namespaces: std::sync::Arc<NamespaceCache>,
    /// `/readyz`: false while the broker is unreachable.
    pub ready: Readiness,
    pub acceptor: crate::accept::Acceptor,
    pub waiters: std::sync::Arc<crate::wait::Waiters>,
    /// Seals request credentials before they are stored or published.
    pub keyring: provisio_shared::sealing::Keyring,
    /// Per-principal submission limits; `None` when off.
    pub rate_limits: Option<crate::ratelimit::RateLimits>,
}
