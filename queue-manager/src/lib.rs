//! The queue manager: Provisio's HTTP front door. It authenticates producers, validates their
//! requests against the current namespace version, and makes them durable (broker confirm +
//! PostgreSQL commit) before answering `2xx`.

pub mod accept;
pub mod api;
pub mod app;
pub mod auth;
pub mod denials;
pub mod depth;
pub mod https;
pub mod ratelimit;
pub mod scheduler;
pub mod wait;
