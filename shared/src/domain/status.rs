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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_text() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).expect("serializes"), s.as_str());
        }
        assert!("done".parse::<Status>().is_err());
    }

    #[test]
    fn only_outcomes_are_final() {
        assert!(Status::Succeeded.is_final());
        assert!(Status::InDoubt.is_final());
        assert!(!Status::Running.is_final());
        assert!(!Status::Parked.is_final());
    }

    #[test]
    fn priority_defaults_to_normal() {
        assert_eq!(Priority::default(), Priority::Normal);
        assert_eq!("high".parse::<Priority>(), Ok(Priority::High));
    }
}
