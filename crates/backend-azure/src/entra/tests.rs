//! The provider's caching rules, under paused time, against a credential that counts its
//! calls and answers as told (the real credentials keep their own wall-clock cache, which
//! paused time cannot move; the loopback tests in `tests/entra.rs` run them for real).

use std::sync::atomic::{AtomicU64, Ordering};

use azure_core::credentials::{AccessToken, TokenRequestOptions};

use super::*;

#[derive(Debug)]
struct Counting {
    calls: AtomicU64,
    life: Duration,
    /// Calls from this one on fail (`u64::MAX`: none).
    fail_from: AtomicU64,
    /// How long each call takes.
    takes: Duration,
}

impl Counting {
    fn new(life: Duration) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicU64::new(0),
            life,
            fail_from: AtomicU64::new(u64::MAX),
            takes: Duration::from_millis(100),
        })
    }
}

#[async_trait]
impl TokenCredential for Counting {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        assert_eq!(scopes, [COGNITIVE_SERVICES_SCOPE]);
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.takes).await;
        if call >= self.fail_from.load(Ordering::SeqCst) {
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Io,
                "connection refused",
            ));
        }
        // The wall clock does not move under paused time: the token's life is what is left.
        Ok(AccessToken::new(
            format!("token-{call}"),
            OffsetDateTime::now_utc() + self.life,
        ))
    }
}

fn provider(credential: &Arc<Counting>) -> EntraId {
    EntraId::from_credential(
        Arc::clone(credential) as Arc<dyn TokenCredential>,
        "counting",
        EntraOptions::default(),
    )
}

async fn token(provider: &EntraId) -> String {
    provider.token().await.unwrap().expose_secret().to_owned()
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_share_one_fetch() {
    let credential = Counting::new(Duration::from_secs(3600));
    let provider = provider(&credential);
    let tokens = futures_util::future::join_all((0..50).map(|_| token(&provider))).await;
    assert!(tokens.iter().all(|t| t == "token-0"), "{tokens:?}");
    assert_eq!(credential.calls.load(Ordering::SeqCst), 1);
    assert_eq!(token(&provider).await, "token-0");
    assert_eq!(provider.fetches(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_token_is_refreshed_ahead_of_expiry_in_the_background_once() {
    let credential = Counting::new(Duration::from_secs(3600));
    let provider = provider(&credential);
    assert_eq!(token(&provider).await, "token-0");
    // Not before the last five minutes.
    tokio::time::advance(Duration::from_secs(3600 - 301)).await;
    assert_eq!(token(&provider).await, "token-0");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(credential.calls.load(Ordering::SeqCst), 1);
    // Within them: requests go on with the valid token while one refresh runs; the next
    // requests get the new one.
    tokio::time::advance(Duration::from_secs(2)).await;
    let during = futures_util::future::join_all((0..20).map(|_| token(&provider))).await;
    assert!(during.iter().all(|t| t == "token-0"), "{during:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(credential.calls.load(Ordering::SeqCst), 2, "one refresh");
    assert_eq!(token(&provider).await, "token-1");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_valid_token_and_is_retried_later() {
    let credential = Counting::new(Duration::from_secs(3600));
    let provider = provider(&credential);
    assert_eq!(token(&provider).await, "token-0");
    credential.fail_from.store(1, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(3600 - 200)).await;
    assert_eq!(token(&provider).await, "token-0");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(credential.calls.load(Ordering::SeqCst), 2);
    // Not asked again within the retry wait, however many requests come.
    for _ in 0..10 {
        assert_eq!(token(&provider).await, "token-0");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(credential.calls.load(Ordering::SeqCst), 2);
    // After it, asked again (and it works again).
    credential.fail_from.store(u64::MAX, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(token(&provider).await, "token-0");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(credential.calls.load(Ordering::SeqCst), 3);
    assert_eq!(token(&provider).await, "token-2");
}

#[tokio::test(start_paused = true)]
async fn no_token_at_all_is_a_clear_error_told_again_without_hammering_the_endpoint() {
    let credential = Counting::new(Duration::from_secs(3600));
    credential.fail_from.store(0, Ordering::SeqCst);
    let provider = provider(&credential);
    let error = provider.token().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("entra (counting)")
            && text.contains(COGNITIVE_SERVICES_SCOPE)
            && text.contains("connection refused"),
        "{text}"
    );
    for _ in 0..5 {
        let again = provider.token().await.unwrap_err();
        assert_eq!(again.to_string(), text);
    }
    assert_eq!(credential.calls.load(Ordering::SeqCst), 1);
    credential.fail_from.store(u64::MAX, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(token(&provider).await, "token-1");
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_is_never_handed_out() {
    let credential = Counting::new(Duration::from_secs(600));
    let provider = provider(&credential);
    assert_eq!(token(&provider).await, "token-0");
    credential.fail_from.store(1, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(601)).await;
    let error = provider.token().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Connect);
}

#[test]
fn http_authority_hosts_only_on_loopback() {
    let at = |url: &str| {
        EntraOptions::default()
            .with_authority_host(Url::parse(url).unwrap())
            .client_options()
    };
    assert!(at("https://login.microsoftonline.us").is_ok());
    assert!(at("http://127.0.0.1:9999").is_ok());
    assert!(at("http://localhost:9999").is_ok());
    assert!(at("http://[::1]:9999").is_ok());
    let error = at("http://login.example.com").unwrap_err();
    assert!(error.to_string().contains("must be https"), "{error}");
}

#[test]
fn debug_names_the_credential_not_the_token() {
    let credential = Counting::new(Duration::from_secs(3600));
    let shown = format!("{:?}", provider(&credential));
    assert!(
        shown.contains("counting") && !shown.contains("token-"),
        "{shown}"
    );
}
