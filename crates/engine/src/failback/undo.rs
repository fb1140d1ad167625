//! Undo failback: production off, its disks back to the replica's final state (or the
//! working layers dropped before a switch), the replica running again as it was.

use super::*;
use standby_model::tracking::{bitmap_trust, SeenBitmap};

impl Engine {
    pub fn failback_undo(&self, vms: &[String], job: Option<&str>, progress: &dyn Progress) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| self.tracked("undo failback", vm, progress, |p| self.undo_failback_one(vm, job, p)))
    }

    pub(super) fn undo_failback_one(&self, name: &str, job: Option<&str>, progress: &dyn Progress) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "undo failback")?;
        let replica = self.replica_of(name, job)?;
        self.store().transition(
            replica.id,
            replica.state,
            Transition::UndoFailbackStarted,
            Some(Step::UndoFailback(UndoFailbackStep::Stop)),
            FailoverPoint::Keep,
        )?;
        self.finish_undo_failback(&replica, progress)
    }

    /// Production off; its disks read as the replica's final state again (after a switch)
    /// or lose their working layers (before one); the identity goes back; the replica
    /// runs again as it was. Idempotent.
    pub(super) fn finish_undo_failback(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let Some(rec) = self.failback_record(replica.id)? else {
            self.store().transition(
                replica.id,
                ReplicaState::UndoingFailback,
                Transition::UndoFailbackDone,
                None,
                FailoverPoint::Keep,
            )?;
            return Ok("failback undone".into());
        };
        let tgt = self.host(&rec.host)?;
        let dr_host = self.host(&replica.target_host)?;
        tgt.nbd_stop_all(&nbd_prefix(replica.id))?;
        let mut restored = Moved::default();
        if rec.switched_at.is_some() {
            self.store().set_step(replica.id, Step::UndoFailback(UndoFailbackStep::Stop))?;
            let production = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
            if production.disks == rec.disks && self.vm_is_running(&production)? {
                progress.step(name, "powering off production");
                vm::power_off(tgt.as_ref(), name)?;
            }
            failpoint::hit("undo-failback.after-stop");
            self.store().set_step(replica.id, Step::UndoFailback(UndoFailbackStep::Restore))?;
            if !rec.created_disks {
                let rd = self.replica_disks(replica)?;
                let bitmap = rec.seq.map(|s| crate::layout::bitmap_name(replica.id, s));
                for (i, d) in rec.disks.iter().enumerate() {
                    // Production's writes since the switch are in the switch's bitmap alone:
                    // it is the newest, and it is trusted only if QEMU saved it cleanly.
                    let trusted = match (rec.seq, d.format) {
                        (Some(seq), Format::Qcow2) => {
                            let seen: Vec<SeenBitmap> = tgt
                                .image_info(&d.path, Format::Qcow2, false)?
                                .bitmaps
                                .iter()
                                .filter(|x| x.name == crate::layout::bitmap_name(replica.id, seq))
                                .map(|x| SeenBitmap { seq, inconsistent: x.in_use, recording: x.enabled })
                                .collect();
                            bitmap_trust(Some(seq), &seen, false).is_ok()
                        }
                        _ => false,
                    };
                    let diff = match (&bitmap, trusted) {
                        (Some(b), true) => Difference::Ranges {
                            known: sync::bitmap_ranges(
                                &format!("{}bm-d{i}", nbd_prefix(replica.id)),
                                tgt.as_ref(),
                                &d.path,
                                b,
                            )?,
                            top_layers: 0,
                        },
                        _ => Difference::Digest,
                    };
                    progress.step(name, &format!("disk {i}: back to the replica's state"));
                    let stats = sync::copy(
                        &format!("{}d{i}", nbd_prefix(replica.id)),
                        End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &rd.vm.disks[i].path)? },
                        End { host: tgt.as_ref(), chain: Chain::single(&d.path, d.format) },
                        &diff,
                        &self.job_wire(&replica.job)?,
                        progress,
                        name,
                        &|| {},
                    )?;
                    restored.add(&stats);
                    tgt.sync_file(&d.path)?;
                    if let (Some(b), true) = (&bitmap, trusted) {
                        tgt.image_bitmap(&d.path, Format::Qcow2, b, BitmapOp::Remove)?;
                    }
                }
            }
            failpoint::hit("undo-failback.after-restore");
            self.store().set_step(replica.id, Step::UndoFailback(UndoFailbackStep::Identity))?;
            if let Some(prior) = &rec.prior {
                self.store().redefine_vm(&prior.protected)?;
                if let Some(e) = &prior.existing {
                    let exists = self.store().vm(&e.name)?.is_some();
                    if !exists {
                        self.store().insert_vm(e)?;
                    }
                }
            }
        }
        self.discard_working(name, &rec)?;
        self.store().set_step(replica.id, Step::UndoFailback(UndoFailbackStep::StartReplica))?;
        let rvm = self.store().replica_vm(replica.id)?;
        let mut started = false;
        if let Some(rvm) = rvm {
            if !self.vm_is_running(&rvm)? {
                self.launch(&rvm)?;
                started = true;
            }
        }
        self.store().delete_failback(replica.id)?;
        self.store().transition(
            replica.id,
            ReplicaState::UndoingFailback,
            Transition::UndoFailbackDone,
            None,
            FailoverPoint::Keep,
        )?;
        let vm_name = replica_vm_name(replica);
        Ok(match rec.switched_at {
            Some(_) => format!(
                "failback undone: {} powered off and its disks made equal to the replica's final state again \
                 (rewrote {}); {vm_name} {}; state failover",
                rec.target,
                human(restored.written + restored.zeroed),
                if started { "runs again" } else { "was already running" }
            ),
            None => format!(
                "failback undone before its switch: working layers on {} discarded; {vm_name} runs on; state failover",
                rec.target
            ),
        })
    }
}
