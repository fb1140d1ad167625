//! A VM's small binary state files beside its disks (a UEFI variable store, a TPM's
//! state): read whole and replaced atomically, never through a symlink.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::local::io_err;
use crate::{HostError, Result, MAX_VARS_FILE};

/// A VM's small binary state file (a UEFI variable store, a TPM's state), whole: at most
/// `MAX_VARS_FILE`, None when it does not exist. Never through a symlink: such files sit
/// in directories QEMU's or swtpm's user owns.
pub fn read_state_file(path: &str, what: &str) -> Result<Option<Vec<u8>>> {
    let p = Path::new(path);
    let f = match fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits()).open(p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&format!("cannot open the {what}"), p)(e)),
    };
    let mut data = Vec::new();
    f.take(MAX_VARS_FILE + 1).read_to_end(&mut data).map_err(io_err("cannot read", p))?;
    if data.len() as u64 > MAX_VARS_FILE {
        return Err(HostError::Invalid(format!("{path} is larger than a {what} can be")));
    }
    Ok(Some(data))
}

/// Replaces the state file at `path` with `data`, atomically (a crash leaves the old one or
/// the new one), owner-only. The caller makes its directory entry durable.
pub fn write_state_file(path: &str, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let p = Path::new(path);
    let tmp = PathBuf::from(format!("{path}.standby-tmp"));
    // A fresh file, never one found there (a crash's leftover, or a planted symlink:
    // the directory may be QEMU's user's); rename replaces the store, not what it links to.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err("cannot remove", &tmp)(e)),
        _ => {}
    }
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, p)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("cannot replace", p)(e));
    }
    Ok(())
}
