//! A VM's TPM state (its seeds, keys, NV indices and counters: what BitLocker or LUKS seal
//! their keys to) is state of the VM like its disks. Each restore point holds a copy taken
//! at its instant (`firmware::at_instant`); a failover gives the replica its point's copy
//! before its first start, and a failback's switch gives the target the replica's final
//! state. The host keeps each VM's state where its driver does (libvirt: under the
//! domain's UUID; standby's own driver: the file the VM's configuration names), so the
//! engine moves it through the host's verbs, never by path.

use standby_host::{Host, VmLaunch};
use standby_model::Tpm;

use crate::Result;

/// The TPM of a replica of a VM with `source`'s: its state in the replica directory on
/// standby's own driver (going with the overlays at undo); libvirt places it itself.
pub(crate) fn for_replica(source: &Tpm, replica_dir: &str) -> Tpm {
    Tpm {
        model: source.model.clone(),
        state: source.state.as_ref().map(|_| crate::layout::replica_tpm_path(replica_dir)),
    }
}

/// Gives `vm` on `host` the TPM state a restore point holds (a copy on `host`), before
/// it first starts; a point taken before its TPM had any state gives it a new TPM.
pub(crate) fn from_point(host: &dyn Host, vm: &VmLaunch, copy: Option<&str>) -> Result<()> {
    let state = copy.map(|c| host.read_vm_state(c)).transpose()?;
    host.vm_set_tpm_state(vm, state.as_deref())?;
    Ok(())
}

/// Gives `to` on host `tgt` the TPM state `from` on host `src` has now (both are off).
/// A `from` whose TPM has no state (its definition was removed by hand) gives nothing:
/// the target keeps its own rather than lose it; false says so.
pub(crate) fn carry(src: &dyn Host, from: &VmLaunch, tgt: &dyn Host, to: &VmLaunch) -> Result<bool> {
    let Some(state) = src.vm_tpm_state(from)? else { return Ok(false) };
    tgt.vm_set_tpm_state(to, Some(&state))?;
    Ok(true)
}
