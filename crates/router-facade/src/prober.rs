//! Health probes. A deployment that is *out* (disabled by a 401, 403, 404 or
//! `insufficient_quota`, or cooling or ejected for longer than
//! [`HealthPolicy::probe_after`](router_core::HealthPolicy::probe_after)) gets no caller's
//! request, and its cooldown's end does not bring it back: a probe does. One task a router
//! sends them: started when something goes out, sleeping until the soonest probe is due (or it
//! is woken: something else went out, a reload asked for a look now), ending when nothing is
//! out or the router is gone.
//!
//! A probe is the cheapest request of the kind the deployment was last sent (a one-token chat
//! completion, one embedding, ...), sent straight to its backend: no routing, no quota, no
//! failover. What it finds goes to the deployment's state
//! ([`DeploymentState::probe_succeeded`](router_core::DeploymentState::probe_succeeded) brings
//! it back half-open and ramping; a failure books the next probe, later).
//!
//! Replicas sharing a state store that leases ([`StateStore::leases`]) probe a deployment once
//! between them: the probe is sent under a lease (one holder across the replicas), and its
//! outcome is kept in the store ([`StateStore::remember`]) for the others, who take it instead
//! of probing when it is newer than their own reason to probe. A probe that succeeds ends the
//! cooldown shared for the deployment ([`StateStore::recovered`]); one that fails extends it
//! past the next probe, so that no replica's caller is sent there meanwhile.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use router_core::{CallKind, CallOptions, Error, ErrorKind, HealthEffect, Out, Rng};
use router_types::{ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest};
use tokio::sync::Notify;

use crate::clock::now;
use crate::shared::Shared;
use crate::snapshot::{Deployment, RouterSnapshot};

/// The longest a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// When another replica holds a deployment's probe, how soon this one looks again (at most;
/// sooner when the probe interval is shorter).
const LOOK_AGAIN: Duration = Duration::from_secs(2);

/// When `deployment` is out (a failure or a shared cooldown just put it there, or it already
/// was): says so once, and starts probing it.
pub(crate) fn went_out(deployment: &Deployment) {
    if deployment.state.out().is_none() {
        return;
    }
    if let Some(out) = deployment.state.tell_out() {
        tracing::warn!(
            endpoint = %deployment.endpoint,
            deployment = %deployment.name,
            why = out.why.as_str(),
            next_probe_in_ms = millis_until(out.next_probe),
            "deployment out: no request goes there until a probe finds it serving"
        );
    }
    deployment.prober.kick();
}

fn millis_until(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(now()).as_millis()).unwrap_or(u64::MAX)
}

/// The task: a round of due probes, then sleep until the next is due or it is woken.
pub(crate) async fn probe_forever(home: Weak<Shared>, wake: Arc<Notify>) {
    let mut rng = Rng::new();
    loop {
        let Some(shared) = home.upgrade() else { return };
        let live = shared.snapshot.load_full();
        let next = round(&live, &mut rng).await;
        let Some(next) = next else {
            // Nothing is out: the task ends, unless something went out meanwhile and no other
            // task was started for it.
            if live.prober.stop(|| soonest(&live).is_some()) {
                return;
            }
            continue;
        };
        drop((live, shared));
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            () = wake.notified() => {}
        }
    }
}

/// When the soonest probe is due, if anything is out.
fn soonest(live: &RouterSnapshot) -> Option<Instant> {
    live.deployments
        .iter()
        .filter_map(|d| d.state.probe_due())
        .min()
}

/// Sends the probes that are due, together; then when the next is due.
async fn round(live: &Arc<RouterSnapshot>, rng: &mut Rng) -> Option<Instant> {
    let policy = live.settings.health;
    let at = now();
    let mut due = Vec::new();
    for deployment in &live.deployments {
        if deployment.state.begin_probe(&policy, at, rng) {
            let seed = rng.fork_seed();
            due.push(probe(live, Arc::clone(deployment), Rng::with_seed(seed)));
        }
    }
    futures_util::future::join_all(due).await;
    soonest(live)
}

/// Probes one deployment: alone, or, with a store shared across replicas, once between them.
async fn probe(live: &Arc<RouterSnapshot>, deployment: Arc<Deployment>, mut rng: Rng) {
    let store = &live.store;
    let Some(out) = deployment.state.out() else {
        return;
    };
    let name = record_name(&deployment.key);
    if store.is_shared() && store.leases() {
        // Another replica's outcome, newer than this one's reason to probe, is taken: one
        // that was served, or a failure whose next probe is still to come (when it has come,
        // this replica may be the one to send it).
        if let Ok(Some(text)) = store.recall(&name, now()).await
            && let Some(record) = Record::parse(&text)
            && record.wall_ms >= wall_ms(out.since)
            && record.failed.is_none_or(|(_, next)| next > wall_ms(now()))
        {
            if adopt(&deployment, &record, out) {
                // What this replica's store keeps of the shared cooldown goes too.
                let _ = store.recovered(&deployment.key, now()).await;
            }
            return;
        }
        match store.lease(&name, 1, now()).await {
            Ok(Some(lease)) => {
                let found = send(live, &deployment, &mut rng).await;
                publish(live, &deployment, &found).await;
                let _ = store.release(&lease).await;
                return;
            }
            Ok(None) => {
                // Another replica is probing it: its outcome is read on the next look.
                deployment.state.stay_out(
                    out.why,
                    now() + LOOK_AGAIN.min(live.settings.health.probe_interval),
                    now(),
                );
                return;
            }
            // The store is away: this replica probes alone.
            Err(_) => {}
        }
    }
    let found = send(live, &deployment, &mut rng).await;
    if matches!(found, Found::Back) {
        let _ = store.recovered(&deployment.key, now()).await;
    }
}

/// What a probe found, recorded on the deployment.
enum Found {
    /// Served: the deployment is back.
    Back,
    /// Still out, for this, until the next probe then.
    Out(ErrorKind, Instant),
}

/// Sends the probe and records what it found; logs a change.
async fn send(live: &RouterSnapshot, deployment: &Deployment, rng: &mut Rng) -> Found {
    let policy = live.settings.health;
    let timeout = live.settings.request_timeout.min(PROBE_TIMEOUT);
    let at = now();
    let previous = deployment.state.last_probe();
    let result = match tokio::time::timeout(timeout, call(deployment, at + timeout)).await {
        Ok(result) => result,
        Err(_) => Err(Error::with_message(
            ErrorKind::Timeout,
            format!("the health probe got no answer within {timeout:?}"),
        )),
    };
    // Refused for the request's own fault: the upstream checked the key and the deployment
    // first, so it serves.
    let served = match &result {
        Ok(()) => true,
        Err(error) => error.health_effect() == HealthEffect::None,
    };
    let (endpoint, name) = (&deployment.endpoint, &deployment.name);
    if served {
        deployment.state.probe_succeeded(at, now());
        tracing::info!(%endpoint, deployment = %name, "probe served: deployment back, one request at a time, ramping up");
        return Found::Back;
    }
    let Err(error) = result else {
        unreachable!("a result that is not served is an error")
    };
    let next = deployment
        .state
        .probe_failed(&error, at, &policy, now(), rng);
    let repeated = previous.and_then(|p| p.failed) == Some(error.kind());
    if repeated {
        tracing::debug!(%endpoint, deployment = %name, %error, next_probe_in_ms = millis_until(next), "probe failed again; deployment stays out");
    } else {
        tracing::info!(%endpoint, deployment = %name, %error, next_probe_in_ms = millis_until(next), "probe failed; deployment stays out");
    }
    Found::Out(error.kind(), next)
}

/// The cheapest request of the kind the deployment was last sent, in its form.
async fn call(deployment: &Deployment, deadline: Instant) -> Result<(), Error> {
    let options = CallOptions::default().with_deadline(deadline);
    let backend = deployment.backend.as_ref();
    let model = deployment.name.as_str();
    match deployment.state.probe_call() {
        CallKind::Embeddings => backend
            .embeddings(&EmbeddingRequest::new(model, "ping"), &options)
            .await
            .map(drop),
        CallKind::Completions => {
            let mut request = CompletionRequest::new(model, "ping");
            request.max_tokens = Some(1);
            backend.completions(&request, &options).await.map(drop)
        }
        CallKind::Responses => {
            let mut request = router_types::CreateResponse {
                model: model.to_owned(),
                input: Some(serde_json::Value::from("ping")),
                // The smallest the Responses API takes.
                max_output_tokens: Some(16),
                ..router_types::CreateResponse::default()
            };
            request
                .extra
                .insert("store".to_owned(), serde_json::Value::Bool(false));
            backend.responses(&request, &options).await.map(drop)
        }
        CallKind::ChatMaxCompletionTokens => chat(deployment, true, &options).await,
        _ => chat(deployment, false, &options).await,
    }
}

/// A one-token chat completion, capped with `max_completion_tokens` (`modern`) or
/// `max_tokens`. When the upstream refuses the cap's parameter (a reasoning model refuses
/// `max_tokens`; an old API version or a compatible server may not know
/// `max_completion_tokens`), once more with the other, which later probes then use: a refusal
/// of the request's form is not the deployment serving (it says nothing of the quota, which
/// the upstream may check after the body).
async fn chat(deployment: &Deployment, modern: bool, options: &CallOptions) -> Result<(), Error> {
    let backend = deployment.backend.as_ref();
    let request = |modern: bool| {
        let mut request =
            ChatCompletionRequest::new(deployment.name.as_str(), vec![ChatMessage::user("ping")]);
        if modern {
            request.max_completion_tokens = Some(1);
        } else {
            request.max_tokens = Some(1);
        }
        request
    };
    let refused = |error: &Error, modern: bool| {
        let cap = if modern {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        error.status() == Some(400)
            && error
                .body()
                .is_some_and(|body| body.param.as_deref() == Some(cap))
    };
    match backend.chat(&request(modern), options).await {
        Err(error) if refused(&error, modern) => {
            let other = !modern;
            deployment.state.note_call(if other {
                CallKind::ChatMaxCompletionTokens
            } else {
                CallKind::Chat
            });
            backend.chat(&request(other), options).await.map(drop)
        }
        result => result.map(drop),
    }
}

/// Tells the other replicas what the probe found: the outcome for them to take, and the
/// shared cooldown ended (back) or extended past the next probe (still out).
async fn publish(live: &RouterSnapshot, deployment: &Deployment, found: &Found) {
    let store = &live.store;
    let policy = live.settings.health;
    let at = now();
    let key = &deployment.key;
    let (record, ttl) = match *found {
        Found::Out(why, next) => {
            let until = next.saturating_duration_since(at);
            let _ = store.cool_down(key, until + PROBE_TIMEOUT, at).await;
            (
                Record {
                    wall_ms: wall_ms(at),
                    failed: Some((why, wall_ms(next))),
                },
                until + policy.probe_interval,
            )
        }
        Found::Back => {
            let _ = store.recovered(key, at).await;
            (
                Record {
                    wall_ms: wall_ms(at),
                    failed: None,
                },
                policy.max_probe_interval,
            )
        }
    };
    if let Err(error) = store
        .remember(&record_name(key), &record.to_text(), ttl, at)
        .await
    {
        tracing::debug!(%key, %error, "cannot share a probe's outcome");
    }
}

/// Takes another replica's probe outcome; `true` when it brought the deployment back.
fn adopt(deployment: &Deployment, record: &Record, out: Out) -> bool {
    let at = now();
    match record.failed {
        None => {
            let back = deployment.state.back(at);
            if back {
                tracing::info!(endpoint = %deployment.endpoint, deployment = %deployment.name, "another replica's probe was served: deployment back, one request at a time");
            }
            back
        }
        Some((why, next_wall_ms)) => {
            let next = instant_of(next_wall_ms).max(at + Duration::from_millis(1));
            deployment.state.stay_out(why, next, at);
            tracing::debug!(endpoint = %deployment.endpoint, deployment = %deployment.name, why = why.as_str(), previous = out.why.as_str(), "another replica's probe failed; deployment stays out");
            false
        }
    }
}

/// Where a deployment's last probe outcome is kept in the store.
fn record_name(key: &str) -> String {
    format!("probe:{key}")
}

/// A probe's outcome as kept in the store: when it was sent (wall clock, so that replicas
/// compare), and for a failure its kind and when the next probe comes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Record {
    wall_ms: u64,
    failed: Option<(ErrorKind, u64)>,
}

impl Record {
    fn to_text(self) -> String {
        match self.failed {
            None => format!("1 {} served", self.wall_ms),
            Some((why, next)) => format!("1 {} {} {next}", self.wall_ms, why.as_str()),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        if parts.next()? != "1" {
            return None;
        }
        let wall_ms = parts.next()?.parse().ok()?;
        let outcome = parts.next()?;
        if outcome == "served" {
            return Some(Self {
                wall_ms,
                failed: None,
            });
        }
        let why = ErrorKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.as_str() == outcome)?;
        let next = parts.next()?.parse().ok()?;
        Some(Self {
            wall_ms,
            failed: Some((why, next)),
        })
    }
}

/// The wall-clock time of an instant on the router's clock, in ms since the Unix epoch.
fn wall_ms(at: Instant) -> u64 {
    let current = now();
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let wall = if at <= current {
        wall.saturating_sub(current - at)
    } else {
        wall + (at - current)
    };
    u64::try_from(wall.as_millis()).unwrap_or(u64::MAX)
}

/// The router-clock instant of a wall-clock time in ms since the Unix epoch.
fn instant_of(wall: u64) -> Instant {
    let current = now();
    let here = wall_ms(current);
    if wall >= here {
        current + Duration::from_millis(wall - here)
    } else {
        current
            .checked_sub(Duration::from_millis(here - wall))
            .unwrap_or(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_and_refuse_what_they_do_not_know() {
        for record in [
            Record {
                wall_ms: 1_700_000_000_000,
                failed: None,
            },
            Record {
                wall_ms: 1_700_000_000_000,
                failed: Some((ErrorKind::Unauthorized, 1_700_000_010_000)),
            },
        ] {
            assert_eq!(Record::parse(&record.to_text()), Some(record));
        }
        for text in [
            "",
            "2 1 served",
            "1 x served",
            "1 5 no_such_kind 6",
            "1 5 unauthorized",
        ] {
            assert_eq!(Record::parse(text), None, "{text:?}");
        }
    }
}
