use std::time::{Duration, Instant};

use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};

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

fn charge(tokens: u64) -> Charge {
    Charge {
        tokens,
        requests: 1,
    }
}

/// The ticket of an admission; panics, naming it, if it was denied.
fn admitted(admission: Admission) -> u64 {
    match admission {
        Admission::Admitted { ticket, .. } => ticket,
        Admission::Denied { .. } => panic!("admitted expected: {admission:?}"),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[test]
fn a_window_admits_its_quota_then_waits_for_the_oldest_to_leave() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000); // 1,000 tokens a 10 s window; the margin is 50 ms.
    assert_eq!(margin(l.window), Duration::from_millis(50));
    let Admission::Admitted {
        tokens_left,
        ticket: first,
        ..
    } = store.reserve_now("d", &l, charge(400), t0)
    else {
        panic!("an empty window admits");
    };
    assert_eq!(tokens_left, Some(600.0));
    let second = admitted(store.reserve_now("d", &l, charge(400), t0 + secs(3.0)));
    assert_ne!(first, second, "each admission has its own ticket");
    // A token bucket would have refilled 300 by now and admitted a third at 5 s; an upstream
    // that counts over 10 s windows would refuse it.
    let Admission::Denied {
        retry_after,
        cooling,
    } = store.reserve_now("d", &l, charge(400), t0 + secs(5.0))
    else {
        panic!("the third does not fit until the first leaves");
    };
    assert!(!cooling);
    assert_eq!(
        retry_after,
        secs(5.05),
        "the first leaves at 10 s and the margin"
    );
    assert!(matches!(
        store.reserve_now("d", &l, charge(400), t0 + secs(10.05)),
        Admission::Admitted { .. }
    ));
    assert_eq!(store.held("d", t0 + secs(10.05)), (800.0, 2.0));
}

#[test]
fn a_request_larger_than_the_window_waits_for_an_empty_one_and_is_held_longer() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    let Admission::Admitted { tokens_left, .. } = store.reserve_now("d", &l, charge(2_500), t0)
    else {
        panic!("an empty window admits it");
    };
    assert!((tokens_left.unwrap() + 1_500.0).abs() < 1e-6, "in debt");
    let Admission::Denied { retry_after, .. } = store.reserve_now("d", &l, charge(100), t0) else {
        panic!("not until it has left");
    };
    // Two and a half windows, so that the average stays within 6,000 a minute.
    assert_eq!(retry_after, secs(25.05));
    let Admission::Denied { .. } = store.reserve_now("d", &l, charge(2_500), t0 + secs(10.0))
    else {
        panic!("still held after one window");
    };
}

#[test]
fn settling_gives_back_to_the_admission_and_releasing_frees_it() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    let a = admitted(store.reserve_now("d", &l, charge(800), t0));
    let used_300 = Settlement {
        ticket: a,
        tokens_back: 500,
        ..Settlement::default()
    };
    store.settle_now("d", &l, used_300, t0);
    assert!((store.tokens_level("d", &l, t0).unwrap() - 700.0).abs() < 1e-6);
    let too_much = Settlement {
        ticket: a,
        tokens_back: 10_000,
        ..Settlement::default()
    };
    store.settle_now("d", &l, too_much, t0);
    assert!(
        (store.tokens_level("d", &l, t0).unwrap() - 1_000.0).abs() < 1e-6,
        "never below nothing"
    );
    let b = admitted(store.reserve_now("d", &l, charge(600), t0));
    assert_ne!(a, b);
    store.settle_now("d", &l, Settlement::release(b, charge(600)), t0);
    assert_eq!(
        store.held("d", t0),
        (0.0, 1.0),
        "only the first's request is held"
    );
    // Settling an admission that has left the window changes nothing.
    let later = t0 + secs(11.0);
    store.settle_now("d", &l, Settlement::release(a, charge(800)), later);
    assert_eq!(store.held("d", later), (0.0, 0.0));
}

#[test]
fn upstream_remaining_lowers_never_raises_and_leaves_after_half_a_window() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    let ticket = admitted(store.reserve_now("d", &l, charge(100), t0));
    let said = |remaining: u64| Settlement {
        ticket,
        remaining_tokens: Some(remaining),
        ..Settlement::default()
    };
    store.settle_now("d", &l, said(250), t0);
    assert!((store.tokens_level("d", &l, t0).unwrap() - 250.0).abs() < 1e-6);
    store.settle_now("d", &l, said(900), t0);
    assert!((store.tokens_level("d", &l, t0).unwrap() - 250.0).abs() < 1e-6);
    // What the upstream holds that the router did not see leaves within half a window (or
    // the reset the upstream named).
    let half = t0 + secs(5.0);
    assert!((store.tokens_level("d", &l, half).unwrap() - 900.0).abs() < 1e-6);
}

#[test]
fn a_remaining_told_at_admission_counts_what_left_the_window_since() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000);
    store.reserve_now("d", &l, charge(300), t0);
    let ticket = admitted(store.reserve_now("d", &l, charge(100), t0 + secs(9.9)));
    // The upstream admitted it with 600 left; the 300 left both windows before the answer.
    let answered = t0 + secs(10.2);
    let settlement = Settlement {
        ticket,
        remaining_tokens: Some(600),
        ..Settlement::default()
    };
    store.settle_now("d", &l, settlement, answered);
    assert!(
        (store.tokens_level("d", &l, answered).unwrap() - 900.0).abs() < 1e-6,
        "a stale remaining is not a lower one"
    );
    // The next answer says 600 are left where the router's window has 800: 200 more are used
    // upstream than the router saw, until the reset the upstream named.
    let ticket = admitted(store.reserve_now("d", &l, charge(100), answered));
    let settlement = Settlement {
        ticket,
        remaining_tokens: Some(600),
        reset: Some(secs(2.0)),
        ..Settlement::default()
    };
    store.settle_now("d", &l, settlement, answered);
    assert!((store.tokens_level("d", &l, answered).unwrap() - 600.0).abs() < 1e-6);
    let reset = answered + secs(2.0);
    assert!((store.tokens_level("d", &l, reset).unwrap() - 800.0).abs() < 1e-6);
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

/// Applies `ops` to `store`'s deployment `d` under `l` from `t0`: each admission's time and
/// the tokens it kept in the end (its estimate, what it settled at, or nothing when released),
/// in the order admitted; and the tokens left after each op.
fn apply(
    store: &MemoryStore,
    l: &Limits,
    ops: &[Op],
    t0: Instant,
) -> (Vec<(Instant, f64)>, Vec<f64>) {
    let mut now = t0;
    // Open: (ticket, cost, index into kept).
    let mut open: Vec<(u64, u64, usize)> = Vec::new();
    let mut kept: Vec<(Instant, f64)> = Vec::new();
    let mut levels = Vec::new();
    for op in ops {
        match *op {
            Op::Reserve(cost) => {
                if let Admission::Admitted { ticket, .. } =
                    store.reserve_now("d", l, charge(cost), now)
                {
                    open.push((ticket, cost, kept.len()));
                    kept.push((now, cost as f64));
                }
            }
            Op::Settle { which, used_share } if !open.is_empty() => {
                let (ticket, cost, index) = open.swap_remove(which % open.len());
                let used = (cost as f64 * used_share).round() as i64;
                let back = cost.cast_signed() - used;
                let settlement = Settlement {
                    ticket,
                    tokens_back: back,
                    ..Settlement::default()
                };
                store.settle_now("d", l, settlement, now);
                kept[index].1 = used as f64;
            }
            Op::Release(which) if !open.is_empty() => {
                let (ticket, cost, index) = open.swap_remove(which % open.len());
                store.settle_now("d", l, Settlement::release(ticket, charge(cost)), now);
                kept[index].1 = 0.0;
            }
            Op::Wait(ms) => now += Duration::from_millis(ms),
            _ => {}
        }
        levels.push(store.tokens_level("d", l, now).unwrap_or_default());
    }
    (kept, levels)
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
    /// Whatever the order of admissions, settlements, releases and waits: what is left never
    /// goes below zero nor above the capacity, and no stretch of a window's length holds more
    /// than a window's quota of what was admitted and kept: the property that makes a log
    /// safe against an upstream counting over fixed, sliding or provisioned windows. (That
    /// nothing leaks is the reservation's property, tested on `Reservation` in router-facade.)
    #[test]
    fn no_window_holds_more_than_its_quota(
        ops in prop::collection::vec(arb_op(), 0..150),
        window_ms in 500u64..20_000,
    ) {
        let store = MemoryStore::new();
        let l = Limits { window: Duration::from_millis(window_ms), ..limits(60_000 * 1_000 / window_ms) };
        let capacity = l.tokens().unwrap().capacity;
        let t0 = Instant::now();
        let (kept, levels) = apply(&store, &l, &ops, t0);
        for level in levels {
            prop_assert!(level >= -1e-6, "negative: {level}");
            prop_assert!(level <= capacity + 1e-6, "over capacity: {level}");
        }
        for (end, _) in &kept {
            let held: f64 = kept
                .iter()
                .filter(|(at, _)| at <= end && *end - *at < l.window)
                .map(|(_, tokens)| tokens)
                .sum();
            prop_assert!(held <= capacity + 1e-6, "{held} in the window ending at {:?}", *end - t0);
        }
    }
}

fn provisioned(tpm: u64, window: Duration) -> Limits {
    Limits {
        window,
        model: QuotaModel::Provisioned,
        ..limits(tpm)
    }
}

#[test]
fn provisioned_admits_while_under_full_utilisation_and_drains_in_order() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    // 30,000 TPM over 1 s: 500 tokens of utilisation, draining 500 a second.
    let l = provisioned(30_000, Duration::from_secs(1));
    assert_eq!(margin(l.window), Duration::from_millis(10));
    admitted(store.reserve_now("d", &l, charge(291), t0));
    // Under 100 %: admitted although it takes utilisation over (a window log would refuse it).
    let Admission::Admitted { tokens_left, .. } = store.reserve_now("d", &l, charge(291), t0)
    else {
        panic!("under full utilisation, admitted");
    };
    assert!(
        (tokens_left.unwrap() + 82.0).abs() < 1e-6,
        "{tokens_left:?}"
    );
    // Over 100 % now: refused until the first has drained (291 / 500 s) and the margin.
    let Admission::Denied { retry_after, .. } = store.reserve_now("d", &l, charge(1), t0) else {
        panic!("at full utilisation, refused");
    };
    assert_eq!(retry_after, secs(0.582 + 0.010));
    admitted(store.reserve_now("d", &l, charge(291), t0 + retry_after));
    // The third drains after the second: 3 × 291 / 500 s from the start.
    let Admission::Denied { retry_after, .. } =
        store.reserve_now("d", &l, charge(291), t0 + secs(0.6))
    else {
        panic!("the second and third hold 582");
    };
    assert!(
        (retry_after.as_secs_f64() - (1.164 + 0.010 - 0.6)).abs() < 1e-6,
        "{retry_after:?}"
    );
    // Requests are not metered under provisioned throughput.
    let counted = Limits {
        rpm: Some(1),
        ..provisioned(30_000, Duration::from_secs(1))
    };
    assert!(counted.requests().is_none());
    let later = t0 + secs(10.0);
    admitted(store.reserve_now("e", &counted, charge(10), later));
    admitted(store.reserve_now("e", &counted, charge(10), later));
}

#[test]
fn a_settlement_redraws_the_drain_across_idle_stretches_and_what_is_taken() {
    // 60,000 TPM over 1 s: 1,000 tokens of utilisation, draining 1,000 a second; the margin
    // is 10 ms.
    let l = provisioned(60_000, Duration::from_secs(1));
    let store = MemoryStore::new();
    let t0 = Instant::now();
    // The first drains by 0.4 s and is still held (until 0.41 s) when the second arrives at
    // 0.405 s, to an idle bucket: the second drains from its arrival, by 0.505 s.
    let first = admitted(store.reserve_now("d", &l, charge(400), t0));
    admitted(store.reserve_now("d", &l, charge(100), t0 + secs(0.405)));
    // Giving back the whole first does not make the second drain any sooner: the upstream
    // began draining it when it arrived. A third of 950 drains after it, by 1.455 s.
    store.settle_now("d", &l, back(first, 400), t0 + secs(0.405));
    admitted(store.reserve_now("d", &l, charge(950), t0 + secs(0.405)));
    assert_eq!(
        store.tokens_level("d", &l, t0 + secs(1.46)),
        Some(1_000.0 - 950.0),
        "the third is held until it has drained"
    );
    // Taking more moves the drain later: what follows leaves later, not just the one settled.
    let store = MemoryStore::new();
    let first = admitted(store.reserve_now("d", &l, charge(0), t0));
    admitted(store.reserve_now("d", &l, charge(400), t0));
    store.settle_now("d", &l, back(first, -300), t0);
    // 300 then 400: drained by 0.3 s and 0.7 s, each held 10 ms more.
    assert_eq!(store.tokens_level("d", &l, t0 + secs(0.305)), Some(300.0));
    assert_eq!(store.tokens_level("d", &l, t0 + secs(0.705)), Some(600.0));
    assert_eq!(store.tokens_level("d", &l, t0 + secs(0.715)), Some(1_000.0));
}

fn back(ticket: u64, tokens: i64) -> Settlement {
    Settlement {
        ticket,
        tokens_back: tokens,
        ..Settlement::default()
    }
}

#[test]
fn provisioned_serves_a_steady_load_at_the_drain_rate_where_a_window_log_cannot() {
    // 291-token requests against 500 tokens a second: a window holds one whole request, so
    // a log admits 291 of every 500; provisioned throughput drains all 500.
    let served = |l: &Limits| {
        let store = MemoryStore::new();
        let t0 = Instant::now();
        let mut tokens = 0;
        for ms in (0..60_000).step_by(5) {
            if let Admission::Admitted { .. } =
                store.reserve_now("d", l, charge(291), t0 + Duration::from_millis(ms))
            {
                tokens += 291;
            }
        }
        f64::from(tokens) / (500.0 * 60.0)
    };
    let window = served(&Limits {
        window: Duration::from_secs(1),
        ..limits(30_000)
    });
    let provisioned = served(&provisioned(30_000, Duration::from_secs(1)));
    assert!(window < 0.6, "a window log: {window}");
    // At most the drain rate plus what a full bucket and one overshooting request hold.
    let most = 1.0 + (500.0 + 291.0) / (500.0 * 60.0);
    assert!(
        provisioned > 0.99 && provisioned <= most,
        "provisioned: {provisioned}"
    );
}

/// Like [`arb_op`], busier: mostly admissions, with short waits between them.
fn arb_busy_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::Strategy as _;
    proptest::prop_oneof![
        4 => (1u64..1_000).prop_map(Op::Reserve),
        1 => (any::<usize>(), 0.0f64..=1.0)
            .prop_map(|(which, used_share)| Op::Settle { which, used_share }),
        1 => any::<usize>().prop_map(Op::Release),
        2 => (0u64..300).prop_map(Op::Wait),
    ]
}

proptest! {
    /// Whatever the order of admissions, settlements, releases and waits, an upstream that
    /// meters provisioned throughput (utilisation draining at the limit's rate, a request
    /// admitted while under 100 %) charged with what each admission kept admits every
    /// request the log admitted.
    #[test]
    fn provisioned_throughput_admits_what_the_log_admits(
        ops in prop::collection::vec(arb_busy_op(), 0..200),
        window_ms in 500u64..20_000,
        tpm in 600u64..200_000,
    ) {
        let store = MemoryStore::new();
        let l = provisioned(tpm, Duration::from_millis(window_ms));
        let shape = l.tokens().unwrap();
        let (kept, _) = apply(&store, &l, &ops, Instant::now());
        // The upstream's utilisation just before each admission, in the order admitted.
        let mut level = 0.0_f64;
        let mut last: Option<Instant> = None;
        for (at, tokens) in &kept {
            if let Some(last) = last {
                level = (level - shape.rate * (*at - last).as_secs_f64()).max(0.0);
            }
            prop_assert!(level < shape.capacity + 1e-6, "refused at {level} of {}", shape.capacity);
            level += tokens;
            last = Some(*at);
        }
    }
}

#[test]
fn a_learned_share_scales_the_limits_over_the_same_window() {
    // 6,000 TPM over 10 s: 1,000 tokens. Half of it: 500, over the same 10 s.
    let learned = Learned { share: 0.5 };
    let limits = learned.apply(&Limits::per_minute(Some(6_000), Some(60)));
    assert_eq!(limits.tpm, Some(3_000));
    assert_eq!(limits.rpm, Some(30));
    assert_eq!(limits.window, Duration::from_secs(10));
    let tokens = limits.tokens().unwrap();
    assert!((tokens.capacity - 500.0).abs() < 1e-6, "{tokens:?}");
    assert_eq!(Learned::FULL.apply(&limits), limits);
}

#[test]
fn a_refusal_cuts_to_what_the_window_held_once_per_window_and_successes_grow_it_back() {
    let policy = Learning::default();
    let window = Duration::from_secs(10);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut learner = Learner::new(t0);
    // The window held 70 % of the limits when the upstream said it was full.
    assert!(learner.refused(&policy, window, 0.7, at(0)));
    assert!((learner.learned.share - 0.7).abs() < 1e-12);
    // The 429s of the same overshoot teach nothing more.
    assert!(!learner.refused(&policy, window, 0.1, at(3)));
    assert!((learner.learned.share - 0.7).abs() < 1e-12);
    // A success counts the time served since the last change, at most one window.
    learner.served(&policy, window, at(6));
    assert!((learner.learned.share - (0.7 + 0.2 * 0.1)).abs() < 1e-9);
    learner.served(&policy, window, at(600));
    let grown = 0.72 + 0.2 * 10.0 / 60.0;
    assert!(
        (learner.learned.share - grown).abs() < 1e-9,
        "an idle stretch counts one window: {:?}",
        learner.learned
    );
    // A refusal always cuts, at least to 95 %, even when the window held more...
    assert!(learner.refused(&policy, window, 2.0, at(611)));
    assert!((learner.learned.share - grown * 0.95).abs() < 1e-9);
    // ...and at most to half, however little it held.
    let before = learner.learned.share;
    assert!(learner.refused(&policy, window, 0.0, at(622)));
    assert!((learner.learned.share - before * 0.5).abs() < 1e-9);
}

#[test]
fn a_refusal_measures_what_the_upstream_admits() {
    let store = MemoryStore::new();
    let l = limits(60_000); // 10,000 tokens a window
    let t0 = Instant::now();
    for i in 0..6 {
        assert!(matches!(
            store.reserve_now("d", &l, charge(1_000), t0 + secs(f64::from(i))),
            Admission::Admitted { .. }
        ));
    }
    // The upstream refuses the seventh although 4,000 are left: it admits 6,000 a window.
    let refused_at = t0 + secs(6.0);
    let learned = store.refused_now("d", &l, secs(4.0), refused_at);
    assert_eq!(store.learned("d"), learned);
    assert!((learned.share - 0.6).abs() < 1e-9, "{learned:?}");
    // Cooling until the wait ends, and then the window is full at the learned share: the
    // next admission waits for the oldest to leave, not for the configured room.
    let Admission::Denied { cooling: true, .. } =
        store.reserve_now("d", &l, charge(1_000), refused_at)
    else {
        panic!("cooling");
    };
    let after = refused_at + secs(4.0);
    let Admission::Denied { retry_after, .. } = store.reserve_now("d", &l, charge(1_000), after)
    else {
        panic!("6,000 of 6,000 held");
    };
    assert_eq!(
        retry_after,
        secs(0.05),
        "the first leaves at 10 s and the margin"
    );
    let Admission::Admitted { learned: told, .. } =
        store.reserve_now("d", &l, charge(1_000), after + retry_after)
    else {
        panic!("admitted once the first left");
    };
    assert_eq!(told, learned, "an admission says what the store keeps to");
}

proptest! {
    /// No sequence of refusals (whatever the window held) and successes takes the share
    /// outside [floor, 1], and serving long enough always brings it back to the configured
    /// limits: learning never shuts a deployment, and never opens it beyond what was
    /// configured.
    #[test]
    fn learning_stays_within_bounds_and_always_recovers(
        events in prop::collection::vec((any::<bool>(), 0u64..30_000, -1.0f64..3.0), 0..200),
        window_ms in 500u64..20_000,
    ) {
        let policy = Learning::default();
        let window = Duration::from_millis(window_ms);
        let t0 = Instant::now();
        let mut now = t0;
        let mut learner = Learner::new(t0);
        for (refused, gap, held) in events {
            now += Duration::from_millis(gap);
            let before = learner.learned.share;
            if refused {
                if learner.refused(&policy, window, held, now) {
                    prop_assert!(learner.learned.share < before || before <= policy.floor, "a refusal cuts");
                }
            } else {
                learner.served(&policy, window, now);
            }
            let share = learner.learned.share;
            prop_assert!((policy.floor - 1e-12..=1.0).contains(&share), "{share}");
        }
        // The share regrows by 0.2 a minute: at most five minutes from the floor.
        for _ in 0..=(5 * 60_000 / window_ms + 1) {
            now += window;
            learner.served(&policy, window, now);
        }
        prop_assert!(learner.learned.is_full(), "{:?}", learner.learned);
    }
}

#[test]
fn a_checked_policy_names_the_field_out_of_range() {
    let d = Learning::default();
    assert_eq!(
        Learning::checked(d.cut, d.deepest_cut, d.floor, d.regrow).unwrap(),
        d
    );
    let message = |r: Result<Learning, Error>| r.unwrap_err().message().unwrap().to_owned();
    assert!(message(Learning::checked(0.0, 0.0, 0.05, 0.2)).starts_with("cut = 0:"));
    assert!(message(Learning::checked(0.9, 0.5, f64::NAN, 0.2)).starts_with("floor = NaN:"));
    assert!(
        message(Learning::checked(0.6, 0.7, 0.05, 0.2))
            .starts_with("deepest_cut = 0.7 is above cut = 0.6")
    );
    assert!(message(Learning::checked(0.9, 0.5, 0.05, -1.0)).starts_with("regrow = -1:"));
    // Where `new` would clamp, `checked` refuses.
    assert!(Learning::checked(1.5, 0.5, 0.05, 0.2).is_err());
}

#[test]
fn a_sliding_window_opens_in_the_bursts_it_admitted() {
    let store = MemoryStore::new();
    let t0 = Instant::now();
    let l = limits(6_000); // 1,000 tokens a 10 s window, 50 ms margin.
    for at in [0.0, 0.0, 0.0, 4.0, 4.0] {
        admitted(store.reserve_now("d", &l, charge(200), t0 + secs(at)));
    }
    let now = t0 + secs(5.0);
    let far = now + secs(3_600.0);
    let openings: Vec<f64> = store
        .openings_now("d", &l, charge(200), 6, now, far)
        .iter()
        .map(|at| (*at - t0).as_secs_f64())
        .collect();
    // The three admitted together leave together, then the two, then the first of those
    // admitted at the first openings. An even rate (100 tokens a second) would have said
    // every 2 s from 7 s.
    let expected = [10.05, 10.05, 10.05, 14.05, 14.05, 20.1];
    assert_eq!(openings.len(), expected.len(), "{openings:?}");
    for (got, want) in openings.iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{openings:?}");
    }
    assert_eq!(
        store
            .openings_now("d", &l, charge(200), 6, now, t0 + secs(15.0))
            .len(),
        5,
        "none later than asked"
    );
    assert_eq!(store.held("d", now), (1_000.0, 5.0), "nothing was reserved");
    // A shared cooldown comes first; so does what was learned.
    store.cool_down_now("d", secs(7.0), now);
    let cooled = store.openings_now("d", &l, charge(200), 1, now, far);
    assert_eq!(cooled, vec![t0 + secs(12.0)]);
}

#[test]
fn a_store_that_keeps_no_log_cannot_tell_its_openings() {
    #[derive(Debug)]
    struct Counter;
    #[async_trait]
    impl StateStore for Counter {
        async fn reserve(
            &self,
            _: &str,
            _: &Limits,
            _: Charge,
            _: Instant,
        ) -> Result<Admission, Error> {
            Ok(Admission::Denied {
                retry_after: Duration::ZERO,
                cooling: false,
            })
        }
        async fn settle(
            &self,
            _: &str,
            _: &Limits,
            _: Settlement,
            _: Instant,
        ) -> Result<(), Error> {
            Ok(())
        }
        async fn cool_down(&self, _: &str, _: Duration, _: Instant) -> Result<(), Error> {
            Ok(())
        }
    }
    let now = Instant::now();
    let openings =
        futures_executor_block_on(Counter.openings("d", &limits(6_000), charge(1), 3, now, now));
    assert_eq!(openings.unwrap(), None);
}

/// Runs a future that never waits (the stores' default methods).
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the default waits for nothing"),
    }
}

proptest! {
    /// Whatever the log holds (window or provisioned, any window length and request sizes),
    /// each opening is the first moment the next request fits after those before it: it is
    /// admitted then, and would not have been a millisecond before.
    #[test]
    fn openings_are_when_each_next_request_first_fits(
        admissions in prop::collection::vec((1u64..1_500, 0u64..3_000), 0..60),
        window_ms in 500u64..20_000,
        size in 1u64..1_200,
        n in 1usize..20,
        is_provisioned in any::<bool>(),
    ) {
        let window = Duration::from_millis(window_ms);
        let tpm = 60_000 * 1_000 / window_ms;
        let l = if is_provisioned {
            provisioned(tpm, window)
        } else {
            Limits { window, ..limits(tpm) }
        };
        let mut log = Log::default();
        let mut now = Instant::now();
        for (ticket, (tokens, wait)) in admissions.into_iter().enumerate() {
            now += Duration::from_millis(wait);
            let _ = log.admit(&l, charge(tokens), ticket as u64, now);
        }
        let openings = log.openings(&l, charge(size), n, now, now + secs(1e6));
        prop_assert_eq!(openings.len(), n);
        let mut check = log.clone();
        let mut previous = now;
        for at in openings {
            prop_assert!(at >= previous, "in order");
            let before = at.checked_sub(Duration::from_millis(1)).unwrap_or(at).max(previous);
            if before < at {
                prop_assert!(
                    !check.clone().wait_for(&l, charge(size), before).is_zero(),
                    "it would have fitted before its opening"
                );
            }
            prop_assert!(check.admit(&l, charge(size), 0, at).is_ok(), "it fits at its opening");
            previous = at;
        }
    }
}

/// What [`Log::openings`] walked before it copied only a prefix: the whole log.
fn openings_of_the_whole(
    log: &Log,
    limits: &Limits,
    charge: Charge,
    n: usize,
    from: Instant,
    by: Instant,
) -> Vec<Instant> {
    let mut log = log.clone();
    let mut at = from;
    let mut openings = Vec::new();
    while openings.len() < n.min(MAX_OPENINGS) {
        at += log.wait_for(limits, charge, at);
        if at > by || log.admit(limits, charge, 0, at).is_err() {
            break;
        }
        openings.push(at);
    }
    openings
}

#[derive(Debug, Clone)]
enum LogOp {
    Admit(u64),
    Adjust { which: usize, back: f64 },
    Refused(u64),
    Unseen(u64),
    Wait(u64),
}

fn arb_log_op() -> impl proptest::strategy::Strategy<Value = LogOp> {
    use proptest::prelude::Strategy as _;
    proptest::prop_oneof![
        4 => (1u64..1_500).prop_map(LogOp::Admit),
        1 => (any::<usize>(), -200.0f64..400.0)
            .prop_map(|(which, back)| LogOp::Adjust { which, back }),
        1 => (0u64..3_000).prop_map(LogOp::Refused),
        1 => (0u64..700).prop_map(LogOp::Unseen),
        2 => (0u64..2_000).prop_map(LogOp::Wait),
    ]
}

proptest! {
    /// The walk to a waiting request's opening copies only the marks it can reach, and finds
    /// exactly the openings a walk of the whole log finds: for windows and provisioned
    /// throughput, any mix of admissions (some larger than a window), settlements, refusals'
    /// paced holds, use the router did not see, cooldowns, and any number of openings.
    #[test]
    fn openings_walked_from_a_prefix_are_those_of_the_whole_log(
        ops in prop::collection::vec(arb_log_op(), 0..120),
        provisioned_model in any::<bool>(),
        window_ms in 500u64..12_000,
        cost in 1u64..1_200,
        n in 0usize..200,
        cooling_ms in prop::option::of(0u64..15_000),
    ) {
        let l = Limits {
            window: Duration::from_millis(window_ms),
            model: if provisioned_model { QuotaModel::Provisioned } else { QuotaModel::Window },
            ..Limits::per_minute(Some(60_000 * 1_000 / window_ms), Some(600))
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut log = Log::default();
        let mut tickets = Vec::new();
        let mut next = 0;
        for op in ops {
            log.expire(now);
            match op {
                LogOp::Admit(tokens) => {
                    next += 1;
                    if log.admit(&l, charge(tokens), next, now).is_ok() {
                        tickets.push(next);
                    }
                }
                LogOp::Adjust { which, back } if !tickets.is_empty() => {
                    let ticket = tickets[which % tickets.len()];
                    log.adjust(&l, ticket, back, 0.0);
                }
                LogOp::Refused(wait) => log.fill_paced(&l, now + Duration::from_millis(wait), || {
                    next += 1;
                    next
                }),
                LogOp::Unseen(tokens) => {
                    next += 1;
                    let until = now + phantom_hold(&l, None);
                    log.hold(next, until, (tokens as f64, 0.0), true, None);
                }
                LogOp::Wait(ms) => now += Duration::from_millis(ms),
                LogOp::Adjust { .. } => {}
            }
        }
        log.expire(now);
        let from = now + Duration::from_millis(cooling_ms.unwrap_or(0));
        let by = from + Duration::from_secs(60);
        let asked = charge(cost);
        let walked = log.openings(&l, asked, n, from, by);
        let whole = openings_of_the_whole(&log, &l, asked, n, from, by);
        prop_assert_eq!(walked, whole);
        prop_assert!(log.reach(&l, asked, n, from) <= log.marks.len());
    }
}
