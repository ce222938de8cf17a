//! The `dualwrite` command line: parses arguments and hands each command to its module.

mod commands;

/// mimalloc instead of the system allocator: the engine's per-record path makes many small
/// allocations, and glibc's malloc was most of its cost (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dualwrite keeps Dynamics 365 Dataverse (CRM) and Finance & Operations (ERP) in step,
/// record by record, in near real time.
#[derive(Debug, Parser)]
#[command(name = "dualwrite", version, about, long_about = None)]
struct Cli {
    /// The embedded state store and queue (SQLite file), created when missing. Default
    /// `.dualwrite/state.db`; for `serve`, the configuration's `db:` unless given here. (The
    /// demo and the benchmarks run on a temporary store of their own.)
    #[arg(long, global = true, env = "DUALWRITE_DB")]
    db: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check, list, show and export table maps.
    Maps {
        #[command(subcommand)]
        command: commands::maps::MapsCommand,
    },
    /// Show map states, links, queue depth, dead letters, conflicts and errors of the local store.
    Status(commands::status::StatusArgs),
    /// List the conflict log; resolve a conflict held for a person.
    Conflicts {
        #[command(subcommand)]
        command: commands::conflicts::ConflictsCommand,
    },
    /// Send changes that failed for good back to the work queue once their cause is fixed.
    Errors {
        #[command(subcommand)]
        command: commands::errors::ErrorsCommand,
    },
    /// Operate the local work queue: send dead letters back to it.
    Queue {
        #[command(subcommand)]
        command: commands::queue::QueueCommand,
    },
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        command: commands::bench::BenchCommand,
    },
    /// Run the webhook endpoints, workers and catch-up scheduler until Ctrl-C.
    Serve(commands::serve::ServeArgs),
    /// Run the whole pipeline against local simulators and check that both sides converge.
    Demo(commands::demo::DemoArgs),
}

/// The store the commands use when `--db` / `DUALWRITE_DB` do not name one.
const DEFAULT_DB: &str = ".dualwrite/state.db";

fn main() -> ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DUALWRITE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let store = cli.db.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DB));
    let result = match cli.command {
        Command::Maps { command } => commands::maps::run(command),
        Command::Status(args) => commands::status::run(&store, args),
        Command::Conflicts { command } => {
            commands::conflicts::run(&store, cli.db.as_deref(), command)
        }
        Command::Errors { command } => commands::errors::run(&store, command),
        Command::Queue { command } => commands::queue::run(&store, command),
        Command::Bench { command } => commands::bench::run(command),
        Command::Serve(args) => commands::serve::run(args, cli.db),
        Command::Demo(args) => commands::demo::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `dualwrite maps show X | head` closes stdout early; `println!` then panics. That is not an
/// error of ours: end quietly, as Unix tools do on SIGPIPE (which Rust ignores and `unsafe` would
/// be needed to restore). Every other panic keeps the default report.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}
