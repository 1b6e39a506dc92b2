//! What `afo bench` measures, as data: one struct per kind of result, the file that
//! holds them with the machine they were measured on, and the reference results of
//! llama.cpp's `llama-bench -o json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One benchmark's result; the `kind` field names it in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum BenchResult {
    /// `afo bench speed`.
    Speed(SpeedResult),
    /// `afo bench batching`.
    Batching(BatchingResult),
    /// `afo bench memory`.
    Memory(MemoryResult),
    /// `afo bench prefix`.
    Prefix(PrefixResult),
    /// `afo eval kv`.
    Kv(KvResult),
    /// `afo bench image`.
    Image(ImageResult),
}

/// Prefill and decode of one sequence, and cold load vs warm re-acquire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SpeedResult {
    /// The model file.
    pub model: String,
    /// The weight format: the file's main type (`Q4_1`) or the `--scheme` it was
    /// quantized to while loading (`int8`).
    pub format: String,
    /// Prompt tokens of the prefill measurement.
    pub prompt_tokens: usize,
    /// Tokens of the decode measurement.
    pub generated_tokens: usize,
    /// Rounds (the figures are medians).
    pub rounds: usize,
    /// Compute threads.
    pub threads: String,
    /// Prefill tokens per second.
    pub prefill_tok_s: f64,
    /// Decode tokens per second.
    pub decode_tok_s: f64,
    /// Loading the model into a fresh runtime.
    pub cold_load_ms: f64,
    /// Re-acquiring the cached model (median).
    pub warm_acquire_ms: f64,
    /// The CPU features that decide which kernels run (`/proc/cpuinfo` names).
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// Which kernel multiplies the weights in a decode step, per distinct path.
    #[serde(default)]
    pub decode_kernels: Vec<KernelUse>,
    /// Which kernel multiplies the weights in the prefill, per distinct path.
    #[serde(default)]
    pub prefill_kernels: Vec<KernelUse>,
    /// Bytes one decode step reads: the weights it multiplies and the KV cache at the
    /// mean position of the measured steps.
    #[serde(default)]
    pub decode_bytes_per_token: u64,
    /// Main-memory read bandwidth measured with the same threads, GB/s (10^9 bytes).
    #[serde(default)]
    pub read_bandwidth_gbs: f64,
    /// Tokens in the KV cache before the measured decode steps (`--depth`).
    #[serde(default)]
    pub depth: usize,
    /// How the KV cache held keys and values (`f32`, `q8_0`, ...).
    #[serde(default = "default_kv_format")]
    pub kv_format: String,
}

fn default_kv_format() -> String {
    "f32".to_owned()
}

impl SpeedResult {
    /// The decode speed memory allows: bandwidth over the bytes a step reads (tok/s);
    /// 0 when either was not measured.
    pub(crate) fn roofline_tok_s(&self) -> f64 {
        if self.decode_bytes_per_token == 0 {
            return 0.0;
        }
        self.read_bandwidth_gbs * 1e9 / self.decode_bytes_per_token as f64
    }

    /// Decode speed as a fraction of [`roofline_tok_s`](Self::roofline_tok_s).
    pub(crate) fn roofline_fraction(&self) -> f64 {
        let roof = self.roofline_tok_s();
        if roof > 0.0 {
            self.decode_tok_s / roof
        } else {
            0.0
        }
    }
}

/// The weights one kernel path multiplies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KernelUse {
    /// Format and kernel (`q8_0 avx2`, `f16 dense avx512vnni`, `f32 candle gemm`).
    pub path: String,
    /// Weight matrices.
    pub matrices: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Aggregate decode speed of many sequences batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BatchingResult {
    /// The model file.
    pub model: String,
    /// The weight format (see [`SpeedResult::format`]).
    pub format: String,
    /// Prompt tokens of each sequence.
    pub prompt_tokens: usize,
    /// Tokens decoded by each sequence.
    pub generated_tokens: usize,
    /// Rounds (the figures are medians).
    pub rounds: usize,
    /// One point per sequence count.
    pub points: Vec<BatchingPoint>,
}

/// Decode speed at one sequence count.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct BatchingPoint {
    /// Sequences decoded together.
    pub sequences: usize,
    /// Decode tokens per second over all sequences.
    pub tok_s: f64,
}

/// Predicted against measured peak memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MemoryResult {
    /// The model file.
    pub model: String,
    /// One row per run.
    pub rows: Vec<MemoryRow>,
}

/// One run of `afo bench memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MemoryRow {
    /// What ran.
    #[serde(flatten)]
    pub run: MemoryRun,
    /// The ledger's prediction at admission.
    pub predicted_bytes: u64,
    /// The process's resident peak over the call.
    pub measured_bytes: u64,
}

/// What one row of `afo bench memory` ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "run", rename_all = "snake_case")]
pub(crate) enum MemoryRun {
    /// One `generate`.
    Prompt {
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Tokens generated.
        generated: usize,
    },
    /// Concurrent `generate` calls on one runtime.
    Batch {
        /// Concurrent runs.
        runs: usize,
        /// Prompt tokens of each.
        prompt_tokens: usize,
        /// Tokens generated by each.
        generated: usize,
        /// Runs that were degraded rather than admitted as asked.
        degraded: usize,
    },
    /// An image -> summary chain.
    Chain {
        /// Tokens of the analysis stage.
        analysis_tokens: usize,
        /// Tokens of the summary stage.
        summary_tokens: usize,
    },
}

impl MemoryRow {
    /// The row's name in tables and plots.
    pub(crate) fn label(&self) -> String {
        match &self.run {
            MemoryRun::Prompt { prompt_tokens, .. } => format!("{prompt_tokens} tokens"),
            MemoryRun::Batch {
                runs,
                prompt_tokens,
                ..
            } => format!("{runs} x {prompt_tokens} tokens"),
            MemoryRun::Chain { .. } => "chain (tiny VLM + summary)".into(),
        }
    }

    /// `(predicted - measured) / measured`, in percent.
    pub(crate) fn error_percent(&self) -> f64 {
        let (p, m) = (self.predicted_bytes as f64, self.measured_bytes as f64);
        100.0 * (p - m) / m
    }
}

/// Time to first token with a cached prompt prefix against without.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PrefixResult {
    /// The model file.
    pub model: String,
    /// Tokens of the shared prefix.
    pub prefix_tokens: usize,
    /// The text the prefix was cut from.
    pub text: String,
    /// Rounds (the figures are medians).
    pub rounds: usize,
    /// Compute threads.
    pub threads: String,
    /// Without a prefix cache.
    pub cold_ms: f64,
    /// The first run with the prefix cache (a miss that publishes the prefix).
    pub first_ms: f64,
    /// The next run with the same prefix.
    pub cached_ms: f64,
    /// Prefix tokens the cached run reused.
    pub hit_tokens: usize,
    /// Publishing the prefix alone.
    pub publish_ms: f64,
    /// Seeding a cache from the published prefix alone.
    pub seed_ms: f64,
}

/// Perplexity over one long context with the KV cache under a budget, per policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KvResult {
    /// The model file.
    pub model: String,
    /// The text file.
    pub file: String,
    /// Tokens read as one sequence.
    pub tokens: usize,
    /// The KV budget in tokens.
    pub budget: usize,
    /// Tokens per forward pass.
    pub chunk: usize,
    /// The full cache first, then one row per policy.
    pub rows: Vec<KvRow>,
}

/// One cache of `afo eval kv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KvRow {
    /// `full` or the policy (`sinks:4+508`).
    pub policy: String,
    /// Perplexity over the sequence.
    pub perplexity: f64,
    /// KV bytes held at the end.
    pub kv_bytes: u64,
    /// Tokens evicted.
    pub evicted_tokens: usize,
    /// Time taken.
    pub seconds: f64,
}

/// Image preprocessing time and peak memory per image size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ImageResult {
    /// The preprocessing configuration (model defaults and pixel budget).
    pub config: String,
    /// Rounds (the figures are medians).
    pub rounds: usize,
    /// One row per image size.
    pub rows: Vec<ImageRow>,
}

/// One image size of `afo bench image`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ImageRow {
    /// Source width.
    pub width: u32,
    /// Source height.
    pub height: u32,
    /// Encoded (JPEG) bytes of the source.
    pub file_bytes: u64,
    /// Width after resizing.
    pub resized_width: usize,
    /// Height after resizing.
    pub resized_height: usize,
    /// Tokens the image becomes.
    pub tokens: usize,
    /// Decode + resize + normalise + patchify.
    pub ms: f64,
    /// Peak resident bytes over the call above the resident bytes before it.
    pub peak_bytes: u64,
}

impl ImageRow {
    /// `WIDTHxHEIGHT`.
    pub(crate) fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// The machine and build that produced a set of results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Machine {
    /// The host name.
    pub host: String,
    /// The CPU: its model name, with its family and model numbers where `/proc/cpuinfo`
    /// gives them (`AMD EPYC (family 26, model 2)`).
    pub cpu: String,
    /// Instruction-set extensions relevant to the kernels that this CPU has.
    pub cpu_features: Vec<String>,
    /// The quantized-matmul kernel chosen at run time.
    pub kernel: String,
    /// Logical CPUs available to the process.
    pub cores: usize,
    /// Compute threads used.
    pub threads: String,
    /// Total memory, bytes (0 when unknown).
    pub memory_bytes: u64,
    /// Operating system and kernel.
    pub os: String,
}

/// The file `afo bench --json` and `afo bench report` write: results, the machine,
/// the build and the command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BenchFile {
    /// `afo`'s version.
    pub afo_version: String,
    /// `git rev-parse HEAD` where it ran, or `unknown`.
    pub git_commit: String,
    /// When it ran (RFC 3339, UTC).
    pub date: String,
    /// The command line.
    pub command: String,
    /// Where it ran.
    pub machine: Machine,
    /// The results.
    pub results: Vec<BenchResult>,
}

impl BenchFile {
    /// Writes the file as pretty JSON.
    pub(crate) fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }

    /// Reads a file written by [`BenchFile::write`]; the error names the file and
    /// what is wrong (the missing field, the line and column).
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("results file {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "results file {}: not a result of `afo bench --json`: {e}",
                path.display()
            )
        })
    }
}

/// The JSON files named by `--from`: each path a file, or a folder whose `*.json`
/// files are read in name order.
pub(crate) fn read_all(paths: &[PathBuf]) -> anyhow::Result<Vec<BenchFile>> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| anyhow::anyhow!("results folder {}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            entries.sort();
            anyhow::ensure!(
                !entries.is_empty(),
                "results folder {}: no .json files",
                path.display()
            );
            for entry in entries {
                files.push(BenchFile::read(&entry)?);
            }
        } else {
            files.push(BenchFile::read(path)?);
        }
    }
    Ok(files)
}

/// One test of `llama-bench -o json`: a prompt (`n_gen` 0) or a generation
/// (`n_prompt` 0) test.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ReferenceTest {
    /// `model_type`, e.g. `llama 135M Q4_1`.
    pub model_type: String,
    /// `n_prompt`.
    pub n_prompt: u64,
    /// `n_gen`.
    pub n_gen: u64,
    /// `avg_ts`: tokens per second, mean of the repetitions.
    pub avg_ts: f64,
    /// `stddev_ts`, when present.
    pub stddev_ts: Option<f64>,
    /// `n_threads`, when present.
    pub n_threads: Option<u64>,
}

impl ReferenceTest {
    /// The weight format in `model_type` (what follows the architecture and size:
    /// `Q4_1`, `Q4_K - Medium`).
    pub(crate) fn format(&self) -> &str {
        let mut parts = self.model_type.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(_), Some(rest)) => rest,
            _ => &self.model_type,
        }
    }

    /// Whether the test is of the format afo calls `format` (`Q4_1`, `q8_0`).
    pub(crate) fn matches(&self, format: &str) -> bool {
        let ours = format.trim().to_ascii_uppercase();
        let theirs = self.format().trim().to_ascii_uppercase();
        theirs == ours || theirs.split(' ').next() == Some(ours.as_str())
    }

    /// `pp512` or `tg64`, as llama-bench names its tests.
    pub(crate) fn test_name(&self) -> String {
        match (self.n_prompt, self.n_gen) {
            (p, 0) => format!("pp{p}"),
            (0, g) => format!("tg{g}"),
            (p, g) => format!("pp{p}+tg{g}"),
        }
    }
}

/// Reads the JSON that `llama-bench -o json` writes (an array of tests); the error
/// names the file, the entry and the field.
pub(crate) fn read_reference(path: &Path) -> anyhow::Result<Vec<ReferenceTest>> {
    let bad = |what: String| anyhow::anyhow!("reference file {}: {what}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let entries = value
        .as_array()
        .ok_or_else(|| bad("expected an array of tests, as `llama-bench -o json` writes".into()))?;
    if entries.is_empty() {
        return Err(bad("no tests in the array".into()));
    }
    let mut tests = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = |name: &str| {
            entry
                .get(name)
                .filter(|v| !v.is_null())
                .ok_or_else(|| bad(format!("test {i}: missing field `{name}`")))
        };
        let number = |name: &str| -> anyhow::Result<f64> {
            field(name)?
                .as_f64()
                .ok_or_else(|| bad(format!("test {i}: field `{name}` is not a number")))
        };
        let count = |name: &str| -> anyhow::Result<u64> {
            field(name)?.as_u64().ok_or_else(|| {
                bad(format!(
                    "test {i}: field `{name}` is not a non-negative integer"
                ))
            })
        };
        let optional = |name: &str| entry.get(name).filter(|v| !v.is_null());
        let model_type = field("model_type")?
            .as_str()
            .ok_or_else(|| bad(format!("test {i}: field `model_type` is not a string")))?
            .to_owned();
        let stddev_ts = match optional("stddev_ts") {
            None => None,
            Some(_) => Some(number("stddev_ts")?),
        };
        let n_threads = match optional("n_threads") {
            None => None,
            Some(_) => Some(count("n_threads")?),
        };
        tests.push(ReferenceTest {
            model_type,
            n_prompt: count("n_prompt")?,
            n_gen: count("n_gen")?,
            avg_ts: number("avg_ts")?,
            stddev_ts,
            n_threads,
        });
    }
    Ok(tests)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_format_is_what_follows_architecture_and_size() {
        let t = |m: &str| ReferenceTest {
            model_type: m.into(),
            n_prompt: 512,
            n_gen: 0,
            avg_ts: 1.0,
            stddev_ts: None,
            n_threads: None,
        };
        assert_eq!(t("llama 135M Q4_1").format(), "Q4_1");
        assert!(t("llama 135M Q4_1").matches("q4_1"));
        assert!(!t("llama 135M Q4_1").matches("Q4_0"));
        assert!(t("qwen2 7B Q4_K - Medium").matches("Q4_K"));
        assert_eq!(t("llama 135M Q4_1").test_name(), "pp512");
    }

    #[test]
    fn a_memory_row_round_trips_with_its_run_tag() {
        let row = MemoryRow {
            run: MemoryRun::Batch {
                runs: 2,
                prompt_tokens: 256,
                generated: 32,
                degraded: 0,
            },
            predicted_bytes: 110,
            measured_bytes: 100,
        };
        let json = serde_json::to_string(&row).unwrap();
        assert!(json.contains(r#""run":"batch""#), "{json}");
        assert_eq!(serde_json::from_str::<MemoryRow>(&json).unwrap(), row);
        assert!((row.error_percent() - 10.0).abs() < 1e-9);
        assert_eq!(row.label(), "2 x 256 tokens");
    }
}
