//! `afo bench report`: runs the suite (or reads saved results) and writes one
//! self-contained HTML page: the machine on top, then one section per benchmark
//! with an inline SVG chart and the table behind it. No scripts, no external files.

use std::fmt::Write as _;
use std::path::Path;

use afo_runtime::guard::ByteSize;

use super::results::{
    BatchingResult, BenchFile, BenchResult, ImageResult, KvResult, MemoryResult, PrefixResult,
    ReferenceTest, SpeedResult, read_all, read_reference,
};
use super::svg::{Axis, Bars, Chart, Line, Plot, Point, esc};
use super::{Args, Mode, machine, measure};

const MIB: f64 = 1024.0 * 1024.0;

/// The suite's sizes: `--quick` or full.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    rounds: usize,
    prompt: usize,
    generate: usize,
    batch_generate: usize,
    concurrency: &'static [usize],
    predict: &'static [usize],
    batches: &'static [usize],
    batch_prompt: usize,
    memory_generate: usize,
    prefix_tokens: usize,
    kv_tokens: usize,
    images: &'static [&'static str],
}

const QUICK: Sizes = Sizes {
    rounds: 1,
    prompt: 64,
    generate: 16,
    batch_generate: 8,
    concurrency: &[1, 2, 4],
    predict: &[16, 64],
    batches: &[2],
    batch_prompt: 64,
    memory_generate: 4,
    prefix_tokens: 64,
    kv_tokens: 256,
    images: &["320x240", "1280x720"],
};

const FULL: Sizes = Sizes {
    rounds: 3,
    prompt: 512,
    generate: 64,
    batch_generate: 32,
    concurrency: &[1, 2, 4, 8, 16],
    predict: &[16, 128, 512, 1024, 2048],
    batches: &[2, 4, 8],
    batch_prompt: 256,
    memory_generate: 32,
    prefix_tokens: 1000,
    kv_tokens: 2048,
    images: &["640x480", "1920x1080", "4000x3000"],
};

/// Runs every benchmark on `--model` at the suite's sizes.
fn suite(args: &Args) -> anyhow::Result<Vec<BenchResult>> {
    let model = args.model()?;
    let z = if args.quick { QUICK } else { FULL };
    let base = Args {
        model: Some(model.clone()),
        rounds: z.rounds,
        scheme: None,
        json: None,
        ..args.clone()
    };
    let step = |what: &str| eprintln!("afo bench report: {what}");
    let mut results = Vec::new();
    // Memory first, in a process that holds nothing else yet: its predictions fold in
    // the process's resident memory that the ledger does not account for, which
    // earlier steps would leave behind. Then image preprocessing, whose peak is
    // measured above the resident memory before each call.
    step("memory");
    results.push(measure(&Args {
        mode: Mode::Memory,
        predict: z.predict.to_vec(),
        batches: z.batches.to_vec(),
        prompt: z.batch_prompt,
        generate: z.memory_generate,
        ..base.clone()
    })?);
    step("image");
    results.push(measure(&Args {
        mode: Mode::Image,
        image_sizes: z.images.iter().map(|s| (*s).to_owned()).collect(),
        ..base.clone()
    })?);
    let schemes = std::iter::once(None).chain(args.schemes.iter().copied().map(Some));
    for scheme in schemes {
        let a = Args {
            mode: Mode::Speed,
            scheme,
            prompt: z.prompt,
            generate: z.generate,
            ..base.clone()
        };
        step(&format!("speed, {}", a.format(&model)));
        results.push(measure(&a)?);
    }
    step("batching");
    results.push(measure(&Args {
        mode: Mode::Batching,
        generate: z.batch_generate,
        concurrency: z.concurrency.to_vec(),
        ..base.clone()
    })?);
    step("prefix");
    results.push(measure(&Args {
        mode: Mode::Prefix,
        prefix_tokens: z.prefix_tokens,
        ..base
    })?);
    step("KV policies");
    let kv = super::super::eval::measure_kv(
        &model,
        &args.text,
        z.kv_tokens,
        None,
        &[],
        16,
        afo_runtime::kvcache::KvFormat::F32,
    )?;
    super::super::eval::print_kv(&kv)?;
    results.push(BenchResult::Kv(kv));
    Ok(results)
}

pub(super) fn run(args: &Args) -> anyhow::Result<()> {
    let reference = match &args.reference {
        Some(path) => Some((path.clone(), read_reference(path)?)),
        None => None,
    };
    let files = if args.from.is_empty() {
        let file = machine::bench_file(suite(args)?);
        let json = args
            .json
            .clone()
            .unwrap_or_else(|| args.out.with_extension("json"));
        create_parent(&json)?;
        file.write(&json)?;
        eprintln!("afo bench report: results in {}", json.display());
        vec![file]
    } else {
        read_all(&args.from)?
    };
    let html = render(
        &files,
        reference.as_ref().map(|(p, t)| (p.as_path(), t.as_slice())),
        &machine::command_line(),
    );
    create_parent(&args.out)?;
    std::fs::write(&args.out, html)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    out!("report: {}", args.out.display());
    Ok(())
}

fn create_parent(path: &Path) -> anyhow::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display())),
        None => Ok(()),
    }
}

/// An HTML table; every cell is escaped.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table><thead><tr>");
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for row in rows {
        s.push_str("<tr>");
        for cell in row {
            let _ = write!(s, "<td>{}</td>", esc(cell));
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

fn section(id: &str, title: &str, intro: &str, body: &str) -> String {
    format!(
        "<section id=\"{}\"><h2>{}</h2><p>{}</p>{body}</section>\n",
        esc(id),
        esc(title),
        esc(intro)
    )
}

fn ratio(ours: f64, theirs: f64) -> String {
    format!("{:.2}x", ours / theirs)
}

/// The reference test for `format` and this kind of test (`prompt`: a prompt test,
/// else a generation test), preferring the same token count.
fn reference_for<'a>(
    tests: &'a [ReferenceTest],
    format: &str,
    prompt: bool,
    tokens: usize,
) -> Option<&'a ReferenceTest> {
    let kind = |t: &&ReferenceTest| {
        t.matches(format)
            && if prompt {
                t.n_prompt > 0 && t.n_gen == 0
            } else {
                t.n_gen > 0 && t.n_prompt == 0
            }
    };
    let size = |t: &ReferenceTest| if prompt { t.n_prompt } else { t.n_gen };
    tests
        .iter()
        .filter(kind)
        .find(|t| size(t) == tokens as u64)
        .or_else(|| tests.iter().find(kind))
}

fn speed_section(speed: &[&SpeedResult], reference: Option<(&Path, &[ReferenceTest])>) -> String {
    let tests = reference.map_or(&[][..], |(_, t)| t);
    let (mut groups, mut ours, mut theirs, mut notes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    let cell = |t: Option<&ReferenceTest>| {
        t.map_or("-".to_owned(), |t| match t.stddev_ts {
            Some(sd) => format!("{:.1} ± {sd:.1} ({})", t.avg_ts, t.test_name()),
            None => format!("{:.1} ({})", t.avg_ts, t.test_name()),
        })
    };
    for r in speed {
        let pp = reference_for(tests, &r.format, true, r.prompt_tokens);
        let tg = reference_for(tests, &r.format, false, r.generated_tokens);
        for (name, value, theirs_test) in [
            (
                format!("{} pp{}", r.format, r.prompt_tokens),
                r.prefill_tok_s,
                pp,
            ),
            (
                format!("{} tg{}", r.format, r.generated_tokens),
                r.decode_tok_s,
                tg,
            ),
        ] {
            groups.push(name);
            ours.push(Some(value));
            theirs.push(theirs_test.map(|t| t.avg_ts));
            notes.push(theirs_test.map_or(String::new(), |t| ratio(value, t.avg_ts)));
        }
        let r_pp = pp.map_or("-".into(), |t| ratio(r.prefill_tok_s, t.avg_ts));
        let r_tg = tg.map_or("-".into(), |t| ratio(r.decode_tok_s, t.avg_ts));
        rows.push(vec![
            r.format.clone(),
            format!("{:.1}", r.prefill_tok_s),
            cell(pp),
            r_pp,
            format!("{:.1}", r.decode_tok_s),
            cell(tg),
            r_tg,
            if r.roofline_tok_s() > 0.0 {
                format!(
                    "{:.0}% of {:.1}",
                    r.roofline_fraction() * 100.0,
                    r.roofline_tok_s()
                )
            } else {
                "-".into()
            },
            r.decode_kernels
                .iter()
                .map(|u| u.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            format!("{:.1} ms", r.cold_load_ms),
            format!("{:.4} ms", r.warm_acquire_ms),
            r.threads.clone(),
        ]);
    }
    let mut series = vec![Bars {
        name: "afo".into(),
        values: ours,
    }];
    if reference.is_some() {
        series.push(Bars {
            name: "llama.cpp".into(),
            values: theirs,
        });
    }
    let chart = Chart {
        title: "Prefill (pp) and decode (tg) speed per weight format".into(),
        x: Axis::new("weight format and test", ""),
        y: Axis::new("speed", "tok/s"),
        plot: Plot::Bars {
            groups,
            series,
            notes,
        },
    };
    let mut body = chart.to_svg();
    body.push_str(&table(
        &[
            "format",
            "afo prefill tok/s",
            "llama.cpp prefill tok/s",
            "afo / llama.cpp",
            "afo decode tok/s",
            "llama.cpp decode tok/s",
            "afo / llama.cpp",
            "decode of the bandwidth roofline (tok/s)",
            "decode kernels",
            "cold load",
            "warm re-acquire",
            "threads",
        ],
        &rows,
    ));
    let intro = match reference {
        Some((path, tests)) => {
            let unmatched: Vec<String> = tests
                .iter()
                .filter(|t| !speed.iter().any(|r| t.matches(&r.format)))
                .map(|t| format!("{} {}", t.model_type, t.test_name()))
                .collect();
            let threads: Vec<String> = tests
                .iter()
                .filter_map(|t| t.n_threads)
                .map(|n| n.to_string())
                .collect();
            format!(
                "Medians of afo against llama.cpp's mean (`llama-bench -o json`, {}{}); the \
                 ratio (afo / llama.cpp) is printed above each pair.{}",
                path.display(),
                if threads.is_empty() {
                    String::new()
                } else {
                    format!(", threads {}", threads.join(", "))
                },
                if unmatched.is_empty() {
                    String::new()
                } else {
                    format!(
                        " Reference tests of formats afo did not measure: {}.",
                        unmatched.join("; ")
                    )
                }
            )
        }
        None => "Medians of afo; no reference given (`--reference llama-bench.json`).".into(),
    };
    section("speed", "Speed per weight format", &intro, &body)
}

fn batching_section(results: &[&BatchingResult]) -> String {
    let lines = results
        .iter()
        .map(|r| {
            let base = r.points.first().map_or(f64::NAN, |p| p.tok_s);
            Line {
                name: format!("afo {}", r.format),
                points: r
                    .points
                    .iter()
                    .map(|p| (p.sequences as f64, p.tok_s))
                    .collect(),
                labels: r
                    .points
                    .iter()
                    .map(|p| format!("{:.2}x", p.tok_s / base))
                    .collect(),
            }
        })
        .collect();
    let chart = Chart {
        title: "Aggregate decode speed against concurrent sequences".into(),
        x: Axis::new("concurrent sequences", ""),
        y: Axis::new("aggregate decode", "tok/s"),
        plot: Plot::Lines(lines),
    };
    let mut rows = Vec::new();
    for r in results {
        let base = r.points.first().map_or(f64::NAN, |p| p.tok_s);
        for p in &r.points {
            rows.push(vec![
                r.format.clone(),
                p.sequences.to_string(),
                format!("{:.1}", p.tok_s),
                format!("{:.1}", p.tok_s / p.sequences as f64),
                format!("{:.2}x", p.tok_s / base),
            ]);
        }
    }
    let mut body = chart.to_svg();
    body.push_str(&table(
        &[
            "format",
            "sequences",
            "tok/s (all)",
            "per sequence",
            "vs 1 sequence",
        ],
        &rows,
    ));
    let intro = results.first().map_or(String::new(), |r| {
        format!(
            "Sequences of {} prompt tokens, {} tokens decoded by each, all admitted at once; \
             decode steps only; medians of {}. Labels: speed-up over one sequence.",
            r.prompt_tokens, r.generated_tokens, r.rounds
        )
    });
    section("batching", "Continuous batching", &intro, &body)
}

fn memory_section(results: &[&MemoryResult]) -> String {
    let rows_in = || results.iter().flat_map(|r| r.rows.iter());
    let chart = Chart {
        title: "Predicted against measured peak memory".into(),
        x: Axis::new("predicted peak", "MiB"),
        y: Axis::new("measured peak", "MiB"),
        plot: Plot::Scatter {
            points: rows_in()
                .map(|row| Point {
                    x: row.predicted_bytes as f64 / MIB,
                    y: row.measured_bytes as f64 / MIB,
                    label: row.label(),
                })
                .collect(),
            identity: true,
        },
    };
    let rows: Vec<Vec<String>> = rows_in()
        .map(|row| {
            vec![
                row.label(),
                ByteSize(row.predicted_bytes).to_string(),
                ByteSize(row.measured_bytes).to_string(),
                format!("{:+.1}%", row.error_percent()),
            ]
        })
        .collect();
    let mut body = chart.to_svg();
    body.push_str(&table(&["run", "predicted", "measured", "error"], &rows));
    section(
        "memory",
        "Memory: predicted against measured peak",
        "The ledger's prediction at admission against the process's resident peak over \
         the call (sampled every 5 ms). Points on the line y = x are exact; below it the \
         prediction was high, above it low.",
        &body,
    )
}

fn kv_section(results: &[&KvResult]) -> String {
    let (mut groups, mut values, mut notes, mut rows) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in results {
        let full = r
            .rows
            .iter()
            .find(|row| row.policy == "full")
            .map(|row| row.perplexity);
        for row in &r.rows {
            let vs = full
                .filter(|_| row.policy != "full")
                .map_or("-".to_owned(), |f| {
                    format!("{:+.2}%", 100.0 * (row.perplexity / f - 1.0))
                });
            groups.push(row.policy.clone());
            values.push(Some(row.perplexity));
            notes.push(format!(
                "{} · {:.1} MiB",
                if vs == "-" { "full" } else { vs.as_str() },
                row.kv_bytes as f64 / MIB
            ));
            rows.push(vec![
                row.policy.clone(),
                format!("{:.4}", row.perplexity),
                vs,
                ByteSize(row.kv_bytes).to_string(),
                row.evicted_tokens.to_string(),
                format!("{:.1} s", row.seconds),
            ]);
        }
    }
    let chart = Chart {
        title: "Perplexity per KV cache policy (lower is better)".into(),
        x: Axis::new("KV cache policy", ""),
        y: Axis::new("perplexity", ""),
        plot: Plot::Bars {
            groups,
            series: vec![Bars {
                name: "perplexity".into(),
                values,
            }],
            notes,
        },
    };
    let mut body = chart.to_svg();
    body.push_str(&table(
        &[
            "cache",
            "perplexity",
            "vs full",
            "KV bytes at the end",
            "tokens evicted",
            "time",
        ],
        &rows,
    ));
    let intro = results.first().map_or(String::new(), |r| {
        format!(
            "The first {} tokens of {} read as one sequence, {} tokens per forward pass; \
             the pruned caches hold at most {} tokens. Labels: perplexity against the full \
             cache, and the KV bytes held at the end.",
            r.tokens, r.file, r.chunk, r.budget
        )
    });
    section("kv", "KV cache policies", &intro, &body)
}

fn image_section(results: &[&ImageResult]) -> String {
    let rows_in = || results.iter().flat_map(|r| r.rows.iter());
    let groups: Vec<String> = rows_in().map(|r| r.size()).collect();
    let notes: Vec<String> = rows_in().map(|r| format!("{} tokens", r.tokens)).collect();
    let time = Chart {
        title: "Preprocessing time per image size".into(),
        x: Axis::new("source image (synthetic JPEG)", ""),
        y: Axis::new("time", "ms"),
        plot: Plot::Bars {
            groups: groups.clone(),
            series: vec![Bars {
                name: "time".into(),
                values: rows_in().map(|r| Some(r.ms)).collect(),
            }],
            notes,
        },
    };
    let peak = Chart {
        title: "Peak memory per image size (above the process before the call)".into(),
        x: Axis::new("source image (synthetic JPEG)", ""),
        y: Axis::new("peak", "MiB"),
        plot: Plot::Bars {
            groups,
            series: vec![Bars {
                name: "peak".into(),
                values: rows_in().map(|r| Some(r.peak_bytes as f64 / MIB)).collect(),
            }],
            notes: Vec::new(),
        },
    };
    let rows: Vec<Vec<String>> = rows_in()
        .map(|r| {
            vec![
                r.size(),
                ByteSize(r.file_bytes).to_string(),
                format!("{}x{}", r.resized_width, r.resized_height),
                r.tokens.to_string(),
                format!("{:.1} ms", r.ms),
                ByteSize(r.peak_bytes).to_string(),
            ]
        })
        .collect();
    let mut body = time.to_svg();
    body.push_str(&peak.to_svg());
    body.push_str(&table(
        &["image", "file", "resized", "tokens", "time", "peak"],
        &rows,
    ));
    let intro = results.first().map_or(String::new(), |r| {
        format!(
            "Decode, resize, normalise and patchify of one synthetic photo (gradient and \
             noise, JPEG quality 90) per size; {}; time: median of {}, peak: the highest \
             resident memory above the start, sampled every 5 ms.",
            r.config, r.rounds
        )
    });
    section("image", "Image preprocessing", &intro, &body)
}

fn prefix_section(results: &[&PrefixResult]) -> String {
    let groups = vec![
        "cold (no prefix cache)".to_owned(),
        "first (miss, publishes)".to_owned(),
        "cached".to_owned(),
    ];
    let series: Vec<Bars> = results
        .iter()
        .map(|r| Bars {
            name: format!("{} prefix tokens", r.prefix_tokens),
            values: vec![Some(r.cold_ms), Some(r.first_ms), Some(r.cached_ms)],
        })
        .collect();
    let notes = results.first().map_or(Vec::new(), |r| {
        [r.cold_ms, r.first_ms, r.cached_ms]
            .iter()
            .map(|v| format!("{:.1}% of cold", 100.0 * v / r.cold_ms))
            .collect()
    });
    let chart = Chart {
        title: "Time to first token with and without a cached prefix".into(),
        x: Axis::new("run", ""),
        y: Axis::new("time to first token", "ms"),
        plot: Plot::Bars {
            groups,
            series,
            notes,
        },
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.prefix_tokens.to_string(),
                format!("{:.1} ms", r.cold_ms),
                format!("{:.1} ms", r.first_ms),
                format!("{:.1} ms", r.cached_ms),
                format!("{:.1}%", 100.0 * r.cached_ms / r.cold_ms),
                r.hit_tokens.to_string(),
                format!("{:.1} ms", r.publish_ms),
                format!("{:.1} ms", r.seed_ms),
            ]
        })
        .collect();
    let mut body = chart.to_svg();
    body.push_str(&table(
        &[
            "prefix tokens",
            "cold",
            "first",
            "cached",
            "cached / cold",
            "tokens reused",
            "publish",
            "seed",
        ],
        &rows,
    ));
    let intro = results.first().map_or(String::new(), |r| {
        format!(
            "A prompt of the first {} tokens of {} and a question that differs every round, \
             one token generated; medians of {}.",
            r.prefix_tokens, r.text, r.rounds
        )
    });
    section("prefix", "Prefix cache", &intro, &body)
}

fn header(files: &[BenchFile], command: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<header><h1>afo benchmark report</h1><p class=\"command\">Command: <code>{}</code></p>",
        esc(command)
    );
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut seen = Vec::new();
    for f in files {
        let m = &f.machine;
        if seen.contains(&m) {
            continue;
        }
        seen.push(m);
        rows.extend([
            vec!["machine".into(), m.host.clone()],
            vec!["CPU".into(), m.cpu.clone()],
            vec!["CPU features".into(), m.cpu_features.join(" ")],
            vec!["quantized kernel".into(), m.kernel.clone()],
            vec![
                "cores".into(),
                format!("{} available, {} threads used", m.cores, m.threads),
            ],
            vec![
                "memory".into(),
                if m.memory_bytes == 0 {
                    "unknown".into()
                } else {
                    ByteSize(m.memory_bytes).to_string()
                },
            ],
            vec!["OS".into(), m.os.clone()],
        ]);
    }
    for f in files {
        rows.extend([
            vec![
                "afo".into(),
                format!("{} (git {})", f.afo_version, f.git_commit),
            ],
            vec!["date".into(), f.date.clone()],
            vec!["measured by".into(), f.command.clone()],
        ]);
    }
    s.push_str(&table(&["", ""], &rows).replacen("<table>", "<table class=\"machine\">", 1));
    s.push_str("</header>\n");
    s
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;\
padding:0 1em;color:#222}h1{margin-bottom:.2em}code{background:#f3f3f3;padding:1px 4px;\
word-break:break-all}table{border-collapse:collapse;margin:.8em 0 1.6em;font-size:14px}\
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}\
table.machine thead{display:none}section{margin-top:2em}svg.chart{display:block;\
max-width:100%;height:auto;font-size:12px}svg .title{font-size:15px;font-weight:600}\
svg .axis{stroke:#333}svg .grid{stroke:#e4e4e4}svg .tick,svg .legend{fill:#333}\
svg .axis-title{fill:#333;font-size:13px}svg .value{fill:#333;font-size:11px}\
svg .note{fill:#000;font-weight:700;font-size:13px}\
svg .identity{stroke:#999;stroke-dasharray:5 4}";

/// The results of one kind, from every file, in order.
fn of<'a, T>(files: &'a [BenchFile], kind: fn(&'a BenchResult) -> Option<&'a T>) -> Vec<&'a T> {
    files
        .iter()
        .flat_map(|f| f.results.iter())
        .filter_map(kind)
        .collect()
}

/// The report's HTML: the header, then one section per kind of result present.
pub(crate) fn render(
    files: &[BenchFile],
    reference: Option<(&Path, &[ReferenceTest])>,
    command: &str,
) -> String {
    let mut body = header(files, command);
    let speed = of(files, |r| match r {
        BenchResult::Speed(x) => Some(x),
        _ => None,
    });
    if !speed.is_empty() || reference.is_some() {
        body.push_str(&speed_section(&speed, reference));
    }
    let batching = of(files, |r| match r {
        BenchResult::Batching(x) => Some(x),
        _ => None,
    });
    if !batching.is_empty() {
        body.push_str(&batching_section(&batching));
    }
    let memory = of(files, |r| match r {
        BenchResult::Memory(x) => Some(x),
        _ => None,
    });
    if !memory.is_empty() {
        body.push_str(&memory_section(&memory));
    }
    let kv = of(files, |r| match r {
        BenchResult::Kv(x) => Some(x),
        _ => None,
    });
    if !kv.is_empty() {
        body.push_str(&kv_section(&kv));
    }
    let image = of(files, |r| match r {
        BenchResult::Image(x) => Some(x),
        _ => None,
    });
    if !image.is_empty() {
        body.push_str(&image_section(&image));
    }
    let prefix = of(files, |r| match r {
        BenchResult::Prefix(x) => Some(x),
        _ => None,
    });
    if !prefix.is_empty() {
        body.push_str(&prefix_section(&prefix));
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>afo benchmark report</title><style>{STYLE}</style></head><body>\n{body}\
         <footer><p>Written by afo {}.</p></footer></body></html>\n",
        esc(env!("CARGO_PKG_VERSION"))
    )
}
