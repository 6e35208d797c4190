//! `openai-router`: the router as a program.
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
mod lifecycle;
mod metrics;
mod probe;
mod problem;
mod routes;
mod sse;

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
    /// Checks a configuration file (and the environment variables it names).
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Also sends each endpoint a one-token request per model it serves.
        #[arg(long)]
        probe: bool,
    },
    /// Prints the SHA-256 of a gateway key (read from standard input), for the `sha256` field.
    HashKey,
    /// Runs every strategy against simulated endpoints and prints what each did.
    Demo(demo::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
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
    let result = match cli.command {
        Command::Demo(args) => runtime
            .block_on(demo::run(args))
            .map_err(anyhow::Error::from),
        Command::Serve { config } => runtime.block_on(async {
            let loaded = config::Config::load(&config)?;
            lifecycle::serve(loaded, Some(config)).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Check { config, probe } => runtime.block_on(async {
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
    match result {
        Ok(code) => code,
        Err(error) => {
            console::say_err(&format!("openai-router: {error:#}"));
            ExitCode::FAILURE
        }
    }
}
