//! The JSONL writer: one record per line, one `write` per line, append only.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::record::Record;

/// How hard the writer pushes each line toward the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// The line is handed to the operating system with one `write` call: other
    /// processes see it at once, and it survives a crash of this process, but not a
    /// power loss. The default.
    #[default]
    OsBuffered,
    /// After each line, `fdatasync`: the line survives a power loss.
    SyncData,
    /// After each line, `fsync` (data and metadata such as the file size).
    SyncAll,
}

/// Ends a torn last line: appends `\n` when the file is not empty and its last byte
/// is not one.
fn terminate_torn_line(file: &File) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    let mut reader = file;
    reader.seek(SeekFrom::Start(len - 1))?;
    reader.read_exact(&mut last)?;
    if last[0] != b'\n' {
        // O_APPEND: the newline goes at the end whatever the cursor says.
        reader.write_all(b"\n")?;
    }
    Ok(())
}

/// Appends records to a JSONL log.
///
/// The file is opened with `O_APPEND` and never truncated. Each record is serialised
/// into one buffer ending in `\n` and written with a single `write` call, so lines from
/// concurrent writers (threads or processes) never interleave; a crash mid-write leaves
/// at most one torn last line, which [`crate::LogReader`] reports and skips. The writer
/// keeps no user-space buffer: there is nothing to lose on drop. Opening a log whose
/// last line was torn by a crash ends that line first, so the next record starts on a
/// line of its own (the torn line stays, and readers skip it).
#[derive(Debug)]
pub struct JsonlWriter {
    path: PathBuf,
    file: File,
    durability: Durability,
}

impl JsonlWriter {
    /// Opens `path` for appending, creating it and its parent folders when missing.
    /// When the file does not end in a newline (a crash tore its last line), one is
    /// appended first, so the torn line is not glued to the next record.
    ///
    /// # Errors
    /// [`Error::Io`] when the folder or file cannot be created or opened.
    pub fn open(path: impl AsRef<Path>, durability: Durability) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        terminate_torn_line(&file).map_err(io)?;
        Ok(Self {
            path,
            file,
            durability,
        })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Validates `record` and appends it as one line.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] for an invalid record (nothing is written),
    /// [`Error::ShortWrite`] when the system took only part of the line, [`Error::Io`]
    /// when writing or syncing fails.
    pub fn append(&self, record: &Record) -> Result<()> {
        record.validate()?;
        let mut line = record.to_json()?.into_bytes();
        line.push(b'\n');
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let written = (&self.file).write(&line).map_err(io)?;
        if written != line.len() {
            return Err(Error::ShortWrite {
                path: self.path.clone(),
                written,
                len: line.len(),
            });
        }
        match self.durability {
            Durability::OsBuffered => Ok(()),
            Durability::SyncData => self.file.sync_data().map_err(io),
            Durability::SyncAll => self.file.sync_all().map_err(io),
        }
    }
}
