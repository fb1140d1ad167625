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
    #[error("NBD {command} at offset {offset} failed with error {errno}{message}")]
    Command { command: &'static str, offset: u64, errno: u32, message: String },
    #[error("NBD export is read-only")]
    ReadOnly,
}

pub type Result<T> = std::result::Result<T, NbdError>;
