//! `dualwrite serve --config FILE`: webhook endpoints, workers and scheduler until Ctrl-C.

use std::io::Write;
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

/// Runs the local pipeline until Ctrl-C, then drains in-flight work and stops. `db`, given
/// by `--db` or `DUALWRITE_DB`, takes the place of the configuration's `db:`.
pub fn run(args: ServeArgs, db: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let mut config = Config::load(&args.config)?;
    if let Some(db) = db {
        config.db = db;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // Listening from before the start for the whole run: a signal arriving while the loop
        // is busy elsewhere is kept for the next `select!` rather than missed between two
        // listeners (or ending the process before the queue is closed cleanly).
        let mut stop = StopSignals::listen()?;
        let handle = Runtime::start(config).await?;
        // Written so that a closed stdout (a supervisor that stopped reading) cannot end the
        // service, as `println!` would.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "dualwrite listening on http://{}", handle.addr());
        let _ = writeln!(
            out,
            "  POST /webhooks/dataverse, POST /webhooks/fno, GET /healthz, GET /status"
        );
        let _ = out.flush();
        drop(out);
        let every = args.every.max(1);
        let mut reported = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                signal = stop.next() => {
                    eprintln!("{signal}: stopping, finishing in-flight deliveries (again to stop at once) ...");
                    break;
                }
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
        tokio::select! {
            () = handle.shutdown() => {}
            signal = stop.next() => {
                // Nothing is lost: every accepted event is in the durable queue, and the
                // deliveries cut short are delivered again at the next start.
                eprintln!("{signal} again: stopping now; unfinished deliveries resume at the next start");
                return anyhow::Ok(ExitCode::from(130));
            }
        }
        anyhow::Ok(ExitCode::SUCCESS)
    })
}

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM (what service managers and container runtimes send to
/// stop a process): both stop `serve` the same way. On Unix both are streams held for the whole
/// run, so a signal arriving between two waits is not missed.
struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignals {})
        }
    }

    /// What stopped the process, once a stop signal arrives.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "interrupted",
                _ = self.terminate.recv() => "terminated",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}
