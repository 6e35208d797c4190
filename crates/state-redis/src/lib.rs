//! A [`StateStore`] on Redis, so that replicas of the router stay within one quota together
//! and see each other's cooldowns.
//!
//! Each operation is one Lua script, one round trip, atomic on the server, timed by the
//! server's clock (`TIME`), so replicas with skewed clocks agree:
//!
//! - `reserve` lets go of what has left a deployment's window, checks a shared cooldown, and
//!   holds the request's estimate (under a ticket) only if the window has room for both its
//!   tokens and its request (a request larger than a window needs an empty one, and is held
//!   for as many windows as it is large), else answers how long until enough leaves;
//! - `settle` gives back what the estimate overshot, holds what the upstream's
//!   `x-ratelimit-remaining-*` says is used beyond the log, and grows back what was learned;
//! - `refused` shares a 429's cooldown and cuts the share of the limits kept to, to what the
//!   window held when the upstream said it was full ([`Learning`]);
//! - `cool_down` shares a 429's cooldown, extending and never shortening one;
//! - `openings` reads the log's marks (changing nothing) and walks them here
//!   ([`Log::openings`](router_core::Log::openings)): when the next requests would fit, which
//!   a refusal's `Retry-After` promises.
//!
//! A deployment's keys share one hash tag, `{prefix:endpoint/model}`, so every script touches
//! a single slot: Redis Cluster safe ([`RedisStore::connect_cluster`]).
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

mod slices;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use router_core::{
    Admission, Charge, Error, Learned, Learning, Lease, Limits, Log, Mark, MemoryStore, Settlement,
    StateStore,
};
use tokio::sync::RwLock;

use crate::slices::{Answer, KeySlices, Local, Outgoing, SLICE_TICKET};

// Keys: 1 the window's log (a sorted set: each admission's ticket, scored by when it leaves
// the window), 2 what each admission holds (`<ticket>` = "tokens:requests:freed tokens:freed
// requests", the last two what had left the window when it was admitted; under provisioned
// throughput followed by ":arrived:drains from", the server times it was admitted and its
// utilisation began to drain) with the window's
// totals (`T` tokens, `R` requests), what has left it so far (`FT`, `FR`) and the last ticket
// (`N`) and, under provisioned throughput, when the utilisation the router's admissions put in
// has drained (`D`), 3 the cooldown, 4 what was
// learned of the upstream's admissions (`s` the share, `g` when it last changed, `c` the last
// cut; absent until the first refusal), 5 half-open (set with a cooldown, for its length and
// `HALF_OPEN_MS` more; deleted when a request is served), 6 the probe (the ticket of the one
// request admitted while half-open, for `PROBE_TTL_MS` or until it settles). Limits come as
// configured (per minute, `-1`: not limited, and the window in seconds); the share applies here.
//
// Every script but the cooldown starts with `PRELUDE`: the server's clock, letting go of what
// has left the window, and a window's capacity, the same arithmetic as
// `router_core::quota::{Log, Learned}`.
const PRELUDE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function parse(v)
  local a, b, c, d, e, f = string.match(v, '^([^:]+):([^:]+):([^:]+):([^:]+):?([^:]*):?([^:]*)$')
  return tonumber(a), tonumber(b), tonumber(c), tonumber(d), tonumber(e), tonumber(f)
end
-- The marks that have left the window by now, and what they hold: in all (`at`, `ar`), and of
-- the router's own admissions (not the `u` tickets standing for what the upstream holds unseen).
local function left_window()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
  local at, ar, ft, fr = 0, 0, 0, 0
  for i = 1, #gone, 500 do
    local part = {}
    for j = i, math.min(i + 499, #gone) do part[#part + 1] = gone[j] end
    local vals = redis.call('HMGET', KEYS[2], unpack(part))
    for j = 1, #part do
      if vals[j] then
        local a, b = parse(vals[j])
        at, ar = at + a, ar + b
        if string.sub(part[j], 1, 1) ~= 'u' then ft, fr = ft + a, fr + b end
      end
    end
  end
  return gone, at, ar, ft, fr
end
-- Lets go of the marks that have left the window: their totals, and what of the router's own
-- admissions is freed.
local function expire()
  local gone, at, ar, ft, fr = left_window()
  if #gone == 0 then return end
  for i = 1, #gone, 500 do
    local part = {}
    for j = i, math.min(i + 499, #gone) do part[#part + 1] = gone[j] end
    redis.call('HDEL', KEYS[2], unpack(part))
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) == 0 then
    redis.call('HSET', KEYS[2], 'T', 0, 'R', 0)
  else
    redis.call('HINCRBYFLOAT', KEYS[2], 'T', -at)
    redis.call('HINCRBYFLOAT', KEYS[2], 'R', -ar)
  end
  redis.call('HINCRBYFLOAT', KEYS[2], 'FT', ft)
  redis.call('HINCRBYFLOAT', KEYS[2], 'FR', fr)
end
-- A server time, to the microsecond (`tostring` keeps 14 digits: a tenth of a millisecond).
local function stamp(x) return string.format('%.6f', x) end
local function freed()
  local v = redis.call('HMGET', KEYS[2], 'FT', 'FR')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
local function held()
  local v = redis.call('HMGET', KEYS[2], 'T', 'R')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end
local function capacity(limit, share, window)
  if limit < 0 then return -1 end
  if share < 1 then
    limit = math.max(1, math.floor(limit * math.max(share, 0.001)))
  end
  return math.max(limit / 60 * window, 1)
end
local function hold(ticket, tokens, requests, untl, ttl, drain)
  local ft, fr = freed()
  redis.call('ZADD', KEYS[1], untl, ticket)
  redis.call('HSET', KEYS[2], ticket, tokens .. ':' .. requests .. ':' .. ft .. ':' .. fr .. (drain or ''))
  redis.call('HINCRBYFLOAT', KEYS[2], 'T', tokens)
  redis.call('HINCRBYFLOAT', KEYS[2], 'R', requests)
  local ms = math.max(tonumber(ttl), math.ceil((untl - now) * 1000) + 1000)
  redis.call('PEXPIRE', KEYS[1], ms)
  redis.call('PEXPIRE', KEYS[2], ms)
end
-- How long until `cost` fits under `cap` with `h` held (0: it fits now), walking the marks in
-- the order they leave, a page at a time (a full window holds thousands of marks; a request
-- a little over the room needs the first few); `dim` 1 for tokens, 2 for requests. A cost
-- over the cap needs an empty window; under provisioned throughput (`prov`) a request fits
-- while utilisation is under 100 %.
local function wait_to_fit(cap, cost, h, dim, prov)
  if cap < 0 then return 0 end
  local need, slack = math.min(cost, cap), 1e-9
  if prov then need, slack = 0, -1e-9 end
  local over = h + need - cap
  if over <= slack then return 0 end
  local offset = 0
  while true do
    local page = redis.call('ZRANGE', KEYS[1], offset, offset + 127, 'WITHSCORES')
    if #page == 0 then return 0 end
    for i = 1, #page, 2 do
      local v = redis.call('HGET', KEYS[2], page[i])
      if v then
        local a, b = parse(v)
        if dim == 1 then over = over - a else over = over - b end
      end
      if over <= slack then return tonumber(page[i + 1]) - now end
    end
    offset = offset + #page / 2
  end
end
";

// ARGV: 1 TPM, 2 RPM, 3 the window (s), 4 the margin (s), 5 tokens, 6 requests, 7 TTL (ms),
// 8 the quota model (`p`: provisioned throughput, where a request fits while utilisation is
// under 100 % and holds its cost until the utilisation drains it, after those before it).
const RESERVE: &str = r"
local cool = redis.call('PTTL', KEYS[3])
if cool > 0 then return {0, cool, '', '', 1, '', 0} end
-- Half-open after a shared cooldown: one request across the replicas until one is served.
local half = redis.call('EXISTS', KEYS[5]) == 1
if half then
  local probe = redis.call('PTTL', KEYS[6])
  if probe > 0 then return {0, math.min(probe, PROBE_WAIT_MS), '', '', 1, '', 0} end
end
expire()
local share = tonumber(redis.call('HGET', KEYS[4], 's')) or 1
local window = tonumber(ARGV[3])
local tcap = capacity(tonumber(ARGV[1]), share, window)
local rcap = capacity(tonumber(ARGV[2]), share, window)
local tcost, rcost = tonumber(ARGV[5]), tonumber(ARGV[6])
local prov = ARGV[8] == 'p' and tcap >= 0
local ht, hr = held()
local wait = math.max(wait_to_fit(tcap, tcost, ht, 1, prov), wait_to_fit(rcap, rcost, hr, 2, prov))
if wait > 0 then return {0, math.ceil(wait * 1000), '', '', 0, '', 0} end
local windows = 1
if tcap >= 0 then windows = math.max(windows, tcost / tcap) end
if rcap >= 0 then windows = math.max(windows, rcost / rcap) end
local untl = now + window * math.min(windows, 1e6) + tonumber(ARGV[4])
local drain = nil
if prov then
  local from = math.max(tonumber(redis.call('HGET', KEYS[2], 'D')) or now, now)
  local d = from + math.min(tcost / (tcap / window), 1e9)
  redis.call('HSET', KEYS[2], 'D', stamp(d))
  untl = d + tonumber(ARGV[4])
  drain = ':' .. stamp(now) .. ':' .. stamp(from)
end
local ticket = redis.call('HINCRBY', KEYS[2], 'N', 1)
hold(ticket, tcost, rcost, untl, ARGV[7], drain)
if half then redis.call('SET', KEYS[6], tostring(ticket), 'PX', PROBE_TTL_MS) end
local out_t, out_r = '', ''
if tcap >= 0 then out_t = tostring(tcap - ht - tcost) end
if rcap >= 0 then out_r = tostring(rcap - hr - rcost) end
return {1, 0, out_t, out_r, 0, tostring(share), ticket}
";

// ARGV: 1 the ticket, 2 tokens back, 3 requests back, 4-5 the remaining tokens and requests
// the upstream said when it admitted it (-1: not said), 6 TPM, 7 RPM, 8 the window (s), 9 TTL
// (ms), 10 served (1/0), 11 share regrowth per minute, 12 how long what the upstream holds
// beyond the log is held (s), 13 the quota model (`p`: provisioned throughput, whose drain is
// redrawn from the settled admission on, as `Log::adjust` does), 14 the margin (s).
const SETTLE: &str = r"
expire()
local s = redis.call('HMGET', KEYS[4], 's', 'g')
local share = tonumber(s[1]) or 1
local window = tonumber(ARGV[8])
local v = redis.call('HGET', KEYS[2], ARGV[1])
local since_t, since_r = nil, nil
if v then
  local a, b, fa, fb, arrived, from = parse(v)
  local na, nb = math.max(a - tonumber(ARGV[2]), 0), math.max(b - tonumber(ARGV[3]), 0)
  local drain = ''
  if arrived and from then drain = ':' .. stamp(arrived) .. ':' .. stamp(from) end
  redis.call('HSET', KEYS[2], ARGV[1], na .. ':' .. nb .. ':' .. fa .. ':' .. fb .. drain)
  redis.call('HINCRBYFLOAT', KEYS[2], 'T', na - a)
  redis.call('HINCRBYFLOAT', KEYS[2], 'R', nb - b)
  local ft, fr = freed()
  since_t, since_r = ft - fa, fr - fb
  local tcap = capacity(tonumber(ARGV[6]), share, window)
  if ARGV[13] == 'p' and tcap >= 0 then
    -- The admissions from this one on, in the order they arrived (their tickets' order):
    -- each drains from when the one before it has drained or when it arrived, if later.
    local rate, margin, mine = tcap / window, tonumber(ARGV[14]), tonumber(ARGV[1])
    local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
    local after = {}
    if score then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], score, '+inf')) do
        local n = tonumber(m)
        if n and n >= mine then after[#after + 1] = n end
      end
    end
    table.sort(after)
    local e, last = nil, now
    for _, n in ipairs(after) do
      local w = redis.call('HGET', KEYS[2], tostring(n))
      local x, y, fx, fy, arrived, from = parse(w or '')
      if arrived and from then
        if e then from = math.max(e, arrived) end
        e = from + math.min(x / rate, 1e9)
        last = math.max(last, e + margin)
        redis.call('ZADD', KEYS[1], e + margin, tostring(n))
        redis.call('HSET', KEYS[2], tostring(n),
          x .. ':' .. y .. ':' .. fx .. ':' .. fy .. ':' .. stamp(arrived) .. ':' .. stamp(from))
      end
    end
    if e then
      redis.call('HSET', KEYS[2], 'D', stamp(e))
      local ms = math.max(tonumber(ARGV[9]), math.ceil((last - now) * 1000) + 1000)
      if redis.call('PTTL', KEYS[1]) < ms then
        redis.call('PEXPIRE', KEYS[1], ms)
        redis.call('PEXPIRE', KEYS[2], ms)
      end
    end
  end
end
local rt, rr = tonumber(ARGV[4]), tonumber(ARGV[5])
if since_t and (rt >= 0 or rr >= 0) then
  local ht, hr = held()
  local tcap = capacity(tonumber(ARGV[6]), share, window)
  local rcap = capacity(tonumber(ARGV[7]), share, window)
  local et, er = 0, 0
  if tcap >= 0 and rt >= 0 then et = math.max(tcap - ht - rt - since_t, 0) end
  if rcap >= 0 and rr >= 0 then er = math.max(rcap - hr - rr - since_r, 0) end
  if et > 0 or er > 0 then
    local ticket = 'u' .. redis.call('HINCRBY', KEYS[2], 'N', 1)
    hold(ticket, et, er, now + tonumber(ARGV[12]), ARGV[9])
  end
end
if ARGV[10] == '1' and s[2] then
  local minutes = math.min(math.max(now - tonumber(s[2]), 0), window) / 60
  share = math.min(1, share + tonumber(ARGV[11]) * minutes)
  redis.call('HSET', KEYS[4], 's', tostring(share), 'g', tostring(now))
  redis.call('PEXPIRE', KEYS[4], ARGV[9])
end
-- The probe ended: served, the deployment is whole again; failed, another may probe.
if redis.call('GET', KEYS[6]) == ARGV[1] then redis.call('DEL', KEYS[6]) end
if ARGV[10] == '1' then redis.call('DEL', KEYS[5]) end
return 1
";

// Leased shares ([`RedisOptions::slices`]): one call gives back the slices a replica closed,
// applies the settlements that came after, and leases a new slice of the window.
// ARGV: 1 TPM, 2 RPM, 3 the window (s), 4 the margin (s), 5 TTL (ms), 6-7 the tokens and
// requests wanted, 8-9 those needed at least (both 0: no slice asked), 10 a slice's life (s),
// 11-12 the remaining tokens and requests the upstream said last (-1: not said), 13 how long
// what it holds beyond the log is held (s), 14 served since the last call (1/0), 15 share
// regrowth per minute, 16 how many slices come back; then four for each (its ticket, the
// tokens and requests spent from it, seconds since the last spend, -1 when none), then three
// for each settlement (a ticket, tokens back, requests back).
//
// A slice is a mark held for its life plus a window: whatever a replica admits from it in its
// life stays counted a window from then. Given back, the mark keeps only what was spent, until
// a window after the last spend; a slice never spent is dropped. The sum of the marks never
// exceeds the window's capacity, as with one mark a request: `RESERVE`'s bound, in one call a
// slice. Answers {status, wait (ms), tokens, requests (-1: not limited), ticket, share, room
// left after the slice as "tokens:requests"}; status 1 granted, 0 no room (wait), 2 cooling
// (wait), 3 half-open (ask per request), 4 nothing asked.
const SLICE: &str = r"
expire()
local window, margin = tonumber(ARGV[3]), tonumber(ARGV[4])
local function change(id, nt, nr, untl)
  local v = redis.call('HGET', KEYS[2], id)
  if not v then return end
  local a, b, fa, fb = parse(v)
  if nt <= 0 and nr <= 0 and untl then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
  else
    redis.call('HSET', KEYS[2], id, nt .. ':' .. nr .. ':' .. fa .. ':' .. fb)
    if untl then
      local cur = tonumber(redis.call('ZSCORE', KEYS[1], id))
      if cur and untl < cur then redis.call('ZADD', KEYS[1], untl, id) end
    end
  end
  redis.call('HINCRBYFLOAT', KEYS[2], 'T', math.max(nt, 0) - a)
  redis.call('HINCRBYFLOAT', KEYS[2], 'R', math.max(nr, 0) - b)
end
local i = 17
for k = 1, tonumber(ARGV[16]) do
  local ago = tonumber(ARGV[i + 3])
  local ut, ur = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if ago < 0 then ut, ur = 0, 0 end
  change(ARGV[i], ut, ur, now - math.max(ago, 0) + window + margin)
  i = i + 4
end
while i + 2 <= #ARGV do
  local v = redis.call('HGET', KEYS[2], ARGV[i])
  if v then
    local a, b = parse(v)
    change(ARGV[i], math.max(a - tonumber(ARGV[i + 1]), 0), math.max(b - tonumber(ARGV[i + 2]), 0), nil)
  end
  i = i + 3
end
local s = redis.call('HMGET', KEYS[4], 's', 'g')
local share = tonumber(s[1]) or 1
local tcap = capacity(tonumber(ARGV[1]), share, window)
local rcap = capacity(tonumber(ARGV[2]), share, window)
local rt, rr = tonumber(ARGV[11]), tonumber(ARGV[12])
if rt >= 0 or rr >= 0 then
  -- What the upstream holds beyond every mark (slices count whole: what is unseen is
  -- under-, never over-, counted).
  local ht, hr = held()
  local et, er = 0, 0
  if tcap >= 0 and rt >= 0 then et = math.max(tcap - ht - rt, 0) end
  if rcap >= 0 and rr >= 0 then er = math.max(rcap - hr - rr, 0) end
  if et > 0 or er > 0 then
    hold('u' .. redis.call('HINCRBY', KEYS[2], 'N', 1), et, er, now + tonumber(ARGV[13]), ARGV[5])
  end
end
if ARGV[14] == '1' and s[2] then
  local minutes = math.min(math.max(now - tonumber(s[2]), 0), window) / 60
  share = math.min(1, share + tonumber(ARGV[15]) * minutes)
  redis.call('HSET', KEYS[4], 's', tostring(share), 'g', tostring(now))
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
  tcap = capacity(tonumber(ARGV[1]), share, window)
  rcap = capacity(tonumber(ARGV[2]), share, window)
end
local cool = redis.call('PTTL', KEYS[3])
if cool > 0 then return {2, cool, '', '', 0, tostring(share), ''} end
if redis.call('EXISTS', KEYS[5]) == 1 then return {3, 0, '', '', 0, tostring(share), ''} end
local nt, nr = tonumber(ARGV[8]), tonumber(ARGV[9])
if nt <= 0 and nr <= 0 then return {4, 0, '', '', 0, tostring(share), ''} end
local ht, hr = held()
local wait = math.max(wait_to_fit(tcap, nt, ht, 1, false), wait_to_fit(rcap, nr, hr, 2, false))
if wait > 0 then
  -- Marks held past a window from now are slices still open: what their replicas do not
  -- spend comes back within a life. If that would make room, ask again then, not when the
  -- window frees.
  local life = tonumber(ARGV[10])
  local opened = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. stamp(now + window + margin), '+inf')
  local ot, orq = 0, 0
  for _, id in ipairs(opened) do
    local v = redis.call('HGET', KEYS[2], id)
    if v then
      local a, b = parse(v)
      ot, orq = ot + a, orq + b
    end
  end
  if (tcap < 0 or ht - ot + nt <= tcap) and (rcap < 0 or hr - orq + nr <= rcap) then
    wait = math.min(wait, life)
  end
  return {0, math.ceil(wait * 1000), '', '', 0, tostring(share), ''}
end
local gt, gr = tonumber(ARGV[6]), tonumber(ARGV[7])
local out_t, out_r, left_t, left_r = '-1', '-1', '', ''
if tcap >= 0 then
  gt = math.max(math.min(gt, tcap - ht), math.min(nt, tcap))
  out_t, left_t = tostring(gt), tostring(tcap - ht - gt)
else
  gt = 0
end
if rcap >= 0 then
  gr = math.max(math.min(gr, rcap - hr), math.min(nr, rcap))
  out_r, left_r = tostring(gr), tostring(rcap - hr - gr)
else
  gr = 0
end
local ticket = redis.call('HINCRBY', KEYS[2], 'N', 1)
hold(ticket, gt, gr, now + tonumber(ARGV[10]) + window + margin, ARGV[5])
return {1, 0, out_t, out_r, ticket, tostring(share), left_t .. ':' .. left_r}
";

// A name kept for a while (where a stored response lives): KEYS[1] the name's key, ARGV 1 the
// value, 2 how long to keep it (ms).
const REMEMBER: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

const RECALL: &str = r"
return redis.call('GET', KEYS[1])
";

const COOL_DOWN: &str = r"
local cur = redis.call('PTTL', KEYS[1])
if cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[1]) + HALF_OPEN_MS)
end
return 1
";

// A probe found the deployment serving: its shared cooldown (KEYS[1]) ends.
const RECOVERED: &str = r"
return redis.call('DEL', KEYS[1])
";

// ARGV: 1 the wait (ms), 2 TPM, 3 RPM, 4 the window (s), 5 cut, 6 deepest cut, 7 floor, 8 TTL
// (ms), 9 the parts a refusal's fill is let go in. Cools down, cuts the share to what the
// window holds of the configured limits (once per window), then holds what is left of the
// window and lets it go in equal parts over one window from the wait's end.
const REFUSED: &str = r"
local wait_ms = tonumber(ARGV[1])
local cur = redis.call('PTTL', KEYS[3])
if cur < wait_ms then
  redis.call('SET', KEYS[3], '1', 'PX', wait_ms)
  redis.call('SET', KEYS[5], '1', 'PX', wait_ms + HALF_OPEN_MS)
end
expire()
local window = tonumber(ARGV[4])
local ht, hr = held()
local h = 0
local tcap, rcap = capacity(tonumber(ARGV[2]), 1, window), capacity(tonumber(ARGV[3]), 1, window)
if tcap >= 0 then h = math.max(h, math.max(ht, 0) / tcap) end
if rcap >= 0 then h = math.max(h, math.max(hr, 0) / rcap) end
local s = redis.call('HMGET', KEYS[4], 's', 'c')
local share, c = tonumber(s[1]) or 1, tonumber(s[2])
if c == nil or now - c >= window then
  local cut = math.min(math.max(h, share * tonumber(ARGV[6])), share * tonumber(ARGV[5]))
  share = math.min(1, math.max(tonumber(ARGV[7]), cut))
  redis.call('HSET', KEYS[4], 's', tostring(share), 'g', tostring(now), 'c', tostring(now))
end
redis.call('PEXPIRE', KEYS[4], ARGV[8])
local lt, lr = 0, 0
local tnow, rnow = capacity(tonumber(ARGV[2]), share, window), capacity(tonumber(ARGV[3]), share, window)
if tnow >= 0 then lt = math.max(tnow - ht, 0) end
if rnow >= 0 then lr = math.max(rnow - hr, 0) end
if lt > 0 or lr > 0 then
  local steps = tonumber(ARGV[9])
  local from = now + wait_ms / 1000
  for k = 1, steps do
    local ticket = 'u' .. redis.call('HINCRBY', KEYS[2], 'N', 1)
    hold(ticket, lt / steps, lr / steps, from + window * k / steps, ARGV[8])
  end
end
return tostring(share)
";

// Reads, changes nothing: the server's clock, the cooldown left (ms), the share kept to, when
// provisioned utilisation drains (`D`, or ''), the tokens and requests the window holds, then
// "seconds until it leaves:tokens:requests" for the marks a walk to the ARGV[6]-th opening of
// a request of ARGV[4] tokens and ARGV[5] requests can reach, in the order they leave: those
// that leave by the cooldown's end, then as many as must leave for one more request than that
// to fit, those leaving together with the last, and one after (`router_core::quota::Log::
// reach`). ARGV 1 to 3 are the limits, as `RESERVE` takes them.
const MARKS: &str = r"
local cool = redis.call('PTTL', KEYS[3])
local share = tonumber(redis.call('HGET', KEYS[4], 's')) or 1
local d = redis.call('HGET', KEYS[2], 'D')
local ht, hr = held()
-- What has left the window but is not let go yet (this script changes nothing).
local gone, gt, gr = left_window()
ht, hr = ht - gt, hr - gr
local total = redis.call('ZCARD', KEYS[1])
if total == #gone then ht, hr = 0, 0 end
local window = tonumber(ARGV[3])
local more = tonumber(ARGV[6]) + 1
local function needed(limit, h, cost)
  local cap = capacity(tonumber(limit), share, window)
  if cap < 0 then return -math.huge end
  return h + more * tonumber(cost) - cap + 1e-6
end
local nt, nr = needed(ARGV[1], ht, ARGV[4]), needed(ARGV[2], hr, ARGV[5])
local from = now + math.max(cool, 0) / 1000
local out = {tostring(now), cool, tostring(share), d and tostring(tonumber(d) - now) or '',
  tostring(ht), tostring(hr)}
local lt, lr, last, reached, done = 0, 0, nil, false, false
local offset = #gone
while not done and offset < total do
  local marks = redis.call('ZRANGE', KEYS[1], offset, offset + 255, 'WITHSCORES')
  if #marks == 0 then break end
  offset = offset + #marks / 2
  local names = {}
  for i = 1, #marks, 2 do names[#names + 1] = marks[i] end
  local vals = redis.call('HMGET', KEYS[2], unpack(names))
  for k = 1, #names do
    local untl = tonumber(marks[2 * k])
    if reached and untl ~= last then
      -- The one after the last reached: kept, and the walk needs no more.
      done = true
    elseif not reached and untl > from and lt >= nt and lr >= nr then
      reached = true
      done = last ~= nil and untl ~= last
    end
    local v = vals[k]
    if v then
      local a, b = parse(v)
      lt, lr = lt + a, lr + b
      out[#out + 1] = tostring(untl - now) .. ':' .. a .. ':' .. b
    end
    last = untl
    if done then break end
  end
end
return out
";

// Concurrency leases: KEYS[1] a sorted set of lease names scored by when each expires (server
// ms). `LEASE` (ARGV: 1 the limit, 2 the lease's life in ms, 3 its name) drops the expired and
// takes a slot if one is free; `RENEW` (ARGV: 1 the life, 2... names) pushes the given leases'
// expiry out (one that expired meanwhile is taken again: its request is still running);
// releasing is a `ZREM`.
const LEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
";

const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local life = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + life, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], life * 2)
return #ARGV - 1
";

/// How long after a shared cooldown ends the deployment stays half-open for the replicas
/// (one request at a time across them) unless a request is served sooner (ms).
const HALF_OPEN_MS: u64 = 120_000;
/// How long a half-open deployment's one request holds the probe before another replica may
/// send one (ms): a replica that dies mid-probe frees it so.
const PROBE_TTL_MS: u64 = 10_000;
/// The longest a replica is told to wait for another's probe before asking again (ms).
const PROBE_WAIT_MS: u64 = 250;

/// A script with the half-open constants written in.
fn half_open(script: &str) -> String {
    script
        .replace("HALF_OPEN_MS", &HALF_OPEN_MS.to_string())
        .replace("PROBE_TTL_MS", &PROBE_TTL_MS.to_string())
        .replace("PROBE_WAIT_MS", &PROBE_WAIT_MS.to_string())
}

/// The names of this process's local leases (taken while Redis was away) start with this.
const LOCAL_LEASE: &str = "local:";

/// A leased slice's life unless set ([`RedisOptions::with_slices`]).
pub const DEFAULT_SLICE_LIFE: Duration = Duration::from_secs(1);

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
    /// How refusals teach the share of a quota an upstream really admits (the Lua and the
    /// local fallback both keep to it); every replica sharing a prefix should use the same.
    pub learning: Learning,
    /// How long a concurrency slot (a [`Lease`]) lives unrenewed (default 30 s). A replica
    /// renews its leases every third of this while their requests run; a replica that dies
    /// frees its slots when this has passed.
    pub lease_ttl: Duration,
    /// Leased shares: the life of a slice of a window a replica leases and admits from
    /// locally (default 1 s, at most a quarter of the window), so that a request costs no
    /// round trip to Redis; `None`: one script call per request (and one per settlement).
    pub slices: Option<Duration>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "openai-router".to_owned(),
            timeout: Duration::from_millis(100),
            local_share: 1.0 / 3.0,
            learning: Learning::default(),
            lease_ttl: Duration::from_secs(30),
            slices: Some(DEFAULT_SLICE_LIFE),
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

    /// Sets how refusals teach the share an upstream admits.
    #[must_use]
    pub fn with_learning(mut self, learning: Learning) -> Self {
        self.learning = learning;
        self
    }

    /// Sets the life of a leased slice (at least 10 ms), or `None` for one call per request.
    #[must_use]
    pub fn with_slices(mut self, life: Option<Duration>) -> Self {
        self.slices = life.map(|life| life.max(Duration::from_millis(10)));
        self
    }

    /// Sets how long a concurrency lease lives unrenewed (at least 300 ms).
    #[must_use]
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(300));
        self
    }
}

/// Where Redis is: one server, or a cluster.
enum Target {
    Single(redis::Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// A connection to either: both reconnect by themselves.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(Box<redis::cluster_async::ClusterConnection>),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Quota and cooldowns shared through Redis, with local accounting while Redis is away.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Target,
    connection: RwLock<Option<Connection>>,
    options: RedisOptions,
    local: MemoryStore,
    reserve: Script,
    settle: Script,
    cool_down: Script,
    recovered: Script,
    refused: Script,
    marks: Script,
    remember: Script,
    recall: Script,
    lease: Script,
    renew: Script,
    slice: Script,
    learning: Learning,
    /// Each key's leased slices on this replica.
    slices: DashMap<String, Arc<KeySlices>>,
    /// The task that gives back closed slices of quiet keys runs.
    flushing: AtomicBool,
    /// This process's leases held in Redis (name to the limit's key), renewed by a task.
    leases: DashMap<String, String>,
    /// Slots taken locally while Redis was away, per limit.
    local_leases: DashMap<String, u32>,
    /// Names this process's leases: unique among replicas.
    lease_names: AtomicU64,
    replica: u64,
    renewing: AtomicBool,
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
        Self::start(Target::Single(client), options).await
    }

    /// A store on a Redis Cluster, found through any of `urls` (`redis://host:port`, one or
    /// more of its nodes). Every script touches one hash slot, so each runs on the node that
    /// owns its keys; the cluster client follows the slots as they move.
    ///
    /// # Errors
    ///
    /// A [`Config`](router_core::ErrorKind::Config) error when no URL is given or one does not
    /// parse.
    pub async fn connect_cluster(urls: &[String], options: RedisOptions) -> Result<Self, Error> {
        if urls.is_empty() {
            return Err(Error::config("redis cluster: no node URL given"));
        }
        let client = redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
            .connection_timeout(options.timeout.max(Duration::from_millis(200)))
            .response_timeout(options.timeout)
            .retries(1)
            .build()
            .map_err(|e| Error::config(format!("redis cluster urls: {e}")))?;
        Self::start(Target::Cluster(Box::new(client)), options).await
    }

    async fn start(client: Target, options: RedisOptions) -> Result<Self, Error> {
        let learning = options.learning;
        let store = Self {
            inner: Arc::new(Inner {
                client,
                connection: RwLock::new(None),
                options,
                local: MemoryStore::with_learning(learning),
                reserve: Script::new(&half_open(&format!("{PRELUDE}{RESERVE}"))),
                settle: Script::new(&format!("{PRELUDE}{SETTLE}")),
                cool_down: Script::new(&half_open(COOL_DOWN)),
                recovered: Script::new(RECOVERED),
                refused: Script::new(&half_open(&format!("{PRELUDE}{REFUSED}"))),
                remember: Script::new(REMEMBER),
                recall: Script::new(RECALL),
                marks: Script::new(&format!("{PRELUDE}{MARKS}")),
                lease: Script::new(LEASE),
                renew: Script::new(RENEW),
                slice: Script::new(&format!("{PRELUDE}{SLICE}")),
                learning,
                slices: DashMap::new(),
                flushing: AtomicBool::new(false),
                leases: DashMap::new(),
                local_leases: DashMap::new(),
                lease_names: AtomicU64::new(0),
                replica: replica_id(),
                renewing: AtomicBool::new(false),
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
        let connecting = match &self.inner.client {
            Target::Single(client) => tokio::time::timeout(
                Duration::from_secs(2),
                client.get_connection_manager_with_config(config),
            )
            .await
            .map(|c| c.map(Connection::Single)),
            Target::Cluster(client) => {
                tokio::time::timeout(Duration::from_secs(2), client.get_async_connection())
                    .await
                    .map(|c| c.map(|c| Connection::Cluster(Box::new(c))))
            }
        };
        if let Ok(Ok(connection)) = connecting {
            *self.inner.connection.write().await = Some(connection);
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

    /// The key a remembered name is kept under.
    fn name_key(&self, name: &str) -> String {
        format!("{}:name:{name}", self.inner.options.prefix)
    }

    /// The log, marks, cooldown, learned-admissions, half-open and probe keys of a deployment,
    /// in one hash slot.
    fn keys(&self, key: &str) -> [String; 6] {
        let tag = self.hash_tag(key);
        ["w", "a", "c", "l", "h", "p"].map(|suffix| format!("{tag}:{suffix}"))
    }

    /// `{prefix:key}`, the braces in `key` left out: every key of one deployment or limit
    /// starts with it, so they share a Cluster slot.
    fn hash_tag(&self, key: &str) -> String {
        let key: String = key.chars().filter(|c| *c != '{' && *c != '}').collect();
        format!("{{{}:{key}}}", self.inner.options.prefix)
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

    /// The sorted set of a concurrency limit's leases, in the limit's hash slot.
    fn lease_key(&self, key: &str) -> String {
        format!("{}:k", self.hash_tag(key))
    }

    /// Takes a slot of `max` under `key` in this process's count (Redis away): the local share
    /// of the limit, at least one.
    fn lease_locally(&self, key: &str, max: u32) -> Option<Lease> {
        let share = (f64::from(max) * self.inner.options.local_share)
            .ceil()
            .max(1.0) as u32;
        let mut count = self.inner.local_leases.entry(key.to_owned()).or_insert(0);
        if *count >= share.min(max) {
            return None;
        }
        *count += 1;
        let n = self.inner.lease_names.fetch_add(1, Ordering::Relaxed);
        Some(Lease::new(key, format!("{LOCAL_LEASE}{n}")))
    }

    /// Starts the task that renews this process's leases, once. It ends with the store.
    fn renew_in_background(&self) {
        if self.inner.renewing.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.renewing.store(false, Ordering::Relaxed);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.options.lease_ttl / 3;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                RedisStore { inner }.renew_leases().await;
            }
        });
    }

    /// Renews every lease this process holds in Redis: one script call per limit.
    async fn renew_leases(&self) {
        let mut by_key: std::collections::HashMap<String, Vec<String>> =
            std::collections::HashMap::new();
        for entry in &self.inner.leases {
            by_key
                .entry(entry.value().clone())
                .or_default()
                .push(entry.key().clone());
        }
        let life = u64::try_from(self.inner.options.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        for (key, names) in by_key {
            let mut invocation = self.inner.renew.prepare_invoke();
            invocation.key(self.lease_key(&key)).arg(life);
            for name in &names {
                invocation.arg(name);
            }
            if let Err(why) = self.run::<i64>(&invocation).await {
                tracing::debug!(%key, reason = %why, "could not renew leases");
            }
        }
    }

    /// How many concurrency slots this process holds, in Redis and locally.
    pub fn leases_held(&self) -> usize {
        self.inner.leases.len()
            + self
                .inner
                .local_leases
                .iter()
                .map(|e| *e.value() as usize)
                .sum::<usize>()
    }
}

/// Now on tokio's clock (paused in tests), as the router's timestamps are.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn lock(state: &std::sync::Mutex<slices::State>) -> std::sync::MutexGuard<'_, slices::State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Leased shares ([`RedisOptions::slices`]).
impl RedisStore {
    fn key_slices(&self, key: &str) -> Arc<KeySlices> {
        if let Some(entry) = self.inner.slices.get(key) {
            return Arc::clone(entry.value());
        }
        Arc::clone(self.inner.slices.entry(key.to_owned()).or_default().value())
    }

    /// Admits `charge` from a slice, calling the store when no open slice has room; `None`
    /// when the key is half-open (one request at a time: per request).
    async fn reserve_sliced(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        now: Instant,
        life: Duration,
    ) -> Option<Admission> {
        let entry = self.key_slices(key);
        let _asking = entry.asking();
        lock(&entry.state).asked(charge, limits, life, now);
        self.flush_in_background();
        let mut now = now;
        // Each turn either admits, answers a wait, or follows a call that changed what is
        // open (a grant others may have spent first, or no room: then a wait): bounded for
        // safety only.
        for _ in 0..64 {
            if let Some(answer) = self.spend(key, limits, &entry, charge, now, life) {
                return answer;
            }
            // One call at a time per key: a request that finds one running waits for it and
            // looks again.
            let Some(calling) = entry.try_call() else {
                entry.call_ended(self.inner.options.timeout * 2).await;
                now = now.max(clock());
                continue;
            };
            // A call may have ended between the look and taking the call: look again before
            // calling, or a replica calls for slices it already holds.
            if let Some(answer) = self.spend(key, limits, &entry, charge, now, life) {
                return answer;
            }
            // Those asking besides this request.
            let waiting = entry.asking_now().saturating_sub(1);
            let called = self
                .call_slices(key, limits, &entry, charge, waiting, now, life)
                .await;
            drop(calling);
            if let Err(why) = called {
                self.fell_back(&why);
                let local = self.local_limits(limits);
                return Some(self.inner.local.reserve_now(key, &local, charge, now));
            }
            now = now.max(clock());
        }
        Some(Admission::Denied {
            retry_after: life / 4,
            cooling: false,
        })
    }

    /// What the open slices answer: an admission or a wait (`Some`), or `None` when a call
    /// is needed. `Some(None)`: per request (half-open).
    #[expect(
        clippy::option_option,
        reason = "no answer yet, or the answer that the key goes per request"
    )]
    fn spend(
        &self,
        key: &str,
        limits: &Limits,
        entry: &Arc<KeySlices>,
        charge: Charge,
        now: Instant,
        life: Duration,
    ) -> Option<Option<Admission>> {
        let (local, ahead) = {
            let mut state = lock(&entry.state);
            let local = state.spend(charge, now, life);
            let ahead = matches!(local, Local::Admitted(_)) && state.renew_ahead(now, life);
            (local, ahead)
        };
        match local {
            Local::Admitted(spent) => {
                if ahead && !entry.ahead.swap(true, Ordering::Relaxed) {
                    self.renew_ahead(key, limits, entry, life);
                }
                Some(Some(Admission::Admitted {
                    tokens_left: spent.tokens_left,
                    requests_left: spent.requests_left,
                    learned: spent.learned,
                    ticket: spent.ticket,
                }))
            }
            Local::Wait { wait, cooling } => Some(Some(Admission::Denied {
                retry_after: wait.max(Duration::from_millis(1)),
                cooling,
            })),
            Local::Direct => Some(None),
            Local::Call => None,
        }
    }

    /// One call: gives back the closed slices and the settlements since, and asks for a
    /// slice with room for `need` (none when `need` is nothing).
    #[expect(
        clippy::too_many_arguments,
        reason = "the key, its limits and slices, and what this call asks for"
    )]
    async fn call_slices(
        &self,
        key: &str,
        limits: &Limits,
        entry: &KeySlices,
        need: Charge,
        waiting: usize,
        now: Instant,
        life: Duration,
    ) -> Result<(), String> {
        let outgoing = lock(&entry.state).outgoing(need, waiting, limits, now, life);
        let invocation = self.slice_invocation(key, limits, &outgoing, now, life);
        match self
            .run::<(i64, i64, String, String, u64, String, String)>(&invocation)
            .await
        {
            Ok((status, wait_ms, tokens, requests, id, share, room)) => {
                let wait = Duration::from_millis(u64::try_from(wait_ms.max(1)).unwrap_or(1));
                let amount = |text: &str| match parse_level(text) {
                    Some(v) if v >= 0.0 => v,
                    _ => f64::INFINITY,
                };
                let answer = match status {
                    1 => {
                        let mut parts = room.split(':').map(parse_level);
                        Answer::Granted {
                            id,
                            tokens: amount(&tokens),
                            requests: amount(&requests),
                            room: (parts.next().flatten(), parts.next().flatten()),
                            learned: parse_learned(&share),
                        }
                    }
                    0 => Answer::NoRoom { wait },
                    2 => Answer::Cooling { wait },
                    3 => Answer::HalfOpen,
                    _ => Answer::Nothing,
                };
                tracing::debug!(
                    %key,
                    ?answer,
                    wanted = ?outgoing.wanted,
                    waiting,
                    returned = outgoing.returns.len(),
                    "slice call"
                );
                lock(&entry.state).answered(answer, outgoing.wanted, now, life);
                Ok(())
            }
            Err(why) => {
                lock(&entry.state).restore(outgoing);
                Err(why)
            }
        }
    }

    fn slice_invocation<'a>(
        &'a self,
        key: &str,
        limits: &Limits,
        outgoing: &Outgoing,
        now: Instant,
        life: Duration,
    ) -> ScriptInvocation<'a> {
        let mut invocation = self.inner.slice.prepare_invoke();
        for key in &self.keys(key) {
            invocation.key(key);
        }
        let (remaining_tokens, remaining_requests, hold) = outgoing.remaining.map_or(
            (-1.0, -1.0, limits.window / 2),
            |(tokens, requests, reset)| {
                let level = |r: Option<u64>| r.map_or(-1.0, |r| r as f64);
                (
                    level(tokens),
                    level(requests),
                    router_core::quota::phantom_hold(limits, Some(reset)),
                )
            },
        );
        invocation
            .arg(limit_arg(limits.tpm))
            .arg(rpm_arg(limits))
            .arg(limits.window.as_secs_f64())
            .arg(router_core::quota::margin(limits.window).as_secs_f64())
            .arg(ttl_ms(limits))
            .arg(outgoing.wanted.0)
            .arg(outgoing.wanted.1)
            .arg(outgoing.needed.0)
            .arg(outgoing.needed.1)
            .arg(life.as_secs_f64())
            .arg(remaining_tokens)
            .arg(remaining_requests)
            .arg(hold.as_secs_f64())
            .arg(u8::from(outgoing.served))
            .arg(self.inner.learning.regrow)
            .arg(outgoing.returns.len());
        for back in &outgoing.returns {
            let ago = back
                .last_spend
                .map_or(-1.0, |at| now.saturating_duration_since(at).as_secs_f64());
            invocation
                .arg(back.id)
                .arg(back.tokens)
                .arg(back.requests)
                .arg(ago);
        }
        for adjustment in &outgoing.adjustments {
            invocation
                .arg(adjustment.id)
                .arg(adjustment.tokens_back)
                .arg(adjustment.requests_back);
        }
        invocation
    }

    /// Renews a key's slice before the open ones run out, off the request's path.
    fn renew_ahead(&self, key: &str, limits: &Limits, entry: &Arc<KeySlices>, life: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            entry.ahead.store(false, Ordering::Relaxed);
            return;
        };
        let (store, key, limits, entry) =
            (self.clone(), key.to_owned(), *limits, Arc::clone(entry));
        runtime.spawn(async move {
            loop {
                let Some(_calling) = entry.try_call() else {
                    entry.call_ended(store.inner.options.timeout * 2).await;
                    continue;
                };
                let now = clock();
                let need = lock(&entry.state).last_charge();
                // Not itself a request: every one asking waits for room.
                let waiting = entry.asking_now();
                if let Err(why) = store
                    .call_slices(&key, &limits, &entry, need, waiting, now, life)
                    .await
                {
                    store.fell_back(&why);
                }
                break;
            }
            entry.ahead.store(false, Ordering::Relaxed);
        });
    }

    /// Starts, once, the task that gives back the slices of keys gone quiet (closed, or at
    /// the end of their life, with no call since) and the settlements that came after.
    fn flush_in_background(&self) {
        let Some(life) = self.inner.options.slices else {
            return;
        };
        // Read first: once started, a reservation writes nothing here.
        if self.inner.flushing.load(Ordering::Relaxed)
            || self.inner.flushing.swap(true, Ordering::Relaxed)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inner.flushing.store(false, Ordering::Relaxed);
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(life / 2).await;
                let Some(inner) = weak.upgrade() else { return };
                RedisStore { inner }.flush().await;
            }
        });
    }

    async fn flush(&self) {
        let entries: Vec<(String, Arc<KeySlices>)> = self
            .inner
            .slices
            .iter()
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        for (key, entry) in entries {
            let now = clock();
            let Some((limits, life)) = lock(&entry.state).limits() else {
                continue;
            };
            let due = {
                let mut state = lock(&entry.state);
                if entry.asking_now() == 0 {
                    state.close_idle(now, life);
                }
                state.pending(now, life)
                    && state
                        .last_call()
                        .is_none_or(|at| now.saturating_duration_since(at) >= life / 2)
            };
            if !due {
                continue;
            }
            let Some(_calling) = entry.try_call() else {
                continue;
            };
            // Nothing is asked: the slices and settlements go back.
            if let Err(why) = self
                .call_slices(&key, &limits, &entry, Charge::default(), 0, now, life)
                .await
            {
                tracing::debug!(%key, reason = %why, "could not give slices back");
            }
        }
    }
}

/// A name for this process among the replicas: its pid and a random number.
fn replica_id() -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one((std::process::id(), Instant::now()))
}

/// A per-minute limit, `-1` for "not limited".
fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX))
}

/// The requests per minute the scripts meter: none under provisioned throughput.
fn rpm_arg(limits: &Limits) -> i64 {
    limit_arg(limits.requests().and(limits.rpm))
}

/// `p` under provisioned throughput, `w` per window.
fn model_arg(limits: &Limits) -> &'static str {
    if limits.is_provisioned() { "p" } else { "w" }
}

fn ttl_ms(limits: &Limits) -> u64 {
    // A log untouched for twice its window holds nothing any more: let it expire.
    (limits.window.as_millis() as u64)
        .saturating_mul(2)
        .max(60_000)
}

fn parse_level(text: &str) -> Option<f64> {
    text.parse().ok()
}

fn parse_learned(share: &str) -> Learned {
    Learned {
        share: parse_level(share).unwrap_or(1.0),
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
        if let Some(life) = self
            .inner
            .options
            .slices
            .filter(|_| slices::sliced(limits, charge))
        {
            let life = slices::life(life, limits);
            if let Some(admission) = self.reserve_sliced(key, limits, charge, now, life).await {
                return Ok(admission);
            }
        }
        let keys = self.keys(key);
        let mut invocation = self.inner.reserve.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(limit_arg(limits.tpm))
            .arg(rpm_arg(limits))
            .arg(limits.window.as_secs_f64())
            .arg(router_core::quota::margin(limits.window).as_secs_f64())
            .arg(charge.tokens)
            .arg(charge.requests)
            .arg(ttl_ms(limits))
            .arg(model_arg(limits));
        match self
            .run::<(i64, i64, String, String, i64, String, u64)>(&invocation)
            .await
        {
            Ok((1, _, tokens, requests, _, share, ticket)) => Ok(Admission::Admitted {
                tokens_left: parse_level(&tokens),
                requests_left: parse_level(&requests),
                learned: parse_learned(&share),
                ticket,
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
        if settlement.ticket & SLICE_TICKET != 0 {
            // Admitted from a slice: settled locally, said to the store with the next call.
            let id = settlement.ticket & !SLICE_TICKET;
            let entry = self.key_slices(key);
            let mut state = lock(&entry.state);
            state.settle(
                id,
                settlement.tokens_back as f64,
                settlement.requests_back as f64,
            );
            let heard = (settlement.remaining_tokens.is_some()
                || settlement.remaining_requests.is_some())
            .then(|| {
                (
                    settlement.remaining_tokens,
                    settlement.remaining_requests,
                    router_core::quota::phantom_hold(limits, settlement.reset),
                )
            });
            state.heard(heard, settlement.served);
            return Ok(());
        }
        let keys = self.keys(key);
        let remaining = |r: Option<u64>| r.map_or(-1.0, |r| r as f64);
        let mut invocation = self.inner.settle.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(settlement.ticket)
            .arg(settlement.tokens_back)
            .arg(settlement.requests_back)
            .arg(remaining(settlement.remaining_tokens))
            .arg(remaining(settlement.remaining_requests))
            .arg(limit_arg(limits.tpm))
            .arg(rpm_arg(limits))
            .arg(limits.window.as_secs_f64())
            .arg(ttl_ms(limits))
            .arg(u8::from(settlement.served))
            .arg(self.inner.learning.regrow)
            .arg(router_core::quota::phantom_hold(limits, settlement.reset).as_secs_f64())
            .arg(model_arg(limits))
            .arg(router_core::quota::margin(limits.window).as_secs_f64());
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
            self.inner
                .local
                .settle_now(key, &self.local_limits(limits), settlement, now);
        }
        Ok(())
    }

    async fn cool_down(&self, key: &str, wait: Duration, now: Instant) -> Result<(), Error> {
        if let Some(entry) = self.inner.slices.get(key) {
            lock(&entry.state).cool(wait, now);
        }
        let keys = self.keys(key);
        let mut invocation = self.inner.cool_down.prepare_invoke();
        invocation
            .key(&keys[2])
            .key(&keys[4])
            .arg(wait.as_millis().max(1) as u64);
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
            self.inner.local.cool_down_now(key, wait, now);
        }
        Ok(())
    }

    async fn recovered(&self, key: &str, now: Instant) -> Result<(), Error> {
        if let Some(entry) = self.inner.slices.get(key) {
            lock(&entry.state).recovered();
        }
        self.inner.local.recovered(key, now).await?;
        // The cooldown key goes; the half-open key stays (one request at a time across the
        // replicas until one is served).
        let keys = self.keys(key);
        let mut invocation = self.inner.recovered.prepare_invoke();
        invocation.key(&keys[2]);
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
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
        if let Some(entry) = self.inner.slices.get(key) {
            lock(&entry.state).cool(wait, now);
        }
        let keys = self.keys(key);
        let learning = &self.inner.learning;
        let mut invocation = self.inner.refused.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(wait.as_millis().max(1) as u64)
            .arg(limit_arg(limits.tpm))
            .arg(rpm_arg(limits))
            .arg(limits.window.as_secs_f64())
            .arg(learning.cut)
            .arg(learning.deepest_cut)
            .arg(learning.floor)
            .arg(ttl_ms(limits))
            .arg(router_core::quota::PACED_STEPS);
        match self.run::<String>(&invocation).await {
            Ok(share) => Ok(parse_learned(&share)),
            Err(why) => {
                self.fell_back(&why);
                Ok(self
                    .inner
                    .local
                    .refused_now(key, &self.local_limits(limits), wait, now))
            }
        }
    }

    async fn openings(
        &self,
        key: &str,
        limits: &Limits,
        charge: Charge,
        n: usize,
        now: Instant,
        by: Instant,
    ) -> Result<Option<Vec<Instant>>, Error> {
        if self.inner.options.slices.is_some() && slices::sliced(limits, charge) {
            // Under leased shares the log holds slices, not requests: walking it would cost a
            // round trip per waiting request and say little. The router paces by the rates.
            return Ok(None);
        }
        let keys = self.keys(key);
        let mut invocation = self.inner.marks.prepare_invoke();
        for key in &keys {
            invocation.key(key);
        }
        invocation
            .arg(limit_arg(limits.tpm))
            .arg(rpm_arg(limits))
            .arg(limits.window.as_secs_f64())
            .arg(charge.tokens)
            .arg(charge.requests)
            .arg(n.min(router_core::quota::MAX_OPENINGS));
        let read = match self.run::<Vec<String>>(&invocation).await {
            Ok(read) => read,
            Err(why) => {
                self.fell_back(&why);
                let local = self.local_limits(limits);
                let openings = self
                    .inner
                    .local
                    .openings_now(key, &local, charge, n, now, by);
                return Ok(Some(openings));
            }
        };
        // Times come relative to the server's clock, and are placed on this process's.
        let seconds = |text: &str| text.parse::<f64>().ok().filter(|s| s.is_finite());
        let at = |s: f64| {
            if s >= 0.0 {
                now + Duration::from_secs_f64(s.min(1e9))
            } else {
                now.checked_sub(Duration::from_secs_f64((-s).min(1e9)))
                    .unwrap_or(now)
            }
        };
        let mut fields = read.iter().skip(1);
        let cooling_ms = fields
            .next()
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0);
        let learned = parse_learned(fields.next().map_or("", String::as_str));
        let drained = fields.next().and_then(|v| seconds(v)).map(at);
        let mut total = || fields.next().and_then(|v| seconds(v)).unwrap_or(0.0);
        let held = (total(), total());
        let marks = fields.filter_map(|mark| {
            let mut parts = mark.split(':').map(seconds);
            let (Some(Some(until)), Some(Some(tokens)), Some(Some(requests))) =
                (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            Some(Mark {
                ticket: 0,
                until: at(until),
                tokens,
                requests,
                freed: (0.0, 0.0),
                unseen: false,
                drain: None,
            })
        });
        let log = Log::from_prefix(marks, held, drained);
        let from = now + Duration::from_millis(u64::try_from(cooling_ms.max(0)).unwrap_or(0));
        Ok(Some(log.openings(
            &learned.apply(limits),
            charge,
            n,
            from,
            by,
        )))
    }

    async fn remember(
        &self,
        name: &str,
        value: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), Error> {
        // Kept here too: while Redis is away, this replica still finds what it placed.
        self.inner.local.remember_now(name, value, ttl, now);
        let mut invocation = self.inner.remember.prepare_invoke();
        invocation
            .key(self.name_key(name))
            .arg(value)
            .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1));
        if let Err(why) = self.run::<i64>(&invocation).await {
            self.fell_back(&why);
        }
        Ok(())
    }

    async fn recall(&self, name: &str, now: Instant) -> Result<Option<String>, Error> {
        let mut invocation = self.inner.recall.prepare_invoke();
        invocation.key(self.name_key(name));
        match self.run::<Option<String>>(&invocation).await {
            Ok(Some(value)) => Ok(Some(value)),
            Ok(None) => Ok(self.inner.local.recall_now(name, now)),
            Err(why) => {
                self.fell_back(&why);
                Ok(self.inner.local.recall_now(name, now))
            }
        }
    }

    fn leases(&self) -> bool {
        true
    }

    async fn lease(&self, key: &str, max: u32, now: Instant) -> Result<Option<Lease>, Error> {
        let _ = now;
        let n = self.inner.lease_names.fetch_add(1, Ordering::Relaxed);
        let name = format!("{:016x}:{n}", self.inner.replica);
        // Registered first, so that a renewal running meanwhile keeps it alive.
        self.inner.leases.insert(name.clone(), key.to_owned());
        let mut invocation = self.inner.lease.prepare_invoke();
        invocation
            .key(self.lease_key(key))
            .arg(max)
            .arg(u64::try_from(self.inner.options.lease_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(&name);
        match self.run::<i64>(&invocation).await {
            Ok(1) => {
                self.renew_in_background();
                Ok(Some(Lease::new(key, name)))
            }
            Ok(_) => {
                self.inner.leases.remove(&name);
                Ok(None)
            }
            Err(why) => {
                self.inner.leases.remove(&name);
                self.fell_back(&why);
                Ok(self.lease_locally(key, max))
            }
        }
    }

    async fn release(&self, lease: &Lease) -> Result<(), Error> {
        if lease.id().starts_with(LOCAL_LEASE) {
            if let Some(mut count) = self.inner.local_leases.get_mut(lease.key()) {
                *count = count.saturating_sub(1);
            }
            return Ok(());
        }
        if self.inner.leases.remove(lease.id()).is_none() {
            return Ok(());
        }
        let Some(mut connection) = self.inner.connection.read().await.clone() else {
            // Not renewed any more: it expires.
            return Ok(());
        };
        let released = tokio::time::timeout(
            self.inner.options.timeout,
            redis::cmd("ZREM")
                .arg(self.lease_key(lease.key()))
                .arg(lease.id())
                .query_async::<i64>(&mut connection),
        )
        .await;
        if !matches!(released, Ok(Ok(_))) {
            tracing::debug!(lease = lease.id(), "a lease is left to expire");
        }
        Ok(())
    }

    fn fallbacks(&self) -> u64 {
        RedisStore::fallbacks(self)
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
