//! Azure spillover: a provisioned deployment that is full has Azure send the request to its
//! spillover deployment on the same resource. The router credits the deployment that served,
//! holds the full one to one request at a time, and does not send a request Azure already
//! spilled (and that failed there too) to the spillover deployment again.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::Arc;
use std::time::Duration;

use router_facade::types::{ChatCompletionRequest, ChatMessage};
use router_facade::{Availability, Endpoint, MemoryStore, RequestOptions, Router};
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect, Spill};

const KEY: &str = "az-spill-key";

async fn world() -> (Sim, Router, Arc<MemoryStore>) {
    let sim = Sim::start(
        4,
        [EndpointConfig::new("east", SimDialect::Azure)
            .with_api_key(KEY)
            .with_models(["ptu", "paygo"])
            .with_latency(LatencyModel::new(
                Duration::from_millis(40),
                Duration::from_millis(1),
            ))],
    )
    .await
    .unwrap();
    let url = sim.endpoints()[0].url();
    let azure = |name: &str, deployment: &str, priority: u32| {
        Endpoint::azure(name, &url)
            .api_version("2024-10-21")
            .api_key(KEY)
            .deployment("gpt-4o", deployment)
            .priority(priority)
            .tpm(600_000)
    };
    let store = Arc::new(MemoryStore::new());
    let router = Router::builder()
        .endpoint(azure("east-ptu", "ptu", 0))
        .endpoint(azure("east-paygo", "paygo", 1))
        .state_store(Arc::clone(&store) as Arc<dyn router_facade::StateStore>)
        .build()
        .unwrap();
    (sim, router, store)
}

fn request() -> ChatCompletionRequest {
    let mut request = ChatCompletionRequest::new("gpt-4o", vec![ChatMessage::user("hi")]);
    request.max_tokens = Some(3);
    request
}

fn stats_of(router: &Router, endpoint: &str) -> router_facade::StateStats {
    router
        .stats()
        .into_iter()
        .find(|s| s.endpoint.as_str() == endpoint)
        .unwrap()
        .state
}

#[tokio::test(start_paused = true)]
async fn the_deployment_azure_spilled_to_is_credited_and_the_full_one_held_to_one() {
    let (sim, router, store) = world().await;
    let options = RequestOptions::default().with_spillover_deployment("paygo");
    // Served as asked first: nothing spilled.
    router.chat_with(&request(), &options).await.unwrap();
    assert_eq!(stats_of(&router, "east-ptu").successes, 1);

    sim.endpoints()[0].spill(Some(Spill::Serves));
    let answer = router.chat_with(&request(), &options).await.unwrap();
    assert_eq!(answer.meta.spilled_from.as_deref(), Some("ptu"));
    let (ptu, paygo) = (
        stats_of(&router, "east-ptu"),
        stats_of(&router, "east-paygo"),
    );
    assert_eq!(ptu.spilled_over, 1);
    assert_eq!(
        ptu.successes, 1,
        "the spilled request is not the full one's success"
    );
    assert_eq!(paygo.successes, 1, "the deployment that served is credited");
    // Its quota too: the spilled request's tokens are held on the pay-as-you-go deployment,
    // and the provisioned one holds only the request it served itself.
    let now = tokio::time::Instant::now().into_std();
    let (ptu_held, paygo_held) = (
        store.held("east-ptu/gpt-4o", now),
        store.held("east-paygo/gpt-4o", now),
    );
    assert!(
        paygo_held.0 > 0.0 && (paygo_held.1 - 1.0).abs() < 1e-9,
        "{paygo_held:?}"
    );
    assert!((ptu_held.1 - 1.0).abs() < 1e-9, "{ptu_held:?}");
    // The full deployment takes one request at a time until it serves one itself.
    let guard_probe = router.chat_with(&request(), &options).await.unwrap();
    assert_eq!(guard_probe.meta.spilled_from.as_deref(), Some("ptu"));
    assert!(
        !matches!(ptu.availability, Availability::Disabled(_)),
        "{ptu:?}"
    );
    sim.endpoints()[0].spill(None);
    router.chat_with(&request(), &options).await.unwrap();
    assert_eq!(stats_of(&router, "east-ptu").successes, 2);
}

#[tokio::test(start_paused = true)]
async fn a_request_azure_spilled_and_that_failed_there_is_not_sent_to_the_spillover_deployment_again()
 {
    let (sim, router, _) = world().await;
    sim.endpoints()[0].spill(Some(Spill::Fails));
    let options = RequestOptions::default().with_spillover_deployment("paygo");
    let error = router.chat_with(&request(), &options).await.unwrap_err();
    assert_eq!(error.status(), Some(503), "{error}");
    assert_eq!(
        sim.endpoints()[0].counters().requests,
        1,
        "one request: Azure tried both deployments already"
    );
    // Without a spillover deployment named, the paygo deployment is the router's failover.
    let sim_requests = sim.endpoints()[0].counters().requests;
    sim.endpoints()[0].spill(None);
    router.chat(&request()).await.unwrap();
    assert!(sim.endpoints()[0].counters().requests > sim_requests);
}
