//! The streaming JSONL reader.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::record::Record;

/// What to do with a line that is not a valid record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// Report it in [`LogReader::skipped`] and go on. The default.
    #[default]
    Skip,
    /// Stop with [`Error::Malformed`] naming the line.
    Strict,
}

/// A record read from a log, with its line number.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The 1-based line number.
    pub line: usize,
    /// The record.
    pub record: Record,
}

/// A line the reader did not return as a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The 1-based line number.
    pub line: usize,
    /// Why it was skipped.
    pub reason: String,
    /// True for a torn line: a record cut short, as a crash mid-write leaves it (the
    /// file's last line without a newline, or a line that stops in the middle of a
    /// JSON object and was ended by the next writer that opened the log).
    pub torn: bool,
}

/// Reads records from a JSONL log one line at a time.
///
/// Blank lines are ignored. A malformed line is skipped and reported, or fatal, as the
/// [`ReadMode`] says. A torn line (the last line without a trailing newline and not a
/// valid record, or any line that is a JSON object cut short) is always reported and
/// skipped, in both modes, so a crash mid-write never hides the records around it. Every record is range-checked ([`Record::validate`]); one out of
/// range counts as malformed.
#[derive(Debug)]
pub struct LogReader<R> {
    input: R,
    mode: ReadMode,
    line: usize,
    buf: Vec<u8>,
    skipped: Vec<Skipped>,
    path: Option<PathBuf>,
    done: bool,
}

impl LogReader<BufReader<File>> {
    /// Opens a log file.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened.
    pub fn open(path: impl AsRef<Path>, mode: ReadMode) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = Self::new(BufReader::new(file), mode);
        reader.path = Some(path.to_path_buf());
        Ok(reader)
    }
}

impl<R: BufRead> LogReader<R> {
    /// A reader over any buffered input.
    pub fn new(input: R, mode: ReadMode) -> Self {
        Self {
            input,
            mode,
            line: 0,
            buf: Vec::new(),
            skipped: Vec::new(),
            path: None,
            done: false,
        }
    }

    /// The lines skipped so far.
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// Reads every remaining record.
    ///
    /// # Errors
    /// As the iterator: I/O errors, and malformed lines in [`ReadMode::Strict`].
    pub fn read_all(&mut self) -> Result<Vec<Entry>> {
        self.by_ref().collect()
    }

    fn next_line(&mut self) -> Option<Result<Entry>> {
        loop {
            self.buf.clear();
            let n = match self.input.read_until(b'\n', &mut self.buf) {
                Ok(n) => n,
                Err(source) => {
                    self.done = true;
                    return Some(Err(Error::Io {
                        path: self.path.clone().unwrap_or_default(),
                        source,
                    }));
                }
            };
            if n == 0 {
                self.done = true;
                return None;
            }
            self.line += 1;
            let complete = self.buf.last() == Some(&b'\n');
            let parsed = std::str::from_utf8(&self.buf)
                .map_err(|e| format!("not UTF-8: {e}"))
                .and_then(|text| {
                    let text = text.trim();
                    if text.is_empty() {
                        return Ok(None);
                    }
                    let record = Record::from_json(text).map_err(|e| reason_of(&e))?;
                    record.validate().map_err(|e| e.to_string())?;
                    Ok(Some(record))
                });
            match parsed {
                Ok(None) => continue,
                Ok(Some(record)) => {
                    return Some(Ok(Entry {
                        line: self.line,
                        record,
                    }));
                }
                Err(reason) if !complete => {
                    tracing::debug!(line = self.line, %reason, "SSOT log: torn last line skipped");
                    self.skipped.push(Skipped {
                        line: self.line,
                        reason,
                        torn: true,
                    });
                    self.done = true;
                    return None;
                }
                Err(reason) if cut_short(&self.buf) => {
                    tracing::debug!(line = self.line, %reason, "SSOT log: torn line skipped");
                    self.skipped.push(Skipped {
                        line: self.line,
                        reason,
                        torn: true,
                    });
                }
                Err(reason) => match self.mode {
                    ReadMode::Skip => {
                        tracing::debug!(line = self.line, %reason, "SSOT log: malformed line skipped");
                        self.skipped.push(Skipped {
                            line: self.line,
                            reason,
                            torn: false,
                        });
                    }
                    ReadMode::Strict => {
                        self.done = true;
                        return Some(Err(Error::Malformed {
                            line: self.line,
                            reason,
                        }));
                    }
                },
            }
        }
    }
}

/// Whether `line` is the start of a JSON object that ends too soon: what a crash in
/// the middle of a write leaves (a line that is wrong in any other way is malformed).
fn cut_short(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    text.starts_with('{')
        && serde_json::from_str::<serde_json::Value>(text).is_err_and(|e| e.is_eof())
}

fn reason_of(e: &Error) -> String {
    match e {
        Error::Malformed { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

impl<R: BufRead> Iterator for LogReader<R> {
    type Item = Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        self.next_line()
    }
}
