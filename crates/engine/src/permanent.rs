//! Permanent failover: the replica becomes the production VM for good. Its disks become
//! standalone images (for a running replica by QEMU's `block-stream`, while it runs; for a
//! stopped one by `qemu-img rebase`), are verified to read exactly as the chain they ran
//! on, and only then are the restore points removed and the VM taken out of its job.

use std::time::Duration;

use standby_host::{Chain, Format, Host};
use standby_model::step::PermanentStep;
use standby_model::{ReplicaState, Step, Transition};
use standby_store::{FailoverPoint, ReplicaRecord, RestorePointRecord, VmRecord};

use crate::batch::OpOutcome;
use crate::lock::VmLock;
use crate::replica_dir;
use crate::replica_vm::{overlay_chain, replica_vm_name};
use crate::{failpoint, Engine, EngineError, Result};

/// Longest a live flatten may take before standby gives up on it.
const STREAM_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

impl Engine {
    pub fn failover_permanent(&self, vms: &[String], job: Option<&str>) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| {
            let r = self.permanent_one(vm, job);
            self.record(vm, "permanent failover", &r, String::clone);
            r
        })
    }

    fn permanent_one(&self, name: &str, job: Option<&str>) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "permanent failover")?;
        let replica = self.replica_of(name, job)?;
        replica.state.apply(Transition::PermanentStarted)?;
        let vm = self.store().replica_vm(replica.id)?.ok_or_else(|| EngineError::Damaged {
            vm: name.into(),
            what: format!("VM {name} is in failover but its replica VM is not defined"),
        })?;
        let points = self.store().restore_points(replica.id, true)?;
        let rp = points
            .iter()
            .find(|p| Some(p.id) == replica.failover_point)
            .ok_or_else(|| EngineError::Damaged {
                vm: name.into(),
                what: format!("VM {name}'s replica has no failover restore point"),
            })?
            .clone();
        let dr_host = self.host(&replica.target_host)?;
        self.store().transition(
            replica.id,
            replica.state,
            Transition::PermanentStarted,
            Some(Step::Permanent(PermanentStep::Flatten)),
            FailoverPoint::Keep,
        )?;
        if let Err(e) = self.make_standalone(&replica, &vm, &points, &rp, dr_host.as_ref()) {
            // Whatever failed, a guest standby paused to verify must not stay paused.
            let step = self.store().replica(replica.id)?.and_then(|r| r.step);
            if step == Some(Step::Permanent(PermanentStep::VerifyPaused)) {
                let _ = self.resume_if_paused(&vm);
            }
            self.store().transition(
                replica.id,
                ReplicaState::MakingPermanent,
                Transition::PermanentRolledBack,
                None,
                FailoverPoint::Keep,
            )?;
            return Err(e);
        }
        failpoint::hit("permanent.after-verify");
        self.store().make_permanent(replica.id, &vm.name)?;
        failpoint::hit("permanent.after-publish");
        let removed = self.finish_permanent(&replica)?;
        Ok(format!(
            "{} is an ordinary VM now, on standalone disks; {} restore point(s) and {removed} layer file(s) removed; \
             {name} left job {}",
            vm.name,
            points.len(),
            replica.job
        ))
    }

    /// Deletes the layer files of the removed restore points (the records went first).
    fn finish_permanent(&self, replica: &ReplicaRecord) -> Result<usize> {
        let dr_host = self.host(&replica.target_host)?;
        self.check_replica_dir(dr_host.as_ref(), replica)?;
        let mut removed = replica_dir::remove_orphans(dr_host.as_ref(), &replica.dir, &[], self.next_seq(replica.id)?)?;
        // Overlay generations below the flattened top (a failback's protective point
        // left them) are read by nothing now.
        let vm = self.store().vm(&replica_vm_name(replica))?;
        if let Some(vm) = vm {
            for name in dr_host.list_dir(&replica.dir)? {
                let path = format!("{}/{name}", replica.dir);
                let kept = vm.disks.iter().any(|d| d.path == path)
                    || vm.config.driver.firmware.as_ref().is_some_and(|f| f.vars == path)
                    || vm.config.driver.tpm.as_ref().is_some_and(|t| t.state.as_ref() == Some(&path));
                if crate::layout::is_overlay(&name) && !kept {
                    dr_host.remove_file(&path)?;
                    removed.push(path);
                }
            }
        }
        self.store().end_operation(replica.id, ReplicaState::Permanent)?;
        // No replica lives here any more: the directory holds an ordinary VM's disks, which
        // its own records name. Last, so that a recovery of this step still finds it.
        dr_host.remove_file(&format!("{}/{}", replica.dir, crate::layout::OWNER_MARKER))?;
        Ok(removed.len())
    }

    /// Flattens every overlay onto its restore point's chain and proves it reads the same.
    fn make_standalone(
        &self,
        replica: &ReplicaRecord,
        vm: &VmRecord,
        points: &[RestorePointRecord],
        rp: &RestorePointRecord,
        dr_host: &dyn Host,
    ) -> Result<()> {
        let running = self.vm_is_running(vm)?;
        let chains: Vec<Chain> = rp
            .disks
            .iter()
            .zip(&vm.disks)
            .map(|(d, overlay)| {
                Ok(overlay_chain(replica_dir::chain_of(points, &d.layer)?, &replica.dir, d.idx as usize, &overlay.path))
            })
            .collect::<Result<_>>()?;
        if running {
            // From each disk's top: a failback's protective point may have stacked a newer one.
            dr_host.vm_flatten(&vm.name, chains.len(), STREAM_TIMEOUT)?;
            // Paused, the guest writes nothing and QEMU has flushed: the comparison below
            // sees exactly what the VM runs. The step says so first: a standby killed
            // while the guest is paused leaves recovery the note to resume it.
            self.store().set_step(replica.id, Step::Permanent(PermanentStep::VerifyPaused))?;
            dr_host.vm_pause(&vm.name)?;
            let verified = self.verify_standalone(replica, vm, &chains, dr_host, PermanentStep::VerifyPaused);
            let resumed = dr_host.vm_resume(&vm.name);
            verified?;
            resumed?;
            Ok(())
        } else {
            for c in &chains {
                dr_host.image_flatten(c)?;
            }
            self.verify_standalone(replica, vm, &chains, dr_host, PermanentStep::Verify)
        }
    }

    /// Each overlay, opened alone, must read as it does over its chain: a block the
    /// flatten missed would read as zeroes alone and as data through the chain.
    fn verify_standalone(
        &self,
        replica: &ReplicaRecord,
        vm: &VmRecord,
        chains: &[standby_host::Chain],
        dr_host: &dyn Host,
        step: PermanentStep,
    ) -> Result<()> {
        failpoint::hit("permanent.after-flatten");
        self.store().set_step(replica.id, Step::Permanent(step))?;
        for (i, (chain, overlay)) in chains.iter().zip(&vm.disks).enumerate() {
            let info = dr_host.image_info(&overlay.path, Format::Qcow2, true)?;
            if info.backing_filename.is_some() {
                return Err(EngineError::Mismatch {
                    vm: vm.name.clone(),
                    what: format!("disk {i} of {} still has a backing file", vm.name),
                });
            }
            if !dr_host.image_compare(&Chain::single(&overlay.path, Format::Qcow2), chain)? {
                return Err(EngineError::Mismatch {
                    vm: vm.name.clone(),
                    what: format!("disk {i} of {} does not read as the chain it ran on; nothing was deleted", vm.name),
                });
            }
        }
        Ok(())
    }

    /// Recovery of a permanent failover a killed standby left before it published: back
    /// to failover (the overlays may be standalone already, which changes nothing the
    /// replica reads), the guest resumed first if standby paused it to verify.
    pub(crate) fn roll_back_permanent(&self, replica: &ReplicaRecord, resume_guest: bool) -> Result<String> {
        let mut resumed = String::new();
        if resume_guest {
            if let Some(vm) = self.store().replica_vm(replica.id)? {
                if self.resume_if_paused(&vm)? {
                    resumed = format!("; resumed {}, paused for the verification", vm.name);
                }
            }
        }
        self.store().transition(
            replica.id,
            replica.state,
            Transition::PermanentRolledBack,
            None,
            FailoverPoint::Keep,
        )?;
        self.record_raw(
            &replica.vm,
            "permanent failover",
            "rolled back",
            &format!("recovered after an interruption{resumed}"),
        );
        Ok(format!("VM {}: rolled back an interrupted permanent failover (still in failover){resumed}", replica.vm))
    }

    /// Recovery of a permanent failover killed after it published: its files go.
    pub(crate) fn complete_permanent(&self, replica: &ReplicaRecord) -> Result<String> {
        self.finish_permanent(replica)?;
        self.record_raw(&replica.vm, "permanent failover", "completed", "recovered after an interruption");
        Ok(format!("VM {}: completed an interrupted permanent failover", replica.vm))
    }

    /// Resumes a running VM that is paused; whether it was.
    fn resume_if_paused(&self, vm: &VmRecord) -> Result<bool> {
        if !self.vm_is_running(vm)? {
            return Ok(false);
        }
        let host = self.host(&vm.host)?;
        if host.vm_paused(&vm.name)? {
            host.vm_resume(&vm.name)?;
            return Ok(true);
        }
        Ok(false)
    }
}
