//! Thin, typed wrappers over QEMU's own interfaces. Nothing here knows about replicas or
//! jobs; the `host` crate decides where these run and the `engine` what they are for.

pub mod chain;
pub mod guest_agent;
pub mod img;
pub mod machine;
pub mod nbd_server;
pub mod qmp;

use std::process::{Command, Output};

/// A QEMU tool or monitor command that failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("could not run {program}")]
    Spawn { program: String, source: std::io::Error },
    #[error("{program} {args} failed: {stderr}")]
    Failed { program: String, args: String, stderr: String },
    #[error("{program} printed output standby cannot read: {detail}")]
    Parse { program: String, detail: String },
    #[error("QMP {command} failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    #[error("QMP connection to {socket} failed")]
    QmpIo { socket: String, source: std::io::Error },
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
}

pub type Result<T> = std::result::Result<T, QemuError>;

/// Runs a QEMU tool and returns its stdout, or its stderr as the error.
pub(crate) fn run(program: &str, args: &[String]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| QemuError::Spawn { program: program.into(), source })?;
    if !out.status.success() {
        return Err(QemuError::Failed {
            program: program.into(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}
