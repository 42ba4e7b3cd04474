//! `provisioctl`: the command-line client of the queue manager's API, shaped like kubectl
//! (`get`, `describe`, `apply -f`, verbs on one object), so that operators need no curl.

mod apply;
mod args;
mod bulk;
mod client;
mod commands;
mod describe;
mod table;

use std::process::ExitCode;

use clap::Parser;
use serde_json::Value;

pub use args::Format;
use args::{Cli, Cmd, Delete, Describe, Keys, Principals};
use client::{Api, Exit, Failure};

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    let api = Api::new(&cli.url, cli.api_key.clone())?;
    let format = cli.output;
    match &cli.cmd {
        Cmd::Apply { path, dry_run } => apply::run(&api, path, *dry_run, format).await,
        Cmd::Get(what) => commands::get(&api, what, format).await,
        Cmd::Describe(Describe::Request { id }) => describe::request(&api, id, format).await,
        Cmd::Submit(s) => commands::submit(&api, s, format).await,
        Cmd::Cancel { id } => commands::cancel(&api, id, format).await,
        Cmd::Resume { id } => commands::resume(&api, id, format).await,
        Cmd::Requeue {
            all: false,
            reason,
            namespace,
            ..
        } if reason.is_some() || namespace.is_some() => {
            Err(Failure::Usage("--reason and --namespace go with --all".into()).into())
        }
        Cmd::Requeue {
            id: Some(id),
            all: false,
            ..
        } => commands::requeue_one(&api, id, format).await,
        Cmd::Requeue {
            reason, namespace, ..
        } => commands::requeue_all(&api, reason.as_ref(), namespace.as_ref(), format).await,
        Cmd::Delete(Delete::DeadLetter { id }) => {
            commands::delete_dead_letter(&api, id, format).await
        }
        Cmd::Resolve { tx_id, note, wait } => {
            commands::resolve(&api, tx_id, note, *wait, format).await
        }
        Cmd::RetryRollback { tx_id, note, wait } => {
            commands::retry_rollback(&api, tx_id, note.as_ref(), *wait, format).await
        }
        Cmd::Principals(Principals::Create {
            name,
            groups,
            kind,
            amqp_user,
        }) => {
            commands::create_principal(
                &api,
                name,
                groups,
                kind.as_ref(),
                amqp_user.as_ref(),
                format,
            )
            .await
        }
        Cmd::Principals(Principals::Groups { name, groups }) => {
            commands::set_groups(&api, name, groups, format).await
        }
        Cmd::Principals(Principals::Grants {
            name,
            set,
            permissions,
        }) => commands::grants(&api, name, set.then_some(permissions.as_slice()), format).await,
        Cmd::Keys(Keys::Create {
            principal,
            ttl_seconds,
        }) => commands::create_key(&api, principal, *ttl_seconds, format).await,
        Cmd::Keys(Keys::Revoke { principal, key_id }) => {
            commands::revoke_key(&api, principal, key_id, format).await
        }
    }
}

fn report(e: &anyhow::Error) -> Exit {
    let failure = e.chain().find_map(|c| c.downcast_ref::<Failure>());
    match failure {
        Some(Failure::Api { details, .. }) => {
            eprintln!("error: {e:#}");
            for d in details.as_array().into_iter().flatten() {
                let p = d.get("path").and_then(Value::as_str).unwrap_or("");
                let m = d.get("message").and_then(Value::as_str).unwrap_or("");
                eprintln!("  {p}: {m}");
            }
        }
        _ => eprintln!("error: {e:#}"),
    }
    failure.map_or(Exit::Usage, Failure::exit)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Ok.into()
            };
        }
    };
    match run(cli).await {
        Ok(code) => code.into(),
        Err(e) => report(&e).into(),
    }
}
