//! `dualwrite serve --config FILE`: webhook endpoints, workers and scheduler until Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use dualwrite_runtime::{Config, Runtime};
use tracing::info;

/// Arguments of `dualwrite serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (YAML).
    #[arg(long)]
    config: PathBuf,
    /// Log a progress line every this many synced events.
    #[arg(long, default_value_t = 100)]
    every: u64,
}

/// Runs the local pipeline until Ctrl-C, then drains in-flight work and stops.
pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let handle = Runtime::start(config).await?;
        println!("dualwrite listening on http://{}", handle.addr());
        println!("  POST /webhooks/dataverse, POST /webhooks/fno, GET /healthz, GET /status");
        let every = args.every.max(1);
        let mut reported = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = tick.tick() => {
                    let s = handle.stats().await;
                    if s.engine.events / every > reported / every {
                        reported = s.engine.events;
                        info!(events = s.engine.events, writes = s.engine.writes, echoes = s.engine.echoes_suppressed, queue_ready = s.queue.ready, "synced");
                        eprintln!("{} events, {} writes, {} echoes suppressed, queue {}", s.engine.events, s.engine.writes, s.engine.echoes_suppressed, s.queue.ready);
                    }
                }
            }
        }
        eprintln!("stopping: finishing in-flight deliveries ...");
        handle.shutdown().await;
        anyhow::Ok(ExitCode::SUCCESS)
    })
}
