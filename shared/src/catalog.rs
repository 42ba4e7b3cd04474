//! The providers and actions a namespace may call. Both the queue manager (validating at
//! apply time) and the engine (running) derive it from the same configuration, so a namespace
//! that validates is one the engines can run.

use crate::config::Config;
use crate::procedure::Catalog;

/// Actions of the built-in `test` provider (fault injection; DESIGN §5).
pub const TEST_ACTIONS: &[&str] = &["echo", "sleep", "fail", "fail_n_times", "panic"];

#[derive(Clone, Debug)]
pub struct StandardCatalog {
    test_enabled: bool,
}

impl StandardCatalog {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            test_enabled: cfg.providers.test.enabled,
        }
    }
}

impl Catalog for StandardCatalog {
    fn check_action(&self, provider: &str, action: &str) -> Result<(), String> {
        let actions: &[&str] = match provider {
            "test" if self.test_enabled => TEST_ACTIONS,
            "test" => {
                return Err(
                    "provider `test` is disabled (providers.test.enabled = false)".to_owned(),
                );
            }
            other => return Err(format!("unknown provider `{other}`")),
        };
        if actions.contains(&action) {
            Ok(())
        } else {
            Err(format!(
                "provider `{provider}` has no action `{action}` (it has: {})",
                actions.join(", ")
            ))
        }
    }
}
