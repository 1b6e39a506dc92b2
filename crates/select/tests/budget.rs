//! Properties of the token budget.

#![allow(clippy::unwrap_used)]

use afo_select::{BudgetBound, BudgetRequest, Error, Task, TokenBudget, analyze};
use proptest::prelude::*;

fn task() -> impl Strategy<Value = Task> {
    prop::sample::select(Task::ALL.to_vec())
}

proptest! {
    #[test]
    fn never_past_the_context_or_the_kv_room(
        task in task(),
        input in 0u64..200_000,
        context in 1u64..200_000,
        kv_bytes in 0u64..(1u64 << 34),
        per_token in 1u64..200_000,
        use_kv in any::<bool>(),
        caller in prop::option::of(1u64..100_000),
    ) {
        let mut req = BudgetRequest::new(task, input, context);
        if use_kv {
            req = req.kv_headroom(kv_bytes, per_token);
        }
        if let Some(n) = caller {
            req = req.max_tokens(n);
        }
        let context_left = context.saturating_sub(input);
        let kv_room = use_kv.then(|| (kv_bytes / per_token).saturating_sub(input));
        let room = kv_room.map_or(context_left, |k| k.min(context_left));
        match TokenBudget::default().plan(&req) {
            Ok(b) => {
                prop_assert!(room > 0);
                prop_assert!(b.max_tokens >= 1);
                prop_assert!(b.max_tokens <= context_left);
                if let Some(k) = kv_room {
                    prop_assert!(b.max_tokens <= k);
                }
                prop_assert_eq!(b.max_tokens, b.wanted.min(room));
                match b.bound {
                    BudgetBound::CallerOverride => prop_assert_eq!(Some(b.max_tokens), caller),
                    BudgetBound::TaskDefault => prop_assert!(caller.is_none()),
                    BudgetBound::ContextLeft => prop_assert_eq!(b.max_tokens, context_left),
                    BudgetBound::KvHeadroom => prop_assert_eq!(Some(b.max_tokens), kv_room),
                    _ => prop_assert!(false, "unknown bound"),
                }
            }
            Err(Error::NoTokenRoom { .. }) => prop_assert_eq!(room, 0),
            Err(other) => prop_assert!(false, "{other}"),
        }
    }

    #[test]
    fn the_callers_values_win_within_the_room(
        task in task(),
        max_tokens in 1u64..4096,
        temperature in 0.0f32..2.0,
    ) {
        let req = BudgetRequest::new(task, 100, 8192)
            .max_tokens(max_tokens)
            .temperature(temperature);
        let b = TokenBudget::default().plan(&req).unwrap();
        prop_assert_eq!(b.max_tokens, max_tokens);
        prop_assert_eq!(b.bound, BudgetBound::CallerOverride);
        prop_assert_eq!(b.temperature, temperature);
        prop_assert!(b.temperature_from_caller);
    }
}

#[test]
fn task_temperatures() {
    let p = TokenBudget::default();
    let plan = |task| p.plan(&BudgetRequest::new(task, 10, 4096)).unwrap();
    for task in [Task::Analysis, Task::Summary, Task::Code] {
        let t = plan(task).temperature;
        assert!((0.2..=0.3).contains(&t), "{task}: {t}");
    }
    assert_eq!(plan(Task::Chat).temperature, 0.7);
    assert!(!plan(Task::Chat).temperature_from_caller);
}

#[test]
fn task_comes_from_the_analyzer_and_the_budget_follows() {
    let p = TokenBudget::default();
    let summary = analyze("Summarize this report in three bullet points.", 0);
    let code = analyze("Implement a function that parses dates.", 0);
    assert_eq!((summary.task, code.task), (Task::Summary, Task::Code));
    let b_summary = p
        .plan(&BudgetRequest::new(
            summary.task,
            summary.features.tokens,
            8192,
        ))
        .unwrap();
    let b_code = p
        .plan(&BudgetRequest::new(code.task, code.features.tokens, 8192))
        .unwrap();
    assert!(b_code.max_tokens > b_summary.max_tokens);
    assert!(b_code.temperature < 0.5);
    let json = serde_json::to_value(b_code).unwrap();
    assert_eq!(json["bound"], "task_default");
    assert_eq!(json["task"], "code");
}
