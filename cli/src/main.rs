//! The `dualwrite` command line: parses arguments and hands each command to its module.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// dualwrite keeps Dynamics 365 Dataverse (CRM) and Finance & Operations (ERP) in step,
/// record by record, in near real time.
#[derive(Debug, Parser)]
#[command(name = "dualwrite", version, about, long_about = None)]
struct Cli {
    /// The embedded state store and queue (SQLite file), created when missing.
    #[arg(long, global = true, env = "DUALWRITE_DB", default_value = ".dualwrite/state.db")]
    db: PathBuf,
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
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        command: commands::bench::BenchCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DUALWRITE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Maps { command } => commands::maps::run(command),
        Command::Status(args) => commands::status::run(&cli.db, args),
        Command::Bench { command } => commands::bench::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
