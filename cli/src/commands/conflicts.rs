//! `dualwrite conflicts …`: list the conflict log, and resolve a held (manual) conflict.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use dualwrite_core::Side;
use dualwrite_core::ports::JournalStore;
use dualwrite_runtime::{Config, Parts, StartError, open_queue};
use dualwrite_sqlite::SqliteStore;

#[derive(Debug, Subcommand)]
pub enum ConflictsCommand {
    /// The conflict log, newest first, with both versions.
    List {
        /// Only conflicts still waiting for a person (policy `manual`).
        #[arg(long)]
        open: bool,
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Resolve an open conflict: the kept side's current record is written to the other side
    /// and changes parked behind the conflict move on.
    Resolve {
        /// The conflict's id (from `dualwrite conflicts list --open`).
        id: String,
        /// Which side's record wins.
        #[arg(long)]
        keep: Keep,
        /// The `serve` configuration (environments, credentials, maps, store).
        #[arg(long)]
        config: PathBuf,
    },
}

/// A side, as typed on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Keep {
    /// Dataverse.
    Crm,
    /// Finance & Operations.
    Erp,
}

/// `db` is the store `list` reads; `explicit_db`, when `--db` / `DUALWRITE_DB` named one, takes
/// the place of the configuration's `db:` for `resolve` (as for `serve`).
pub fn run(db: &Path, explicit_db: Option<&Path>, command: ConflictsCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        ConflictsCommand::List { open, limit, json } => {
            if !db.exists() {
                return Err(super::no_store(db));
            }
            let store =
                SqliteStore::open(db).with_context(|| format!("opening {}", db.display()))?;
            let conflicts = rt.block_on(store.conflicts(open, limit))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&conflicts)?);
                return Ok(ExitCode::SUCCESS);
            }
            if conflicts.is_empty() {
                println!("no {}conflicts", if open { "open " } else { "" });
            }
            for c in &conflicts {
                let state = match (c.open, c.winner) {
                    (true, _) => "OPEN".to_string(),
                    (false, Some(w)) => format!("{w} won"),
                    (false, None) => "merged field by field".to_string(),
                };
                println!(
                    "{}  {}  map {}  key {}  policy {}  {state}",
                    c.id,
                    c.detected_at.to_rfc3339(),
                    c.map,
                    c.key,
                    c.policy
                );
                println!("    crm: {}", serde_json::to_string(&c.crm.fields)?);
                println!("    erp: {}", serde_json::to_string(&c.erp.fields)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        ConflictsCommand::Resolve { id, keep, config } => {
            let mut config = Config::load(&config)?;
            if let Some(db) = explicit_db {
                config.db = db.to_path_buf();
            }
            let keep = match keep {
                Keep::Crm => Side::Crm,
                Keep::Erp => Side::Erp,
            };
            let parts = Parts::build(&config)?;
            let (outcome, released) = rt.block_on(async {
                let outcome = parts.engine.resolve_conflict(&id, keep).await?;
                // Changes parked behind the conflict go back to the queue. While `serve` runs it
                // holds the queue, and its own sweep releases them (within 30 s). Only a queue
                // held that way is left to it; any other failure (damage, permissions) is
                // reported, after what the resolution did.
                let released = match open_queue(&config, &parts.store).await {
                    Ok(queue) => parts
                        .engine
                        .sweep_parked(queue.as_ref())
                        .await
                        .map(Some)
                        .map_err(anyhow::Error::from),
                    Err(StartError::QueueUnavailable { held: true, .. }) => Ok(None),
                    Err(e) => Err(e.into()),
                };
                anyhow::Ok((outcome, released))
            })?;
            let (written, code) = resolution_summary(&id, keep, &outcome);
            match released {
                Ok(Some(n)) => println!("{written}; {n} parked change(s) re-queued"),
                Ok(None) => println!(
                    "{written}; the running `dualwrite serve` holds the queue and re-queues the parked changes at its next sweep (within 30 s)"
                ),
                Err(e) => {
                    println!("{written}");
                    return Err(e.context(
                        "the changes parked behind the conflict could not be re-queued; they stay parked and a later `dualwrite serve` releases them",
                    ));
                }
            }
            Ok(code)
        }
    }
}

/// What became of a resolution's write, in words, and the exit code: 0 when the kept record
/// was written (or the other side already held it) or waits for a lookup, 1 when the write
/// was refused for good (logged with the change, for `dualwrite errors retry`).
fn resolution_summary(
    id: &str,
    keep: Side,
    outcome: &dualwrite_engine::ProcessOutcome,
) -> (String, ExitCode) {
    use dualwrite_engine::MapAction;
    let other = keep.other();
    for result in &outcome.maps {
        match &result.action {
            MapAction::Failed { message } => {
                return (
                    format!(
                        "conflict {id} closed with {keep} kept, but the write to {other} was refused: {message}; \
                         fix the cause, then run `dualwrite errors retry {}`",
                        outcome.event_id
                    ),
                    ExitCode::from(1),
                );
            }
            MapAction::Parked { reason, .. } => {
                return (
                    format!(
                        "conflict {id} resolved: {keep} kept; its write to {other} waits for {reason} and is made once that record is synced"
                    ),
                    ExitCode::SUCCESS,
                );
            }
            _ => {}
        }
    }
    (
        format!("conflict {id} resolved: {keep} kept and written to {other}"),
        ExitCode::SUCCESS,
    )
}

#[cfg(test)]
mod tests {
    use dualwrite_core::IntegrationKey;
    use dualwrite_engine::{EventStatus, MapAction, MapResult, ProcessOutcome};

    use super::*;

    fn outcome(action: MapAction) -> ProcessOutcome {
        ProcessOutcome {
            event_id: "resolve:C1".into(),
            status: EventStatus::Processed,
            maps: vec![MapResult {
                map: "customers-v3-accounts".into(),
                key: Some(IntegrationKey("A1".into())),
                action,
            }],
            released: Vec::new(),
        }
    }

    #[test]
    fn a_resolution_says_what_became_of_its_write() {
        let (text, code) = resolution_summary(
            "C1",
            Side::Crm,
            &outcome(MapAction::Written {
                writes: 1,
                conflict: None,
            }),
        );
        assert_eq!(text, "conflict C1 resolved: crm kept and written to erp");
        assert_eq!(code, ExitCode::SUCCESS);
        let (text, code) = resolution_summary(
            "C1",
            Side::Crm,
            &outcome(MapAction::Failed {
                message: "403: privilege missing".into(),
            }),
        );
        assert!(
            text.contains("was refused: 403: privilege missing"),
            "{text}"
        );
        assert!(text.contains("dualwrite errors retry resolve:C1"), "{text}");
        assert_eq!(code, ExitCode::from(1));
        let (text, code) = resolution_summary(
            "C1",
            Side::Erp,
            &outcome(MapAction::Parked {
                waiting_map: "currencies".into(),
                waiting_key: IntegrationKey("EUR".into()),
                reason: "currency EUR".into(),
            }),
        );
        assert!(text.contains("waits for currency EUR"), "{text}");
        assert_eq!(code, ExitCode::SUCCESS);
    }
}
