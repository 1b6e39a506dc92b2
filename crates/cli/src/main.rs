//! The `afo` command-line tool.

#[macro_use]
mod cmd;

use clap::{Parser, Subcommand};

/// afo: run language and vision-language models locally, under a hard memory cutline.
#[derive(Debug, Parser)]
#[command(name = "afo", version, about)]
struct Cli {
    /// Compute threads (default: the cores available to this process).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// The most capable kernels to run: `avx512vnni` (the default: the best this CPU
    /// has), `avx2` (as on a CPU without AVX-512), or `scalar` (portable code only).
    #[arg(long, global = true, value_name = "KERNEL")]
    kernels: Option<afo_runtime::quant::kernels::Kernel>,
    /// Keep prompts off the AMX tiles on CPUs that have them, for timing one against
    /// the other: AVX-512 VNNI for quantized weights (the same results), FMA tiles for
    /// f32 weights (results that differ by f32 rounding only).
    #[arg(long, global = true)]
    no_amx: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text with a model, streamed to stdout; stats go to stderr.
    Generate(cmd::generate::Args),
    /// Analyse images with a vision-language model, then summarise with a text model.
    Chain(cmd::chain::Args),
    /// Preprocess images for a vision-language model: sizes, patch grid, pixels,
    /// compression ratio, time and peak memory per image.
    Image(cmd::image::Args),
    /// Describe a model file: architecture, parameters, types, tokenizer.
    Inspect(cmd::inspect::Args),
    /// Measure a model's quality.
    Eval {
        #[command(subcommand)]
        command: cmd::eval::Command,
    },
    /// Download a model from a Hugging Face compatible hub into the Hugging Face cache
    /// (`ORG/NAME`, or one file: `ORG/NAME:FILE`).
    Pull(cmd::pull::Args),
    /// Show which catalog model a query would run on, and why, without running it.
    Route(cmd::route::Args),
    /// Quantize a model by a policy and save it as GGUF.
    Quantize(cmd::quantize::Args),
    /// Measure prefill and decode speed, and cold load vs warm re-acquire.
    Bench(cmd::bench::Args),
    /// Serve models over an OpenAI-compatible HTTP API, with /health, /metrics and a
    /// live dashboard.
    Serve(cmd::serve::Args),
    /// Print the JSON Schema of an SSOT record version.
    Schema(cmd::schema::Args),
    /// Work with SSOT monitoring logs.
    Ssot {
        #[command(subcommand)]
        command: cmd::ssot::Command,
    },
}

/// Sets the compute thread count once, before any thread pool starts: rayon and
/// candle both read `RAYON_NUM_THREADS` (candle re-reads the CPU list on every matmul
/// when it is unset).
fn set_threads(threads: Option<usize>) {
    let n = threads
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok()?.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    // SAFETY: called first thing in `main`, before any other thread exists, so no
    // other thread can read the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    set_threads(cli.threads);
    if let Some(kernel) = cli.kernels {
        // First thing, before any matrix product chooses its kernel.
        afo_runtime::quant::kernels::limit_kernels(kernel);
    }
    if cli.no_amx {
        afo_runtime::quant::kernels::disable_amx();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(&args),
        Command::Chain(args) => cmd::chain::run(&args),
        Command::Image(args) => cmd::image::run(&args),
        Command::Inspect(args) => cmd::inspect::run(&args),
        Command::Eval { command } => cmd::eval::run(&command),
        Command::Pull(args) => cmd::pull::run(&args),
        Command::Route(args) => cmd::route::run(&args),
        Command::Quantize(args) => cmd::quantize::run(&args),
        Command::Bench(args) => cmd::bench::run(&args),
        Command::Serve(args) => cmd::serve::run(&args),
        Command::Schema(args) => cmd::schema::run(&args),
        Command::Ssot { command } => cmd::ssot::run(&command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader of our output went away (`afo inspect M | head`): not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line. A cause is added only when the message before
/// it does not already quote it (the engine's errors quote their source), and line
/// breaks inside a message become spaces.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
