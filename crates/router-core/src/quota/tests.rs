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
