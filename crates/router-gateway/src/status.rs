//! `GET /status` and `GET /status.json`: what the router is doing, live, for an operator.
//!
//! `/status.json` gathers, per model group and deployment: its state (ready, half-open,
//! cooling down until when and why, ejected, disabled and why), requests in flight, the
//! latency estimates the strategies use and the answers' p50/p99 over the last minute, its
//! quota and what is left of it, what it learned from the upstream's headers, its share of the
//! group's traffic over the last ten minutes, and its errors by kind; and the router's queue
//! (by lane and priority class) and throttles. `/status` is one HTML page with no external
//! assets and no build step that polls `/status.json` once a second.
//!
//! Both are served to loopback clients only, unless `[server] admin_key_sha256` is set: then
//! to anyone presenting that key (`Authorization: Bearer`, or as the password of HTTP Basic,
//! which a browser asks for), and to no one without it. `[server] status_page = false` turns
//! them off (404).
//!
//! What needs history comes from two places: every answer's time, recorded per deployment
//! in six ten-second slots of a log-scale histogram (the last minute), and a sample of the
//! router's counters every [`SAMPLE_EVERY`], the last [`HISTORY`] kept (traffic shares and the
//! last minute's errors are differences between samples).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use router_facade::{Availability, DeploymentStats, ErrorKind, Router};
use serde_json::{Value, json};
use subtle::ConstantTimeEq as _;

use crate::auth::digest;

/// How often the router's counters are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: ten minutes' worth.
pub(crate) const HISTORY: usize = 120;

/// One slot of the latency histograms, and how many make the minute.
const SLOT: Duration = Duration::from_secs(10);
const SLOTS: usize = 6;

/// Latency buckets: bucket `i` holds times up to `1.25^i` ms (bucket 0: up to 1 ms); the last
/// holds everything longer. A quantile is its bucket's upper bound: at most a quarter over.
const BUCKETS: usize = 64;
const GROWTH: f64 = 1.25;

/// Who may see the status page, as configured.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Access {
    /// `[server] status_page` (on unless turned off).
    pub(crate) enabled: bool,
    /// `[server] admin_key_sha256`: anyone with the key; without it, loopback only.
    pub(crate) admin: Option<[u8; 32]>,
}

/// The last minute of answer times of one deployment.
#[derive(Debug, Clone)]
struct Minute {
    /// Each slot: its number (time since the board's origin, in slots) and its counts.
    slots: [(u64, [u32; BUCKETS]); SLOTS],
}

impl Default for Minute {
    fn default() -> Self {
        Self {
            slots: [(u64::MAX, [0; BUCKETS]); SLOTS],
        }
    }
}

fn bucket(took: Duration) -> usize {
    let ms = took.as_secs_f64() * 1000.0;
    if ms <= 1.0 {
        return 0;
    }
    ((ms.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

impl Minute {
    fn record(&mut self, slot: u64, took: Duration) {
        let (number, counts) = &mut self.slots[(slot % SLOTS as u64) as usize];
        if *number != slot {
            *number = slot;
            *counts = [0; BUCKETS];
        }
        counts[bucket(took)] = counts[bucket(took)].saturating_add(1);
    }

    /// Answers in the last minute (up to `slot`), and the times under which `quantiles` of
    /// them fell (ms; `None` when there were none).
    fn summary(&self, slot: u64, quantiles: &[f64]) -> (u64, Vec<Option<f64>>) {
        let mut merged = [0_u64; BUCKETS];
        for (number, counts) in &self.slots {
            if *number <= slot && slot - *number < SLOTS as u64 {
                for (total, count) in merged.iter_mut().zip(counts) {
                    *total += u64::from(*count);
                }
            }
        }
        let answers: u64 = merged.iter().sum();
        let at = quantiles
            .iter()
            .map(|q| {
                if answers == 0 {
                    return None;
                }
                let rank = ((q * answers as f64).ceil() as u64).max(1);
                let mut seen = 0;
                merged.iter().enumerate().find_map(|(i, count)| {
                    seen += count;
                    (seen >= rank).then(|| GROWTH.powi(i32::try_from(i).unwrap_or(i32::MAX)))
                })
            })
            .collect();
        (answers, at)
    }
}

/// A deployment as the board names it: endpoint and deployment name.
type Place = (String, String);

/// The router's counters at one moment.
#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    /// Per deployment: answers served and failed attempts by kind.
    deployments: HashMap<Place, (u64, Vec<(ErrorKind, u64)>)>,
    throttled: u64,
}

/// What the status page shows that needs history.
#[derive(Debug)]
pub(crate) struct Board {
    origin: Instant,
    every: Duration,
    /// By endpoint, then deployment (looked up without an allocation per answer).
    latency: Mutex<HashMap<String, HashMap<String, Minute>>>,
    history: Mutex<VecDeque<Sample>>,
}

impl Default for Board {
    fn default() -> Self {
        Self::sampled_every(SAMPLE_EVERY)
    }
}

impl Board {
    /// A board whose counters are sampled every `every` (the gateway: [`SAMPLE_EVERY`]; the
    /// demo, whose runs are short: a second).
    pub(crate) fn sampled_every(every: Duration) -> Self {
        Self {
            origin: Instant::now(),
            every,
            latency: Mutex::default(),
            history: Mutex::default(),
        }
    }

    /// How often its counters are sampled.
    pub(crate) fn every(&self) -> Duration {
        self.every
    }

    fn slot(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_secs() / SLOT.as_secs()
    }

    /// An answer from `endpoint`'s `deployment` took `took` (to its headers, for a stream).
    pub(crate) fn answered(&self, endpoint: &str, deployment: &str, took: Duration) {
        let slot = self.slot(Instant::now());
        let mut latency = self.latency.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(minute) = latency
            .get_mut(endpoint)
            .and_then(|deployments| deployments.get_mut(deployment))
        {
            minute.record(slot, took);
            return;
        }
        let mut minute = Minute::default();
        minute.record(slot, took);
        latency
            .entry(endpoint.to_owned())
            .or_default()
            .insert(deployment.to_owned(), minute);
    }

    /// Takes a sample of the router's counters (every [`every`](Self::every)).
    pub(crate) fn sample(&self, router: &Router, throttled: u64) {
        let deployments = router
            .stats()
            .into_iter()
            .map(|s| {
                (
                    (s.endpoint.as_str().to_owned(), s.deployment.clone()),
                    (s.state.successes, s.state.failures.clone()),
                )
            })
            .collect();
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        history.push_back(Sample {
            at: Instant::now(),
            deployments,
            throttled,
        });
        while history.len() > HISTORY {
            history.pop_front();
        }
    }

    /// The samples, oldest first.
    fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// Why the status is not shown to a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// `[server] status_page = false`.
    Off,
    /// No admin key configured, and the caller is not on loopback.
    NotLoopback,
    /// An admin key is configured, and the caller did not present it.
    NeedsKey,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Off => crate::error::ApiError::no_route().into_response(),
            Self::NotLoopback => (
                StatusCode::FORBIDDEN,
                "the status page is served to loopback clients only; set \
                 server.admin_key_sha256 to serve it to others with that key\n",
            )
                .into_response(),
            Self::NeedsKey => {
                let mut refused = (
                    StatusCode::UNAUTHORIZED,
                    "the status page needs the gateway's admin key (Authorization: Bearer, \
                     or as the password of HTTP Basic)\n",
                )
                    .into_response();
                refused.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Basic realm=\"openai-router status\", charset=\"UTF-8\"",
                    ),
                );
                refused
            }
        }
    }
}

/// Whether the caller (from `peer`, with `headers`) may see the status.
fn admit(access: Access, peer: Option<SocketAddr>, headers: &HeaderMap) -> Result<(), Refused> {
    if !access.enabled {
        return Err(Refused::Off);
    }
    let Some(admin) = access.admin else {
        if peer.is_some_and(|p| p.ip().is_loopback()) {
            return Ok(());
        }
        return Err(Refused::NotLoopback);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(token) = v.strip_prefix("Bearer ") {
                return Some(token.trim().to_owned());
            }
            let basic = v.strip_prefix("Basic ")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (_, password) = text.split_once(':')?;
            Some(password.to_owned())
        });
    if presented.is_some_and(|key| bool::from(digest(&key).ct_eq(&admin))) {
        Ok(())
    } else {
        Err(Refused::NeedsKey)
    }
}

/// `GET /status`: the page, for a caller from `peer` with `headers`.
pub(crate) fn page(access: Access, peer: Option<SocketAddr>, headers: &HeaderMap) -> Response {
    if let Err(refused) = admit(access, peer, headers) {
        return refused.into_response();
    }
    let mut response = PAGE.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Its own script and styles only; nothing loaded from elsewhere.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:",
        ),
    );
    response
}

/// `GET /status.json`: the data, for a caller from `peer` with `headers`; `throttled` is the
/// gateway's count of 429 answers.
pub(crate) fn data(
    access: Access,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    router: &Router,
    board: &Board,
    throttled: u64,
) -> Response {
    if let Err(refused) = admit(access, peer, headers) {
        return refused.into_response();
    }
    let mut response = axum::Json(snapshot(router, board, throttled)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const PAGE: &str = include_str!("status.html");

/// The state and why, and until when, of a deployment.
fn availability(
    stats: &DeploymentStats,
    now: Instant,
) -> (&'static str, Option<String>, Option<f64>) {
    let left = |at: Instant| Some(at.saturating_duration_since(now).as_secs_f64());
    let (name, why, until) = match stats.state.availability {
        Availability::Ready => ("ready", None, None),
        Availability::Probing => (
            "half-open",
            Some("back from a cooldown: one request at a time until one is served".to_owned()),
            None,
        ),
        Availability::RateLimited(at) => (
            "cooling",
            Some("the upstream throttled it (429)".to_owned()),
            left(at),
        ),
        Availability::Ejected(at) => (
            "ejected",
            Some(format!(
                "{} failures in a row",
                stats.state.consecutive_failures.max(1)
            )),
            left(at),
        ),
        Availability::Disabled(kind) => (
            "disabled",
            Some(format!("{} ({kind})", kind.describe())),
            None,
        ),
        _ => ("unknown", None, None),
    };
    // Out until probed: when the next probe comes, and what the last one found.
    let Some(out) = stats.state.out else {
        return (name, why, until);
    };
    let last = stats
        .state
        .last_probe
        .and_then(|probe| probe.failed)
        .map_or(String::new(), |kind| {
            format!("; the last probe failed ({kind})")
        });
    let why = format!(
        "{}; out until a probe finds it serving{last}",
        why.unwrap_or_else(|| out.why.describe().to_owned())
    );
    (name, Some(why), left(out.next_probe))
}

fn kinds(failures: &[(ErrorKind, u64)]) -> Value {
    Value::Object(
        failures
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(kind, n)| (kind.as_str().to_owned(), json!(n)))
            .collect(),
    )
}

/// Failures by kind in `now` less those in `then`.
fn since(now: &[(ErrorKind, u64)], then: Option<&[(ErrorKind, u64)]>) -> Vec<(ErrorKind, u64)> {
    now.iter()
        .map(|(kind, n)| {
            let before = then
                .and_then(|t| t.iter().find(|(k, _)| k == kind))
                .map_or(0, |(_, n)| *n);
            (*kind, n.saturating_sub(before))
        })
        .collect()
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10_f64.powi(places);
    (value * scale).round() / scale
}

/// Everything `/status.json` says.
#[expect(clippy::too_many_lines, reason = "one document, field after field")]
pub(crate) fn snapshot(router: &Router, board: &Board, throttled: u64) -> Value {
    let now = Instant::now();
    let all = router.stats();
    let history = board.history();
    // The sample a minute ago (or the oldest), for the last minute's differences.
    let minute_ago = history
        .iter()
        .rev()
        .find(|s| now.saturating_duration_since(s.at) >= Duration::from_secs(60))
        .or_else(|| history.first());
    let slot = board.slot(now);
    let latency = board
        .latency
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut groups: Vec<(String, Vec<&DeploymentStats>)> = Vec::new();
    for s in &all {
        match groups.iter_mut().find(|(model, _)| *model == s.model) {
            Some((_, members)) => members.push(s),
            None => groups.push((s.model.clone(), vec![s])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(model, members)| {
            let places: Vec<Place> = members
                .iter()
                .map(|s| (s.endpoint.as_str().to_owned(), s.deployment.clone()))
                .collect();
            // Answers per deployment in each interval between samples, oldest first.
            let intervals: Vec<Value> = history
                .windows(2)
                .map(|pair| {
                    let counts: Vec<u64> = places
                        .iter()
                        .map(|place| {
                            let served = |s: &Sample| s.deployments.get(place).map_or(0, |d| d.0);
                            served(&pair[1]).saturating_sub(served(&pair[0]))
                        })
                        .collect();
                    json!(counts)
                })
                .collect();
            let deployments: Vec<Value> = members
                .iter()
                .zip(&places)
                .map(|(s, place)| {
                    let (name, why, until) = availability(s, now);
                    let (answers, at) = latency
                        .get(&place.0)
                        .and_then(|deployments| deployments.get(&place.1))
                        .map_or((0, vec![None, None]), |m| m.summary(slot, &[0.5, 0.99]));
                    let then = minute_ago
                        .and_then(|sample| sample.deployments.get(place))
                        .map(|d| d.1.as_slice());
                    let quota = s.quota.map(|q| {
                        json!({
                            "tpm": q.tpm,
                            "rpm": q.rpm,
                            "window_s": q.window.as_secs_f64(),
                            "share": round(q.share, 3),
                            "tokens_left": q.tokens_left.map(|v| v.max(0.0).floor()),
                            "requests_left": q.requests_left.map(|v| v.max(0.0).floor()),
                            "tokens_per_window": q.tpm.map(|t| round(t as f64 * q.window.as_secs_f64() / 60.0 * q.share, 0)),
                            "requests_per_window": q.rpm.map(|r| round(r as f64 * q.window.as_secs_f64() / 60.0 * q.share, 0)),
                        })
                    });
                    json!({
                        "endpoint": place.0,
                        "deployment": place.1,
                        "weight": s.weight,
                        "priority": s.priority,
                        "state": name,
                        "why": why,
                        "until_s": until.map(|u| round(u, 1)),
                        "state_for_s": round(now.saturating_duration_since(s.state.since).as_secs_f64(), 1),
                        "out": s.state.out.map(|out| json!({
                            "why": out.why.as_str(),
                            "for_s": round(now.saturating_duration_since(out.since).as_secs_f64(), 1),
                            "next_probe_in_s": round(out.next_probe.saturating_duration_since(now).as_secs_f64(), 1),
                            "failed_probes": out.failed_probes,
                        })),
                        "last_probe": s.state.last_probe.map(|probe| json!({
                            "ago_s": round(now.saturating_duration_since(probe.at).as_secs_f64(), 1),
                            "outcome": probe.failed.map_or("served", ErrorKind::as_str),
                        })),
                        "probes": s.state.probes,
                        "in_flight": s.state.in_flight,
                        "latency_estimate_ms": {
                            "first_token": round(s.state.latency_stream * 1000.0, 1),
                            "per_output_token": round(s.state.latency_generation * 1000.0, 2),
                            "call": round(s.state.latency_call * 1000.0, 1),
                        },
                        "last_minute": {
                            "answers": answers,
                            "p50_ms": at[0].map(|v| round(v, 1)),
                            "p99_ms": at[1].map(|v| round(v, 1)),
                        },
                        "quota": quota,
                        "learned": {
                            "tpm": s.state.learned_tpm,
                            "rpm": s.state.learned_rpm,
                            "admits": round(s.state.admits.share, 3),
                        },
                        "served": s.state.successes,
                        "errors_last_minute": kinds(&since(&s.state.failures, then)),
                        "errors_total": kinds(&s.state.failures),
                    })
                })
                .collect();
            json!({
                "model": model,
                "deployments": deployments,
                "traffic": {
                    "deployments": places.iter().map(|(e, d)| format!("{e}/{d}")).collect::<Vec<_>>(),
                    "interval_s": board.every.as_secs_f64(),
                    "intervals": intervals,
                },
            })
        })
        .collect();
    let queue: Vec<Value> = router
        .queue()
        .into_iter()
        .map(|w| json!({"lane": w.lane, "priority": w.priority, "waiting": w.count}))
        .collect();
    let generated = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "generated_at_ms": generated,
        "uptime_s": round(now.saturating_duration_since(board.origin).as_secs_f64(), 0),
        "state_shared": router.state_shared(),
        "state_fallbacks": router.state_fallbacks(),
        "waiting": router.waiting(),
        "queue": queue,
        "throttled": {
            "total": throttled,
            "last_minute": throttled.saturating_sub(minute_ago.map_or(0, |s| s.throttled)),
        },
        "groups": groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_last_minute_within_a_quarter() {
        let mut minute = Minute::default();
        for ms in 1..=100_u64 {
            minute.record(3, Duration::from_millis(ms));
        }
        let (answers, at) = minute.summary(3, &[0.5, 0.99]);
        assert_eq!(answers, 100);
        let (p50, p99) = (at[0].unwrap(), at[1].unwrap());
        assert!((50.0..=62.5).contains(&p50), "{p50}");
        assert!((99.0..=123.75).contains(&p99), "{p99}");
        // Six slots later the minute has moved on: none left.
        let (answers, at) = minute.summary(3 + SLOTS as u64, &[0.5]);
        assert_eq!((answers, at[0]), (0, None));
        // A slot reused after a minute starts from nothing.
        minute.record(3 + SLOTS as u64, Duration::from_secs(2));
        let (answers, at) = minute.summary(3 + SLOTS as u64, &[0.5]);
        assert_eq!(answers, 1);
        assert!((2000.0..=2500.0).contains(&at[0].unwrap()));
    }

    #[test]
    fn the_page_is_for_loopback_or_the_admin_key() {
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let open = Access {
            enabled: true,
            admin: None,
        };
        let none = HeaderMap::new();
        assert!(admit(open, Some(loopback), &none).is_ok());
        assert_eq!(admit(open, Some(remote), &none), Err(Refused::NotLoopback));
        assert_eq!(
            Refused::NotLoopback.into_response().status(),
            StatusCode::FORBIDDEN
        );
        let off = Access {
            enabled: false,
            admin: None,
        };
        assert_eq!(admit(off, Some(loopback), &none), Err(Refused::Off));
        assert_eq!(Refused::Off.into_response().status(), StatusCode::NOT_FOUND);
        let keyed = Access {
            enabled: true,
            admin: Some(digest("admin-secret")),
        };
        // With a key, loopback needs it too; Bearer, or Basic's password.
        assert_eq!(admit(keyed, Some(loopback), &none), Err(Refused::NeedsKey));
        let refused = Refused::NeedsKey.into_response();
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        assert!(refused.headers().contains_key(header::WWW_AUTHENTICATE));
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert!(admit(keyed, Some(remote), &with("Bearer admin-secret")).is_ok());
        // "ops:admin-secret"
        assert!(admit(keyed, Some(remote), &with("Basic b3BzOmFkbWluLXNlY3JldA==")).is_ok());
        assert!(admit(keyed, Some(remote), &with("Bearer wrong")).is_err());
        // "ops:wrong"
        assert!(admit(keyed, Some(remote), &with("Basic b3BzOndyb25n")).is_err());
        assert!(admit(keyed, Some(remote), &with("Basic !!!")).is_err());
    }
}
