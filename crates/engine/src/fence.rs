//! Fencing: what a failover made while its source's host was unreachable owes that host.
//!
//! A site loss hides whether the source still runs. The failover goes ahead (the operator
//! declared the host lost) and opens a fence. When the host answers again, the fence is
//! carried out before anything else may touch the source: a source still running is
//! paused at once (its guest stops writing), then powered off; every disk is then copied
//! into a protective image beside it, so the writes the source made after the failover
//! instant (and those after the last restore point) are kept for the operator, never
//! overwritten by a failback. Only then is the fence closed.

use standby_host::{Chain, HostError, VmRuntime};
use standby_store::FenceRecord;

use crate::lock::VmLock;
use crate::{vm, Engine, EngineError, Result};

/// What failover records when the operator declares the source's host lost.
pub(crate) const DECLARED_BY_FLAG: &str = "the operator (failover --source-unreachable)";

/// Where disk `path`'s protective image goes: beside it, named for when it was taken.
fn protective_path(path: &str, stamp: &str) -> String {
    format!("{path}.protective-{stamp}.qcow2")
}

/// A UTC stamp for file names: `20261202T210455Z`.
fn file_stamp() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    t.chars().filter(|c| !matches!(c, '-' | ':')).collect()
}

impl Engine {
    /// Carries out every open fence whose host answers now; one note per fence that was
    /// carried out, or that could not be and why. Each unreachable host is tried once.
    pub fn fence_returning(&self) -> Result<(Vec<String>, Vec<String>)> {
        let (mut done, mut attention) = (Vec::new(), Vec::new());
        let mut unreachable: Vec<String> = Vec::new();
        let fences = self.store().open_fences()?;
        for fence in fences {
            if unreachable.contains(&fence.host) {
                continue;
            }
            let Ok(_lock) = VmLock::acquire(&self.data_dir, &fence.vm, "fence") else {
                continue;
            };
            match self.fence_locked(&fence) {
                Ok(note) => {
                    self.store().host_answered(&fence.host)?;
                    done.push(note)
                }
                Err(EngineError::Host(HostError::Unreachable { .. })) => {
                    self.store().host_silent(&fence.host)?;
                    unreachable.push(fence.host.clone())
                }
                Err(e) => attention.push(format!(
                    "VM {}: the fence on {} could not be carried out: {}; standby tries again at the next \
                     standby recover or daemon check",
                    fence.vm,
                    fence.host,
                    crate::chain(&e)
                )),
            }
        }
        Ok((done, attention))
    }

    /// Carries out the open fence of the replica, if any, for a caller holding the VM's
    /// lock that is about to touch its source. Err when it cannot be: then nothing about
    /// the source may go on.
    pub(crate) fn settle_fence(&self, replica_id: standby_model::ReplicaId) -> Result<Option<FenceRecord>> {
        let Some(fence) = self.store().fence(replica_id)? else {
            return Ok(None);
        };
        if fence.is_open() {
            self.fence_locked(&fence).map_err(|e| EngineError::Refused {
                vm: fence.vm.clone(),
                why: format!(
                    "its source on {} may still run since the failover made while {} was unreachable, and it \
                     could not be fenced: {}; bring {} back, then run the command again",
                    fence.host,
                    fence.host,
                    crate::chain(&e),
                    fence.host
                ),
            })?;
        }
        Ok(self.store().fence(replica_id)?)
    }

    /// Pauses and powers off the source if it runs, copies its disks into protective
    /// images, and closes the fence. Each step is in the history. Safe to repeat: a
    /// partial protective image is removed, and the VM is off before any copy starts.
    fn fence_locked(&self, fence: &FenceRecord) -> Result<String> {
        let host = self.host(&fence.host)?;
        let vm = &fence.vm;
        let found = match host.vm_runtime(vm)? {
            VmRuntime::Running { pid } => {
                host.vm_pause(vm)?;
                self.record_raw(
                    vm,
                    "fence",
                    "paused",
                    &format!(
                        "{} answers again and VM {vm} still ran there (process {pid}) after the failover: paused",
                        fence.host
                    ),
                );
                vm::power_off(host.as_ref(), vm)?;
                self.record_raw(vm, "fence", "powered off", &format!("VM {vm} on {} powered off", fence.host));
                format!("still ran (process {pid}): paused, then powered off")
            }
            VmRuntime::Stopped => "was not running".to_owned(),
        };
        let disks = &fence.disks;
        let stamp = file_stamp();
        let mut protective: Vec<String> = Vec::new();
        for d in disks {
            let dst = protective_path(&d.path, &stamp);
            if let Err(e) = host.image_copy(&Chain::single(&d.path, d.format), &dst) {
                let _ = host.remove_file(&dst);
                for made in &protective {
                    let _ = host.remove_file(made);
                }
                return Err(e.into());
            }
            protective.push(dst);
        }
        self.store().close_fence(fence.replica_id, &found, &protective)?;
        let note = format!(
            "VM {vm} on {}: {found}; its disks as it left them are kept in {}",
            fence.host,
            protective.join(", ")
        );
        self.record_raw(vm, "fence", "ok", &note);
        Ok(note)
    }
}

/// A fence's line for a failback or a replica list: where the source's own writes are.
pub(crate) fn protective_note(fence: &FenceRecord) -> Option<String> {
    match fence.is_open() {
        true => Some(format!(
            "VM {} on {} is not fenced yet ({} was declared unreachable by {} at {}): it is paused and powered \
             off when {} answers again",
            fence.vm, fence.host, fence.host, fence.declared_by, fence.declared_at, fence.host
        )),
        false if fence.protective.is_empty() => None,
        false => Some(format!(
            "the source's disks as {} left them after the failover are kept on {} in {}",
            fence.vm,
            fence.host,
            fence.protective.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protective_images_sit_beside_their_disk_named_by_time() {
        assert_eq!(
            protective_path("/vms/web.qcow2", "20261202T210455Z"),
            "/vms/web.qcow2.protective-20261202T210455Z.qcow2"
        );
        let s = file_stamp();
        assert_eq!(s.len(), "20261202T210455Z".len(), "{s}");
        assert!(s.ends_with('Z') && s.contains('T') && !s.contains(':'), "{s}");
    }
}
