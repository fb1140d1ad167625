//! Commit failback: the replica's final state kept as a restore point; replication resumes.

use super::*;

impl Engine {
    pub fn failback_commit(&self, vms: &[String], job: Option<&str>, progress: &dyn Progress) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| self.tracked("commit failback", vm, progress, |p| self.commit_one(vm, job, p)))
    }

    pub(super) fn commit_one(&self, name: &str, job: Option<&str>, progress: &dyn Progress) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "commit failback")?;
        let replica = self.replica_of(name, job)?;
        replica.state.apply(Transition::CommitStarted)?;
        let rd = self.replica_disks(&replica)?;
        if self.vm_is_running(&rd.vm)? {
            return Err(EngineError::Refused {
                vm: name.into(),
                why: format!(
                "replica {} runs; shut it down first (standby vm shutdown {}) so that production is the only writer",
                rd.vm.name, rd.vm.name
            ),
            });
        }
        self.store().transition(
            replica.id,
            replica.state,
            Transition::CommitStarted,
            Some(Step::Commit(CommitStep::Point)),
            FailoverPoint::Keep,
        )?;
        self.finish_commit(&replica, progress)
    }

    /// Keeps the replica's final state as a restore point over the newest one, then
    /// deletes the replica VM and its overlays; state Ready. Idempotent.
    pub(super) fn finish_commit(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let dr_host = self.host(&replica.target_host)?;
        let Some(rec) = self.failback_record(replica.id)? else {
            // Only the final state change was left.
            self.store().transition(
                replica.id,
                ReplicaState::CommittingFailback,
                Transition::CommitDone,
                None,
                FailoverPoint::Set(None),
            )?;
            return Ok("failback committed".into());
        };
        let seq = rec.seq.ok_or_else(|| EngineError::Damaged {
            vm: name.into(),
            what: "the failback reserved no sequence".into(),
        })?;
        let exists = self.store().restore_points(replica.id, false)?.iter().any(|p| p.seq == seq);
        let mut kept = None;
        if !exists {
            let rd = self.replica_disks(replica)?;
            kept = Some(self.keep_final_state(replica, &rec, &rd, seq, progress)?);
        }
        failpoint::hit("commit.after-point");
        self.store().set_step(replica.id, Step::Commit(CommitStep::Cleanup))?;
        let rvm = self.store().replica_vm(replica.id)?;
        if let Some(rvm) = rvm {
            dr_host.vm_forget(&rvm.name)?;
            self.store().delete_vm(&rvm.name)?;
        }
        self.remove_overlays(dr_host.as_ref(), replica)?;
        self.restore_source_autostart(replica);
        self.store().delete_failback(replica.id)?;
        self.store().transition(
            replica.id,
            ReplicaState::CommittingFailback,
            Transition::CommitDone,
            None,
            FailoverPoint::Set(None),
        )?;
        let retain = self.store().job(&replica.job)?.map(|j| j.retain).unwrap_or(standby_model::DEFAULT_RETAIN);
        let dropped = self.apply_retention(dr_host.as_ref(), replica.id, &replica.dir, retain)?;
        let mut msg = match kept {
            Some((id, moved)) => format!(
                "failback committed: the replica's final state is restore point {id} (wrote {}); replication of {name} \
                 resumes from the switch",
                human(moved.written + moved.zeroed)
            ),
            None => format!("failback committed; replication of {name} resumes from the switch"),
        };
        if dropped > 0 {
            msg.push_str(&format!("; retention removed {dropped} old restore point(s)"));
        }
        Ok(msg)
    }

    /// The replica's final state as a new restore point over the newest one: a layer per
    /// disk holding what the replica's overlays and the newer points changed, read from
    /// the replica's chain.
    pub(super) fn keep_final_state(
        &self,
        replica: &ReplicaRecord,
        rec: &FailbackRecord,
        rd: &ReplicaDisks,
        seq: Seq,
        progress: &dyn Progress,
    ) -> Result<(PointId, Moved)> {
        let dr_host = self.host(&replica.target_host)?;
        let newest = rd.points.last().ok_or_else(|| EngineError::Damaged {
            vm: replica.vm.clone(),
            what: "the replica has no restore point".into(),
        })?;
        let full_newer = rd.newer_points().any(|p| p.disks.iter().any(|d| d.parent.is_none()));
        let mut moved = Moved::default();
        let mut layers = Vec::new();
        let started = std::time::Instant::now();
        for (i, top) in rd.vm.disks.iter().enumerate() {
            let base = &newest.disks[i];
            let layer = crate::layout::layer_path(&replica.dir, seq, i);
            dr_host.remove_file(&layer)?;
            dr_host.image_create(&layer, base.size, Some((&base.layer, Format::Qcow2)))?;
            let diff = if full_newer {
                Difference::Digest
            } else {
                let mut lists = Vec::new();
                for p in rd.newer_points() {
                    lists.push(dr_host.image_allocated(&p.disks[i].layer)?);
                }
                Difference::Ranges { known: transfer::union(&lists, base.size), top_layers: overlay_gen(&top.path) + 1 }
            };
            progress.step(&replica.vm, &format!("disk {i}: keeping the replica's final state"));
            let stats = sync::copy(
                &format!("{}keep-d{i}", nbd_prefix(replica.id)),
                End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &top.path)? },
                End { host: dr_host.as_ref(), chain: replica_dir::chain_of(&rd.points, &base.layer)?.with_top(&layer) },
                &diff,
                &self.job_wire(&replica.job)?,
                progress,
                &replica.vm,
                &|| {},
            )?;
            dr_host.sync_file(&layer)?;
            moved.add(&stats);
            let bitmap = (rec.disks[i].format == Format::Qcow2).then(|| crate::layout::bitmap_name(replica.id, seq));
            layers.push(RpDiskRecord {
                idx: i as u32,
                layer,
                parent: Some(base.layer.clone()),
                size: base.size,
                method: if full_newer { Method::Digest } else { Method::Cbt },
                bitmap,
                bytes_transferred: stats.written,
            });
        }
        // The replica's final UEFI variables stay with it: its own store goes with the
        // overlays at the cleanup below.
        let nvram = match &rd.vm.config.driver.firmware {
            Some(f) => {
                let keep = crate::layout::vars_path(&replica.dir, seq);
                dr_host.write_vm_state(&keep, &dr_host.read_vm_state(&f.vars)?)?;
                Some(keep)
            }
            None => None,
        };
        // And its TPM's final state, like its variables.
        let tpm_state = match &rd.vm.config.driver.tpm {
            Some(_) => match dr_host.vm_tpm_state(&self.launch_of(&rd.vm)?)? {
                Some(state) => {
                    let keep = crate::layout::tpm_path(&replica.dir, seq);
                    dr_host.write_vm_state(&keep, &state)?;
                    Some(keep)
                }
                None => None,
            },
            None => None,
        };
        let id = self.store().insert_restore_point(&NewRestorePoint {
            replica_id: replica.id,
            seq,
            created_at: rec.switched_at.clone().unwrap_or_else(standby_store::now),
            method: if full_newer { Method::Digest } else { Method::Cbt },
            // What the replica left when it was shut down for the switch.
            consistency: standby_model::Consistency::Offline,
            nvram,
            tpm_state,
            bytes_transferred: moved.written,
            bytes_read: moved.read,
            duration_ms: started.elapsed().as_millis() as u64,
            disks: layers,
        })?;
        Ok((id, moved))
    }
}
