//! Admission properties: never over the cutline, reservations always released, badge
//! and health monotonic; many threads admitting at once never over-commit.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use afo_guard::{
    Admission, Guard, HealthInputs, MemoryBudget, PlanOption, StatusBadge, badge, health_score,
};
use proptest::prelude::*;

proptest! {
    #[test]
    fn never_admits_past_the_cutline(
        cutline in 1u64..1_000_000,
        in_use in 0u64..1_000_000,
        requests in proptest::collection::vec(0u64..400_000, 1..30),
        alt in 0u64..400_000,
    ) {
        let guard = Guard::new(cutline);
        let mut held = Vec::new();
        for (i, need) in requests.into_iter().enumerate() {
            let reserved_before = guard.reserved();
            let alternatives = [PlanOption { name: "smaller".into(), predicted_bytes: alt }];
            match guard.admit(need, in_use, &alternatives) {
                Admission::Admit(r) => {
                    prop_assert!(in_use + reserved_before + need <= cutline);
                    prop_assert_eq!(guard.reserved(), reserved_before + need);
                    held.push(r);
                }
                Admission::Degrade { plan, reason, .. } => {
                    prop_assert!(in_use + reserved_before + need > cutline);
                    prop_assert!(in_use + reserved_before + plan.predicted_bytes <= cutline);
                    prop_assert_eq!(reason.needed, need);
                }
                Admission::Refuse(r) => {
                    prop_assert!(in_use + reserved_before + need > cutline);
                    prop_assert!(in_use + reserved_before + alt > cutline);
                    prop_assert_eq!(r.reserved, reserved_before);
                }
            }
            // Release some reservations along the way.
            if i % 3 == 2 {
                held.pop();
            }
            prop_assert!(guard.reserved() + in_use <= cutline.max(in_use));
        }
        drop(held);
        prop_assert_eq!(guard.reserved(), 0);
        prop_assert_eq!(guard.runs(), 0);
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

#[test]
fn reservations_release_on_panic() {
    let guard = Guard::new(1000);
    let g = guard.clone();
    let result = std::panic::catch_unwind(move || {
        let Admission::Admit(_reservation) = g.admit(600, 0, &[]) else {
            unreachable!()
        };
        assert_eq!(g.reserved(), 600);
        panic!("the run failed");
    });
    assert!(result.is_err());
    assert_eq!(guard.reserved(), 0);
    assert!(matches!(guard.admit(1000, 0, &[]), Admission::Admit(_)));
}

#[test]
fn two_runs_cannot_both_squeeze_under_the_cutline() {
    let guard = Guard::new(1000);
    let first = guard.admit(600, 100, &[]);
    assert!(matches!(first, Admission::Admit(_)));
    match guard.admit(
        600,
        100,
        &[PlanOption {
            name: "int4".into(),
            predicted_bytes: 250,
        }],
    ) {
        Admission::Degrade {
            index,
            plan,
            reason,
        } => {
            assert_eq!(index, 0);
            assert_eq!(plan.name, "int4");
            assert_eq!(reason.available(), 300);
        }
        other => panic!("expected Degrade, got {other:?}"),
    }
    match guard.admit(600, 100, &[]) {
        Admission::Refuse(r) => {
            let text = r.to_string();
            assert!(text.contains("needs 600 B"), "{text}");
            assert_eq!(
                (r.needed, r.reserved, r.in_use, r.cutline),
                (600, 600, 100, 1000)
            );
        }
        other => panic!("expected Refuse, got {other:?}"),
    }
    drop(first);
    assert!(matches!(guard.admit(600, 100, &[]), Admission::Admit(_)));
}

#[test]
fn concurrent_admissions_never_over_commit() {
    let guard = Guard::new(10_000);
    let peak = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let guard = guard.clone();
            let peak = Arc::clone(&peak);
            let admitted = Arc::clone(&admitted);
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let need = 100 + (t * 37 + i * 11) % 900;
                    if let Admission::Admit(r) = guard.admit(need, 0, &[]) {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        peak.fetch_max(guard.reserved(), Ordering::Relaxed);
                        std::hint::black_box(&r);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(peak.load(Ordering::Relaxed) <= 10_000);
    assert!(admitted.load(Ordering::Relaxed) > 0);
    assert_eq!(guard.reserved(), 0);
}
