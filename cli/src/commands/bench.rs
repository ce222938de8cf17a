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
            let report = dualwrite_bench::engine::run(records).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "bench engine: {} records of {} ({} fields): median {} ns, p99 {} ns, {} records/s (target median <= {} ns: {})",
                    report.records,
                    report.map,
                    report.fields_per_record,
                    report.median_ns_per_record,
                    report.p99_ns_per_record,
                    report.records_per_sec,
                    report.target_median_ns,
                    if report.target_met { "met" } else { "NOT met" }
                );
            }
            Ok(if report.target_met {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
