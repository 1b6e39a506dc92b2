//! The fallback ladder over the example catalog.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use afo_guard::ByteSize;
use afo_select::{Catalog, Error, FallbackReason, ModelCard, fallback, fallback_ladder};

fn example() -> Catalog {
    Catalog::from_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog.toml")).unwrap()
}

fn ids(cards: &[&ModelCard]) -> Vec<String> {
    cards.iter().map(|c| c.id().to_owned()).collect()
}

#[test]
fn ladders_go_down_by_size_within_the_family() {
    let cat = example();
    let ladder = fallback_ladder(&cat, "qwen3-vl-4b-bf16").unwrap();
    assert_eq!(
        ids(&ladder),
        [
            "qwen3-vl-4b-int8",
            "qwen3-vl-2b-bf16",
            "qwen3-vl-4b-int4",
            "qwen3-vl-2b-int8",
            "qwen3-vl-2b-int4",
        ]
    );
    // The ineligible q2_k card is never a rung; other families never are.
    let ladder = fallback_ladder(&cat, "smollm2-135m-f32").unwrap();
    assert_eq!(
        ids(&ladder),
        [
            "smollm2-135m-int8",
            "smollm2-135m-q4_1",
            "smollm2-135m-int4"
        ]
    );
    assert!(
        fallback_ladder(&cat, "smollm2-135m-int4")
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        fallback_ladder(&cat, "nope"),
        Err(Error::UnknownModel { .. })
    ));
}

#[test]
fn a_4b_that_does_not_fit_falls_back_to_2b() {
    let cat = example();
    let fb = fallback(&cat, "qwen3-vl-4b-bf16", ByteSize(5_000_000_000)).unwrap();
    assert_eq!(fb.to, "qwen3-vl-2b-bf16");
    assert_eq!(fb.fallback_from, "qwen3-vl-4b-bf16");
    assert_eq!(fb.reason, FallbackReason::SmallerModel);
    assert_eq!(fb.to_bytes, 4_800_000_000);
    assert_eq!(fb.available_bytes, 5_000_000_000);
    assert!(fb.reason_text.contains("4B -> 2B"), "{}", fb.reason_text);
    // With less, the 4B int4 is next: a bigger model in a much lower precision.
    let fb = fallback(&cat, "qwen3-vl-4b-bf16", ByteSize(3_500_000_000)).unwrap();
    assert_eq!(fb.to, "qwen3-vl-4b-int4");
    assert_eq!(fb.reason, FallbackReason::LowerPrecision);
    let fb = fallback(&cat, "qwen3-vl-4b-int8", ByteSize(2_000_000_000)).unwrap();
    assert_eq!(fb.to, "qwen3-vl-2b-int4");
    assert_eq!(fb.reason, FallbackReason::SmallerAndLowerPrecision);
    let fb = fallback(&cat, "qwen3-vl-2b-bf16", ByteSize(3_500_000_000)).unwrap();
    assert_eq!(fb.to, "qwen3-vl-4b-int4");
    assert_eq!(fb.reason, FallbackReason::CheaperVariant);
}

#[test]
fn int8_that_does_not_fit_falls_to_int4() {
    let cat = example();
    let fb = fallback(&cat, "smollm2-135m-int8", ByteSize(205_000_000)).unwrap();
    assert_eq!(fb.to, "smollm2-135m-int4");
    assert_eq!(fb.reason, FallbackReason::LowerPrecision);
    assert!(
        fb.reason_text.contains("int8 -> int4"),
        "{}",
        fb.reason_text
    );
    assert!(
        fb.reason_text
            .starts_with("`smollm2-135m-int8` needs 248.85 MiB but 195.50 MiB"),
        "{}",
        fb.reason_text
    );
    let json = serde_json::to_value(&fb).unwrap();
    assert_eq!(json["reason"], "lower_precision");
    assert_eq!(json["fallback_from"], "smollm2-135m-int8");
}

#[test]
fn nothing_fits_is_a_typed_error_with_the_rungs_tried() {
    let cat = example();
    let err = fallback(&cat, "smollm2-135m-int8", ByteSize::mib(100)).unwrap_err();
    match &err {
        Error::NoFallback {
            from,
            available,
            tried,
        } => {
            assert_eq!(from, "smollm2-135m-int8");
            assert_eq!(*available, ByteSize::mib(100));
            assert_eq!(tried.len(), 2);
        }
        other => panic!("{other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("no fallback for `smollm2-135m-int8` fits in 100.00 MiB")
            && text.contains("`smollm2-135m-q4_1` needs"),
        "{text}"
    );
    let err = fallback(&cat, "smollm2-135m-int4", ByteSize::mib(100)).unwrap_err();
    assert!(err.to_string().contains("no cheaper variant"), "{err}");
}
