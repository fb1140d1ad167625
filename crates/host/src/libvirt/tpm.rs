//! A domain's TPM state as libvirt keeps it: swtpm's state file, under the domain's UUID,
//! which standby reads at a point's instant and writes before a replica or a failback
//! target starts. A VM standby defines from a domain at its start (a replica, a failback's
//! new VM) has no UUID before its first start: its state waits beside its run files until
//! `vm_start` defines it, and is never written into a domain standby did not define.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{domain, is_own, LibvirtHost, RUN_ROOT};
use crate::state_file::{read_state_file, write_state_file};
use crate::{HostError, Result, Storage, VmLaunch};

/// Where libvirt's swtpm keeps each domain's TPM state (`<uuid>/tpm2/tpm2-00.permall` for
/// TPM 2.0); not configurable in libvirt.
const SWTPM_ROOT: &str = "/var/lib/libvirt/swtpm";
const WHAT: &str = "TPM state";

/// Where a VM's TPM state is now.
enum Place {
    /// The state file of a domain libvirt holds.
    Domain(PathBuf),
    /// The file a VM not defined yet waits with.
    Waiting(PathBuf),
}

impl LibvirtHost {
    fn tpm_place(&self, vm: &VmLaunch) -> Result<Place> {
        let xml = vm.config.driver.domain_xml.as_deref().ok_or_else(|| HostError::BadConfig {
            arg: "--host",
            why: format!("VM {} has no libvirt definition", vm.name),
        })?;
        let source = domain::parse(xml).map_err(HostError::Invalid)?;
        let defined =
            if is_own(vm, &source) { Some(self.domain(&vm.name, true)?) } else { self.derived_definition(&vm.name)? };
        let Some(d) = defined else { return Ok(Place::Waiting(self.tpm_seed(&vm.name))) };
        let uuid = d.uuid.ok_or_else(|| HostError::Invalid(format!("libvirt gives domain {} no UUID", vm.name)))?;
        // A UUID names a directory here: only its own characters.
        if uuid.is_empty() || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(HostError::Invalid(format!("domain {} has a UUID standby cannot use: {uuid:?}", vm.name)));
        }
        Ok(Place::Domain(Path::new(SWTPM_ROOT).join(uuid).join("tpm2/tpm2-00.permall")))
    }

    /// The state a VM not defined yet starts its TPM with.
    fn tpm_seed(&self, vm: &str) -> PathBuf {
        Path::new(RUN_ROOT).join(&self.name).join(vm).join("tpm-state.permall")
    }

    pub(super) fn tpm_state(&self, vm: &VmLaunch) -> Result<Option<Vec<u8>>> {
        match self.tpm_place(vm)? {
            Place::Domain(file) | Place::Waiting(file) => read_state_file(&file.to_string_lossy(), WHAT),
        }
    }

    pub(super) fn set_tpm_state(&self, vm: &VmLaunch, state: Option<&[u8]>) -> Result<()> {
        match (self.tpm_place(vm)?, state) {
            // libvirt makes a new TPM (swtpm_setup) for a domain whose state directory is empty.
            (Place::Domain(file) | Place::Waiting(file), None) => remove(&file),
            (Place::Waiting(seed), Some(data)) => {
                self.run_dir(&vm.name, None)?;
                write_state_file(&seed.to_string_lossy(), data)
            }
            (Place::Domain(file), Some(data)) => {
                let dir =
                    file.parent().ok_or_else(|| HostError::Invalid(format!("{} has no parent", file.display())))?;
                // As libvirt makes them: swtpm's user passes through the UUID's directory
                // to its own, which libvirt gives it (with the file) at the domain's start.
                // The modes are set, not asked of mkdir: this process's umask is owner-only.
                let uuid_dir = dir.parent().unwrap_or(dir);
                for (d, mode) in [(uuid_dir, 0o711), (dir, 0o700)] {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .create(d)
                        .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)))
                        .map_err(|source| HostError::Io {
                            what: "cannot create".into(),
                            path: d.display().to_string(),
                            source,
                        })?;
                }
                let file = file.to_string_lossy();
                write_state_file(&file, data)?;
                self.local.sync_file(&file)
            }
        }
    }

    /// Moves the state a VM just defined waited with into its TPM's place. Idempotent.
    pub(super) fn place_tpm_seed(&self, vm: &VmLaunch) -> Result<()> {
        let seed = self.tpm_seed(&vm.name);
        let Some(data) = read_state_file(&seed.to_string_lossy(), WHAT)? else { return Ok(()) };
        if let Place::Waiting(_) = self.tpm_place(vm)? {
            return Err(HostError::NotRunning(vm.name.clone()));
        }
        self.set_tpm_state(vm, Some(&data))?;
        remove(&seed)
    }

    /// Drops the state a VM never defined waited with.
    pub(super) fn forget_tpm_seed(&self, vm: &str) -> Result<()> {
        remove(&self.tpm_seed(vm))
    }
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(HostError::Io { what: "cannot remove".into(), path: path.display().to_string(), source: e })
        }
        _ => Ok(()),
    }
}
