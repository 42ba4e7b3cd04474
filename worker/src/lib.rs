//! The worker: `--role engine` runs procedures; `--role auditor` (later) sweeps the log.

pub mod audit;
pub mod engine;
pub mod logservers;
pub mod providers;
pub mod recovery;
pub mod txlog;

#[cfg(test)]
pub(crate) mod testing;
