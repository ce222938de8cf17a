//! `dualwrite queue …`: operations on the local work queue; `redrive` sends dead letters back.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use dualwrite_core::ports::WorkQueue;
use dualwrite_logqueue::LogQueue;
use dualwrite_runtime::queue_dir;
use dualwrite_sqlite::SqliteQueue;
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Send dead letters back to the work queue, oldest first: each goes to the end of its
    /// record's group with its attempt count reset, and is processed again by `dualwrite serve`.
    /// Stop `serve` first: it holds the queue.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// Move at most this many dead letters (oldest first); all of them when not given.
    #[arg(long)]
    limit: Option<usize>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Opens the work queue of the store `db` for a command run while `serve` is stopped (`command`
/// names it in the refusal, `done` what would have been done): refused with what to do when a
/// running `serve` holds the queue.
pub(crate) fn open_held_queue(db: &Path, command: &str, done: &str) -> Result<LogQueue> {
    let dir = queue_dir(db);
    match LogQueue::open(&dir, dualwrite_logqueue::QueueConfig::default()) {
        Ok(q) => Ok(q),
        Err(dualwrite_logqueue::OpenError::Locked { .. }) => anyhow::bail!(
            "the work queue {} is held by a running dualwrite process (`dualwrite serve`); \
             nothing was {done}. Stop `dualwrite serve`, run `{command}` again, then start \
             `dualwrite serve` again",
            dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("opening the queue {}", dir.display())),
    }
}

pub fn run(db: &Path, command: QueueCommand) -> Result<ExitCode> {
    match command {
        QueueCommand::Redrive(args) => redrive(db, &args),
    }
}

fn redrive(db: &Path, args: &RedriveArgs) -> Result<ExitCode> {
    if !db.exists() {
        return Err(super::no_store(db));
    }
    let dir = queue_dir(db);
    // The queue belongs to one process. Checked before anything moves: while `serve` runs,
    // nothing is redriven, not even the earlier table's dead letters.
    let queue = if dir.is_dir() {
        Some(open_held_queue(db, "dualwrite queue redrive", "redriven")?)
    } else {
        None
    };
    // Dead letters of versions before the log queue stay in the database's own table; they are
    // older than any of the log queue's, so they go first.
    let earlier = SqliteQueue::open(db, dualwrite_sqlite::QueueConfig::default())
        .with_context(|| format!("opening the queue table in {}", db.display()))?;
    let limit = args.limit.unwrap_or(usize::MAX);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (from_table, from_queue, remaining) = rt.block_on(async {
        let from_table = earlier.redrive(limit).await?;
        let mut remaining = earlier.depth().await?.dead;
        let mut from_queue = 0;
        if let Some(q) = &queue {
            let left = limit.saturating_sub(usize::try_from(from_table).unwrap_or(usize::MAX));
            from_queue = q.redrive(left).await?;
            remaining += q.depth().await?.dead;
        }
        anyhow::Ok((from_table, from_queue, remaining))
    })?;
    let moved = from_table + from_queue;
    if args.json {
        let out = json!({
            "db": db.display().to_string(),
            "queue": dir.display().to_string(),
            "moved": moved,
            "moved_from_earlier_table": from_table,
            "remaining_dead_letters": remaining,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{moved} dead letter(s) moved back to the work queue; {remaining} dead letter(s) remain"
    );
    if from_table > 0 {
        println!(
            "{from_table} of them were in the database's queue table (an earlier version's): \
             `dualwrite serve` moves them into the work queue when it starts"
        );
    }
    if moved > 0 {
        println!("start `dualwrite serve` to process them");
    }
    Ok(ExitCode::SUCCESS)
}
