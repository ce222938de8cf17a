//! `dualwrite bench …`: benchmarks whose figures users size deployments with (docs/PERFORMANCE.md).

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Map + hash + decide on generated Customers V3 records, in memory.
    Engine {
        /// How many records each of the 5 rounds measures.
        #[arg(long, default_value_t = 20_000)]
        records: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Webhooks through the local pipeline (runtime, SQLite, connectors) against the
    /// simulators: throughput, latency to the target write, and a check of both sides.
    Live {
        /// Webhook deliveries to send (one distinct account each).
        #[arg(long, default_value_t = 20_000)]
        events: usize,
        /// Open loop at this many events/s; without it, closed loop at maximum throughput.
        #[arg(long)]
        rate: Option<f64>,
        /// Most POSTs in flight at once (keep-alive connections).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Events the runtime processes at once (`worker.concurrency`).
        #[arg(long, default_value_t = 128)]
        workers: usize,
        /// Seconds to wait for every event to complete.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Requests in flight per environment when coalescing calls into `$batch` requests
        /// (the `batching.max_in_flight` of the configuration).
        #[arg(long, default_value_t = dualwrite_connectors::coalesce::DEFAULT_MAX_IN_FLIGHT)]
        max_in_flight: usize,
        /// Calls per `$batch` (the `batching.max_batch` of the configuration).
        #[arg(long, default_value_t = dualwrite_connectors::coalesce::DEFAULT_MAX_BATCH)]
        max_batch: usize,
        /// Send every connector call as a request of its own (`batching.enabled: false`).
        #[arg(long)]
        no_batching: bool,
        /// Print one JSON object on stdout instead of text (progress goes to stderr).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Live {
            events,
            rate,
            concurrency,
            workers,
            timeout,
            max_in_flight,
            max_batch,
            no_batching,
            json,
        } => {
            let batching = (!no_batching).then_some(dualwrite_connectors::CoalescingConfig {
                max_in_flight,
                max_batch,
            });
            let options = dualwrite_bench::live::LiveOptions {
                events,
                rate,
                concurrency,
                workers,
                timeout: std::time::Duration::from_secs(timeout),
                batching: dualwrite_runtime::BatchingSettings {
                    dataverse: batching,
                    fno: batching,
                },
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let progress = move |line: &str| eprintln!("{line}");
            let report = rt.block_on(dualwrite_bench::live::run(options, &progress))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "bench live: {} events in {:.2} s = {} events/s; latency p50 {} ms, p99 {} ms, max {} ms; lost {}, duplicated {} ({}: {})",
                    report.events,
                    report.duration_s,
                    report.events_per_sec,
                    report.p50_ms,
                    report.p99_ms,
                    report.max_ms,
                    report.lost,
                    report.duplicated,
                    report.target,
                    if report.target_met { "met" } else { "NOT met" }
                );
                if let (Some(total), Some(pipeline)) =
                    (report.cpu_us_per_event, report.cpu_us_per_event_pipeline)
                {
                    println!(
                        "  CPU per event: {total} µs in all, {pipeline} µs without the simulators"
                    );
                }
                for p in &report.problems {
                    println!("  - {p}");
                }
            }
            Ok(if report.target_met {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        BenchCommand::Engine { records, json } => {
            let report = dualwrite_bench::engine::run(records).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "bench engine: {} rounds of {} records of {} ({} fields): best round median {} ns, p99 {} ns, {} records/s; round medians {:?} ns, all rounds {} ns (target median <= {} ns: {})",
                    report.rounds,
                    report.records,
                    report.map,
                    report.fields_per_record,
                    report.median_ns_per_record,
                    report.p99_ns_per_record,
                    report.records_per_sec,
                    report.round_medians_ns,
                    report.median_ns_all_rounds,
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
