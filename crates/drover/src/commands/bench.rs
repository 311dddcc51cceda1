//! `drover bench …`: measurements recorded in BENCHMARKS.md.

use std::process::ExitCode;

use drover_config::Config;
use drover_server::bench::{BusBenchOptions, EnvBenchOptions, bench_bus, bench_env};

use crate::cli::{BenchBackend, BenchCommand, GlobalArgs};
use crate::output;

pub(crate) async fn bench(
    global: &GlobalArgs,
    config: &Config,
    command: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Bus(args) => {
            let bus_url = match (args.backend, args.url) {
                (_, Some(url)) => url,
                (BenchBackend::Embedded, None) => "embedded".to_owned(),
                (BenchBackend::Redis, None) if config.bus.url.starts_with("redis") => {
                    config.bus.url.clone()
                }
                (BenchBackend::Nats, None) if config.bus.url.starts_with("nats") => {
                    config.bus.url.clone()
                }
                (BenchBackend::Redis, None) => "redis://127.0.0.1:6379".to_owned(),
                (BenchBackend::Nats, None) => "nats://127.0.0.1:4222".to_owned(),
            };
            let report = bench_bus(BusBenchOptions {
                bus_url,
                tasks: args.tasks.max(1),
                workers: args.workers,
                payload_bytes: args.payload,
                stages: args.stages,
                submitters: args.submitters,
            })
            .await?;
            if global.json {
                output::json(&report);
            } else {
                output::table(
                    &[
                        "BACKEND",
                        "RUNS",
                        "STAGES",
                        "WORKERS",
                        "RUNS/S",
                        "STAGES/S",
                        "DISPATCH P50",
                        "DISPATCH P99",
                        "STAGE P50",
                        "STAGE P99",
                    ],
                    &[vec![
                        report.backend.clone(),
                        report.runs.to_string(),
                        report.stages_per_run.to_string(),
                        report.workers.to_string(),
                        format!("{:.0}", report.runs_per_second),
                        format!("{:.0}", report.stages_per_second),
                        format!("{:.2} ms", report.dispatch_p50_ms),
                        format!("{:.2} ms", report.dispatch_p99_ms),
                        format!("{:.2} ms", report.stage_overhead_p50_ms),
                        format!("{:.2} ms", report.stage_overhead_p99_ms),
                    ]],
                );
                if report.unmeasured_stages > 0 {
                    output::note(format!(
                        "note: {} stages were not measured (event feed lagged)",
                        report.unmeasured_stages
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Env { repo, iterations } => {
            let report = bench_env(EnvBenchOptions { repo, iterations: iterations.max(1) }).await?;
            if global.json {
                output::json(&report);
            } else {
                let row = |what: &str, p50: f64, p95: f64| {
                    vec![what.to_owned(), format!("{p50:.1} ms"), format!("{p95:.1} ms")]
                };
                output::table(
                    &["CREATE → READY", "P50", "P95"],
                    &[
                        row(
                            "git worktree add (bare)",
                            report.git_worktree_add_p50_ms,
                            report.git_worktree_add_p95_ms,
                        ),
                        row(
                            "environment, no services",
                            report.env_no_services_p50_ms,
                            report.env_no_services_p95_ms,
                        ),
                        row(
                            "environment, two services",
                            report.env_two_services_p50_ms,
                            report.env_two_services_p95_ms,
                        ),
                    ],
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
