//! `openai-router`: the router as a program.
//!
//! - `openai-router demo`: simulated OpenAI and Azure endpoints (one fast, one slow, one that
//!   starts failing midway, one that throttles), the same concurrent workload through each
//!   strategy, and a table per strategy. No keys, no network beyond 127.0.0.1.

mod demo;

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
            demo::say_err(&format!("openai-router: cannot start the runtime: {error}"));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            demo::say_err(&format!("openai-router: {error:#}"));
            ExitCode::FAILURE
        }
    }
}
