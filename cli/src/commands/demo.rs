//! `dualwrite demo`: runs the whole pipeline against local simulators and checks convergence.

use std::process::ExitCode;

use clap::Args;
use dualwrite_runtime::demo::{DemoOptions, run_demo, summary_table};

/// Arguments of `dualwrite demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Print the summary as one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Accounts created on each side.
    #[arg(long, default_value_t = 5)]
    records: usize,
}

/// Runs the demo; exit 0 only when the run passed (`DemoReport::passed`: converged and showed
/// what it claims), 1 when it did not, 2 when it could not run.
pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let json = args.json;
    let progress = move |line: &str| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    };
    let report = rt.block_on(run_demo(
        DemoOptions {
            records: args.records,
        },
        &progress,
    ))?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!();
        print!("{}", summary_table(&report));
        if !report.error_messages.is_empty() {
            println!("errors logged for a person:");
            for e in &report.error_messages {
                println!("  - {e}");
            }
        }
        if report.converged {
            println!(
                "converged: all {} linked record pairs match on both sides",
                report.records_checked
            );
        } else {
            println!("NOT converged, {} differences:", report.differences.len());
            for d in &report.differences {
                println!("  - {d}");
            }
        }
    }
    if !json && !report.failures.is_empty() {
        println!("FAILED:");
        for f in &report.failures {
            println!("  - {f}");
        }
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
