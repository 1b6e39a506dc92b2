//! Catalogs from files: the committed example, JSON, and the errors.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use afo_guard::{ByteSize, Estimator, ModelShape};
use afo_select::{
    Capability, Catalog, Eligibility, Error, QuantScheme, REFERENCE_CONTEXT_TOKENS, Task,
    estimate_bytes,
};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/catalog.toml")
}

#[test]
fn example_catalog_loads_and_reports_eligibility() {
    let cat = Catalog::from_path(example()).unwrap();
    assert_eq!(cat.len(), 11);
    assert_eq!(cat.min_score(), 95.0);
    let ineligible: Vec<_> = cat.ineligible().map(|c| c.id()).collect();
    assert_eq!(ineligible, ["smollm2-135m-q2_k"]);
    let q2 = cat.card("smollm2-135m-q2_k").unwrap();
    assert!(matches!(
        cat.eligibility(q2),
        Eligibility::BelowMinScore { score, min_score } if score == 88.0 && min_score == 95.0
    ));
    assert_eq!(q2.estimated_bytes(), ByteSize(270_000_000));
    let vl = cat.card("qwen3-vl-2b-int8").unwrap();
    assert!(vl.capabilities().has(Capability::Vision));
    assert_eq!(vl.quant(), QuantScheme::Int8);
    assert_eq!(vl.variant_of(), Some("qwen3-vl-2b-bf16"));
    let f32 = cat.card("smollm2-135m-f32").unwrap();
    assert_eq!(f32.score_for(Task::Code), 94.0);
    assert_eq!(f32.score_for(Task::Chat), 96.5);
    // The same catalog in JSON reads back equal.
    let json = serde_json::to_string_pretty(&cat).unwrap();
    assert_eq!(Catalog::from_json_str(&json).unwrap(), cat);
}

#[test]
fn example_smollm2_sizes_are_the_guard_estimate() {
    let cat = Catalog::from_path(example()).unwrap();
    let shape = ModelShape {
        layers: 30,
        hidden: 576,
        intermediate: 1536,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        vocab: 49152,
    };
    let mut wrong = Vec::new();
    for id in [
        "smollm2-135m-f32",
        "smollm2-135m-int8",
        "smollm2-135m-q4_1",
        "smollm2-135m-int4",
    ] {
        let card = cat.card(id).unwrap();
        let expected = estimate_bytes(
            &Estimator::default(),
            card.params(),
            card.quant(),
            shape,
            REFERENCE_CONTEXT_TOKENS,
        );
        if card.estimated_bytes() != expected {
            wrong.push(format!(
                "{id}: the catalog says {}, the estimate is {}",
                card.estimated_bytes().0,
                expected.0
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:?}");
}

#[test]
fn json_fixture_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/catalog.json");
    let cat = Catalog::from_path(&path).unwrap();
    assert_eq!(cat.min_score(), 90.0);
    assert_eq!(cat.eligible().count(), 2);
    let q8 = cat.card("tiny-q8_0").unwrap();
    assert_eq!(q8.quant(), QuantScheme::Q8_0);
    assert_eq!(q8.tokens_per_s(), Some(400.5));
    assert_eq!(q8.score_for(Task::Summary), 91.0);
    assert_eq!(q8.score_for(Task::Code), 92.0);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const CARD: &str = r#"
[[models]]
id = "a"
family = "f"
params = 10
quant = "f32"
trinity_score = 96.0
context_length = 100
estimated_bytes = 1000
"#;

#[test]
fn file_errors_name_the_file_and_the_thing() {
    let dir = tempfile::tempdir().unwrap();

    let dup = write(dir.path(), "dup.toml", &format!("{CARD}{CARD}"));
    let err = Catalog::from_path(&dup).unwrap_err();
    assert!(matches!(&err, Error::DuplicateId { id, .. } if id == "a"));
    let text = err.to_string();
    assert!(
        text.contains("duplicate model id `a`") && text.contains("dup.toml"),
        "{text}"
    );

    let broken = write(dir.path(), "broken.toml", "[[models]\nid = ");
    let text = Catalog::from_path(&broken).unwrap_err().to_string();
    assert!(text.contains("broken.toml"), "{text}");

    let bad_score = write(dir.path(), "score.toml", &CARD.replace("96.0", "140.0"));
    let text = Catalog::from_path(&bad_score).unwrap_err().to_string();
    assert!(
        text.contains("score.toml") && text.contains("model card `a`: field `trinity_score`"),
        "{text}"
    );

    let bad_json = write(dir.path(), "bad.json", r#"{"models": [{"id": "x"}]}"#);
    let text = Catalog::from_path(&bad_json).unwrap_err().to_string();
    assert!(
        text.contains("bad.json") && text.contains("missing field"),
        "{text}"
    );

    let yaml = write(dir.path(), "catalog.yaml", "models: []");
    assert!(matches!(
        Catalog::from_path(&yaml),
        Err(Error::UnknownFormat { .. })
    ));

    let missing = dir.path().join("missing.toml");
    let text = Catalog::from_path(&missing).unwrap_err().to_string();
    assert!(
        text.contains("cannot read catalog") && text.contains("missing.toml"),
        "{text}"
    );

    let bad_variant = write(
        dir.path(),
        "variant.toml",
        &format!("{CARD}variant_of = \"nope\"\n"),
    );
    let text = Catalog::from_path(&bad_variant).unwrap_err().to_string();
    assert!(text.contains("`variant_of` = `nope`"), "{text}");

    let floor = write(
        dir.path(),
        "floor.toml",
        &format!("min_score = 120.0\n{CARD}"),
    );
    let text = Catalog::from_path(&floor).unwrap_err().to_string();
    assert!(text.contains("min_score"), "{text}");
}
