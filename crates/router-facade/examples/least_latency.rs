//! The seed project's README example, in Rust: two endpoints serving one model, routed on
//! latency. Runs against simulated endpoints; with real ones, put their URLs and keys.
//!
//! `cargo run -p router-facade --example least_latency`

#![expect(clippy::print_stdout, reason = "an example shows its results")]

use std::time::Duration;

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router, StrategyKind};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Stand-ins for an Azure OpenAI resource and OpenAI, the first one three times faster.
    let sim = Sim::start(
        1,
        [
            EndpointConfig::new("azure", SimDialect::Azure)
                .with_api_key("azure-key")
                .with_models(["my-gpt-4o-mini"])
                .with_latency(LatencyModel::new(
                    Duration::from_millis(40),
                    Duration::from_millis(2),
                )),
            EndpointConfig::new("openai", SimDialect::OpenAi)
                .with_api_key("openai-key")
                .with_models(["gpt-4o-mini"])
                .with_latency(LatencyModel::new(
                    Duration::from_millis(120),
                    Duration::from_millis(6),
                )),
        ],
    )
    .await?;
    let (azure, openai) = (&sim.endpoints()[0], &sim.endpoints()[1]);

    let router = Router::builder()
        .endpoint(
            Endpoint::azure("azure", azure.url())
                .api_version("2024-10-21")
                .api_key("azure-key")
                // The model group callers use, and this resource's deployment for it.
                .deployment("gpt-4o-mini", "my-gpt-4o-mini"),
        )
        .endpoint(
            Endpoint::openai("openai", openai.openai_base_url())
                .api_key("openai-key")
                .model("gpt-4o-mini"),
        )
        .strategy(StrategyKind::LeastLatency)
        .build()?;

    let request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello!")]);
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..40 {
        let answer = router.chat(&request).await?;
        *served.entry(answer.endpoint.to_string()).or_default() += 1;
    }
    println!("served: {served:?}");
    for stats in router.stats() {
        println!(
            "{:>7}: {:.1} ms/token estimate, {} ok",
            stats.endpoint,
            stats.state.latency_generation * 1000.0,
            stats.state.successes
        );
    }
    assert!(
        served.get("azure") > served.get("openai"),
        "the faster endpoint serves more"
    );
    Ok(())
}
