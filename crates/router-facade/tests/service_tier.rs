//! The service tier each answer reports is recorded per deployment, streamed or not, and a
//! request that asked for `priority` and was served at another tier counts as a downgrade.

use std::time::Duration;

use futures_util::StreamExt as _;
use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Endpoint, Router, StrategyKind};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect};

const MODEL: &str = "gpt-4o-mini";

fn asking(tier: Option<&str>, stream: bool) -> ChatCompletionRequest {
    let mut request = ChatCompletionRequest::new(MODEL, vec![ChatMessage::user("hi")]);
    request.max_tokens = Some(2);
    if let Some(tier) = tier {
        request.extra.insert("service_tier".into(), tier.into());
    }
    if stream {
        request.stream = Some(true);
    }
    request
}

#[tokio::test(start_paused = true)]
async fn tiers_are_recorded_and_priority_downgrades_counted() {
    let latency = LatencyModel::new(Duration::from_millis(50), Duration::from_millis(1));
    let sim = Sim::start(
        2,
        [
            EndpointConfig::new("keeps", SimDialect::OpenAi)
                .with_models([MODEL])
                .with_latency(latency),
            EndpointConfig::new("downgrades", SimDialect::OpenAi)
                .with_models([MODEL])
                .with_latency(latency)
                .with_priority_downgraded(),
        ],
    )
    .await
    .unwrap();
    let mut builder = Router::builder().strategy(StrategyKind::RoundRobin).seed(2);
    for endpoint in sim.endpoints() {
        builder = builder
            .endpoint(Endpoint::openai(endpoint.name(), endpoint.openai_base_url()).model(MODEL));
    }
    let router = builder.build().unwrap();
    // (where it went, whether it asked for priority), for every request.
    let mut sent = Vec::new();
    for _ in 0..2 {
        let answer = router.chat(&asking(Some("priority"), false)).await.unwrap();
        let expected = if answer.endpoint.as_str() == "keeps" {
            "priority"
        } else {
            "default"
        };
        assert_eq!(answer.body.service_tier.as_deref(), Some(expected));
        sent.push((answer.endpoint.to_string(), true));
        let mut stream = router
            .chat_stream(&asking(Some("priority"), true))
            .await
            .unwrap();
        sent.push((stream.endpoint().to_string(), true));
        while stream.next().await.is_some() {}
        let answer = router.chat(&asking(None, false)).await.unwrap();
        sent.push((answer.endpoint.to_string(), false));
    }
    let deployments = router.stats();
    let state = |name: &str| {
        deployments
            .iter()
            .find(|s| s.endpoint.as_str() == name)
            .unwrap()
            .state
            .clone()
    };
    let count = |tiers: &[(&'static str, u64)], tier: &str| {
        tiers
            .iter()
            .find(|(t, _)| *t == tier)
            .map_or(0, |(_, n)| *n)
    };
    let went = |name: &str, priority: bool| {
        sent.iter()
            .filter(|(e, p)| e == name && *p == priority)
            .count() as u64
    };
    let (keeps, downgrades) = (state("keeps"), state("downgrades"));
    assert_eq!(count(&keeps.service_tiers, "priority"), went("keeps", true));
    assert_eq!(count(&keeps.service_tiers, "default"), went("keeps", false));
    assert_eq!(keeps.tier_downgrades, 0);
    assert_eq!(count(&downgrades.service_tiers, "priority"), 0);
    assert_eq!(
        count(&downgrades.service_tiers, "default"),
        went("downgrades", true) + went("downgrades", false)
    );
    assert_eq!(downgrades.tier_downgrades, went("downgrades", true));
    assert!(
        went("downgrades", true) > 0 && went("keeps", true) > 0,
        "{sent:?}"
    );
}
