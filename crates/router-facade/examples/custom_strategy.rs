//! Your own strategy: a pure function of the candidates, the time and a random generator.
//!
//! `FirstReady` always takes the first eligible deployment in configuration order (gRPC's
//! `pick_first`): an ordered fallback list, where the second endpoint serves only while the
//! first cannot.
//!
//! `cargo run -p router-facade --example custom_strategy`

#![expect(clippy::print_stdout, reason = "an example shows its results")]

use std::time::{Duration, Instant};

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Candidate, Endpoint, Rng, Router, Strategy};
use upstream_sim::{EndpointConfig, Fault, LatencyModel, Sim, SimDialect, Times};

#[derive(Debug)]
struct FirstReady;

impl Strategy for FirstReady {
    fn pick(&self, candidates: &[Candidate], _now: Instant, _rng: &mut Rng) -> Option<usize> {
        (!candidates.is_empty()).then_some(0)
    }

    fn name(&self) -> &'static str {
        "first-ready"
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let sim = Sim::start(
        1,
        ["primary", "fallback"].map(|name| {
            EndpointConfig::new(name, SimDialect::OpenAi).with_latency(LatencyModel::instant())
        }),
    )
    .await?;
    let mut builder = Router::builder().custom_strategy("first-ready", || Box::new(FirstReady));
    for endpoint in sim.endpoints() {
        builder = builder.endpoint(
            Endpoint::openai(endpoint.name(), endpoint.openai_base_url()).model("gpt-4o-mini"),
        );
    }
    let router = builder.build()?;
    let request = ChatCompletionRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hi")]);

    assert_eq!(router.chat(&request).await?.endpoint.as_str(), "primary");
    // The primary throttles for two seconds: the fallback serves meanwhile.
    sim.endpoints()[0].inject(Fault::rate_limited(Duration::from_secs(2)), Times::Next(1));
    let during = router.chat(&request).await?;
    println!(
        "while primary is throttled: {} ({} attempts)",
        during.endpoint, during.attempts
    );
    assert_eq!(during.endpoint.as_str(), "fallback");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = router.chat(&request).await?;
    println!("after its retry-after: {}", after.endpoint);
    assert_eq!(after.endpoint.as_str(), "primary");
    Ok(())
}
