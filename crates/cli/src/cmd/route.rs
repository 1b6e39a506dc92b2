//! `afo route`: which model a query would run on, and why, without running it.

use std::path::PathBuf;

use afo_runtime::guard::{ByteSize, MemoryBudget, Probe, SystemProbe};
use afo_runtime::select::{
    BudgetRequest, Catalog, PolicyRouter, Query, RouteContext, Router, TokenBudget, fallback,
};

/// Arguments of `afo route`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The query.
    query: String,
    /// The model catalog (TOML or JSON). Default: a catalog of the models found in
    /// `$AFO_MODEL_DIR` (default `models`) and the Hugging Face cache, each read from
    /// its file (parameters, scheme, context, size) with the neutral trinity score 95,
    /// so routing comes down to what fits and is cheapest.
    #[arg(long)]
    catalog: Option<PathBuf>,
    /// The memory cutline; the headroom is the cutline less this process's resident
    /// memory now (a cgroup limit lowers the cutline, as the runtime does).
    #[arg(long, default_value = "20GiB")]
    cutline: ByteSize,
    /// Images attached to the query.
    #[arg(long, default_value_t = 0)]
    images: usize,
    /// Ask for this model by id (routing is bypassed, the memory check is not).
    #[arg(long)]
    model: Option<String>,
}

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let catalog = match &args.catalog {
        Some(path) => Catalog::from_path(path)?,
        None => found_catalog()?,
    };
    let probe = SystemProbe::new();
    let snapshot = probe.snapshot()?;
    let budget = MemoryBudget::builder().cutline(args.cutline).build()?;
    let cutline = budget.effective_cutline(snapshot.cgroup_limit());
    let available = ByteSize(cutline.saturating_sub(snapshot.rss_bytes));
    let mut query = Query::new(args.query.clone()).images(args.images);
    if let Some(id) = &args.model {
        query = query.model(id.clone());
    }
    let mut selection =
        PolicyRouter::default().route(&query, &catalog, &RouteContext::new(available))?;
    let report = &selection.complexity;
    out!(
        "complexity: {} (score {:.3}), task {}, {} tokens, task words {:?}",
        report.level,
        report.score,
        selection.task,
        report.features.tokens,
        report.features.task_words
    );
    out!(
        "memory: {available} available under a cutline of {}",
        ByteSize(cutline)
    );
    for c in &selection.candidates {
        let why: Vec<String> = c.rejected.iter().map(ToString::to_string).collect();
        let verdict = if why.is_empty() {
            "ok".to_owned()
        } else {
            why.join("; ")
        };
        out!(
            "  {:<24} score {:>5.1} {:>11}  {verdict}",
            c.id,
            c.score,
            ByteSize(c.bytes).to_string()
        );
    }
    out!("chosen: {} ({})", selection.model_id, selection.reason_text);
    let card = catalog.card(&selection.model_id)?;
    if card.estimated_bytes() > available {
        let step = fallback(&catalog, card.id(), available)?;
        out!("fallback: {}", step.reason_text);
        selection.apply_fallback(step);
    }
    let card = catalog.card(&selection.model_id)?;
    let plan = TokenBudget::default().plan(&BudgetRequest::new(
        selection.task,
        selection.complexity.features.tokens,
        card.context_length(),
    ))?;
    out!(
        "would run: {} (trinity score {}), max_tokens {} ({}), temperature {}",
        selection.model_id,
        selection.trinity_score,
        plan.max_tokens,
        plan.bound,
        plan.temperature
    );
    Ok(())
}

/// The catalog of the models found on disk, announced on the first line.
fn found_catalog() -> anyhow::Result<Catalog> {
    let (found, places) = super::found_models()?;
    let (catalog, skipped) = afo_runtime::catalog_of(&found);
    for (model, why) in &skipped {
        eprintln!("skipped {} ({}): {why}", model.id, model.path.display());
    }
    anyhow::ensure!(
        !catalog.is_empty(),
        "none of the {} models found in {places} could be read",
        found.len()
    );
    out!(
        "no --catalog: a catalog of {} model{} found in {places} (trinity score {} each: \
         unmeasured)",
        catalog.len(),
        if catalog.len() == 1 { "" } else { "s" },
        afo_runtime::UNSCORED_TRINITY_SCORE
    );
    Ok(catalog)
}
