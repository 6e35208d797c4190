//! Entra ID through the official `azure_identity` credentials, against upstream-sim's loopback
//! token endpoint and an Azure endpoint that accepts only the tokens it issued (feature
//! `entra-id`; `cargo xtask ci` runs every feature).

#![cfg(feature = "entra-id")]
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

use std::sync::Arc;

use backend_azure::{AzureBackend, EntraId, EntraOptions};
use router_core::{Backend, CallOptions, ErrorKind};
use router_types::{ChatCompletionRequest, ChatMessage};
use secrecy::SecretString;
use upstream_sim::{EndpointConfig, LatencyModel, Sim, SimDialect, TokenIssuer, TokenIssuerConfig};
use url::Url;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "0a1b2c3d-router";
const SECRET: &str = "entra-client-secret-do-not-print";
const ASSERTION: &str = "eyJhbGciOiJSUzI1NiJ9.workload.assertion";

async fn world() -> (TokenIssuer, Sim) {
    let issuer = TokenIssuer::start(
        TokenIssuerConfig::new(TENANT, CLIENT, SECRET).with_client_assertion(ASSERTION),
    )
    .await
    .unwrap();
    let endpoint = EndpointConfig::new("az", SimDialect::Azure)
        // A key is required; the issuer's tokens are accepted in its place, nothing else.
        .with_api_key("a-key-nobody-sends")
        .with_entra(&issuer)
        .with_models(["mini-east"])
        .with_latency(LatencyModel::instant());
    let sim = Sim::start(1, [endpoint]).await.unwrap();
    (issuer, sim)
}

fn options(issuer: &TokenIssuer) -> EntraOptions {
    EntraOptions::default().with_authority_host(Url::parse(&issuer.authority_host()).unwrap())
}

fn backend(sim: &Sim, entra: EntraId) -> AzureBackend {
    AzureBackend::builder("az", sim.endpoints()[0].url())
        .api_version("2024-10-21")
        .token_provider(Arc::new(entra))
        .build()
        .unwrap()
}

fn chat() -> ChatCompletionRequest {
    ChatCompletionRequest::new("mini-east", vec![ChatMessage::user("Hello")])
}

#[tokio::test]
async fn a_client_secret_gets_one_token_for_many_requests() {
    let (issuer, sim) = world().await;
    let entra = EntraId::client_secret(
        TENANT,
        CLIENT,
        &SecretString::from(SECRET),
        options(&issuer),
    )
    .unwrap();
    let backend = backend(&sim, entra.clone());
    let calls = (0..20).map(|_| {
        let backend = backend.clone();
        async move { backend.chat(&chat(), &CallOptions::default()).await }
    });
    for reply in futures_util::future::join_all(calls).await {
        reply.unwrap();
    }
    assert_eq!(issuer.issued(), 1, "one token for every request");
    assert_eq!(entra.fetches(), 1);
    let seen = sim.endpoints()[0].last_request().unwrap();
    assert!(
        seen.header("authorization")
            .is_some_and(|v| v.starts_with("Bearer sim-entra.")),
        "{seen:?}"
    );
    assert_eq!(seen.header("api-key"), None);
    assert!(!format!("{entra:?}").contains(SECRET));
}

#[tokio::test]
async fn workload_identity_sends_its_token_file_as_the_assertion() {
    let (issuer, sim) = world().await;
    let dir = std::env::temp_dir().join(format!("entra-wi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    std::fs::write(&file, ASSERTION).unwrap();
    let entra = EntraId::workload_identity_with(
        Some(TENANT.to_owned()),
        Some(CLIENT.to_owned()),
        Some(file),
        options(&issuer),
    )
    .unwrap();
    backend(&sim, entra)
        .chat(&chat(), &CallOptions::default())
        .await
        .unwrap();
    assert_eq!(issuer.issued(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_refused_secret_is_an_unauthorized_error_that_says_why_and_never_the_secret() {
    let (issuer, sim) = world().await;
    let wrong = "a-wrong-secret-never-printed";
    let entra =
        EntraId::client_secret(TENANT, CLIENT, &SecretString::from(wrong), options(&issuer))
            .unwrap();
    let error = backend(&sim, entra)
        .chat(&chat(), &CallOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unauthorized, "{error}");
    let text = format!("{error} {error:?}");
    assert!(
        text.contains("client secret") && text.contains("AADSTS7000215"),
        "{text}"
    );
    assert!(!text.contains(wrong), "{text}");
    assert_eq!(issuer.refused(), 1);
    assert_eq!(
        sim.endpoints()[0].counters().requests,
        0,
        "nothing sent without a token"
    );
}

#[tokio::test]
async fn an_unknown_tenant_is_named() {
    let (issuer, sim) = world().await;
    let tenant = "00000000-0000-0000-0000-000000000000";
    let entra = EntraId::client_secret(
        tenant,
        CLIENT,
        &SecretString::from(SECRET),
        options(&issuer),
    )
    .unwrap();
    let error = backend(&sim, entra)
        .chat(&chat(), &CallOptions::default())
        .await
        .unwrap_err();
    assert!(error.to_string().contains(tenant), "{error}");
}

#[test]
fn an_http_authority_host_off_loopback_is_refused_when_built() {
    let error = EntraId::client_secret(
        TENANT,
        CLIENT,
        &SecretString::from(SECRET),
        EntraOptions::default()
            .with_authority_host(Url::parse("http://login.example.com").unwrap()),
    )
    .unwrap_err();
    assert!(error.to_string().contains("must be https"), "{error}");
}
