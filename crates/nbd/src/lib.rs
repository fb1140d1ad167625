//! A blocking client for the NBD protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>),
//! just what standby's data path needs: read, write, write-zeroes, flush and block status
//! (`base:allocation` and `qemu:dirty-bitmap:NAME`). Every reply is treated as untrusted input:
//! lengths are bounded and offsets checked before anything is believed.

mod client;
mod coverage;
mod wire;

pub use client::{Client, Extent};

/// What went wrong talking to an NBD server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection failed")]
    Io(#[from] std::io::Error),
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server refused option {option}: {message}")]
    OptionRefused { option: &'static str, message: String },
    #[error("NBD server has no metadata context {0:?}")]
    NoContext(String),
    #[error("NBD {command} at offset {offset} failed: {}{message}", errno_text(*errno))]
    Command { command: &'static str, offset: u64, errno: u32, message: String },
    #[error("NBD export is read-only")]
    ReadOnly,
}

pub type Result<T> = std::result::Result<T, NbdError>;

/// What an NBD error number means to the operator who reads it (the protocol's own list).
fn errno_text(errno: u32) -> String {
    match errno {
        1 => "the server does not permit it (EPERM)".into(),
        5 => "an I/O error on the server's disk (EIO)".into(),
        12 => "the server is out of memory (ENOMEM)".into(),
        22 => "the server found the request invalid (EINVAL)".into(),
        // The one a DR site meets most: its target filesystem filled up mid-run.
        28 => "no space left on the server's disk (ENOSPC); free space there and run again".into(),
        75 => "the request was too large for the server (EOVERFLOW)".into(),
        95 => "the server does not support it (ENOTSUP)".into(),
        108 => "the server is shutting down (ESHUTDOWN)".into(),
        n => format!("error {n}"),
    }
}
