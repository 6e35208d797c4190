//! Invariants of the strategies and of selection (STYLE.md §9), as properties.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::{Strategy as _, any, prop, prop_assert, prop_assert_eq, proptest};

use super::*;
use crate::endpoint::EndpointId;
use crate::error::Error;
use crate::quota::{Charge, Limits};
use crate::ratelimit::RateLimitInfo;
use crate::rng::Rng;
use crate::select::{Ask, Reason, Selection, Slot, select};
use crate::state::{Availability, DeploymentState, HealthPolicy, InFlightGuard, LatencyClass};

/// `ALL` lists every kind: the match has no wildcard, so a new kind must be placed here, and
/// each must be in `ALL` with a name that parses back to it.
#[test]
fn all_lists_every_kind() {
    let position = |kind: StrategyKind| match kind {
        StrategyKind::RoundRobin => 0,
        StrategyKind::LeastBusy => 1,
        StrategyKind::LeastLatency => 2,
        StrategyKind::Weighted => 3,
        StrategyKind::UsageBased => 4,
    };
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::LeastBusy,
        StrategyKind::LeastLatency,
        StrategyKind::Weighted,
        StrategyKind::UsageBased,
    ] {
        assert_eq!(
            StrategyKind::ALL.get(position(kind)),
            Some(&kind),
            "{kind} missing from ALL"
        );
        assert_eq!(kind.as_str().parse::<StrategyKind>().unwrap(), kind);
    }
}

fn arb_candidate() -> impl proptest::strategy::Strategy<Value = Candidate> {
    (0u32..50, 0.001f64..5.0, 1u32..10, 0u32..3).prop_map(
        |(in_flight, latency, weight, priority)| Candidate {
            in_flight,
            latency,
            weight,
            priority,
            ..Candidate::default()
        },
    )
}

/// A P2C strategy and the cost it must minimise (given the compared pair's mean in-flight).
type Check<'a> = (&'a dyn super::Strategy, fn(&Candidate, f64) -> f64);

fn strategies() -> Vec<Box<dyn super::Strategy>> {
    StrategyKind::ALL.iter().map(|k| k.build()).collect()
}

proptest! {
    #[test]
    fn pick_is_none_only_when_empty_and_in_range(
        candidates in prop::collection::vec(arb_candidate(), 0..20),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        for strategy in strategies() {
            let mut rng = Rng::with_seed(seed);
            let pick = strategy.pick(&candidates, now, &mut rng);
            prop_assert_eq!(pick.is_none(), candidates.is_empty(), "{}", strategy.name());
            if let Some(i) = pick {
                prop_assert!(i < candidates.len());
            }
        }
    }

    #[test]
    fn p2c_never_prefers_the_more_loaded_of_its_two(
        candidates in prop::collection::vec(arb_candidate(), 1..20),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        let least_latency = LeastLatency::default();
        let checks: [Check<'_>; 2] = [
            (&LeastBusy, |c, _| f64::from(c.in_flight)),
            (&least_latency, LeastLatency::cost),
        ];
        for (strategy, cost) in checks {
            let chosen = strategy.pick(&candidates, now, &mut Rng::with_seed(seed)).unwrap();
            // Replay the same draws to see which two were compared.
            let (a, b) = sample_two(candidates.len(), &mut Rng::with_seed(seed));
            prop_assert!(chosen == a || chosen == b);
            let other = if chosen == a { b } else { a };
            let mean = f64::from(candidates[a].in_flight + candidates[b].in_flight) / 2.0;
            prop_assert!(cost(&candidates[chosen], mean) <= cost(&candidates[other], mean));
        }
    }

    #[test]
    fn sample_two_is_distinct_and_in_range(n in 2usize..500, seed in any::<u64>()) {
        let (a, b) = sample_two(n, &mut Rng::with_seed(seed));
        prop_assert!(a < n && b < n && a != b);
    }

    #[test]
    fn round_robin_is_exact_per_instance(n in 1usize..16, rounds in 1usize..20) {
        let candidates = vec![Candidate::default(); n];
        let (group_a, group_b) = (RoundRobin::default(), RoundRobin::default());
        let mut counts_a = vec![0; n];
        let mut counts_b = vec![0; n];
        let mut rng = Rng::with_seed(0);
        let now = Instant::now();
        // Interleaved across two groups (the seed shared one counter across models).
        for _ in 0..rounds * n {
            counts_a[group_a.pick(&candidates, now, &mut rng).unwrap()] += 1;
            counts_b[group_b.pick(&candidates[..n], now, &mut rng).unwrap()] += 1;
        }
        prop_assert!(counts_a.iter().all(|c| *c == rounds));
        prop_assert!(counts_b.iter().all(|c| *c == rounds));
    }

    #[test]
    fn tiers_spill_only_when_the_best_is_empty(
        mut candidates in prop::collection::vec(arb_candidate(), 1..20),
        seed in any::<u64>(),
    ) {
        candidates.sort_by_key(|c| c.priority);
        let best = candidates[0].priority;
        for strategy in strategies() {
            let i = pick_tiered(strategy.as_ref(), &candidates, Instant::now(), &mut Rng::with_seed(seed)).unwrap();
            prop_assert_eq!(candidates[i].priority, best);
        }
    }

    #[test]
    fn selection_never_picks_an_ineligible_deployment(
        states in prop::collection::vec(0u8..7, 1..12),
        tried_mask in any::<u16>(),
        seed in any::<u64>(),
    ) {
        // 0 ready, 1 throttled, 2 ejected, 3 disabled, 4 ready but low priority, 5 no quota now,
        // 6 ejected for longer than probe_after (out until probed: not even in panic mode).
        let now = Instant::now();
        let policy = HealthPolicy::default().with_ejection(1, Duration::from_secs(30), Duration::from_secs(30));
        let long = HealthPolicy::default().with_ejection(1, Duration::from_secs(120), Duration::from_secs(120));
        let mut rng = Rng::with_seed(seed);
        let deployments: Vec<Arc<DeploymentState>> = states.iter().map(|s| {
            let state = Arc::new(DeploymentState::new(now, Duration::from_secs(10)));
            let status = match s { 1 => Some(429), 2 | 6 => Some(500), 3 => Some(401), _ => None };
            if let Some(status) = status {
                let limits = RateLimitInfo { retry_after: Some(Duration::from_secs(5)), ..RateLimitInfo::default() };
                let error = Error::upstream(EndpointId::new("e"), status, None, &limits);
                let policy = if *s == 6 { &long } else { &policy };
                state.record_failure(&error, LatencyClass::Call, policy, now, &mut rng);
            }
            state
        }).collect();
        // A quota with no room now: 60 tokens a minute over 10 s (10 tokens), blocked for 2 s.
        let quota = Limits::per_minute(Some(60), None);
        for (d, s) in deployments.iter().zip(&states) {
            if *s == 5 {
                d.quota.block(Duration::from_secs(2), now);
            }
        }
        let ask = Ask { class: LatencyClass::Call, charge: Some(Charge { tokens: 1, requests: 1 }) };
        let mut slots: Vec<(usize, Slot<'_>)> = deployments.iter().zip(&states).enumerate().map(|(i, (d, s))| {
            (i, Slot { state: d, weight: 1, priority: u32::from(*s == 4), limits: quota })
        }).collect();
        slots.sort_by_key(|(_, s)| s.priority);
        let order: Vec<usize> = slots.iter().map(|(i, _)| *i).collect();
        let no_room: Vec<bool> = order.iter().map(|i| states[*i] == 5).collect();
        let slots: Vec<Slot<'_>> = slots.into_iter().map(|(_, s)| s).collect();
        let tried = |i: usize| tried_mask & (1 << (order[i] % 16)) != 0;
        for strategy in strategies() {
            let result = select(&slots, tried, ask, strategy.as_ref(), now, &mut rng, &mut Selection::default());
            let ready: Vec<usize> = (0..slots.len()).filter(|i| !tried(*i) && !no_room[*i] && slots[*i].state.availability(now) == Availability::Ready).collect();
            let ejected: Vec<usize> = (0..slots.len()).filter(|i| !tried(*i) && !no_room[*i] && matches!(slots[*i].state.availability(now), Availability::Ejected(_)) && slots[*i].state.out().is_none()).collect();
            match result {
                Ok(i) => {
                    prop_assert!(!tried(i));
                    if ready.is_empty() {
                        prop_assert!(ejected.contains(&i), "panic mode uses ejected only");
                    } else {
                        prop_assert!(ready.contains(&i));
                        let best = ready.iter().map(|r| slots[*r].priority).min().unwrap();
                        prop_assert_eq!(slots[i].priority, best);
                    }
                }
                Err(nothing) => {
                    prop_assert!(ready.is_empty() && ejected.is_empty());
                    // The soonest recovery is among the deployments this request may still use.
                    let cooling: Vec<usize> = (0..slots.len()).filter(|i| !tried(*i) && matches!(states[order[*i]], 1 | 2 | 5 | 6)).collect();
                    prop_assert_eq!(nothing.until.is_some(), !cooling.is_empty());
                    if cooling.is_empty() {
                        let untried = (0..slots.len()).any(|i| !tried(i));
                        prop_assert_eq!(nothing.reason, if untried { Reason::Disabled } else { Reason::Tried });
                    } else {
                        // Quota-blocked ones recover in 2 s, throttled ones in 5 s, ejections
                        // in 30 s ± 10 % jitter.
                        let (reason, low, high) = cooling.iter().map(|i| match states[order[*i]] {
                            5 => (Reason::Quota, 2.0_f64, 2.0_f64),
                            1 => (Reason::RateLimited, 5.0, 5.0),
                            6 => (Reason::Ejected, 108.0, 132.0),
                            _ => (Reason::Ejected, 27.0, 33.0),
                        }).min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
                        prop_assert_eq!(nothing.reason, reason);
                        let wait = (nothing.until.unwrap() - now).as_secs_f64();
                        prop_assert!(wait >= low - 0.002 && wait <= high + 0.002, "{wait}");
                    }
                }
            }
        }
    }

    /// No sequence of 429s, other failures, successes, starts, ends and waits lets a half-open
    /// deployment carry more than its one request, or leaves a deployment shut for good.
    #[test]
    fn half_open_admits_one_at_a_time_and_never_stays_shut(ops in prop::collection::vec((0u8..6, 0u64..3_000), 0..200)) {
        let t0 = Instant::now();
        let state = Arc::new(DeploymentState::new(t0, Duration::from_secs(1)));
        let policy = HealthPolicy::default().with_ejection(3, Duration::from_secs(1), Duration::from_secs(4));
        let mut rng = Rng::with_seed(7);
        let mut now = t0;
        // Each request in flight, and whether it took the half-open slot.
        let mut held: Vec<(InFlightGuard, bool)> = Vec::new();
        let upstream = |status: u16| {
            let limits = RateLimitInfo { retry_after: Some(Duration::from_millis(500)), ..RateLimitInfo::default() };
            Error::upstream(EndpointId::new("e"), status, None, &limits)
        };
        for (op, ms) in ops {
            match op {
                0 | 1 => {
                    let probe = state.is_half_open();
                    if let Some(guard) = state.try_start(Instant::now()) {
                        held.push((guard, probe));
                    } else {
                        prop_assert!(probe, "refused while not half-open");
                        prop_assert!(held.iter().any(|(_, p)| *p), "refused with no probe in flight");
                    }
                }
                2 if !held.is_empty() => { held.remove(ms as usize % held.len()); }
                3 => state.record_failure(&upstream(429), LatencyClass::Call, &policy, now, &mut rng),
                4 => state.record_failure(&upstream(500), LatencyClass::Call, &policy, now, &mut rng),
                5 => state.record_success(),
                _ => now += Duration::from_millis(ms),
            }
            let probes = held.iter().filter(|(_, p)| *p).count();
            prop_assert!(probes <= 1, "{probes} half-open requests in flight");
        }
        // Every request ends and time passes: it takes a request again.
        held.clear();
        let later = now + Duration::from_secs(10);
        prop_assert_eq!(state.availability(later), Availability::Ready);
        prop_assert!(state.try_start(Instant::now()).is_some());
    }

    #[test]
    fn in_flight_returns_to_zero_after_any_interleaving(ops in prop::collection::vec((0usize..3, any::<bool>()), 0..200)) {
        let states: Vec<Arc<DeploymentState>> =
            (0..3).map(|_| Arc::new(DeploymentState::new(Instant::now(), Duration::from_secs(1)))).collect();
        let mut held = Vec::new();
        for (which, start) in ops {
            if start || held.is_empty() {
                held.push(states[which].start());
            } else {
                let at = which % held.len();
                drop(held.swap_remove(at));
            }
            let total: u32 = states.iter().map(|s| s.in_flight()).sum();
            prop_assert_eq!(total as usize, held.len());
        }
        drop(held);
        prop_assert!(states.iter().all(|s| s.in_flight() == 0));
    }
}

#[test]
fn weighted_shares_within_tolerance() {
    let candidates = [1, 2, 7].map(|weight| Candidate {
        weight,
        ..Candidate::default()
    });
    let mut rng = Rng::with_seed(42);
    let mut counts = [0u32; 3];
    let draws = 100_000;
    for _ in 0..draws {
        counts[Weighted
            .pick(&candidates, Instant::now(), &mut rng)
            .unwrap()] += 1;
    }
    for (count, weight) in counts.iter().zip([1.0, 2.0, 7.0]) {
        let share = f64::from(*count) / f64::from(draws);
        assert!(
            (share - weight / 10.0).abs() < 0.01,
            "{share} vs {}",
            weight / 10.0
        );
    }
}

#[test]
fn names_parse_including_the_seeds() {
    for (name, kind) in [
        ("round-robin", StrategyKind::RoundRobin),
        ("least-busy", StrategyKind::LeastBusy),
        ("least-connection", StrategyKind::LeastBusy),
        ("Least_Latency", StrategyKind::LeastLatency),
        ("weighted", StrategyKind::Weighted),
        ("simple-shuffle", StrategyKind::Weighted),
    ] {
        assert_eq!(name.parse::<StrategyKind>().unwrap(), kind, "{name}");
    }
    let error = "fastest".parse::<StrategyKind>().unwrap_err();
    assert!(error.to_string().contains("fastest") && error.to_string().contains("least-latency"));
}

#[test]
fn least_latency_does_not_read_concurrency_as_a_queue() {
    // Two fast endpoints carrying twelve requests each (the group's concurrency, served in
    // parallel), one three times slower and idle: the slow one is never chosen, although
    // "latency x (in-flight + 1)" would send it most requests.
    let fast = Candidate {
        in_flight: 12,
        latency: 0.4,
        ..Candidate::default()
    };
    let slow = Candidate {
        in_flight: 0,
        latency: 1.2,
        ..Candidate::default()
    };
    let candidates = [slow, fast, fast];
    let strategy = LeastLatency::default();
    let mut rng = Rng::with_seed(5);
    let now = Instant::now();
    for _ in 0..1_000 {
        assert_ne!(strategy.pick(&candidates, now, &mut rng), Some(0));
    }
    // Up to the group's concurrency a request costs its latency; above it, more: among
    // equals the busier one loses, which keeps P2C's balance.
    let mean = 8.0;
    let at_mean = Candidate {
        in_flight: 8,
        ..fast
    };
    let below = Candidate {
        in_flight: 3,
        ..fast
    };
    assert!((LeastLatency::cost(&at_mean, mean) - fast.latency).abs() < 1e-12);
    assert!((LeastLatency::cost(&below, mean) - fast.latency).abs() < 1e-12);
    let busier = Candidate {
        in_flight: 12,
        ..fast
    };
    assert!(LeastLatency::cost(&busier, mean) > LeastLatency::cost(&at_mean, mean));
}

#[test]
fn a_starved_deployment_gets_its_probe_budget_while_the_group_is_busy() {
    let busy = Candidate {
        in_flight: 4,
        latency: 0.3,
        idle: 0.01,
        ..Candidate::default()
    };
    let slow = Candidate {
        latency: 3.0,
        idle: 4.0,
        ..Candidate::default()
    };
    let now = Instant::now();
    let mut rng = Rng::with_seed(1);
    let probes = |strategy: &LeastLatency, slow: Candidate, busy: Candidate, rng: &mut Rng| {
        (0..1_500)
            .filter(|_| strategy.pick(&[slow, busy, busy], now, rng) == Some(0))
            .count()
    };
    let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5));
    assert_eq!(
        probes(&strategy, slow, busy, &mut rng),
        0,
        "not starved yet"
    );
    // Starved (idle a probe interval longer than the busy ones, who are in use): a probe,
    // at most one per 150 picks of the group, so probes are never more than that share.
    let starved = Candidate { idle: 5.2, ..slow };
    let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5));
    let n = probes(&strategy, starved, busy, &mut rng);
    assert!((8..=10).contains(&n), "{n} probes in 1,500 picks");
    // The budget accumulates: after a busy spell with nothing starved, a deployment that
    // becomes starved is probed at its first pairing, not after another 150 picks (a recovery
    // found a probe budget late: 3x open loop never came back within 15 s).
    let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5));
    assert_eq!(probes(&strategy, slow, busy, &mut rng), 0);
    let first = (0..100)
        .find(|_| strategy.pick(&[starved, busy, busy], now, &mut rng) == Some(0))
        .expect("probed within 100 picks");
    assert!(first < 10, "first probe after {first} picks");
    // A group nobody uses probes nothing: the next request goes by cost.
    let quiet = Candidate { idle: 30.0, ..busy };
    let never = Candidate { idle: 60.0, ..slow };
    let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5));
    assert_eq!(probes(&strategy, never, quiet, &mut rng), 0);
}

/// A deployment in use: four requests in flight, 300 ms.
fn busy() -> Candidate {
    Candidate {
        in_flight: 4,
        latency: 0.3,
        idle: 0.01,
        ..Candidate::default()
    }
}

/// A slow deployment nobody sent a request for 5.2 s: owed a probe at a 5 s interval.
fn starved() -> Candidate {
    Candidate {
        latency: 3.0,
        idle: 5.2,
        ..Candidate::default()
    }
}

#[test]
fn shadow_probes_take_the_budget_out_of_the_picks() {
    let (busy, starved) = (busy(), starved());
    let now = Instant::now();
    let mut rng = Rng::with_seed(3);
    let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5))
        .with_probe_mode(ProbeMode::Shadow);
    let group = [starved, busy, busy];
    let (mut picked, mut probed) = (0, 0);
    for _ in 0..1_500 {
        picked += usize::from(strategy.pick(&group, now, &mut rng) == Some(0));
        match strategy.probe(&group, now, &mut rng) {
            Some(0) => probed += 1,
            None => {}
            other => panic!("only the starved one is owed a probe: {other:?}"),
        }
    }
    assert_eq!(
        picked, 0,
        "no caller's request goes to the starved deployment"
    );
    assert!(
        (8..=10).contains(&probed),
        "{probed} shadow probes in 1,500 picks"
    );
    // Live probes owe no shadow; a deployment never tried still gets a caller's request.
    let live = LeastLatency::with_probe_interval(Duration::from_secs(5));
    assert_eq!(live.probe(&group, now, &mut rng), None);
    let untried = Candidate {
        idle: f64::INFINITY,
        ..starved
    };
    let first = (0..100).find(|_| strategy.pick(&[untried, busy], now, &mut rng) == Some(0));
    assert!(first.is_some(), "an untried deployment is tried at once");
}

/// Requests that went where something else chose (a cache key's deployment) count toward the
/// probe budget as picks do; without them counted, a group whose requests all have keys
/// would probe once and never again.
#[test]
fn picks_made_elsewhere_fill_the_probe_budget() {
    let (busy, starved) = (busy(), starved());
    let now = Instant::now();
    let mut rng = Rng::with_seed(3);
    let group = [starved, busy, busy];
    let probes = |counted: bool, rng: &mut Rng| {
        let strategy = LeastLatency::with_probe_interval(Duration::from_secs(5))
            .with_probe_mode(ProbeMode::Shadow);
        (0..1_500)
            .filter(|_| {
                if counted {
                    strategy.picked_elsewhere();
                }
                strategy.probe(&group, now, rng) == Some(0)
            })
            .count()
    };
    let counted = probes(true, &mut rng);
    assert!(
        (8..=10).contains(&counted),
        "{counted} in 1,500 keyed requests"
    );
    assert!(probes(false, &mut rng) <= 1);
}

#[test]
fn a_ramping_deployment_wins_in_proportion_to_its_ramp() {
    let back = Candidate {
        latency: 0.2,
        ..Candidate::default()
    };
    let others = Candidate {
        in_flight: 8,
        latency: 0.3,
        ..Candidate::default()
    };
    let strategy = LeastLatency::default();
    let now = Instant::now();
    let mut rng = Rng::with_seed(11);
    let share = |ramp: f64, rng: &mut Rng| {
        let candidates = [Candidate { ramp, ..back }, others, others];
        (0..10_000)
            .filter(|_| strategy.pick(&candidates, now, rng) == Some(0))
            .count() as f64
            / 10_000.0
    };
    // Cheapest, it wins every comparison it is in (two in three) once ramped; a fifth of
    // that at a fifth of its ramp; none just back.
    let full = share(1.0, &mut rng);
    assert!((full - 2.0 / 3.0).abs() < 0.02, "{full}");
    let fifth = share(0.2, &mut rng);
    assert!((fifth - 2.0 / 15.0).abs() < 0.02, "{fifth}");
    assert!(share(0.0, &mut rng) < 1e-9);
}

#[test]
fn a_deployment_never_tried_gets_tried() {
    // Its estimate is only the initial guess; without a first request it would never have
    // another (the probe budget counts 150 picks first).
    let tried = Candidate {
        latency: 0.01,
        idle: 0.05,
        ..Candidate::default()
    };
    let never = Candidate {
        latency: 0.03,
        idle: f64::INFINITY,
        ..Candidate::default()
    };
    let strategy = LeastLatency::default();
    let mut rng = Rng::with_seed(2);
    assert_eq!(
        strategy.pick(&[tried, never], Instant::now(), &mut rng),
        Some(1)
    );
}
