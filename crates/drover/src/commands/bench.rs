//! `drover bench …`: measurements recorded in BENCHMARKS.md.

use std::process::ExitCode;

use drover_config::Config;
use drover_server::bench::{
    BenchServer, BusBenchOptions, EnvBenchOptions, ProxyBenchOptions, ProxyBenchReport,
    TargetFigures, bench_bus, bench_env, bench_proxy, cancel_when_stdin_closes, find_nginx, guard,
};

use crate::cli::{BenchBackend, BenchCommand, BenchProxyArgs, BenchStore, GlobalArgs};
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
            let postgres = (args.store == BenchStore::Postgres).then(|| {
                args.store_url
                    .clone()
                    .or_else(|| config.store.url.clone().filter(|url| url.starts_with("postgres")))
                    .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
            });
            let report = bench_bus(BusBenchOptions {
                postgres,
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
                        "STORE",
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
                        report.store.clone(),
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
        BenchCommand::Proxy(args) => proxy(global, args).await,
        BenchCommand::Events { subscribers, runs, interval_ms } => {
            let report =
                drover_server::bench::bench_events(drover_server::bench::EventsBenchOptions {
                    subscribers: subscribers.max(1),
                    runs: runs.max(1),
                    interval: std::time::Duration::from_millis(interval_ms),
                })
                .await?;
            if global.json {
                output::json(&report);
            } else {
                output::table(
                    &["SUBSCRIBERS", "RUNS", "DELIVERED", "P50", "P99", "MAX"],
                    &[vec![
                        report.subscribers.to_string(),
                        report.runs.to_string(),
                        format!("{}/{}", report.delivered, report.expected),
                        format!("{:.2} ms", report.p50_ms),
                        format!("{:.2} ms", report.p99_ms),
                        format!("{:.2} ms", report.max_ms),
                    ]],
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Soak {
            rounds,
            requests,
            concurrency,
            seed,
            idle,
            compare_glibc_defaults,
        } => {
            let report = drover_server::bench::bench_soak(drover_server::bench::SoakOptions {
                exe: std::env::current_exe()?,
                rounds,
                requests,
                concurrency,
                seed,
                idle,
                compare_glibc_defaults,
            })
            .await?;
            if global.json {
                output::json(&report);
            } else {
                let mut rows = Vec::new();
                for series in &report.series {
                    rows.push(vec![
                        series.allocator.clone(),
                        "start".to_owned(),
                        String::new(),
                        String::new(),
                        format!("{:.1} MB", series.rss_start_mb),
                        String::new(),
                    ]);
                    for (i, round) in series.rounds.iter().enumerate() {
                        rows.push(vec![
                            series.allocator.clone(),
                            format!("round {}", i + 1),
                            round.requests.to_string(),
                            format!("{:.1} s", round.seconds),
                            format!("{:.1} MB", round.rss_mb),
                            format!("{:+.1} MB", round.growth_mb),
                        ]);
                    }
                }
                output::table(&["ALLOCATOR", "", "REQUESTS", "TIME", "RSS", "GROWTH"], &rows);
                for series in &report.series {
                    output::note(format!(
                        "{}: last round's growth / first round's: {:.2} (target < 0.10)",
                        series.allocator, series.last_over_first
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Guard { command } => {
            let code = guard(&command).await?;
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
        BenchCommand::Upstream { listen } => serve(BenchServer::upstream(listen).await?).await,
        BenchCommand::ProxyServer { listen, routes } => {
            serve(BenchServer::proxy(listen, &routes).await?).await
        }
    }
}

/// The parent reads the address on the first line of stdout; the end of stdin (the
/// parent closed it, or is gone), Ctrl-C or SIGTERM stops.
async fn serve(server: BenchServer) -> anyhow::Result<ExitCode> {
    output::data(server.local_addr().to_string());
    let stop = super::interrupted();
    cancel_when_stdin_closes(stop.clone());
    server.serve(stop).await;
    Ok(ExitCode::SUCCESS)
}

async fn proxy(global: &GlobalArgs, args: BenchProxyArgs) -> anyhow::Result<ExitCode> {
    let nginx = args.nginx.or_else(find_nginx);
    if nginx.is_none() {
        output::note(
            "note: nginx not found (on PATH or in /usr/sbin); measuring direct and drover only",
        );
    }
    let exe = std::env::current_exe()?;
    let bench = bench_proxy(ProxyBenchOptions {
        exe,
        nginx,
        connections: args.connections,
        moderate_connections: args.moderate_connections,
        moderate_rate: Some(args.moderate_rate),
        duration: args.duration,
        rounds: args.rounds,
        warmup: args.warmup,
    });
    // Ctrl-C drops the bench, whose handles kill every child's process group (nginx's
    // workers included) and remove the temporary directory.
    let interrupted = super::interrupted();
    let report = tokio::select! {
        report = bench => report?,
        () = interrupted.cancelled() => {
            output::note("interrupted");
            return Ok(ExitCode::from(crate::EXIT_INTERRUPTED));
        }
    };
    if global.json {
        output::json(&report);
    } else {
        print_proxy_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_proxy_report(report: &ProxyBenchReport) {
    let ms = |value: f64| if value.is_finite() { format!("{value:.3} ms") } else { "-".to_owned() };
    let row = |load: &str, figures: &TargetFigures| {
        vec![
            load.to_owned(),
            figures.target.clone(),
            figures.connections.to_string(),
            figures.requests.to_string(),
            format!("{:.0}", figures.requests_per_second),
            ms(figures.p50_ms),
            ms(figures.p99_ms),
            figures.cpu_us_per_request.map_or("-".to_owned(), |us| format!("{us:.1} µs")),
            figures.non_2xx.to_string(),
            figures.errors.to_string(),
        ]
    };
    let moderate = match report.moderate_rate {
        Some(rate) => format!("moderate ({rate}/s)"),
        None => "moderate".to_owned(),
    };
    let rows: Vec<Vec<String>> = report
        .full_load
        .iter()
        .map(|figures| row("full", figures))
        .chain(report.moderate_load.iter().map(|figures| row(&moderate, figures)))
        .collect();
    output::table(
        &[
            "LOAD", "TARGET", "CONNS", "REQUESTS", "REQ/S", "P50", "P99", "CPU/REQ", "NON-2XX",
            "ERRORS",
        ],
        &rows,
    );
    output::data("");
    match report.drover_to_nginx_throughput {
        Some(ratio) => output::data(format!(
            "drover/nginx throughput at full load: {ratio:.2}× (target ≥ 0.90×: {})",
            if ratio >= 0.9 { "met" } else { "not met" }
        )),
        None => output::data("drover/nginx throughput at full load: - (nginx not measured)"),
    }
    let added = report.drover_added_p99_ms;
    output::data(format!(
        "p99 added by drover at moderate load: {} (target < 1 ms: {})",
        ms(added),
        if added < 1.0 { "met" } else { "not met" }
    ));
    if let Some(added) = report.nginx_added_p99_ms {
        output::data(format!("p99 added by nginx at moderate load: {}", ms(added)));
    }
    for (load, figures) in report
        .full_load
        .iter()
        .map(|figures| ("full", figures))
        .chain(report.moderate_load.iter().map(|figures| ("moderate", figures)))
    {
        if !figures.clean() {
            output::note(format!(
                "warning: {} at {load} load: {} 2xx responses, {} non-2xx, {} failed requests",
                figures.target, figures.requests, figures.non_2xx, figures.errors
            ));
        }
    }
}
