use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $kind:literal, { $($(#[$vm:meta])* $var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $var),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(UnknownVariant { kind: $kind, value: s.to_owned() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// A request's lifecycle (docs/design.md §2.3).
    Status, "status", {
        Scheduled => "scheduled",
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        /// Rolled back cleanly.
        Failed => "failed",
        /// Rollback could not complete; an operator must look.
        InDoubt => "in_doubt",
        Parked => "parked",
        Dead => "dead",
        Cancelled => "cancelled",
    }
);

impl Status {
    /// A final status never changes again; redelivery of a final request is answered, not run.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::InDoubt | Status::Dead | Status::Cancelled
        )
    }
}

string_enum!(
    /// The request lanes; each is its own queue so that high is served first.
    #[derive(Default)]
    Priority, "priority", {
        High => "high",
        #[default]
        Normal => "normal",
        Low => "low",
    }
);

string_enum!(
    /// A procedure's transaction model (docs/design.md §4).
    #[derive(Default)]
    TxModel, "transaction model", {
        Read => "read",
        #[default]
        Compensating => "compensating",
        TwoPhase => "two_phase",
    }
);

string_enum!(
    /// A transaction's state in the log (`transactions.status`; docs/design.md §6).
    TxStatus, "transaction status", {
        Running => "running",
        /// Two-phase: every participant prepared, the decision not yet taken.
        Prepared => "prepared",
        /// Two-phase: the decision to commit is durable; every participant must commit.
        Committing => "committing",
        Committed => "committed",
        RollingBack => "rolling_back",
        RolledBack => "rolled_back",
        /// Rollback could not complete; an operator must look.
        InDoubt => "in_doubt",
        /// Refused or failed before anything needed undoing (and every `read` failure).
        Failed => "failed",
    }
);

string_enum!(
    /// What a request-level retry policy does once its retries are spent.
    #[derive(Default)]
    OnExhausted, "on_exhausted", {
        /// The request ends `failed`.
        #[default]
        Fail => "fail",
        /// The request waits, `parked`, for an operator to resume it.
        Park => "park",
    }
);

string_enum!(
    /// What a grant allows (`grants.permission`; docs/design.md §8).
    Permission, "permission", {
        /// Queued requests for public procedures.
        Execute => "execute",
        /// Requests that carry credentials for the providers.
        ExecuteWithCredentials => "execute_with_credentials",
        /// The trusted lane: `run_as` and inline steps.
        ExecuteTrusted => "execute_trusted",
        /// Procedures marked `access: private`.
        ExecutePrivate => "execute_private",
        /// Everything, including the admin routes.
        Admin => "admin",
    }
);

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
