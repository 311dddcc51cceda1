//! The command line, as clap types. Names here are the public contract.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version,
    about = "Control plane for fleets of AI coding agents",
    long_about = "drover runs pipelines of agent stages (scaffold → validate → e2e → integration → deploy) \
                  durably, each in its own workspace, and streams everything live.\n\n\
                  Try: drover run \"Hello World API\""
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// Server to talk to (default: the one serving --data-dir, else http://127.0.0.1:7070
    /// if it answers, else an embedded instance for the command's duration).
    #[arg(long, global = true, env = "DROVER_SERVER")]
    pub(crate) server: Option<String>,
    /// API token for a server that requires one.
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Project to act in (default: `default`).
    #[arg(long, global = true, env = "DROVER_PROJECT")]
    pub(crate) project: Option<String>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Config file (default: ./drover.toml if present).
    #[arg(long, global = true, env = "DROVER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Data directory (default: ./.drover).
    #[arg(long, global = true, env = "DROVER_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the API and the built-in workers in the foreground (Ctrl-C stops gracefully).
    Up(ServeArgs),
    /// Run the API and engine without the built-in workers.
    Serve(ServeArgs),
    /// Run a request through a pipeline and follow it to the end.
    Run(RunArgs),
    /// Inspect and control runs.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// List the pipelines the server runs (built-in `sdlc` and `[pipelines]`).
    Pipelines,
    /// List the agents stages can name (built-in ones and `[agents]`).
    Agents,
    /// Tokens and cost the agents reported, per stage, run and submitter.
    Usage {
        /// Runs created in the last this many hours.
        #[arg(long, default_value_t = 720)]
        hours: u64,
    },
    /// Run agents for a server: lease its tasks and report back (Ctrl-C drains).
    Worker(WorkerArgs),
    /// List the workers registered with the server.
    Workers,
    /// The dead-letter queue: stages that used every attempt.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Environments: isolated workspaces with their own ports and services.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Project secrets, given to agents as environment variables and redacted everywhere.
    #[command(subcommand)]
    Secrets(crate::commands::secrets::SecretsCommand),
    /// Webhook endpoints: the project's events, signed, POSTed to your URLs.
    #[command(subcommand)]
    Webhooks(crate::commands::webhooks::WebhooksCommand),
    /// Service instances of every environment and the shared ones.
    Services {
        /// Show resident memory per instance and what sharing saves.
        #[arg(long)]
        resources: bool,
    },
    /// Hostnames the routing proxy answers for, and where each leads.
    Routes {
        /// Print `/etc/hosts` lines for the names outside `.localhost`.
        #[arg(long)]
        hosts: bool,
        /// With --hosts: write those lines into the hosts file (a marked block, replaced
        /// each time) instead of printing them.
        #[arg(long, requires = "hosts")]
        apply: bool,
        /// The hosts file --apply edits.
        #[arg(long, default_value = "/etc/hosts", requires = "apply")]
        hosts_file: PathBuf,
    },
    /// The routing proxy.
    #[command(subcommand)]
    Proxy(ProxyCommand),
    /// Users and their global roles (administrators).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Projects and their members.
    #[command(subcommand)]
    Projects(ProjectsCommand),
    /// API tokens (shown once when created) and worker service tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Log in with a password: prints an access token (15 minutes) and a refresh token.
    Login {
        #[arg(long)]
        user: String,
        /// Read the password from standard input (else prompt on the terminal).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Who the current credential belongs to.
    Whoami,
    /// The audit log of security-relevant actions (administrators).
    Audit {
        /// Only this project's entries (`global` for users, projects and tokens).
        #[arg(long = "of-project")]
        of_project: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Talk with an `llm` agent; the conversation is kept as a session (/help inside).
    Chat(ChatArgs),
    /// Measure drover (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// The `llm` agent to talk to (needed when several are configured).
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// The environment the chat is about: the model is told its variables, `/run` runs
    /// there.
    #[arg(long)]
    pub(crate) env: Option<String>,
    /// Resume this session (its agent and environment come with it).
    #[arg(long, conflicts_with_all = ["agent", "env"])]
    pub(crate) session: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProxyCommand {
    /// Print where the local CA behind HTTPS is (made now if missing) and how to trust it.
    Trust,
}

#[derive(Debug, Subcommand)]
pub(crate) enum EnvCommand {
    /// Create an environment (its services start at once).
    Create {
        /// Name (default: generated).
        name: Option<String>,
        /// Make the workspace a git worktree of this repository, on its own branch.
        #[arg(long)]
        repo: Option<std::path::PathBuf>,
        /// Branch or commit the worktree starts from.
        #[arg(long, requires = "repo")]
        base: Option<String>,
    },
    /// List environments.
    Ls {
        /// Include deleted ones.
        #[arg(long)]
        all: bool,
    },
    /// Show an environment, its services and variables.
    Show { env: String },
    /// Start an environment's services (idempotent).
    Start { env: String },
    /// Stop an environment's services (idempotent).
    Stop { env: String },
    /// Delete an environment and its workspace.
    Rm {
        env: String,
        /// Delete even if the worktree holds unmerged work.
        #[arg(long)]
        force: bool,
    },
    /// Print a service's log.
    Logs {
        env: String,
        service: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in the environment's workspace, with its variables.
    Exec {
        env: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// No-op tasks end to end through the real engine, store and bus.
    Bus(BenchBusArgs),
    /// Environment create→ready time, beside a bare `git worktree add`.
    Env {
        /// Repository to make worktrees of (default: a generated one with 200 files).
        #[arg(long)]
        repo: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// HTTP load straight to a small upstream, through the drover proxy and through nginx.
    Proxy(BenchProxyArgs),
    /// Delivery latency of the event log to many live SSE subscribers.
    Events {
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 100)]
        runs: usize,
        /// Milliseconds between two submitted runs.
        #[arg(long, default_value_t = 20)]
        interval_ms: u64,
    },
    /// Resident memory of a real `drover up` over identical rounds of mixed traffic.
    Soak {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Requests per round.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Idle time before each reading of the server's memory.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
        /// Also measure a server with glibc's default malloc settings, side by side.
        #[arg(long)]
        compare_glibc_defaults: bool,
    },
    /// Runs a program until it exits or stdin closes, then ends its process group (how
    /// `bench proxy` starts nginx).
    #[command(hide = true)]
    Guard {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The upstream of `bench proxy`: prints its address, then answers every request
    /// until stdin closes.
    #[command(hide = true)]
    Upstream {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// The drover proxy of `bench proxy`: prints its address, then routes until stdin
    /// closes.
    #[command(hide = true)]
    ProxyServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// `HOST=UPSTREAM`, e.g. `bench.localhost=127.0.0.1:8080`.
        #[arg(long = "route", value_parser = parse_route, required = true)]
        routes: Vec<(String, SocketAddr)>,
    },
}

fn parse_route(text: &str) -> Result<(String, SocketAddr), String> {
    let (host, upstream) =
        text.split_once('=').ok_or_else(|| format!("`{text}` is not HOST=UPSTREAM"))?;
    let upstream = upstream.parse().map_err(|err| format!("upstream `{upstream}`: {err}"))?;
    Ok((host.to_owned(), upstream))
}

#[derive(Debug, Args)]
pub(crate) struct BenchProxyArgs {
    /// Keep-alive connections of the full-load pass.
    #[arg(long, default_value_t = 32)]
    pub(crate) connections: usize,
    /// Keep-alive connections of the moderate-load pass (added latency).
    #[arg(long, default_value_t = 4)]
    pub(crate) moderate_connections: usize,
    /// Requests per second offered by the moderate-load pass, between all its
    /// connections (0: back to back).
    #[arg(long, default_value_t = 2000)]
    pub(crate) moderate_rate: u32,
    /// Measured time per target and pass (over all rounds).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: std::time::Duration,
    /// Slices each measurement is cut into, the targets taking turns.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: u32,
    /// Unmeasured load before each slice.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: std::time::Duration,
    /// nginx to compare with (default: `nginx` on PATH, else /usr/sbin/nginx).
    #[arg(long)]
    pub(crate) nginx: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum BenchBackend {
    Embedded,
    Redis,
    Nats,
}

#[derive(Debug, Args)]
pub(crate) struct BenchBusArgs {
    #[arg(long, value_enum, default_value = "embedded")]
    pub(crate) backend: BenchBackend,
    /// Broker URL (default: the configured bus.url if it is of this backend, else the
    /// broker's default local address).
    #[arg(long)]
    pub(crate) url: Option<String>,
    /// Runs to push through.
    #[arg(long, default_value_t = 1000)]
    pub(crate) tasks: usize,
    /// Tasks run at once by the worker.
    #[arg(long, default_value_t = 8)]
    pub(crate) workers: u32,
    /// Bytes of payload carried by each task.
    #[arg(long, default_value_t = 256)]
    pub(crate) payload: usize,
    /// No-op stages per run.
    #[arg(long, default_value_t = 1)]
    pub(crate) stages: u32,
    /// Runs submitted at once (like that many concurrent API clients).
    #[arg(long, default_value_t = 16)]
    pub(crate) submitters: usize,
    /// The store to measure on: SQLite in a temporary file, or a scratch database (made
    /// and dropped by the run) on the PostgreSQL server of --store-url.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub(crate) store: BenchStore,
    /// PostgreSQL server to make the scratch database on (default: the configured
    /// store.url if it is PostgreSQL, else postgres://postgres@127.0.0.1:5432/postgres).
    #[arg(long, requires = "store")]
    pub(crate) store_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchStore {
    Sqlite,
    Postgres,
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Agent types to serve, comma-separated (e.g. `scaffold,validate`), or `all`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) agent: Vec<String>,
    /// Tasks of one agent type run at once.
    #[arg(long)]
    pub(crate) concurrency: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead letters, newest first.
    Ls {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Run a dead letter's stage again (its run reopens).
    Redrive { id: String },
    /// Dismiss a dead letter (its run stays failed).
    Discard { id: String },
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address of the HTTP API.
    #[arg(long)]
    pub(crate) listen: Option<SocketAddr>,
    /// Address of the routing proxy (`<service>.<env>.localhost`).
    #[arg(long)]
    pub(crate) proxy_listen: Option<SocketAddr>,
    /// Also serve HTTPS here, with certificates minted per hostname by a local CA
    /// (see `drover proxy trust`).
    #[arg(long)]
    pub(crate) proxy_tls_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// What to build, e.g. "Hello World API".
    #[arg(required_unless_present = "list")]
    pub(crate) request: Option<String>,
    /// Pipeline to run.
    #[arg(long, default_value = "sdlc")]
    pub(crate) pipeline: String,
    /// Submit and print the run id without following it.
    #[arg(long, conflicts_with = "serve")]
    pub(crate) detach: bool,
    /// List the built-in project templates and exit.
    #[arg(long, conflicts_with_all = ["detach", "serve"])]
    pub(crate) list: bool,
    /// With an embedded instance: keep the deployed app serving until Ctrl-C.
    #[arg(long)]
    pub(crate) serve: bool,
    /// Run inside this environment: its workspace, ports and services
    /// (see `drover env create`). Without it the run gets its own directory.
    #[arg(long = "env", value_name = "NAME")]
    pub(crate) environment: Option<String>,
    /// Stop the run once its stages together used more tokens than this.
    #[arg(long, value_name = "TOKENS")]
    pub(crate) budget_tokens: Option<u64>,
    /// Stop the run once its stages together cost more than this many US dollars.
    #[arg(long, value_name = "USD")]
    pub(crate) budget_cost: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunsCommand {
    /// List runs, newest first.
    Ls {
        /// Only runs with this status.
        #[arg(long)]
        status: Option<String>,
        /// How many runs to show (1-200).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Continue after this cursor (printed with the previous page).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a run and its stage attempts.
    Show { id: String },
    /// Cancel a run and stop its running stage.
    Cancel { id: String },
    /// Approve a stage waiting for approval (`approval = true`): it runs next.
    Approve {
        id: String,
        stage: String,
        /// Why (kept in the stage's events).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a stage waiting for approval: the run fails with the reason.
    Reject {
        id: String,
        stage: String,
        /// Why (required; becomes the run's error).
        #[arg(long)]
        reason: String,
    },
    /// List what each stage attempt left (logs, transcripts, diffs), or download them.
    Artifacts {
        id: String,
        /// Only this stage's (or `app`).
        #[arg(long)]
        stage: Option<String>,
        /// Download them into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a run's logs (every stage attempt, then the deployed app).
    Logs {
        id: String,
        /// Only this stage (or `app`).
        #[arg(long)]
        stage: Option<String>,
        /// Only this attempt number.
        #[arg(long, conflicts_with = "follow")]
        attempt: Option<u32>,
        /// Print the output as it is written, until the run ends.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UsersCommand {
    /// List users.
    Ls,
    /// Add a user (the first one ends local mode: from then on every call needs a token).
    Add {
        name: String,
        /// `viewer`, `member` (default) or `admin`.
        #[arg(long, default_value = "member")]
        role: String,
        /// Read a login password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's global role.
    Role { name: String, role: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectsCommand {
    /// The projects you can see, with your role in each.
    Ls,
    /// Create a project.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// A project's members.
    Members { id: String },
    /// Add a user to a project.
    AddMember {
        id: String,
        user: String,
        /// `viewer`, `member` or `admin`.
        #[arg(long, default_value = "member")]
        role: String,
    },
    /// Remove a user from a project.
    RmMember { id: String, user: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokensCommand {
    /// Create an API token; it is printed once, here.
    Create {
        /// What it is for.
        #[arg(long)]
        name: String,
        /// `read` or `write`.
        #[arg(long, default_value = "write")]
        scope: String,
        /// Bind it to one project.
        #[arg(long = "for-project")]
        for_project: Option<String>,
        /// Days until it expires (1-365).
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Whose token (administrators; default: yours).
        #[arg(long)]
        user: Option<String>,
    },
    /// List your tokens (`--all`: everyone's, administrators).
    Ls {
        #[arg(long)]
        all: bool,
    },
    /// Revoke a token.
    Revoke { id: String },
    /// A service token for a worker (`drover worker --token`), limited to agent types.
    Worker {
        /// The worker's name.
        name: String,
        /// Agent types it may run (comma-separated; default: any).
        #[arg(long, value_delimiter = ',')]
        agent: Vec<String>,
        /// Hours until it expires.
        #[arg(long, default_value_t = 720)]
        hours: u32,
    },
}
