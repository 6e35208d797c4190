//! A [`StateStore`] on Redis, so that replicas of the router stay within one quota together
//! and see each other's cooldowns.
//!
//! Each operation is one Lua script, one round trip, atomic on the server, timed by the
//! server's clock (`TIME`), so replicas with skewed clocks agree:
//!
//! - `reserve` refills a deployment's token and request buckets, checks a shared cooldown,
//!   and takes the request's estimate only if both buckets have room (a request larger than a
//!   bucket needs a full one and leaves it in debt), else answers how long to wait;
//! - `settle` gives back what the estimate overshot and lowers the buckets to the upstream's
//!   `x-ratelimit-remaining-*`;
//! - `cool_down` shares a 429's cooldown, extending and never shortening one.
//!
//! A deployment's keys share one hash tag, `{prefix:endpoint/model}`, so every script touches
//! a single slot: Redis Cluster safe.
//!
//! # When Redis is away
//!
//! No request fails because of Redis. A call that fails or takes longer than the timeout
//! (default 100 ms) is answered from local accounting with [`RedisOptions::local_share`] of
//! each limit (by default a third, for three replicas), a warning is logged once, and
//! [`RedisStore::fallbacks`] counts the calls. For half a second after a failure, calls go
//! straight to local accounting rather than each waiting for a timeout. The connection
//! manager reconnects in the background; the first call that succeeds again logs it, and
//! sharing resumes.
//!
//! # Examples
//!
//! ```no_run
//! use std::sync::Arc;
//! use router_facade::{Endpoint, Router};
//! use state_redis::{RedisOptions, RedisStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let router = Router::builder()
//!     .endpoint(Endpoint::openai("openai", "https://api.openai.com/v1").model("gpt-4o-mini").tpm(150_000))
//!     .state_store(Arc::new(store))
//!     .build()?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use router_core::{
    Admission, Charge, Error, Learned, Learning, Limits, MemoryStore, Settlement, StateStore,
};
use tokio::sync::RwLock;

// Keys: 1 tokens bucket, 2 requests bucket, 3 cooldown, 4 what was learned of the upstream's
// admissions (`b` burst share, `r` rate share, `g` when they last changed, `c` the last cut;
// absent until the first refusal). Bucket shapes come as configured; the shares apply here.
//
// Every script starts with `PRELUDE`: the server's clock, and a bucket's level refilled to now
// (full when it was never touched), the same arithmetic as `router_core::quota::Bucket`.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap, rate)
  local v = redis.call('HMGET', key, 'l', 't')
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil then return cap end
  local r = l + (now - at) * rate
  if r > cap then r = cap end
  return r
end
";

const RESERVE: &str = r"
local cool = redis.call('PTTL', KEYS[3])
if cool > 0 then return {0, cool, '', '', 1, '', ''} end
local s = redis.call('HMGET', KEYS[4], 'b', 'r')
local b, sr = tonumber(s[1]) or 1, tonumber(s[2]) or 1
local tcap, trate, tcost = tonumber(ARGV[1]) * b, tonumber(ARGV[2]) * sr, tonumber(ARGV[3])
local rcap, rrate, rcost = tonumber(ARGV[4]) * b, tonumber(ARGV[5]) * sr, tonumber(ARGV[6])
local ttl = ARGV[7]
local wait, lt, lr = 0, nil, nil
if tcap >= 0 then
  lt = level(KEYS[1], tcap, trate)
  local need = math.min(tcost, tcap)
  if lt < need then wait = math.max(wait, (need - lt) / trate) end
end
if rcap >= 0 then
  lr = level(KEYS[2], rcap, rrate)
  local need = math.min(rcost, rcap)
  if lr < need then wait = math.max(wait, (need - lr) / rrate) end
end
if wait > 0 then return {0, math.ceil(wait * 1000), '', '', 0, '', ''} end
local out_t, out_r = '', ''
if tcap >= 0 then
  lt = lt - tcost
  redis.call('HSET', KEYS[1], 'l', tostring(lt), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[1], ttl)
  out_t = tostring(lt)
end
if rcap >= 0 then
  lr = lr - rcost
  redis.call('HSET', KEYS[2], 'l', tostring(lr), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[2], ttl)
  out_r = tostring(lr)
end
return {1, 0, out_t, out_r, 0, tostring(b), tostring(sr)}
";

// ARGV 10..13: served (1/0), the window in seconds, burst and rate regrowth per minute.
const SETTLE: &str = r"
local s = redis.call('HMGET', KEYS[3], 'b', 'r', 'g')
local b, sr = tonumber(s[1]) or 1, tonumber(s[2]) or 1
local function settle(key, cap, rate, back, remaining, ttl)
  if cap < 0 then return end
  cap, rate = cap * b, rate * sr
  local l = level(key, cap, rate) + back
  if l > cap then l = cap end
  if remaining >= 0 and l > remaining then l = remaining end
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', key, ttl)
end
settle(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[9])
settle(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9])
if ARGV[10] == '1' and s[3] then
  local minutes = math.min(math.max(now - tonumber(s[3]), 0), tonumber(ARGV[11])) / 60
  b = math.min(1, b + tonumber(ARGV[12]) * minutes)
  sr = math.min(1, sr + tonumber(ARGV[13]) * minutes)
  redis.call('HSET', KEYS[3], 'b', tostring(b), 'r', tostring(sr), 'g', tostring(now))
  redis.call('PEXPIRE', KEYS[3], ARGV[9])
end
return 1
";

const COOL_DOWN: &str = r"
local cur = redis.call('PTTL', KEYS[1])
if cur < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 1
";

// ARGV: 1-2 tokens shape, 3-4 requests shape, 5 the wait (ms), 6 the window (s), 7 burst cut,
// 8 rate cut, 9 floor, 10 TTL (ms), 11 the windows within which a second cut also cuts the
// rate. Cuts once per window, then empties both buckets until the cooldown ends.
const REFUSED: &str = r"
local wait_ms = tonumber(ARGV[5])
local cur = redis.call('PTTL', KEYS[3])
if cur < wait_ms then redis.call('SET', KEYS[3], '1', 'PX', wait_ms) end
local s = redis.call('HMGET', KEYS[4], 'b', 'r', 'c')
local b, sr, c = tonumber(s[1]) or 1, tonumber(s[2]) or 1, tonumber(s[3])
if c == nil or now - c >= tonumber(ARGV[6]) then
  local floor = tonumber(ARGV[9])
  b = math.max(floor, b * tonumber(ARGV[7]))
  if c ~= nil and now - c < tonumber(ARGV[6]) * tonumber(ARGV[11]) then
    sr = math.max(floor, sr * tonumber(ARGV[8]))
  end
  redis.call('HSET', KEYS[4], 'b', tostring(b), 'r', tostring(sr), 'g', tostring(now), 'c', tostring(now))
end
redis.call('PEXPIRE', KEYS[4], ARGV[10])
local function empty(key, cap, rate)
  if cap < 0 then return end
  cap, rate = cap * b, rate * sr
  local l = math.min(level(key, cap, rate), -rate * wait_ms / 1000)
  redis.call('HSET', key, 'l', tostring(l), 't', tostring(now))
  redis.call('PEXPIRE', key, ARGV[10])
end
empty(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
empty(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return {tostring(b), tostring(sr)}
";

/// How long after a failed call Redis is left alone.
const RETRY_AFTER_FAILURE_MS: u64 = 500;

/// How the store talks to Redis and what it does without it.
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Prefix of every key (default `openai-router`); replicas sharing a quota use the same.
    pub prefix: String,
    /// The longest a call may take before local accounting answers instead (default 100 ms).
    pub timeout: Duration,
    /// The share of each quota a replica uses on its own while Redis is away (default 1/3).
    pub local_share: f64,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "openai-router".to_owned(),
            timeout: Duration::from_millis(100),
            local_share: 1.0 / 3.0,
        }
    }
}

impl RedisOptions {
    /// Sets the key prefix.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the call timeout.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the local share of each quota while Redis is away.
    #[must_use]
    pub fn with_local_share(mut self, share: f64) -> Self {
        self.local_share = share.clamp(0.0, 1.0);
        self
    }
}

/// Quota and cooldowns shared through Redis, with local accounting while Redis is away.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    connection: RwLock<Option<ConnectionManager>>,
    options: RedisOptions,
    local: MemoryStore,
    reserve: Script,
    settle: Script,
    cool_down: Script,
    refused: Script,
    learning: Learning,
    shared: AtomicBool,
    fallbacks: AtomicU64,
    connecting: AtomicBool,
    /// After a failure, Redis is not asked again before this (ms since `origin`): requests
    /// must not each wait for a timeout while it is away.
    retry_at: AtomicU64,
    origin: Instant,
}

impl RedisStore {
    /// A store on the Redis at `url` (`redis://host:port/db`). It starts even when Redis is
    /// not reachable yet (accounting locally until it is).
    ///
    /// # Errors
    ///
    /// A [`Config`](router_core::ErrorKind::Config) error when the URL does not parse.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, Error> {
        let client =
            redis::Client::open(url).map_err(|e| Error::config(format!("redis url: {e}")))?;
        let store = Self {
            inner: Arc::new(Inner {
                client,
                connection: RwLock::new(None),
                options,
                local: MemoryStore::new(),
                reserve: Script::new(&format!("{PRELUDE}{RESERVE}")),
                settle: Script::new(&format!("{PRELUDE}{SETTLE}")),
                cool_down: Script::new(COOL_DOWN),
                refused: Script::new(&format!("{PRELUDE}{REFUSED}")),
                learning: Learning::default(),
                shared: AtomicBool::new(false),
                fallbacks: AtomicU64::new(0),
                connecting: AtomicBool::new(false),
                retry_at: AtomicU64::new(0),
                origin: Instant::now(),
            }),
        };
        store.try_connect().await;
        if !store.inner.shared.load(Ordering::Relaxed) {
            tracing::warn!("redis is not reachable; accounting locally until it is");
        }
        Ok(store)
    }

    /// Calls answered locally because Redis failed or was slow.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    async fn try_connect(&self) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(
                self.inner.options.timeout.max(Duration::from_millis(200)),
            ))
            .set_response_timeout(Some(self.inner.options.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let connecting = tokio::time::timeout(
            Duration::from_secs(2),
            self.inner.client.get_connection_manager_with_config(config),
        )
        .await;
        if let Ok(Ok(manager)) = connecting {
            *self.inner.connection.write().await = Some(manager);
            self.inner.shared.store(true, Ordering::Relaxed);
        }
    }

    /// Connects in the background when there is no connection yet.
    fn reconnect_in_background(&self) {
        if self.inner.connecting.swap(true, Ordering::Relaxed) {
            return;
        }
        let store = self.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                store.try_connect().await;
                store.inner.connecting.store(false, Ordering::Relaxed);
            });
        } else {
            self.inner.connecting.store(false, Ordering::Relaxed);
        }
    }

    /// The tokens, requests, cooldown and learned-admissions keys of a deployment, in one
    /// hash slot.
    fn keys(&self, key: &str) -> [String; 4] {
        let tag: String = key.chars().filter(|c| *c != '{' && *c != '}').collect();
        let prefix = &self.inner.options.prefix;
        ["t", "r", "c", "l"].map(|suffix| format!("{{{prefix}:{tag}}}:{suffix}"))
    }

    /// Runs a script invocation, or says why not.
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let now_ms = self.inner.origin.elapsed().as_millis() as u64;
        if now_ms < self.inner.retry_at.load(Ordering::Relaxed) {
            return Err("backing off after a failure".to_owned());
        }
        let Some(mut connection) = self.inner.connection.read().await.clone() else {
            self.reconnect_in_background();
            return Err("not connected".to_owned());
        };
        match tokio::time::timeout(
            self.inner.options.timeout,
            invocation.invoke_async(&mut connection),
        )
        .await
        {
            Ok(Ok(value)) => {
                if !self.inner.shared.swap(true, Ordering::Relaxed) {
                    tracing::info!("redis is back; quota and cooldowns are shared again");
                }
                Ok(value)
            }
            Ok(Err(error)) => Err(self.failed(error.to_string())),
            Err(_) => {
                Err(self.failed(format!("no answer within {:?}", self.inner.options.timeout)))
            }
        }
    }

    fn fell_back(&self, why: &str) {
        self.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
        if self.inner.shared.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                reason = why,
                "redis unavailable; accounting locally with a share of each quota"
            );
        }
    }

    /// A real failure: leave Redis alone for a moment.
    fn failed(&self, why: String) -> String {
        let retry_at = self.inner.origin.elapsed().as_millis() as u64 + RETRY_AFTER_FAILURE_MS;
        self.inner.retry_at.fetch_max(retry_at, Ordering::Relaxed);
        why
    }

    fn local_limits(&self, limits: &Limits) -> Limits {
        limits.scaled(self.inner.options.local_share)
    }
}

/// `-1` for "not limited", else the bucket's capacity; then its rate.
fn shape_args(shape: Option<router_core::quota::Shape>) -> (f64, f64) {
    shape.map_or((-1.0, 0.0), |s| (s.capacity, s.rate))
}

fn ttl_ms(limits: &Limits) -> u64 {
    // A bucket untouched for twice its window is full again anyway: let it expire.
    (limits.window.as_millis() as u64)
        .saturating_mul(2)
        .max(60_000)
}

fn parse_level(text: &str) -> Option<f64> {
    text.parse().ok()
}

fn parse_learned(burst: &str, rate: &str) -> Learned {
    Learned {
        burst: parse_level(burst).unwrap_or(1.0),
        rate: parse_level(rate).unwrap_or(1.0),
    }
}

#[async_trait]
impl StateStore for RedisStore {
    async fn reserve(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
    ) -> Result<Admission, Error> {
        let keys = self.keys(key);
        let (tcap, trate) = shape_args(limits.tokens());
        let (rcap, rrate) = shape_args(limits.requests());
        let mut invocation = self.inner.reserve.prepare_invoke();
        invocation
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .key(&keys[3]);
        invocation
            .arg(tcap)
            .arg(trate)
            .arg(charge.tokens)
            .arg(rcap)
            .arg(rrate)
            .arg(charge.requests)
            .arg(ttl_ms(limits));
        match self
            .run::<(i64, i64, String, String, i64, String, String)>(&invocation)
            .await
        {
            Ok((1, _, tokens, requests, _, burst_share, rate_share)) => Ok(Admission::Admitted {
                tokens_left: parse_level(&tokens),
                requests_left: parse_level(&requests),
                learned: parse_learned(&burst_share, &rate_share),
            }),
            Ok((_, wait_ms, _, _, cooling, _, _)) => Ok(Admission::Denied {
                retry_after: Duration::from_millis(u64::try_from(wait_ms.max(1)).unwrap_or(1)),
                cooling: cooling == 1,
            }),
            Err(why) => {
                self.fell_back(&why);
                Ok(self
                    .inner
                    .local
                    .reserve_now(key, &self.local_limits(limits), charge, now))
            }
        }
    }

    async fn settle(
        &self,
        key: &str,
        limits: &Limits,
        settlement: Settlement,
        now: Instant,
    ) -> Result<(), Error> {
        let keys = self.keys(key);
        let (tcap, trate) = shape_args(limits.tokens());
        let (rcap, rrate) = shape_args(limits.requests());
        let remaining = |r: Option<u64>| r.map_or(-1.0, |r| r as f64);
        let mut invocation = self.inner.settle.prepare_invoke();
        invocation.key(&keys[0]).key(&keys[1]).key(&keys[3]);
        let learning = &self.inner.learning;
        invocation
            .arg(tcap)
            .arg(trate)
            .arg(settlement.tokens_back)
            .arg(remaining(settlement.remaining_tokens))
            .arg(rcap)
            .arg(rrate)
            .arg(settlement.requests_back)
            .arg(remaining(settlement.remaining_requests))
            .arg(ttl_ms(limits))
            .arg(u8::from(settlement.served))
            .arg(limits.window.as_secs_f64())
            .arg(learning.burst_regrow)
            .arg(learning.rate_regrow);
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
            self.inner
                .local
                .settle_now(key, &self.local_limits(limits), settlement, now);
        }
        Ok(())
    }

    async fn cool_down(&self, key: &str, wait: Duration, now: Instant) -> Result<(), Error> {
        let keys = self.keys(key);
        let mut invocation = self.inner.cool_down.prepare_invoke();
        invocation.key(&keys[2]).arg(wait.as_millis().max(1) as u64);
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
            self.inner.local.cool_down_now(key, wait, now);
        }
        Ok(())
    }

    async fn refused(
        &self,
        key: &str,
        limits: &Limits,
        wait: Duration,
        now: Instant,
    ) -> Result<Learned, Error> {
        let keys = self.keys(key);
        let (tcap, trate) = shape_args(limits.tokens());
        let (rcap, rrate) = shape_args(limits.requests());
        let learning = &self.inner.learning;
        let mut invocation = self.inner.refused.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(tcap)
            .arg(trate)
            .arg(rcap)
            .arg(rrate)
            .arg(wait.as_millis().max(1) as u64)
            .arg(limits.window.as_secs_f64())
            .arg(learning.burst_cut)
            .arg(learning.rate_cut)
            .arg(learning.floor)
            .arg(ttl_ms(limits))
            .arg(router_core::quota::REPEAT_WINDOWS);
        match self.run::<(String, String)>(&invocation).await {
            Ok((burst_share, rate_share)) => Ok(parse_learned(&burst_share, &rate_share)),
            Err(why) => {
                self.fell_back(&why);
                Ok(self
                    .inner
                    .local
                    .refused_now(key, &self.local_limits(limits), wait, now))
            }
        }
    }

    fn is_shared(&self) -> bool {
        self.inner.shared.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never shown.
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.options.prefix)
            .field("shared", &self.is_shared())
            .field("fallbacks", &self.fallbacks())
            .finish_non_exhaustive()
    }
}
