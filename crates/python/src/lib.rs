//! Python bindings of the afo runtime: the `afo` package.
//!
//! This crate builds the extension module `afo._afo` with [PyO3](https://pyo3.rs)
//! and [maturin](https://www.maturin.rs) (abi3: one wheel for every CPython >= 3.9);
//! `python/afo/__init__.py` re-exports it, and `python/afo/__init__.pyi` types it.
//!
//! - [`runtime::PyRuntime`] (`afo.Runtime`) wraps [`afo_runtime::Runtime`]:
//!   `generate`, `stream`, `chain`, `query`, `health`, `preload`, `evict`.
//! - [`run`]: every run happens on a Rust thread while Python waits with the GIL
//!   released, running its signal handlers between short waits, so that Ctrl-C
//!   cancels a generation (its SSOT record is still written) and other Python
//!   threads keep running.
//! - [`results`]: `GenerateResult`, `ChainResult`, `QueryResult`.
//! - [`error`]: `AfoError` (a `RuntimeError`), `RefusedError` with the refusal's
//!   numbers, `ModelError`; bad arguments raise `ValueError`.
//!
//! Build and install: `pip install ./crates/python` (maturin is the PEP 517 build
//! backend), or `maturin develop` in `crates/python`. The tests are Python:
//! `scripts/python.sh` builds the package into a virtual environment and runs
//! `pytest crates/python/tests`.
//!
//! # Features
//!
//! None. PyO3's `extension-module` linking is chosen by maturin
//! (`PYO3_BUILD_EXTENSION_MODULE`), so that `cargo build` and `cargo clippy` of the
//! workspace link against libpython as any binary would.

#![deny(missing_docs)]
#![warn(missing_debug_implementations)]
#![forbid(unsafe_code)]

pub mod error;
pub mod results;
pub mod run;
pub mod runtime;

use pyo3::prelude::*;

/// Writes the tiny seeded vision-language model (a Qwen3-VL with random weights,
/// a few MB) into the folder `path`, created if missing: a stand-in for a real
/// checkpoint in tests and examples of `Runtime.chain` (its descriptions are noise;
/// the pipeline, the timings and the memory figures are real).
#[pyfunction]
fn write_tiny_vlm(py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
    py.detach(|| afo_runtime::engine::TinyVlm::default().write(&path))
        .map_err(|e| error::to_py(py, &afo_runtime::Error::from(e)))
}

/// The afo runtime: local LLM and VLM inference under a memory cutline, one SSOT
/// record per run.
#[pymodule]
fn _afo(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<runtime::PyRuntime>()?;
    m.add_class::<run::Stream>()?;
    m.add_class::<results::GenerateResult>()?;
    m.add_class::<results::ChainResult>()?;
    m.add_class::<results::QueryResult>()?;
    m.add("AfoError", py.get_type::<error::AfoError>())?;
    m.add("RefusedError", py.get_type::<error::RefusedError>())?;
    m.add("ModelError", py.get_type::<error::ModelError>())?;
    m.add_function(wrap_pyfunction!(write_tiny_vlm, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
