//! `dualwrite bench …`: benchmarks whose figures users size deployments with (docs/PERFORMANCE.md).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Map + hash + decide on generated Customers V3 records, in memory.
    Engine {
        /// How many records to generate.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Engine { records, json } => {
            let _ = (records, json);
            anyhow::bail!("bench engine: not wired yet")
        }
    }
}
