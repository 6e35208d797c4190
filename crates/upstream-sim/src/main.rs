//! `upstream-sim --config sim.toml`: simulated OpenAI and Azure endpoints for any client.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use upstream_sim::{Sim, SimConfig, SimDialect};

/// Simulated OpenAI and Azure OpenAI endpoints on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The simulator's TOML configuration (see crates/upstream-sim/examples/sim.toml).
    #[arg(long, short)]
    config: PathBuf,
    /// Overrides the configuration's seed.
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let mut config: SimConfig =
        toml::from_str(&text).with_context(|| format!("invalid {}", args.config.display()))?;
    if config.endpoints.is_empty() {
        anyhow::bail!("{}: no [[endpoint]] configured", args.config.display());
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    let sim = Sim::spawn(config)
        .await
        .context("cannot start the endpoints")?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "upstream-sim: {} endpoint(s), Ctrl-C to stop",
        sim.endpoints().len()
    )?;
    for endpoint in sim.endpoints() {
        let url = match endpoint.dialect() {
            SimDialect::OpenAi => endpoint.openai_base_url(),
            SimDialect::Azure => endpoint.url(),
        };
        writeln!(
            out,
            "  {:<20} {:<7} {url}",
            endpoint.name(),
            format!("{:?}", endpoint.dialect()).to_lowercase()
        )?;
    }
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    let mut out = std::io::stdout().lock();
    for endpoint in sim.endpoints() {
        writeln!(out, "{}: {:?}", endpoint.name(), endpoint.counters())?;
    }
    Ok(())
}
