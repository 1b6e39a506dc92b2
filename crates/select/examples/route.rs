//! Routes one query over a catalog and prints the choice, the candidates and the
//! budget.
//!
//! ```text
//! cargo run -p afo-select --example route -- [--catalog FILE] [--images N]
//!     [--available SIZE] [--model ID] TEXT
//! ```
//!
//! The catalog defaults to `crates/select/examples/catalog.toml`, the memory headroom
//! to 4GiB.

use std::error::Error;
use std::path::PathBuf;

use afo_guard::ByteSize;
use afo_select::{
    BudgetRequest, Catalog, PolicyRouter, Query, RouteContext, Router, TokenBudget, fallback,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let mut catalog_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/catalog.toml");
    let mut images = 0;
    let mut available = ByteSize::gib(4);
    let mut model = None;
    let mut text = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--catalog" => catalog_path = value()?.into(),
            "--images" => images = value()?.parse()?,
            "--available" => available = value()?.parse()?,
            "--model" => model = Some(value()?),
            _ => text.push(arg),
        }
    }
    let catalog = Catalog::from_path(&catalog_path)?;
    let mut query = Query::new(text.join(" ")).images(images);
    if let Some(id) = model {
        query = query.model(id);
    }
    let selection =
        PolicyRouter::default().route(&query, &catalog, &RouteContext::new(available))?;
    let report = &selection.complexity;
    println!(
        "complexity: {} (score {:.3}, task {}, words {:?})",
        report.level, report.score, selection.task, report.features.task_words
    );
    for c in &selection.candidates {
        let why: Vec<String> = c.rejected.iter().map(ToString::to_string).collect();
        let verdict = if why.is_empty() {
            "ok".to_owned()
        } else {
            why.join("; ")
        };
        println!(
            "  {:<22} {:>5.1} {:>11}  {verdict}",
            c.id,
            c.score,
            ByteSize(c.bytes).to_string()
        );
    }
    println!("chosen: {} ({})", selection.model_id, selection.reason_text);
    let card = catalog.card(&selection.model_id)?;
    if card.estimated_bytes() > available {
        match fallback(&catalog, card.id(), available) {
            Ok(step) => println!("fallback: {}", step.reason_text),
            Err(e) => println!("no fallback: {e}"),
        }
    }
    let budget = TokenBudget::default().plan(&BudgetRequest::new(
        selection.task,
        report.features.tokens,
        card.context_length(),
    ))?;
    println!(
        "budget: max_tokens {} ({}), temperature {}",
        budget.max_tokens, budget.bound, budget.temperature
    );
    println!("record: {}", serde_json::to_string(&selection.summary())?);
    Ok(())
}
