//! `pick()` per strategy at 2, 8, 64 and 256 candidates, and `select()` (candidates built from
//! live deployment state) at the same sizes. Target: at most 50 ns and no allocation per pick.
//! Beside them, a waiting decision's walk of a full log to the `n`-th opening (`openings`).

#![expect(
    clippy::print_stdout,
    reason = "the allocation counts are part of the report"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use router_core::{
    Ask, Candidate, Charge, DeploymentState, LatencyClass, Limits, MemoryStore, Rng, Selection,
    Slot, StrategyKind, pick_tiered, select,
};

const SIZES: [usize; 4] = [2, 8, 64, 256];

fn candidates(n: usize) -> Vec<Candidate> {
    (0..n)
        .map(|i| Candidate {
            in_flight: (i * 7 % 13) as u32,
            latency: 0.05 + (i % 5) as f64 * 0.01,
            weight: 1 + (i % 3) as u32,
            priority: 0,
            ..Candidate::default()
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let now = Instant::now();
    let mut group = c.benchmark_group("pick");
    for kind in StrategyKind::ALL {
        let strategy = kind.build();
        for n in SIZES {
            let list = candidates(n);
            let mut rng = Rng::with_seed(1);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &list, |b, list| {
                b.iter(|| strategy.pick(black_box(list), now, &mut rng));
            });
        }
    }
    group.finish();

    // Allocation check, reported with the numbers: none per pick.
    for kind in StrategyKind::ALL {
        let strategy = kind.build();
        let list = candidates(256);
        let mut rng = Rng::with_seed(1);
        let info = allocation_counter::measure(|| {
            for _ in 0..10_000 {
                black_box(pick_tiered(
                    strategy.as_ref(),
                    black_box(&list),
                    now,
                    &mut rng,
                ));
                black_box(strategy.pick(black_box(&list), now, &mut rng));
            }
        });
        println!(
            "allocations in 10,000 picks ({kind}, 256 candidates): {}",
            info.count_total
        );
        assert_eq!(info.count_total, 0, "{kind} allocates");
    }
}

fn selection(c: &mut Criterion) {
    let origin = Instant::now();
    let mut group = c.benchmark_group("select");
    for n in SIZES {
        let states: Vec<Arc<DeploymentState>> = (0..n)
            .map(|_| Arc::new(DeploymentState::new(origin, Duration::from_secs(10))))
            .collect();
        let slots: Vec<Slot<'_>> = states
            .iter()
            .map(|state| Slot {
                state,
                weight: 1,
                priority: 0,
                limits: Limits::default(),
            })
            .collect();
        let strategy = StrategyKind::LeastLatency.build();
        let mut rng = Rng::with_seed(1);
        let mut buffers = Selection::default();
        group.bench_function(BenchmarkId::new("least-latency", n), |b| {
            b.iter(|| {
                select(
                    black_box(&slots),
                    |_| false,
                    Ask {
                        class: LatencyClass::Stream,
                        charge: None,
                    },
                    strategy.as_ref(),
                    Instant::now(),
                    &mut rng,
                    &mut buffers,
                )
            });
        });
    }
    group.finish();
}

/// A waiting decision's walk (`MemoryStore::openings_now`, what `StateStore::openings` runs for
/// each deployment of the group): a sliding 10 s window of 600,000 tokens full of 120-token
/// admissions (5,000 marks, spread over the window), walked to the `n`-th opening.
fn openings(c: &mut Criterion) {
    let now = Instant::now();
    let limits = Limits::per_minute(Some(3_600_000), None);
    let store = MemoryStore::new();
    let charge = Charge {
        tokens: 120,
        requests: 1,
    };
    let marks = 5_000_u32;
    for i in 0..marks {
        let at = now + Duration::from_secs(10).mul_f64(f64::from(i) / f64::from(marks));
        store.reserve_now("d", &limits, charge, at);
    }
    let at = now + Duration::from_secs(10);
    let mut group = c.benchmark_group("openings");
    for n in [1, 64, 1024, 4096] {
        group.bench_function(BenchmarkId::new("sliding-5000-marks", n), |b| {
            b.iter(|| {
                store.openings_now(
                    "d",
                    &limits,
                    charge,
                    black_box(n),
                    at,
                    at + Duration::from_secs(60),
                )
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pick, selection, openings);
criterion_main!(benches);
