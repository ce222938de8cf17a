//! `dualwrite status`: what the local store and queue hold, for an operator.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use dualwrite_core::ports::{JournalStore, WorkQueue};
use dualwrite_logqueue::LogQueue;
use dualwrite_runtime::queue_dir;
use dualwrite_sqlite::{SqliteQueue, SqliteStore};
use serde_json::json;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// How many recent conflicts, errors and dead letters to show.
    #[arg(long, default_value_t = 5)]
    recent: usize,
}

pub fn run(db: &Path, args: StatusArgs) -> Result<ExitCode> {
    if !db.exists() {
        return Err(super::no_store(db));
    }
    let store = SqliteStore::open(db).with_context(|| format!("opening {}", db.display()))?;
    // Dead letters of versions before the log queue stay in the database's own table.
    let earlier = SqliteQueue::open(db, dualwrite_sqlite::QueueConfig::default())
        .with_context(|| format!("opening the queue table in {}", db.display()))?;
    let dir = queue_dir(db);
    // The queue belongs to one process: while `serve` runs, its /status tells.
    let (queue, held) = if dir.is_dir() {
        match LogQueue::open(&dir, dualwrite_logqueue::QueueConfig::default()) {
            Ok(q) => (Some(q), false),
            Err(dualwrite_logqueue::OpenError::Locked { .. }) => (None, true),
            Err(e) => {
                return Err(e).with_context(|| format!("opening the queue {}", dir.display()));
            }
        }
    } else {
        (None, false)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let counts = store.counts()?;
        let states = store.map_states().await?;
        let mut depth = earlier.depth().await?;
        // Queues list dead letters oldest first (the earlier version's table holds the older
        // ones): the most recent are the last `recent` of them all, shown newest first.
        let mut dead = earlier.dead_letters(usize::MAX).await?;
        if let Some(q) = &queue {
            let d = q.depth().await?;
            depth.ready += d.ready;
            depth.in_flight += d.in_flight;
            depth.delayed += d.delayed;
            depth.dead += d.dead;
            dead.extend(q.dead_letters(usize::MAX).await?);
        }
        let dead: Vec<_> = dead.into_iter().rev().take(args.recent).collect();
        let conflicts = store.conflicts(false, args.recent).await?;
        let errors = store.errors(args.recent).await?;
        let mut per_map = std::collections::BTreeMap::<String, usize>::new();
        for link in store.links(None)? {
            *per_map.entry(link.map.into()).or_default() += 1;
        }
        if args.json {
            let out = json!({
                "db": db.display().to_string(),
                "links": counts.links,
                "links_per_map": per_map,
                "completed_events": counts.completed_events,
                "open_conflicts": counts.open_conflicts,
                "conflicts": counts.conflicts,
                "errors": counts.errors,
                "parked": counts.parked,
                // While another process holds the queue its counts are unknown here: null, not
                // 0 (`earlier_dead` counts what the earlier version's table still holds).
                "queue": if held {
                    json!({"dir": dir.display().to_string(), "held_by_another_process": true, "ready": null, "in_flight": null, "delayed": null, "dead": null, "earlier_dead": depth.dead})
                } else {
                    json!({"dir": dir.display().to_string(), "held_by_another_process": false, "ready": depth.ready, "in_flight": depth.in_flight, "delayed": depth.delayed, "dead": depth.dead, "earlier_dead": null})
                },
                "maps": states,
                "recent_conflicts": conflicts,
                "recent_errors": errors.iter().map(|e| json!({
                    "at": e.at, "class": e.class, "map": e.map, "key": e.key,
                    "event_id": e.event_id, "message": e.message,
                    "retryable": e.event.is_some()})).collect::<Vec<_>>(),
                "recent_dead_letters": dead.iter().map(|d| json!({
                    "event_id": d.message.event.event_id, "group": d.message.group_id,
                    "attempts": d.attempts, "last_error": d.last_error})).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            return Ok::<_, anyhow::Error>(ExitCode::SUCCESS);
        }
        println!("store: {}", db.display());
        println!(
            "links: {}   events done: {}   parked: {}   conflicts: {} ({} open)   errors: {}",
            counts.links, counts.completed_events, counts.parked, counts.conflicts, counts.open_conflicts, counts.errors
        );
        if held {
            println!(
                "queue: {} is held by a running dualwrite process (`dualwrite serve`: GET /status on its listen address shows the queue){}",
                dir.display(),
                if depth.dead > 0 { format!("; {} earlier dead letters", depth.dead) } else { String::new() }
            );
        } else {
            println!(
                "queue: {} ready, {} in flight, {} delayed, {} dead-lettered",
                depth.ready, depth.in_flight, depth.delayed, depth.dead
            );
        }
        if !per_map.is_empty() {
            println!("\nlinks per map:");
            for (map, n) in &per_map {
                println!("  {map:32} {n}");
            }
        }
        if !states.is_empty() {
            println!("\nmaps:");
            for s in &states {
                println!("  {:32} {:?}  updated {}", s.map, s.status, s.updated_at.to_rfc3339());
            }
        }
        if !conflicts.is_empty() {
            println!("\nrecent conflicts:");
            for c in &conflicts {
                let winner = c.winner.map_or("none (open)".to_string(), |w| w.to_string());
                println!("  {} {} {} policy {} winner {}", c.detected_at.to_rfc3339(), c.map, c.key, c.policy, winner);
            }
        }
        if !errors.is_empty() {
            println!("\nrecent errors:");
            for e in &errors {
                println!(
                    "  {} {:?} {} {}: {}",
                    e.at.to_rfc3339(),
                    e.class,
                    e.map.as_deref().unwrap_or("-"),
                    e.key.as_deref().unwrap_or("-"),
                    e.message
                );
                if let (Some(id), Some(_)) = (&e.event_id, &e.event) {
                    println!("    event {id}: `dualwrite errors retry {id}` once the cause is fixed");
                }
            }
        }
        if !dead.is_empty() {
            println!("\nrecent dead letters (newest first):");
            for d in &dead {
                println!("  {} after {} attempts: {}", d.message.event.event_id, d.attempts, d.last_error);
            }
            println!(
                "  `dualwrite queue redrive` sends them back to the queue once the cause is fixed (stop `dualwrite serve` first, start it again after)"
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
