//! Two-phase commit across the participants a transaction enlisted.

use std::time::Duration;

use provisio_shared::retry::{Attempt, retry};
use serde_json::json;

use super::{Failure, Run};
use crate::txlog::Record;

impl Run<'_> {
    /// Prepare every participant, log the decision, commit every participant. The error says
    /// whether the decision had been logged (then the transaction must still commit).
    pub(super) async fn two_phase_commit(&mut self) -> Result<(), (Failure, bool)> {
        self.flush().await.map_err(|f| (f, false))?;
        if self.participants.is_empty() {
            return Ok(());
        }
        let participants: Vec<String> = self.participants.iter().cloned().collect();
        for name in &participants {
            let Some(p) = self.registry.get(name).cloned() else {
                continue;
            };
            if let Err(e) = p.prepare(self.tx_id).await {
                return Err((
                    Failure::new("prepare_failed", format!("{name}: {e}"), "prepare"),
                    false,
                ));
            }
        }
        self.txlog
            .write_record(Record::Status {
                tx_id: self.tx_id,
                status: "prepared",
                owner: self.owner.clone(),
            })
            .await
            .map_err(|e| (Failure::from(e), false))?;
        if let Some(pause) = self.pause_after_prepare {
            tracing::warn!(tx_id = %self.tx_id, ?pause, "fault injection: pausing between prepare and commit");
            tokio::time::sleep(pause).await;
        }
        // The decision. Once durable, every participant must commit, whatever happens.
        self.txlog
            .write_record(Record::Status {
                tx_id: self.tx_id,
                status: "committing",
                owner: self.owner.clone(),
            })
            .await
            .map_err(|e| (Failure::from(e), false))?;
        for name in &participants {
            let Some(p) = self.registry.get(name).cloned() else {
                continue;
            };
            let policy = provisio_shared::retry::Backoff::attempts(
                5,
                Duration::from_millis(50),
                Duration::from_secs(2),
            );
            let r = retry(&policy, |_| {
                let p = p.clone();
                let tx = self.tx_id;
                async move { p.commit(tx).await.map_err(Attempt::Retry) }
            })
            .await;
            if let Err(e) = r {
                return Err((
                    Failure::new("commit_failed", format!("{name}: {e}"), "commit"),
                    true,
                ));
            }
        }
        Ok(())
    }

    /// Discards every participant's pending or prepared effects; false if one could not.
    pub(super) async fn abort_participants(&mut self) -> bool {
        let mut ok = true;
        for name in std::mem::take(&mut self.participants) {
            let Some(p) = self.registry.get(&name).cloned() else {
                continue;
            };
            if let Err(e) = p.abort(self.tx_id).await {
                tracing::error!(provider = %name, error = %e, "two-phase abort failed");
                ok = false;
            } else {
                self.summary
                    .push(json!({"path": format!("abort:{name}"), "status": "rolled_back"}));
            }
        }
        ok
    }
}
