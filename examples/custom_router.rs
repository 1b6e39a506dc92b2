//! A custom model-selection `Router`: `cargo run --example custom_router`.
//!
//! afo's default router (`PolicyRouter`) picks the cheapest card that meets a
//! quality floor for the query's complexity. This one serves a latency-first
//! deployment: code questions go to the best-scoring card for code, everything else
//! to the smallest card, and both only among cards that pass the same hard
//! requirements (capabilities, context, memory headroom) through
//! `Requirements::check`. The runtime uses it for `query`, and the fallback ladder,
//! the memory guard and the SSOT record work as with the default.

use afo_runtime::select::{
    Candidate, Capabilities, Catalog, PolicyRouter, Query, Requirements, Result as SelectResult,
    RouteContext, Router, Selection, SelectionReason, Task, analyze,
};
use afo_runtime::{QueryRequest, Runtime};

/// Code to the strongest coder, the rest to the smallest card that fits.
#[derive(Debug)]
struct LatencyFirst;

impl Router for LatencyFirst {
    fn route(
        &self,
        query: &Query,
        catalog: &Catalog,
        ctx: &RouteContext,
    ) -> SelectResult<Selection> {
        if query.model.is_some() || query.images > 0 {
            // Explicit requests and images: the default router's rules.
            return PolicyRouter::default().route(query, catalog, ctx);
        }
        let report = analyze(&query.text, query.images);
        let task = query.task.unwrap_or(report.task);
        let requirements = Requirements {
            capabilities: Capabilities::TEXT,
            input_tokens: report.features.tokens,
            min_output_tokens: ctx.min_output_tokens,
            available: ctx.available,
            floor: 0.0,
            task,
        };
        let candidates: Vec<Candidate> = catalog
            .iter()
            .map(|card| requirements.check(catalog, card))
            .collect();
        let fits = catalog
            .iter()
            .zip(&candidates)
            .filter(|(_, c)| c.is_accepted())
            .map(|(card, _)| card);
        let chosen = if task == Task::Code {
            fits.max_by(|a, b| a.score_for(task).total_cmp(&b.score_for(task)))
        } else {
            fits.min_by_key(|card| card.estimated_bytes())
        };
        let Some(card) = chosen else {
            // Nothing fits: let the default router explain why, in its own words.
            return PolicyRouter::default().route(query, catalog, ctx);
        };
        Ok(Selection {
            model_id: card.id().to_owned(),
            trinity_score: card.score_for(task),
            task,
            complexity: report,
            floor: None,
            reason: SelectionReason::MeetsFloor,
            reason_text: format!(
                "latency-first: {} for a {task} query",
                if task == Task::Code {
                    "the best coder"
                } else {
                    "the smallest card"
                }
            ),
            candidates,
            fallback: None,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let source = afo_examples::smollm2()?
        .display()
        .to_string()
        .replace('\\', "/");
    let catalog = Catalog::from_toml_str(&format!(
        r#"
        [[models]]
        id = "smollm2-q4"
        family = "smollm2-135m"
        params = 134515008
        quant = "int4"
        trinity_score = 95.0
        task_scores = {{ code = 90.0 }}
        context_length = 8192
        estimated_bytes = "160MB"
        source = "{source}"

        [[models]]
        id = "smollm2-int8"
        family = "smollm2-135m"
        params = 134515008
        quant = "int8"
        trinity_score = 96.0
        task_scores = {{ code = 94.0 }}
        context_length = 8192
        estimated_bytes = "420MB"
        source = "{source}"
        "#
    ))?;
    let runtime = Runtime::builder()
        .catalog(catalog)
        .router(LatencyFirst)
        .ssot_log(afo_examples::examples_log())
        .build()?;
    let mut chosen = Vec::new();
    for text in [
        "Hi! How are you today?",
        "Write a Rust function that reverses a string.",
    ] {
        let mut request = QueryRequest::new(text);
        request.max_tokens = Some(24);
        let answer = runtime.query(&request)?;
        println!(
            "{text:?}\n  -> {} ({}): {}",
            answer.model_id(),
            answer.selection.reason_text,
            answer.response.text.trim().replace('\n', " ")
        );
        chosen.push(answer.model_id().to_owned());
    }
    anyhow::ensure!(
        chosen == ["smollm2-q4", "smollm2-int8"],
        "the router chose {chosen:?}"
    );
    Ok(())
}
