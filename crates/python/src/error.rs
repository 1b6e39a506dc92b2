//! The runtime's errors as Python exceptions: `AfoError` and its subclasses, with the
//! same message as the Rust error and the numbers of a refusal as attributes.

use afo_runtime::Error;
use afo_runtime::engine::Error as EngineError;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

pyo3::create_exception!(
    afo,
    AfoError,
    PyRuntimeError,
    "Base class of every error the afo runtime raises (a RuntimeError).\n\n\
     The message is the runtime's own: it names the thing and the place."
);

pyo3::create_exception!(
    afo,
    RefusedError,
    AfoError,
    "The memory ledger refused the run (or a model's load): no plan fits under the cutline.\n\n\
     Attributes: needed_bytes, available_bytes, cutline_bytes, reserved_bytes, margin_bytes,\n\
     unaccounted_bytes (ints), tried (list of the plans tried, in order) and admission\n\
     (dict: the admission record written to the SSOT log)."
);

pyo3::create_exception!(
    afo,
    ModelError,
    AfoError,
    "A model could not be loaded or used: a missing or invalid file, an unsupported\n\
     architecture, a tokenizer or chat template that cannot be read."
);

/// A Python `ValueError` with this message.
pub(crate) fn value_error(message: impl Into<String>) -> PyErr {
    PyValueError::new_err(message.into())
}

/// An `AfoError` with this message (for failures of the bindings themselves, such as
/// a thread that cannot be started).
pub(crate) fn afo_error(message: impl Into<String>) -> PyErr {
    AfoError::new_err(message.into())
}

/// Whether an engine error is about the model (its files, its format, its tokenizer)
/// rather than a run.
fn is_model_error(e: &EngineError) -> bool {
    matches!(
        e,
        EngineError::Io { .. }
            | EngineError::LoadFailed { .. }
            | EngineError::UnsupportedArchitecture { .. }
            | EngineError::InvalidConfig { .. }
            | EngineError::GgufMetadata { .. }
            | EngineError::Gguf { .. }
            | EngineError::TensorOutOfBounds { .. }
            | EngineError::MissingTensor { .. }
            | EngineError::TensorShape { .. }
            | EngineError::Safetensors { .. }
            | EngineError::FileTooLarge { .. }
            | EngineError::ShardOutsideModel { .. }
            | EngineError::ModelNotCached { .. }
            | EngineError::TokenizerMetadata { .. }
            | EngineError::UnsupportedTokenizer { .. }
            | EngineError::TokenizerConfig { .. }
            | EngineError::Json { .. }
            | EngineError::ChatTemplate { .. }
            | EngineError::InvalidTokenizer { .. }
    )
}

/// The admission record as a dict.
pub(crate) fn admission_dict<'py>(
    py: Python<'py>,
    a: &afo_runtime::ssot::AdmissionRecord,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("decision", &a.decision)?;
    d.set_item("plan", &a.plan)?;
    d.set_item("tried", &a.tried)?;
    d.set_item("reserved_bytes", a.reserved_bytes)?;
    d.set_item("run_bytes", a.run_bytes)?;
    d.set_item("unaccounted_bytes", a.unaccounted_bytes)?;
    Ok(d)
}

/// The Python exception of a runtime error: `RefusedError` for a refusal (with its
/// numbers), `ValueError` for bad sampling parameters and stop strings, `ModelError`
/// for a model that cannot be loaded, `AfoError` otherwise. The message is the
/// error's own.
pub(crate) fn to_py(py: Python<'_>, err: &Error) -> PyErr {
    let message = err.to_string();
    let refusal = match err {
        Error::Refused { refusal, tried } => Some((refusal, tried.clone())),
        Error::Engine(EngineError::ModelTooLarge { refusal, .. }) => {
            Some((refusal, vec!["load the model".to_owned()]))
        }
        _ => None,
    };
    if let Some((refusal, tried)) = refusal {
        let exception = RefusedError::new_err(message);
        let value = exception.value(py);
        let set = || -> PyResult<()> {
            value.setattr("needed_bytes", refusal.needed)?;
            value.setattr("available_bytes", refusal.available())?;
            value.setattr("cutline_bytes", refusal.cutline)?;
            value.setattr("reserved_bytes", refusal.reserved)?;
            value.setattr("margin_bytes", refusal.margin)?;
            value.setattr("unaccounted_bytes", refusal.unaccounted)?;
            value.setattr("tried", tried)?;
            let admission = match err.admission_record() {
                Some(a) => admission_dict(py, &a)?.into_any(),
                None => py.None().into_bound(py),
            };
            value.setattr("admission", admission)?;
            Ok(())
        };
        return match set() {
            Ok(()) => exception,
            Err(e) => e,
        };
    }
    match err {
        Error::Engine(
            EngineError::InvalidSamplingParam { .. }
            | EngineError::EmptyStopString { .. }
            | EngineError::EmptyPrompt,
        ) => PyValueError::new_err(message),
        Error::Engine(e) if is_model_error(e) => ModelError::new_err(message),
        _ => AfoError::new_err(message),
    }
}
