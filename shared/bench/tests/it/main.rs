//! Integration tests of dualwrite-bench: the live bench end to end (simulators, runtime,
//! SQLite), checked for correctness only; timings depend on the machine.

use std::time::Duration;

use dualwrite_bench::live::{LiveOptions, run};

/// 300 webhooks through the whole pipeline, closed loop: every account arrives in F&O once,
/// with its values, and nothing is written back to Dataverse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_bench_loses_and_duplicates_nothing() {
    let report = run(
        LiveOptions {
            events: 300,
            rate: None,
            concurrency: 16,
            workers: 8,
            timeout: Duration::from_secs(120),
            ..LiveOptions::default()
        },
        &|_| {},
    )
    .await
    .expect("the live bench runs to the end");
    assert_eq!(report.events, 300);
    assert_eq!(report.lost, 0, "problems: {:?}", report.problems);
    assert_eq!(report.duplicated, 0, "problems: {:?}", report.problems);
    assert_eq!(
        report.latency_samples, 300,
        "every event's completion is observed"
    );
    assert_eq!(report.post_failures, 0);
    assert!(
        report.pipeline.engine.writes >= 300,
        "{:?}",
        report.pipeline
    );
    let fno = report.pipeline.batching.fno;
    assert!(
        fno.calls >= 300,
        "F&O calls go through the coalescer: {fno:?}"
    );
    assert!(fno.requests <= fno.calls, "{fno:?}");
    // The simulators run on threads of their own, so the pipeline's CPU is told apart.
    if cfg!(target_os = "linux") {
        assert!(
            report
                .cpu_us_per_event_by_thread
                .contains_key(dualwrite_bench::live::SIMULATOR_THREADS),
            "{:?}",
            report.cpu_us_per_event_by_thread
        );
        // The pipeline's share is the total without the simulators' thread (each rounded to
        // 0.1 µs).
        let (total, pipeline) = (report.cpu_us_per_event, report.cpu_us_per_event_pipeline);
        let simulators =
            report.cpu_us_per_event_by_thread[dualwrite_bench::live::SIMULATOR_THREADS];
        assert!(
            matches!((total, pipeline), (Some(t), Some(p)) if (t - simulators - p).abs() <= 0.2),
            "{total:?} - {simulators} != {pipeline:?}"
        );
    }
}

/// Open loop: events are sent on schedule and all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_bench_open_loop_completes_every_event() {
    let report = run(
        LiveOptions {
            events: 100,
            rate: Some(500.0),
            concurrency: 16,
            workers: 8,
            timeout: Duration::from_secs(120),
            ..LiveOptions::default()
        },
        &|_| {},
    )
    .await
    .expect("the live bench runs to the end");
    assert_eq!(report.rate, Some(500.0));
    assert_eq!(report.latency_samples, 100);
    assert_eq!(
        (report.lost, report.duplicated),
        (0, 0),
        "{:?}",
        report.problems
    );
    // 100 events at 500/s take at least 0.198 s of sending.
    assert!(report.duration_s >= 0.19, "duration {}", report.duration_s);
}

/// Options that cannot give a run are refused before anything starts.
#[tokio::test]
async fn live_bench_refuses_a_zero_rate() {
    let err = run(
        LiveOptions {
            rate: Some(0.0),
            ..LiveOptions::default()
        },
        &|_| {},
    )
    .await
    .expect_err("rate 0 is refused");
    assert!(err.to_string().contains("--rate"), "{err}");
}
