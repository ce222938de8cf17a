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

pub fn run(db: &Path, command: ConflictsCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        ConflictsCommand::List { open, limit, json } => {
            if !db.exists() {
                anyhow::bail!("no local store at {} (pass --db)", db.display());
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
            let config = Config::load(&config)?;
            let keep = match keep {
                Keep::Crm => Side::Crm,
                Keep::Erp => Side::Erp,
            };
            let parts = Parts::build(&config)?;
            let released = rt.block_on(async {
                parts.engine.resolve_conflict(&id, keep).await?;
                // Changes parked behind the conflict go back to the queue. While `serve` runs it
                // holds the queue, and its own sweep releases them (within 30 s).
                match open_queue(&config, &parts.store).await {
                    Ok(queue) => anyhow::Ok(Some(parts.engine.sweep_parked(queue.as_ref()).await?)),
                    Err(StartError::QueueUnavailable { .. }) => anyhow::Ok(None),
                    Err(e) => Err(e.into()),
                }
            })?;
            match released {
                Some(n) => println!(
                    "conflict {id} resolved: {keep} kept and written to {}; {n} parked change(s) re-queued",
                    keep.other()
                ),
                None => println!(
                    "conflict {id} resolved: {keep} kept and written to {}; the running `dualwrite serve` holds the queue and re-queues the parked changes at its next sweep (within 30 s)",
                    keep.other()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
