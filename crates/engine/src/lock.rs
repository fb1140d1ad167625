//! Advisory locks that serialize operations on one VM across standby processes. They are
//! kernel file locks: a killed process releases its locks, so no stale lock outlives a crash.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{EngineError, Result};

#[derive(Debug)]
pub struct VmLock {
    _file: File,
}

impl VmLock {
    /// Takes the VM's lock or says who holds it.
    pub fn acquire(data_dir: &Path, vm: &str, purpose: &str) -> Result<VmLock> {
        Self::acquire_named(data_dir, &format!("vm-{vm}"), &format!("VM {vm}"), purpose)
    }

    /// Takes the lock file `locks/<file>.lock` for `what` (as the error names it).
    pub fn acquire_named(data_dir: &Path, file: &str, what: &str, purpose: &str) -> Result<VmLock> {
        let path = data_dir.join("locks").join(format!("{file}.lock"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| EngineError::DataDir { path: path.display().to_string(), source })?;
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = write!(file, "{purpose} (pid {})", std::process::id());
                Ok(VmLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                Err(EngineError::Busy {
                    what: what.to_owned(),
                    holder: if holder.is_empty() { "another standby command".into() } else { holder },
                })
            }
            Err(std::fs::TryLockError::Error(source)) => {
                Err(EngineError::DataDir { path: path.display().to_string(), source })
            }
        }
    }
}
