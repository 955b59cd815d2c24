//! Typed errors of the library. Every message names the file, key, shape or value at fault and,
//! where we know it, what would fix it: the CLI prints them as they are.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O error is part of the message, not a `source`: printers that walk the chain
    // (anyhow's `{:#}`) would otherwise repeat it.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file ({reason}); the download may be truncated or corrupt: delete it and fetch it again")]
    CorruptCheckpoint { path: PathBuf, reason: String },

    #[error("{path}: not a valid GGUF file ({reason}); the download may be truncated or corrupt: delete it and fetch it again")]
    CorruptGguf { path: PathBuf, reason: String },

    #[error("{path}: missing tensor `{key}`{hint}")]
    MissingKey {
        path: PathBuf,
        key: String,
        hint: String,
    },

    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}{hint}")]
    WrongShape {
        path: PathBuf,
        key: String,
        // Boxed slices keep `Error` small enough to return cheaply.
        expected: Box<[usize]>,
        found: Box<[usize]>,
        hint: String,
    },

    #[error("{path}: tensor `{key}` has shape {found:?}, expected a {rank}-D tensor")]
    WrongRank {
        path: PathBuf,
        key: String,
        rank: usize,
        found: Box<[usize]>,
    },

    #[error("{path}: tensor `{key}` has dtype {dtype}, which fluxfit cannot read (supported: F32, BF16, F16, F8_E4M3, F8_E5M2)")]
    UnsupportedDtype {
        path: PathBuf,
        key: String,
        dtype: String,
    },

    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("output {path}: {message}")]
    Output { path: PathBuf, message: String },

    #[error("{0}")]
    Config(String),

    /// No plan fits the budget; the message names the smallest plan and the nearest
    /// alternatives.
    #[error("{0}")]
    NoPlanFits(String),

    /// The compute device ran out of memory: a smaller plan may succeed where this one failed.
    #[error("the device ran out of memory: {0}")]
    OutOfMemory(String),

    #[error("compute: {0}")]
    Candle(candle_core::Error),

    /// The run was asked to stop ([`crate::pipeline::watch::Watch::cancel`]).
    #[error("cancelled after step {step} of {total}")]
    Cancelled { step: usize, total: usize },
}

impl From<candle_core::Error> for Error {
    /// candle reports a device allocation failure (CUDA, Metal) only in its message: it is
    /// told apart here, once, so that callers match a type.
    fn from(e: candle_core::Error) -> Self {
        let text = e.to_string().to_ascii_lowercase();
        if ["out of memory", "out_of_memory", "outofmemory"]
            .iter()
            .any(|p| text.contains(p))
        {
            Error::OutOfMemory(e.to_string())
        } else {
            Error::Candle(e)
        }
    }
}

impl Error {
    /// Whether a smaller plan could cure this error.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory(_))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    /// Refuses what is not a regular file before it is opened (opening a FIFO blocks until a
    /// writer comes; a device never ends): "no such file", or what it is instead.
    pub fn check_regular_file(path: &std::path::Path) -> Result<()> {
        use std::io::{Error as E, ErrorKind};
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            return Ok(());
        }
        let what = if meta.is_dir() {
            "a folder, not a file"
        } else {
            "not a regular file (a FIFO, socket or device); give the checkpoint file itself"
        };
        Err(Error::io(path, E::new(ErrorKind::InvalidInput, what)))
    }
}
