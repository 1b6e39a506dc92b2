//! Routing over the example catalog and small catalogs built in code.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use afo_guard::ByteSize;
use afo_select::{
    Capabilities, Catalog, Complexity, Error, ModelCard, PolicyRouter, Query, Rejection,
    RouteContext, Router, Selection, SelectionReason, Task, fallback,
};

fn example() -> Catalog {
    Catalog::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog.toml")).unwrap()
}

fn route(query: &Query, available: ByteSize) -> Result<Selection, Error> {
    PolicyRouter::default().route(query, &example(), &RouteContext::new(available))
}

fn rejections<'a>(s: &'a Selection, id: &str) -> &'a [Rejection] {
    &s.candidates.iter().find(|c| c.id == id).unwrap().rejected
}

const COMPARE: &str = "Compare PostgreSQL and MongoDB for an e-commerce backend: analyze \
    consistency, scaling, operational cost and schema evolution, then recommend one.";

#[test]
fn low_query_takes_the_cheapest_eligible_model() {
    let s = route(&Query::new("Who wrote Hamlet?"), ByteSize::gib(16)).unwrap();
    assert_eq!(s.complexity.level, Complexity::Low);
    assert_eq!(s.model_id, "smollm2-135m-int4");
    assert_eq!(s.reason, SelectionReason::MeetsFloor);
    assert_eq!(s.floor, Some(95.0));
    assert_eq!(s.candidates.len(), 11);
    // The q2_k card is cheaper still but below the registration floor.
    assert!(matches!(
        rejections(&s, "smollm2-135m-q2_k"),
        [
            Rejection::Ineligible {
                score: 88.0,
                min_score: 95.0
            },
            Rejection::BelowFloor { .. }
        ]
    ));
    assert!(
        s.reason_text
            .contains("cheapest model meeting the quality floor 95")
    );
}

#[test]
fn medium_query_needs_a_higher_score() {
    let s = route(
        &Query::new("Explain how a TCP three-way handshake works."),
        ByteSize::gib(16),
    )
    .unwrap();
    assert_eq!(s.complexity.level, Complexity::Medium);
    // int4 (95.3) and q4_1 (95.6) are cheaper but below the floor of 96.
    assert_eq!(s.model_id, "smollm2-135m-int8");
    assert!(matches!(
        rejections(&s, "smollm2-135m-int4"),
        [Rejection::BelowFloor { floor, .. }] if *floor == 96.0
    ));
}

#[test]
fn high_query_goes_to_the_cheapest_model_meeting_97() {
    let s = route(&Query::new(COMPARE), ByteSize::gib(16)).unwrap();
    assert_eq!(s.complexity.level, Complexity::High);
    assert_eq!(s.task, Task::Analysis);
    assert_eq!(s.model_id, "qwen3-vl-2b-int8");
    assert_eq!(s.trinity_score, 97.2);
}

#[test]
fn memory_headroom_rejects_big_models_and_says_so() {
    // With 3 GB, the 2B int8 (2.7 GB) still fits.
    let s = route(&Query::new(COMPARE), ByteSize(3_000_000_000)).unwrap();
    assert_eq!(s.model_id, "qwen3-vl-2b-int8");
    assert!(matches!(
        rejections(&s, "qwen3-vl-4b-int4"),
        [Rejection::TooBig {
            needed_bytes: 3_100_000_000,
            available_bytes: 3_000_000_000
        }]
    ));
    // With 2 GB nothing meeting 97 fits: the best-scoring model that fits, said so.
    let s = route(&Query::new(COMPARE), ByteSize(2_000_000_000)).unwrap();
    assert_eq!(s.reason, SelectionReason::BestBelowFloor);
    assert_eq!(s.model_id, "smollm2-135m-f32");
    assert!(
        s.reason_text
            .contains("no model meets the quality floor 97"),
        "{}",
        s.reason_text
    );
}

#[test]
fn images_require_vision() {
    let q = Query::new("Describe what is happening in this picture.").images(1);
    let s = route(&q, ByteSize::gib(16)).unwrap();
    assert_eq!(s.model_id, "qwen3-vl-2b-int4");
    assert!(
        rejections(&s, "smollm2-135m-int8").contains(&Rejection::MissingCapability {
            missing: Capabilities::only(afo_select::Capability::Vision)
        })
    );
    // No vision model fits in 1 GB: a typed error naming every card and why.
    let err = route(&q, ByteSize::gib(1)).unwrap_err();
    match &err {
        Error::NoModel {
            complexity,
            candidates,
        } => {
            assert_eq!(*complexity, Complexity::Medium);
            assert_eq!(candidates.len(), 11);
            assert!(candidates.iter().all(|c| !c.is_accepted()));
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("`qwen3-vl-2b-int4` (too big for the memory headroom")
            && text.contains("lacks vision"),
        "{text}"
    );
}

#[test]
fn context_must_hold_the_input() {
    let q = Query::new("Who wrote Hamlet?").input_tokens(10_000);
    let s = route(&q, ByteSize::gib(16)).unwrap();
    assert_eq!(s.model_id, "qwen3-vl-2b-int4");
    assert!(matches!(
        rejections(&s, "smollm2-135m-int4"),
        [Rejection::ContextTooShort {
            context_length: 8192,
            needed: 10_064
        }]
    ));
}

#[test]
fn per_task_scores_count() {
    // SmolLM2's code scores are below 96; the 2B vision model's overall 96 counts.
    let q = Query::new("Write a Python function that checks whether a string is a palindrome.");
    let s = route(&q, ByteSize::gib(16)).unwrap();
    assert_eq!(
        (s.task, s.complexity.level),
        (Task::Code, Complexity::Medium)
    );
    assert_eq!(s.model_id, "qwen3-vl-2b-int4");
    // Overriding the task to chat lets SmolLM2 int8 (96.2 overall) serve it.
    let s = route(&q.clone().task(Task::Chat), ByteSize::gib(16)).unwrap();
    assert_eq!(s.model_id, "smollm2-135m-int8");
}

#[test]
fn explicit_request_bypasses_routing() {
    let q = Query::new("Describe this photo in detail.")
        .images(1)
        .model("smollm2-135m-q2_k");
    let s = route(&q, ByteSize::mib(1)).unwrap();
    assert_eq!(s.model_id, "smollm2-135m-q2_k");
    assert_eq!(s.reason, SelectionReason::Explicit);
    assert_eq!(s.floor, None);
    assert!(
        s.reason_text.contains("explicitly requested")
            && s.reason_text.contains("below the registration floor")
            && s.reason_text.contains("lacks vision")
            && s.reason_text.contains("too big"),
        "{}",
        s.reason_text
    );
    let err = route(&Query::new("hi").model("gpt-9"), ByteSize::gib(1)).unwrap_err();
    assert!(err.to_string().contains("unknown model `gpt-9`"), "{err}");
}

#[test]
fn floors_are_configurable() {
    let router = PolicyRouter::builder()
        .floor(Complexity::Low, 96.3)
        .build()
        .unwrap();
    let s = router
        .route(
            &Query::new("Who wrote Hamlet?"),
            &example(),
            &RouteContext::new(ByteSize::gib(16)),
        )
        .unwrap();
    assert_eq!(s.model_id, "smollm2-135m-f32");
    assert!(
        PolicyRouter::builder()
            .floor(Complexity::High, 101.0)
            .build()
            .is_err()
    );
}

fn card(id: &str, bytes: u64, params: u64, speed: Option<f32>) -> ModelCard {
    let mut b = ModelCard::builder(id, "fam")
        .params(params)
        .trinity_score(97.0)
        .context_length(4096)
        .estimated_bytes(bytes);
    if let Some(s) = speed {
        b = b.tokens_per_s(s);
    }
    b.build().unwrap()
}

#[test]
fn ties_break_on_speed_then_parameters() {
    let ctx = RouteContext::new(ByteSize::gib(1));
    let router = PolicyRouter::default();
    let q = Query::new("hi");
    let cat = Catalog::builder()
        .card(card("slow", 100, 10, Some(10.0)))
        .card(card("fast", 100, 20, Some(50.0)))
        .card(card("unmeasured", 100, 5, None))
        .card(card("big", 200, 1, Some(1000.0)))
        .build()
        .unwrap();
    assert_eq!(router.route(&q, &cat, &ctx).unwrap().model_id, "fast");
    let cat = Catalog::builder()
        .card(card("b", 100, 20, None))
        .card(card("a", 100, 10, None))
        .build()
        .unwrap();
    assert_eq!(router.route(&q, &cat, &ctx).unwrap().model_id, "a");
    let empty = router.route(&q, &Catalog::new(), &ctx).unwrap_err();
    assert!(
        empty.to_string().contains("the catalog is empty"),
        "{empty}"
    );
}

/// A router of one's own: always the biggest card that fits.
struct Biggest;

impl Router for Biggest {
    fn route(
        &self,
        query: &Query,
        catalog: &Catalog,
        ctx: &RouteContext,
    ) -> afo_select::Result<Selection> {
        let mut s = PolicyRouter::default().route(query, catalog, ctx)?;
        let best = catalog
            .eligible()
            .filter(|c| c.estimated_bytes() <= ctx.available)
            .max_by_key(|c| c.estimated_bytes())
            .ok_or(Error::NoModel {
                complexity: s.complexity.level,
                candidates: Vec::new(),
            })?;
        s.model_id = best.id().to_owned();
        s.trinity_score = best.trinity_score();
        s.reason_text = "the biggest that fits".to_owned();
        Ok(s)
    }
}

#[test]
fn routers_plug_in() {
    let routers: [&dyn Router; 2] = [&PolicyRouter::default(), &Biggest];
    let picks: Vec<String> = routers
        .iter()
        .map(|r| {
            r.route(
                &Query::new("Who wrote Hamlet?"),
                &example(),
                &RouteContext::new(ByteSize::gib(6)),
            )
            .unwrap()
            .model_id
        })
        .collect();
    assert_eq!(picks, ["smollm2-135m-int4", "qwen3-vl-4b-int8"]);
}

#[test]
fn summary_is_the_ssot_selection_record() {
    let cat = example();
    let mut s = PolicyRouter::default()
        .route(
            &Query::new(COMPARE),
            &cat,
            &RouteContext::new(ByteSize::gib(16)),
        )
        .unwrap();
    let record: afo_ssot::Selection =
        serde_json::from_value(serde_json::to_value(s.summary()).unwrap()).unwrap();
    assert_eq!(record.model_id, "qwen3-vl-2b-int8");
    assert_eq!(record.fallback_from, None);
    assert_eq!(record.trinity_score, Some(97.2));

    // The guard then finds only 2 GB: fall back and record it.
    let step = fallback(&cat, &s.model_id, ByteSize(2_000_000_000)).unwrap();
    s.apply_fallback(step);
    let record: afo_ssot::Selection =
        serde_json::from_value(serde_json::to_value(s.summary()).unwrap()).unwrap();
    assert_eq!(record.model_id, "qwen3-vl-2b-int4");
    assert_eq!(record.fallback_from.as_deref(), Some("qwen3-vl-2b-int8"));
    assert!(
        record.reason.contains("fell back to `qwen3-vl-2b-int4`"),
        "{}",
        record.reason
    );

    // The whole selection round-trips through JSON.
    let json = serde_json::to_string(&s).unwrap();
    let back: Selection = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
}
