//! Runs on a Rust thread, waited for from Python with the GIL released.
//!
//! A generation runs on its own thread and sends its text deltas and its end over a
//! channel. The Python side waits in short slices with the GIL released and runs
//! Python's signal handlers between them, so that Ctrl-C (`KeyboardInterrupt`)
//! cancels the run: a flag the generation's callback reads turns into
//! `ControlFlow::Break`, the runtime writes the run's SSOT record, and the exception
//! goes on. Dropping or closing a `Stream` cancels its run the same way.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use afo_runtime::{GenerateRequest, GenerateResponse, Runtime};
use pyo3::prelude::*;

use crate::error::{afo_error, to_py};
use crate::results::GenerateResult;

/// How long the Python side waits with the GIL released before it runs Python's
/// signal handlers again: the longest a Ctrl-C waits to be seen.
const POLL: Duration = Duration::from_millis(50);

/// Deltas a stream's generation may run ahead of its reader.
const STREAM_AHEAD: usize = 64;

/// What a generation's thread sends.
enum Event {
    /// A text delta (streams only).
    Text(String),
    /// The run's end.
    Done(Box<afo_runtime::Result<GenerateResponse>>),
}

/// A generation running on its own thread.
pub(crate) struct Run {
    rx: Mutex<Receiver<Event>>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// The result of a run cancelled by a Python signal handler's exception.
    interrupted: Option<afo_runtime::Result<GenerateResponse>>,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run")
            .field("cancelled", &self.cancel.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Run {
    /// Starts `request` on a new thread; with `stream`, each text delta is sent.
    pub(crate) fn start(
        runtime: Arc<Runtime>,
        request: GenerateRequest,
        stream: bool,
    ) -> PyResult<Run> {
        let (tx, rx) = mpsc::sync_channel(if stream { STREAM_AHEAD } else { 1 });
        let cancel = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&cancel);
        let thread = std::thread::Builder::new()
            .name("afo-generate".into())
            .spawn(move || {
                let result = runtime.generate_stream(&request, |delta| {
                    if flag.load(Ordering::Relaxed) {
                        return ControlFlow::Break(());
                    }
                    // A reader that went away cancels the run.
                    if stream && tx.send(Event::Text(delta.to_owned())).is_err() {
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                });
                let _ = tx.send(Event::Done(Box::new(result)));
            })
            .map_err(|e| afo_error(format!("cannot start the generation thread: {e}")))?;
        Ok(Run {
            rx: Mutex::new(rx),
            cancel,
            thread: Some(thread),
            interrupted: None,
        })
    }

    /// The next event, `None` once the thread is gone. Waits with the GIL released;
    /// a Python signal handler that raises (Ctrl-C) cancels the run, waits for its
    /// end (so that its record is written; the result is kept in `interrupted`) and
    /// returns the exception.
    fn next_event(&mut self, py: Python<'_>) -> PyResult<Option<Event>> {
        loop {
            let rx = &self.rx;
            let got = py.detach(|| {
                rx.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .recv_timeout(POLL)
            });
            match got {
                Ok(event) => return Ok(Some(event)),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.interrupted = self.cancel_and_finish(py);
                        return Err(interrupt);
                    }
                }
            }
        }
    }

    /// Cancels the run and waits for its end (with the GIL released): the runtime
    /// writes the record of a cancelled run too. Returns the run's result, `None`
    /// when it was taken already.
    fn cancel_and_finish(
        &mut self,
        py: Python<'_>,
    ) -> Option<afo_runtime::Result<GenerateResponse>> {
        self.cancel.store(true, Ordering::Relaxed);
        let rx = &self.rx;
        let thread = self.thread.take();
        py.detach(move || {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            let mut done = None;
            // Deltas still queued are dropped; the thread sends its end last.
            while let Ok(event) = rx.recv() {
                if let Event::Done(result) = event {
                    done = Some(*result);
                }
            }
            if let Some(t) = thread {
                let _ = t.join();
            }
            done
        })
    }

    /// Waits for the end of a run started without `stream`.
    pub(crate) fn wait(mut self, py: Python<'_>) -> PyResult<GenerateResult> {
        loop {
            match self.next_event(py)? {
                Some(Event::Done(result)) => return finish(py, *result),
                Some(Event::Text(_)) => {}
                None => return Err(thread_gone()),
            }
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // The thread sees the flag (or the closed channel) at its next token, ends
        // the run and writes its record; nobody waits for it.
        self.cancel.store(true, Ordering::Relaxed);
    }
}

fn thread_gone() -> PyErr {
    afo_error("the generation thread ended without a result (it panicked)")
}

fn finish(
    py: Python<'_>,
    result: afo_runtime::Result<GenerateResponse>,
) -> PyResult<GenerateResult> {
    result
        .map(|inner| GenerateResult { inner })
        .map_err(|e| to_py(py, &e))
}

/// An iterator over the text deltas of a generation, from `Runtime.stream`.
///
/// Iterate it to get each piece of text as soon as it decodes; once it is exhausted,
/// `result` holds the `GenerateResult` (its text is the deltas joined). Breaking out
/// of the loop and dropping the iterator, or calling `close()`, cancels the run; the
/// run's SSOT record is written all the same (finish_reason "cancelled"). Ctrl-C
/// while waiting for a delta cancels the run (`result` then holds what was generated)
/// and raises KeyboardInterrupt; one that lands in the loop's own code leaves the
/// run going until the stream is closed or dropped. Errors
/// (a refusal, a model that cannot be loaded) are raised by the first `next()`.
///
/// Also a context manager: leaving the `with` block closes the stream.
#[pyclass(module = "afo")]
#[derive(Debug)]
pub struct Stream {
    run: Option<Run>,
    result: Option<Py<GenerateResult>>,
}

impl Stream {
    pub(crate) fn new(run: Run) -> Self {
        Self {
            run: Some(run),
            result: None,
        }
    }

    fn settle(
        &mut self,
        py: Python<'_>,
        result: afo_runtime::Result<GenerateResponse>,
    ) -> PyResult<()> {
        self.run = None;
        let r = finish(py, result)?;
        self.result = Some(Py::new(py, r)?);
        Ok(())
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<String>> {
        loop {
            let Some(run) = self.run.as_mut() else {
                return Ok(None);
            };
            match run.next_event(py) {
                Ok(Some(Event::Text(delta))) => return Ok(Some(delta)),
                Ok(Some(Event::Done(result))) => {
                    self.settle(py, *result)?;
                }
                Ok(None) => {
                    self.run = None;
                    return Err(thread_gone());
                }
                Err(interrupt) => {
                    // The run was cancelled and has ended: keep what it generated.
                    if let Some(Ok(inner)) = run.interrupted.take() {
                        self.result = Some(Py::new(py, GenerateResult { inner })?);
                    }
                    self.run = None;
                    return Err(interrupt);
                }
            }
        }
    }

    /// Cancels the run if it is still going and waits for its end (its SSOT record
    /// is written); `result` then holds what was generated. Does nothing once the
    /// stream is exhausted.
    fn close(&mut self, py: Python<'_>) -> PyResult<()> {
        if let Some(mut run) = self.run.take() {
            match run.cancel_and_finish(py) {
                Some(result) => self.settle(py, result)?,
                None => return Err(thread_gone()),
            }
        }
        Ok(())
    }

    /// The `GenerateResult` once the stream is exhausted or closed, else None.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<GenerateResult>> {
        self.result.as_ref().map(|r| r.clone_ref(py))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(
        &mut self,
        py: Python<'_>,
        _args: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        match (&self.run, &self.result) {
            (Some(_), _) => "Stream(running)".to_owned(),
            (None, Some(_)) => "Stream(done)".to_owned(),
            (None, None) => "Stream(failed)".to_owned(),
        }
    }
}

/// Runs `f` on a new thread and waits for it with the GIL released. Ctrl-C returns
/// KeyboardInterrupt at once; `f` (a chain, a query, a load: none can be cancelled
/// midway) finishes in the background and its SSOT record is still written.
pub(crate) fn on_thread<T, F>(py: Python<'_>, name: &str, f: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("afo-{name}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| afo_error(format!("cannot start the {name} thread: {e}")))?;
    let rx = Mutex::new(rx);
    loop {
        let got = py.detach(|| {
            rx.lock()
                .unwrap_or_else(|e| e.into_inner())
                .recv_timeout(POLL)
        });
        match got {
            Ok(value) => return Ok(value),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(afo_error(format!(
                    "the {name} thread ended without a result (it panicked)"
                )));
            }
            Err(RecvTimeoutError::Timeout) => py.check_signals()?,
        }
    }
}
