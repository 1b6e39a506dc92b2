//! Ledger properties: no admitted plan predicts a peak past the cutline, reservations
//! always come back, badge and health are monotonic, and many threads admitting at
//! once never over-commit.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use afo_guard::{
    Admission, HealthInputs, KindBytes, Ledger, MemoryBudget, MemoryKind, PlanOption, StatusBadge,
    badge, health_score,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// A load: weights reserved when they fit.
    Load(u64),
    /// A run with its plans, largest first.
    Run(Vec<u64>),
    /// A model measured bigger than its estimate: bytes that exist whether or not
    /// they fit.
    Existing(u64),
    /// An RSS sample.
    Observe(u64),
    /// Something ends.
    Release(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..400_000).prop_map(Op::Load),
        proptest::collection::vec(0u64..500_000, 1..4).prop_map(Op::Run),
        (0u64..100_000).prop_map(Op::Existing),
        (0u64..1_500_000).prop_map(Op::Observe),
        (0usize..8).prop_map(Op::Release),
    ]
}

proptest! {
    /// Whatever happened before (loads, existing bytes, RSS samples far above the
    /// ledger, releases), an admitted plan's predicted peak (reserved + unaccounted +
    /// the plan) is never above the cutline, and reservations add up.
    #[test]
    fn no_admitted_plan_predicts_a_peak_past_the_cutline(
        cutline in 1u64..1_000_000,
        margin in 0u64..100_000,
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        let ledger = Ledger::with_min_margin(cutline, margin);
        let mut held = Vec::new();
        for op in ops {
            let before = ledger.snapshot();
            match op {
                Op::Load(bytes) => {
                    if let Ok(r) = ledger.try_reserve(MemoryKind::Weights, bytes) {
                        prop_assert!(before.reserved_total() + bytes + before.margin <= cutline);
                        held.push(r);
                    } else {
                        prop_assert!(before.reserved_total() + bytes + before.margin > cutline);
                    }
                }
                Op::Run(sizes) => {
                    let plans: Vec<_> = sizes
                        .iter()
                        .map(|&b| PlanOption::new(format!("{b}"), KindBytes::of(MemoryKind::KvCache, b)))
                        .collect();
                    match ledger.admit(&plans) {
                        Admission::Admit { index, predicted_peak, reservation } => {
                            prop_assert!(predicted_peak <= cutline, "{predicted_peak} > {cutline}");
                            prop_assert_eq!(reservation.bytes(), sizes[index]);
                            // Every plan before the one taken did not fit.
                            for &b in &sizes[..index] {
                                prop_assert!(before.reserved_total() + b + before.margin > cutline);
                            }
                            held.push(reservation);
                        }
                        Admission::Refuse(r) => {
                            prop_assert_eq!(r.needed, sizes[0]);
                            for &b in &sizes {
                                prop_assert!(before.reserved_total() + b + before.margin > cutline);
                            }
                        }
                    }
                }
                Op::Existing(bytes) => held.push(ledger.reserve_existing(MemoryKind::Weights, bytes)),
                Op::Observe(rss) => {
                    let unaccounted = ledger.observe_rss(rss);
                    prop_assert_eq!(unaccounted, rss.saturating_sub(before.reserved_total()));
                }
                Op::Release(i) => {
                    if !held.is_empty() {
                        let i = i % held.len();
                        held.swap_remove(i);
                    }
                }
            }
            let sum: u64 = held.iter().map(|r| r.bytes()).sum();
            prop_assert_eq!(ledger.reserved(), sum);
        }
        drop(held);
        prop_assert_eq!(ledger.reserved(), 0);
        prop_assert_eq!(ledger.runs(), 0);
    }

    #[test]
    fn badge_is_monotonic(cutline in 1u64..u64::MAX / 2, a in any::<u64>(), b in any::<u64>(),
                          warn in 0.01f64..=1.0) {
        let budget = MemoryBudget::builder().cutline(cutline).warn_fraction(warn).build().unwrap();
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(badge(lo, &budget) <= badge(hi, &budget));
        prop_assert_eq!(badge(hi, &budget) == StatusBadge::OverCutline, hi > cutline);
    }

    #[test]
    fn health_is_monotonic_and_bounded(cutline in 1u64..1 << 40, a in 0u64..1 << 41,
                                       b in 0u64..1 << 41, error: bool, fallback: bool) {
        let h = |peak| health_score(HealthInputs { peak_bytes: peak, cutline_bytes: cutline, error, fallback });
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(h(lo) >= h(hi));
        prop_assert!((0.0..=100.0).contains(&h(lo)));
    }
}

fn kv(bytes: u64) -> PlanOption {
    PlanOption::new("kv", KindBytes::of(MemoryKind::KvCache, bytes))
}

#[test]
fn reservations_release_on_panic() {
    let ledger = Ledger::with_min_margin(1000, 0);
    let l = ledger.clone();
    let result = std::panic::catch_unwind(move || {
        let Admission::Admit { reservation, .. } = l.admit(&[kv(600)]) else {
            unreachable!()
        };
        assert_eq!(l.reserved(), 600);
        std::hint::black_box(&reservation);
        panic!("the run failed");
    });
    assert!(result.is_err());
    assert_eq!(ledger.reserved(), 0);
    assert!(matches!(ledger.admit(&[kv(1000)]), Admission::Admit { .. }));
}

#[test]
fn two_runs_cannot_both_squeeze_under_the_cutline() {
    let ledger = Ledger::with_min_margin(1000, 0);
    let _weights = ledger.try_reserve(MemoryKind::Weights, 100).unwrap();
    let first = ledger.admit(&[kv(600)]);
    assert!(matches!(first, Admission::Admit { index: 0, .. }));
    let second = match ledger.admit(&[kv(600), kv(250)]) {
        Admission::Admit {
            index,
            predicted_peak,
            reservation,
        } => {
            assert_eq!(index, 1);
            assert_eq!(predicted_peak, 950);
            reservation
        }
        Admission::Refuse(r) => panic!("the smaller plan fits: {r}"),
    };
    match ledger.admit(&[kv(600)]) {
        Admission::Refuse(r) => {
            let text = r.to_string();
            assert!(text.contains("needs 600 B"), "{text}");
            assert_eq!((r.needed, r.reserved, r.cutline), (600, 950, 1000));
            assert_eq!(r.available(), 50);
            assert!(!r.never_fits());
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop((first, second));
    assert_eq!(ledger.reserved(), 100);
}

#[test]
fn concurrent_admissions_never_over_commit() {
    let ledger = Ledger::with_min_margin(10_000, 0);
    let peak = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let ledger = ledger.clone();
            let peak = Arc::clone(&peak);
            let admitted = Arc::clone(&admitted);
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let need = 100 + (t * 37 + i * 11) % 900;
                    if let Admission::Admit { reservation, .. } = ledger.admit(&[kv(need)]) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        peak.fetch_max(ledger.reserved(), Ordering::Relaxed);
                        std::hint::black_box(&reservation);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(peak.load(Ordering::Relaxed) <= 10_000);
    assert!(ledger.snapshot().peak_reserved <= 10_000);
    assert!(admitted.load(Ordering::Relaxed) > 0);
    assert_eq!(ledger.reserved(), 0);
}
