//! A UEFI VM's variable store (its firmware's NVRAM: boot entries, Secure Boot keys) is
//! state of the VM like its disks. Each restore point holds a copy taken at its instant,
//! with the running VM's CPUs stopped around the instant and the copy, so that no variable
//! write falls between the disks' instant and the variables'. A failover gives the replica
//! its own copy of its point's; a failback's switch gives the target the replica's final
//! one. Stores are small (OVMF's are 528 KiB) and travel whole.
//!
//! A TPM's state is read at the same paused instant (`at_instant`); where it goes from
//! there is `tpm.rs`.

use std::path::Path;

use standby_host::{Host, VmLaunch};
use standby_model::Firmware;
use standby_store::VmRecord;

use crate::{EngineError, Result};

/// What a restore point keeps of a VM beside its disks, read at their instant.
#[derive(Debug, Default)]
pub(crate) struct Beside {
    /// A UEFI VM's variable store.
    pub vars: Option<Vec<u8>>,
    /// Its TPM's state: None without a TPM, or while its TPM has none yet.
    pub tpm: Option<Vec<u8>>,
}

/// Takes the instant with `open` and reads, at that same instant, a UEFI VM's variables
/// and the state of a VM's TPM (`tpm`: the VM as its host starts it, when it has one).
/// Never returns early: the VM runs again whatever happened. `marker` exists while
/// standby holds the VM paused, so that recovery resumes a VM a killed run left so (and
/// only such a VM: one its operator paused stays paused).
pub(crate) fn at_instant<T>(
    src: &dyn Host,
    vm: &VmRecord,
    tpm: Option<&VmLaunch>,
    running: bool,
    marker: &Path,
    open: impl FnOnce() -> Result<T>,
) -> (Result<T>, Result<Beside>) {
    let vars = vm.config.driver.firmware.as_ref().map(|f| f.vars.as_str());
    if vars.is_none() && tpm.is_none() {
        return (open(), Ok(Beside::default()));
    }
    // A stopped VM writes nothing; a running one already paused by its operator stays so.
    let pause = match running.then(|| src.vm_paused(&vm.name)).transpose() {
        Ok(paused) => paused == Some(false),
        Err(e) => return (Err(e.into()), Ok(Beside::default())),
    };
    if pause {
        // Durable before the pause, so that whatever ends this process, recovery knows.
        let marked = std::fs::File::create(marker)
            .and_then(|f| f.sync_all())
            .map_err(|e| EngineError::Invalid(format!("cannot record the pause in {}: {e}", marker.display())));
        if let Err(e) = marked.and_then(|()| src.vm_pause(&vm.name).map_err(EngineError::from)) {
            let _ = std::fs::remove_file(marker);
            return (Err(e), Ok(Beside::default()));
        }
    }
    let views = open();
    let beside = match &views {
        Err(_) => Ok(Beside::default()),
        Ok(_) => (|| -> Result<Beside> {
            Ok(Beside {
                vars: vars.map(|v| src.read_vm_state(v)).transpose()?,
                tpm: tpm.map(|t| src.vm_tpm_state(t)).transpose()?.flatten(),
            })
        })(),
    };
    if pause {
        crate::failpoint::hit("replicate.while-paused");
        if let Err(e) = src.vm_resume(&vm.name) {
            let why = format!(
                "VM {} stays paused: its CPUs could not be started again after its instant ({}); the job's next \
                 run starts them",
                vm.name,
                crate::chain(&e)
            );
            return (Err(EngineError::Invalid(why)), beside);
        }
        let _ = std::fs::remove_file(marker);
    }
    (views, beside)
}

/// An earlier run may have left a UEFI VM paused around its instant (killed, or its resume
/// failed; its `marker` says so): its CPUs run again. A VM that stopped meanwhile needs
/// nothing, and the marker goes.
pub(crate) fn after_kill(
    src: &dyn Host,
    vm: &str,
    running: bool,
    marker: &Path,
    notes: &mut Vec<String>,
) -> Result<()> {
    if !marker.exists() {
        return Ok(());
    }
    if running && src.vm_paused(vm)? {
        src.vm_resume(vm)?;
        notes.push(format!("started VM {vm}'s CPUs again: the interrupted run had paused them for its instant"));
    }
    let _ = std::fs::remove_file(marker);
    Ok(())
}

/// The variable store a replica of `source` gets at failover: its own copy of its restore
/// point's, at `replica_vars`. Every point of a UEFI VM holds one (firmware is set when the
/// VM is defined, and standby captured variables from its first point on).
pub(crate) fn for_replica(
    dr: &dyn Host,
    source: &Firmware,
    point_vars: Option<&str>,
    replica_vars: &str,
) -> Result<Firmware> {
    let point_vars = point_vars.ok_or_else(|| {
        EngineError::Invalid(
            "the restore point holds no copy of the VM's UEFI variables, so a replica could not boot as the VM \
             did; fail over to another point"
                .into(),
        )
    })?;
    dr.write_vm_state(replica_vars, &dr.read_vm_state(point_vars)?)?;
    Ok(Firmware { loader: source.loader.clone(), vars: replica_vars.into() })
}
