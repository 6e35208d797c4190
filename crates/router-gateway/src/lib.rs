//! `openai-router`: the router as a program. The binary is `main.rs`; this library holds its
//! parts, for it, its tests and the fuzz targets (`fuzzing`).
//!
//! - `openai-router serve --config router.toml`: the OpenAI-compatible HTTP gateway.
//! - `openai-router check --config router.toml`: validates a configuration.
//! - `openai-router hash-key`: the SHA-256 a gateway key is configured by.
//! - `openai-router demo`: simulated OpenAI and Azure endpoints (one fast, one slow, one that
//!   starts failing midway, one that throttles), the same concurrent workload through each
//!   strategy, and a table per strategy. No keys, no network beyond 127.0.0.1.

mod assemble;
mod auth;
mod config;
mod console;
mod demo;
mod error;
mod keepalive;
mod lifecycle;
mod litellm;
mod metrics;
mod probe;
mod problem;
mod routes;
mod sse;
mod status;
mod telemetry;
mod tls;

#[doc(hidden)]
pub mod fuzzing;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Many OpenAI and Azure OpenAI endpoints behind one router.
#[derive(Debug, Parser)]
#[command(name = "openai-router", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the router as an OpenAI-compatible HTTP API.
    Serve {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Checks a configuration file (and the environment variables it names), or converts a
    /// `LiteLLM` proxy configuration to one.
    Check {
        /// The configuration file.
        #[arg(long, short, required_unless_present = "litellm_config")]
        config: Option<PathBuf>,
        /// Also sends each endpoint a one-token request per model it serves.
        #[arg(long)]
        probe: bool,
        /// A `LiteLLM` proxy configuration (YAML) to convert: the TOML goes to `--out` (or
        /// standard output), what could not be converted to standard error.
        #[arg(long, conflicts_with = "config")]
        litellm_config: Option<PathBuf>,
        /// Where the converted TOML is written.
        #[arg(long, requires = "litellm_config")]
        out: Option<PathBuf>,
    },
    /// Prints the SHA-256 of a gateway key (read from standard input), for the `sha256` field.
    HashKey,
    /// Runs every strategy against simulated endpoints and prints what each did.
    Demo(demo::Args),
}

/// `check --litellm-config`: converts, checks that the result parses, writes it, and lists
/// what was left out.
fn convert_litellm(
    path: &std::path::Path,
    out: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    let converted =
        litellm::convert(&yaml).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let parsed = config::Config::parse(&converted.toml)
        .map_err(|e| anyhow::anyhow!("the converted configuration does not check: {e}"))?;
    match out {
        Some(out) => std::fs::write(out, &converted.toml)
            .map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", out.display()))?,
        None => console::say(converted.toml.trim_end()),
    }
    for line in &converted.left_out {
        console::say_err(&format!("left out: {line}"));
    }
    console::say_err(&format!(
        "{}: {} endpoint(s) converted, {} thing(s) left out{}",
        path.display(),
        parsed.endpoints.len(),
        converted.left_out.len(),
        out.map_or(String::new(), |o| format!("; written to {}", o.display()))
    ));
    Ok(ExitCode::SUCCESS)
}

/// The log to standard error as `RUST_LOG` says, and, when `exporting`, the spans for OTLP.
fn init_logging(exporting: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"))
    };
    // Colours for a terminal only: a log file or a collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if let Some(provider) = exporting {
        // The log as `RUST_LOG` says, and beside it the router's request and attempt spans
        // and the gateway's own, whatever the log shows.
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter());
        let traces = telemetry::layer(provider).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("router_facade", tracing::Level::DEBUG)
                .with_target("router_gateway", tracing::Level::INFO),
        );
        tracing_subscriber::registry().with(log).with(traces).init();
    } else {
        // The log alone, filtered once for the whole process: spans and events below its
        // level are never built.
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .init();
    }
}

/// The program: parses the command line, runs the command, and says how it went.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            console::say_err(&format!("openai-router: cannot start the runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    // Traces over OTLP when the standard environment names a collector.
    let exporting = telemetry::endpoint().and_then(|endpoint| {
        telemetry::provider(&endpoint, runtime.handle().clone())
            .map_err(|problem| console::say_err(&format!("openai-router: {problem}")))
            .ok()
    });
    init_logging(exporting.as_ref());
    let result = match cli.command {
        Command::Demo(args) => runtime
            .block_on(demo::run(args))
            .map_err(anyhow::Error::from),
        Command::Serve { config } => runtime.block_on(async {
            let loaded = config::Config::load(&config)?;
            lifecycle::serve(loaded, Some(config)).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check {
            litellm_config: Some(litellm),
            out,
            ..
        } => convert_litellm(&litellm, out.as_deref()),
        Command::Check {
            config: Some(config),
            probe,
            ..
        } => runtime.block_on(async {
            let loaded = config::Config::load(&config)?;
            loaded.keys()?;
            let builder = loaded.builder()?;
            let router = builder.build()?;
            console::say(&format!(
                "{}: ok: {} endpoint(s), model groups: {}, {} gateway key(s)",
                config.display(),
                loaded.endpoints.len(),
                router.models().join(", "),
                loaded.keys.len()
            ));
            if probe && !probe::probe(&loaded).await? {
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check { .. } => Err(anyhow::anyhow!(
            "check: give --config FILE, or --litellm-config FILE"
        )),
        Command::HashKey => {
            let mut key = String::new();
            match std::io::stdin().read_to_string(&mut key) {
                Ok(_) if !key.trim().is_empty() => {
                    console::say(&auth::hash_key(key.trim()));
                    Ok(ExitCode::SUCCESS)
                }
                _ => Err(anyhow::anyhow!("hash-key: give the key on standard input")),
            }
        }
    };
    // What is batched leaves before the process does (the runtime still runs its calls).
    if let Some(provider) = exporting
        && let Err(error) = provider.shutdown()
    {
        console::say_err(&format!("openai-router: traces not all exported: {error}"));
    }
    match result {
        Ok(code) => code,
        Err(error) => {
            console::say_err(&format!("openai-router: {error:#}"));
            ExitCode::FAILURE
        }
    }
}
