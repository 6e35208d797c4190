use std::time::{Duration, Instant};

use proptest::prelude::{any, prop, prop_assert, proptest};

use super::*;

fn limits(tpm: u64) -> Limits {
    Limits::per_minute(Some(tpm), None)
}

#[test]
fn shape_of_a_limit() {
    // 6,000 TPM over 10 s: 1,000 tokens, refilled at 100 a second.
    let shape = Shape::new(6_000, Duration::from_secs(10));
    assert!((shape.capacity - 1_000.0).abs() < 1e-9);
    assert!((shape.rate - 100.0).abs() < 1e-9);
}

#[test]
fn reserve_until_empty_then_wait_for_the_refill() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    let charge = Charge {
        tokens: 400,
        requests: 1,
    };
    assert!(matches!(
        store.reserve_now("d", &l, charge, t0),
        Admission::Admitted { .. }
    ));
    assert!(matches!(
        store.reserve_now("d", &l, charge, t0),
        Admission::Admitted { .. }
    ));
    let Admission::Denied {
        retry_after,
        cooling,
    } = store.reserve_now("d", &l, charge, t0)
    else {
        panic!("the third does not fit");
    };
    assert!(!cooling);
    assert_eq!(
        retry_after,
        Duration::from_secs(2),
        "200 left, 400 needed, 100 a second"
    );
    assert!(matches!(
        store.reserve_now("d", &l, charge, t0 + Duration::from_secs(2)),
        Admission::Admitted { .. }
    ));
}

#[test]
fn a_request_larger_than_the_bucket_waits_for_a_full_one_then_goes_into_debt() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    let big = Charge {
        tokens: 2_500,
        requests: 1,
    };
    let Admission::Admitted { tokens_left, .. } = store.reserve_now("d", &l, big, t0) else {
        panic!("a full bucket admits it");
    };
    assert!((tokens_left.unwrap() + 1_500.0).abs() < 1e-6, "in debt");
    let Admission::Denied { retry_after, .. } = store.reserve_now("d", &l, big, t0) else {
        panic!("not until full again");
    };
    assert_eq!(retry_after, Duration::from_secs(25));
}

#[test]
fn reconcile_and_release_give_back() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    store.reserve_now(
        "d",
        &l,
        Charge {
            tokens: 800,
            requests: 1,
        },
        t0,
    );
    store.adjust_now("d", &l, 500, 0, t0); // used 300 of 800
    assert!((store.tokens_level("d", &l, t0).unwrap() - 700.0).abs() < 1e-6);
    store.adjust_now("d", &l, 10_000, 0, t0);
    assert!(
        (store.tokens_level("d", &l, t0).unwrap() - 1_000.0).abs() < 1e-6,
        "capped"
    );
}

#[test]
fn upstream_remaining_lowers_never_raises() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    store.correct_now("d", &l, Some(250), None, t0);
    assert!((store.tokens_level("d", &l, t0).unwrap() - 250.0).abs() < 1e-6);
    store.correct_now("d", &l, Some(900), None, t0);
    assert!((store.tokens_level("d", &l, t0).unwrap() - 250.0).abs() < 1e-6);
}

#[test]
fn shared_cooldowns_deny_and_only_extend() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    store.cool_down_now("d", Duration::from_secs(5), t0);
    store.cool_down_now("d", Duration::from_secs(1), t0);
    let Admission::Denied {
        retry_after,
        cooling,
    } = store.reserve_now("d", &Limits::default(), Charge::default(), t0)
    else {
        panic!("cooling");
    };
    assert!(cooling);
    assert_eq!(retry_after, Duration::from_secs(5));
    assert!(matches!(
        store.reserve_now(
            "d",
            &Limits::default(),
            Charge::default(),
            t0 + Duration::from_secs(5)
        ),
        Admission::Admitted { .. }
    ));
}

#[test]
fn view_tells_when_and_how_much() {
    let t0 = Instant::now();
    let view = QuotaView::new(t0);
    let l = limits(6_000);
    assert_eq!(view.headroom(&l, t0), Some(1.0), "unknown is full");
    assert_eq!(view.headroom(&Limits::default(), t0), None);
    view.update(Some(100.0), None, t0);
    assert!((view.headroom(&l, t0).unwrap() - 0.1).abs() < 1e-6);
    let at = view
        .available_at(
            &l,
            Charge {
                tokens: 300,
                requests: 1,
            },
            t0,
        )
        .unwrap();
    assert_eq!(at - t0, Duration::from_secs(2));
    assert_eq!(
        view.available_at(
            &l,
            Charge {
                tokens: 50,
                requests: 1
            },
            t0
        ),
        None
    );
    view.block(Duration::from_secs(3), t0);
    assert!(
        view.available_at(
            &l,
            Charge {
                tokens: 50,
                requests: 1
            },
            t0
        )
        .is_some()
    );
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Reserve(u64),
    Settle { which: usize, used_share: f64 },
    Release(usize),
    Wait(u64),
}

fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::Strategy as _;
    proptest::prop_oneof![
        (1u64..1_000).prop_map(Op::Reserve),
        (any::<usize>(), 0.0f64..=1.0)
            .prop_map(|(which, used_share)| Op::Settle { which, used_share }),
        any::<usize>().prop_map(Op::Release),
        (0u64..5_000).prop_map(Op::Wait),
    ]
}

proptest! {
    /// With costs within a bucket, a level never goes below zero nor above the capacity,
    /// whatever the order of takes, refunds and waits. (That nothing leaks is the
    /// reservation's property, tested on `Reservation` itself in router-facade.)
    #[test]
    fn bucket_levels_stay_within_zero_and_the_capacity(ops in prop::collection::vec(arb_op(), 0..120)) {
        let store = MemoryStore::new();
        let l = limits(6_000); // 1,000 tokens
        let t0 = Instant::now();
        let mut now = t0;
        let mut open: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Reserve(cost) => {
                    if let Admission::Admitted { .. } = store.reserve_now("d", &l, Charge { tokens: cost, requests: 1 }, now) {
                        open.push(cost);
                    }
                }
                Op::Settle { which, used_share } if !open.is_empty() => {
                    let cost = open.swap_remove(which % open.len());
                    let used = (cost as f64 * used_share).round() as i64;
                    store.adjust_now("d", &l, cost.cast_signed() - used, 0, now);
                }
                Op::Release(which) if !open.is_empty() => {
                    let cost = open.swap_remove(which % open.len());
                    store.adjust_now("d", &l, cost.cast_signed(), 0, now);
                }
                Op::Wait(ms) => now += Duration::from_millis(ms),
                _ => {}
            }
            let level = store.tokens_level("d", &l, now).unwrap();
            prop_assert!(level >= -1e-6, "negative: {level}");
            prop_assert!(level <= 1_000.0 + 1e-6, "over capacity: {level}");
        }
    }
}

#[test]
fn learned_shares_shape_the_buckets() {
    // 6,000 TPM over 10 s: 1,000 tokens at 100 a second. Half the burst, 80 % of the rate.
    let learned = Learned {
        burst: 0.5,
        rate: 0.8,
    };
    let limits = learned.apply(&Limits::per_minute(Some(6_000), Some(60)));
    let tokens = limits.tokens().unwrap();
    assert!((tokens.capacity - 500.0).abs() < 1e-6, "{tokens:?}");
    assert!((tokens.rate - 80.0).abs() < 1e-6, "{tokens:?}");
    let requests = limits.requests().unwrap();
    assert!((requests.capacity - 5.0).abs() < 0.1, "{requests:?}");
    assert_eq!(Learned::FULL.apply(&limits), limits);
}

#[test]
fn a_refusal_cuts_once_per_window_and_successes_grow_the_shares_back() {
    let policy = Learning::default();
    let window = Duration::from_secs(10);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut learner = Learner::new(t0);
    assert!(learner.refused(&policy, window, at(0)));
    assert!((learner.learned.burst - 0.5).abs() < 1e-12);
    assert!(
        (learner.learned.rate - 1.0).abs() < 1e-12,
        "a first overshoot is the burst's"
    );
    // The 429s of the same overshoot teach nothing more.
    assert!(!learner.refused(&policy, window, at(3)));
    assert!((learner.learned.burst - 0.5).abs() < 1e-12);
    // A success counts the time served since the last change, at most one window.
    learner.served(&policy, window, at(6));
    assert!((learner.learned.burst - (0.5 + 0.5 * 0.1)).abs() < 1e-9);
    learner.served(&policy, window, at(600));
    assert!(
        (learner.learned.burst - (0.55 + 0.5 * 10.0 / 60.0)).abs() < 1e-9,
        "an idle stretch counts one window: {:?}",
        learner.learned
    );
    assert!(learner.refused(&policy, window, at(611)), "a new overshoot");
    assert!(
        (learner.learned.rate - 1.0).abs() < 1e-12,
        "long after the last cut: the burst's again"
    );
    // Again within six windows: the smaller burst did not help, so the rate is wrong too.
    assert!(learner.refused(&policy, window, at(640)));
    assert!((learner.learned.rate - 0.95).abs() < 1e-9);
}

#[test]
fn a_refusal_empties_the_buckets_until_the_wait_ends() {
    let store = MemoryStore::new();
    let l = limits(6_000);
    let t0 = Instant::now();
    let charge = Charge {
        tokens: 100,
        requests: 1,
    };
    assert!(matches!(
        store.reserve_now("d", &l, charge, t0),
        Admission::Admitted { .. }
    ));
    let learned = store.refused_now("d", &l, Duration::from_secs(2), t0);
    assert_eq!(store.learned("d"), learned);
    assert!(learned.burst < 1.0);
    // Cooling until the wait ends, and then empty: what frees comes at the learned rate.
    let after = t0 + Duration::from_secs(2);
    let level = store.tokens_level("d", &l, after).unwrap();
    assert!(level.abs() < 1e-6, "empty when the wait ends: {level}");
    let Admission::Denied { retry_after, .. } = store.reserve_now("d", &l, charge, after) else {
        panic!("nothing freed yet");
    };
    // 100 tokens at 100 a second.
    assert!(
        (retry_after.as_secs_f64() - 1.0).abs() < 0.01,
        "{retry_after:?}"
    );
    let Admission::Admitted { learned: told, .. } =
        store.reserve_now("d", &l, charge, after + retry_after)
    else {
        panic!("admitted once the refill came");
    };
    assert_eq!(told, learned, "an admission says what the store keeps to");
}

proptest! {
    /// No sequence of refusals and successes takes a share outside [floor, 1], and serving
    /// long enough always brings both shares back to the configured limits: learning never
    /// shuts a deployment, and never opens it beyond what was configured.
    #[test]
    fn learning_stays_within_bounds_and_always_recovers(
        events in prop::collection::vec((any::<bool>(), 0u64..30_000), 0..200),
        window_ms in 500u64..20_000,
    ) {
        let policy = Learning::default();
        let window = Duration::from_millis(window_ms);
        let t0 = Instant::now();
        let mut now = t0;
        let mut learner = Learner::new(t0);
        for (refused, gap) in events {
            now += Duration::from_millis(gap);
            if refused {
                learner.refused(&policy, window, now);
            } else {
                learner.served(&policy, window, now);
            }
            for share in [learner.learned.burst, learner.learned.rate] {
                prop_assert!((policy.floor - 1e-12..=1.0).contains(&share), "{share}");
            }
        }
        // Rate regrows by 0.05 a minute: at most 19 minutes from the floor.
        for _ in 0..=(20 * 60_000 / window_ms) {
            now += window;
            learner.served(&policy, window, now);
        }
        prop_assert!(learner.learned.is_full(), "{:?}", learner.learned);
    }
}
