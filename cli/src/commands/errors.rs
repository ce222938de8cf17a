//! `dualwrite errors …`: the changes that failed for good; `retry` sends them again.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use chrono::Utc;
use clap::{Args, Subcommand};
use dualwrite_core::ports::{QueueMessage, WorkQueue};
use dualwrite_engine::replay::failed_events;
use dualwrite_sqlite::SqliteStore;
use serde_json::json;

use super::queue::open_held_queue;

#[derive(Debug, Subcommand)]
pub enum ErrorsCommand {
    /// Send changes that failed for good (a 400, 403 or 404 from the other side, an unmappable
    /// record) to the work queue again, once their cause is fixed. They are processed by
    /// `dualwrite serve` under new ids; one older than what was applied since is dropped as
    /// stale, one already applied changes nothing. Stop `serve` first: it holds the queue.
    Retry(RetryArgs),
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    /// Event ids of the failed changes (as `dualwrite status` lists them).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    event_ids: Vec<String>,
    /// Every failed change in the error log.
    #[arg(long)]
    all: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(db: &Path, command: ErrorsCommand) -> Result<ExitCode> {
    match command {
        ErrorsCommand::Retry(args) => retry(db, &args),
    }
}

fn retry(db: &Path, args: &RetryArgs) -> Result<ExitCode> {
    if !db.exists() {
        return Err(super::no_store(db));
    }
    let queue = open_held_queue(db, "dualwrite errors retry", "sent again")?;
    let store =
        SqliteStore::open(db).with_context(|| format!("opening the store {}", db.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let replay = rt.block_on(async {
        let replay = failed_events(&store, &args.event_ids, Utc::now()).await?;
        if !replay.events.is_empty() {
            let messages = replay
                .events
                .iter()
                .cloned()
                .map(QueueMessage::for_event)
                .collect();
            queue.send(messages).await?;
        }
        anyhow::Ok(replay)
    })?;
    let sent: Vec<&str> = replay.events.iter().map(|e| e.event_id.as_str()).collect();
    if args.json {
        let out = json!({
            "db": db.display().to_string(),
            "sent": sent,
            "unknown": replay.unknown,
            "without_event": replay.without_event,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} failed change(s) sent to the work queue again",
            sent.len()
        );
        for id in &sent {
            println!("  {id}");
        }
        for id in &replay.unknown {
            println!("{id}: no error in the log names this event id; nothing sent");
        }
        for id in &replay.without_event {
            println!(
                "{id}: its error was logged without the change (an earlier version); \
                 its record's next change, or the catch-up poll, syncs it"
            );
        }
        if !sent.is_empty() {
            println!("start `dualwrite serve` to process them");
        }
    }
    Ok(if replay.unknown.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
