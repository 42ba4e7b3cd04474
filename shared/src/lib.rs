//! Provisio's contract crate: everything the queue manager and the workers must agree on.
//!
//! Binaries depend on this crate; it depends on no binary. Wire formats (the request envelope,
//! AMQP names, SQL schema) are defined here once so that a producer and a consumer cannot drift.

pub mod amqp;
pub mod batch;
pub mod config;
pub mod db;
pub mod domain;
pub mod jq;
pub mod metrics;
pub mod namespaces;
pub mod notify;
pub mod procedure;
/// The provider contract, a crate of its own so that out-of-tree providers need only it.
pub use provisio_provider as provider;
pub mod reconnect;
pub mod retry;
pub mod runtime;
pub mod sealing;
pub mod security;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod tls;
