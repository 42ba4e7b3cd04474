//! The worker: `--role engine` runs procedures; `--role auditor` recovers, sweeps the log
//! and gives dead-lettered requests their final status.

pub mod audit;
pub mod auditor;
pub mod dead;
pub mod engine;
pub mod logservers;
pub mod logset;
pub mod operator;
pub mod recovery;
pub mod txlog;

#[cfg(test)]
mod namespace_cache_tests;
#[cfg(test)]
pub(crate) mod testing;
