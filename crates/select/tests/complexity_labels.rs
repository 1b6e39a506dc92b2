//! The complexity analyzer against queries labelled by hand.
//!
//! `fixtures/complexity_labels.jsonl` holds English and Korean queries, each labelled
//! low, medium or high by what a person would say the query needs, not by what the
//! analyzer returns; some are hard on purpose (a short deep question, a long but easy
//! summary). Run with `--nocapture` to see the figures.

#![allow(clippy::unwrap_used)]

use afo_select::{Complexity, analyze};
use serde::Deserialize;

#[derive(Deserialize)]
struct Labelled {
    text: String,
    images: usize,
    label: Complexity,
}

fn load() -> Vec<Labelled> {
    let text = include_str!("fixtures/complexity_labels.jsonl");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn accuracy_on_the_labelled_set() {
    let set = load();
    assert!(set.len() >= 50, "{} queries", set.len());
    let levels = [Complexity::Low, Complexity::Medium, Complexity::High];
    let index = |c: Complexity| levels.iter().position(|&l| l == c).unwrap();
    let mut matrix = [[0usize; 3]; 3];
    let mut misses = Vec::new();
    for q in &set {
        let r = analyze(&q.text, q.images);
        matrix[index(q.label)][index(r.level)] += 1;
        if r.level != q.label {
            let short: String = q.text.chars().take(70).collect();
            misses.push(format!(
                "  {} labelled, {} predicted (score {:.3}): {short:?}",
                q.label, r.level, r.score
            ));
        }
    }
    let correct: usize = (0..3).map(|i| matrix[i][i]).sum();
    let accuracy = correct as f64 / set.len() as f64;
    println!(
        "complexity accuracy: {correct}/{} = {accuracy:.3}",
        set.len()
    );
    println!("confusion matrix (rows: label, columns: predicted)");
    println!("{:>8} {:>6} {:>6} {:>6}", "", "low", "medium", "high");
    for (i, row) in matrix.iter().enumerate() {
        println!(
            "{:>8} {:>6} {:>6} {:>6}",
            levels[i].to_string(),
            row[0],
            row[1],
            row[2]
        );
    }
    println!("misclassified:\n{}", misses.join("\n"));
    assert!(accuracy >= 0.8, "accuracy {accuracy:.3} below 0.8");
}

#[test]
fn every_level_is_represented() {
    let set = load();
    for level in [Complexity::Low, Complexity::Medium, Complexity::High] {
        let n = set.iter().filter(|q| q.label == level).count();
        assert!(n >= 15, "{level}: {n}");
    }
    let korean = set
        .iter()
        .filter(|q| q.text.chars().any(|c| ('가'..='힣').contains(&c)))
        .count();
    assert!(korean >= 20, "{korean} Korean queries");
}
