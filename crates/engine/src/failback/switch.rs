//! Failback phase 2, the switch: the replica down, its last changes sent, the working
//! layers committed into the target, the next point's bitmap, the identity moved.

use super::*;

impl Engine {
    pub fn failback_switch(&self, vms: &[String], job: Option<&str>, progress: &dyn Progress) -> Vec<OpOutcome> {
        self.batch(vms, |vm, warnings| {
            self.tracked("failback switch", vm, progress, |p| self.switch_one(vm, job, p, warnings))
        })
    }

    /// Switches every failback whose scheduled time has come (`standby daemon`); a time
    /// missed while no daemon ran has come too.
    pub fn failback_due(&self, progress: &dyn Progress) -> Result<Vec<OpOutcome>> {
        let mut due = Vec::new();
        let rows = self.store().failbacks()?;
        for (replica_id, _) in rows {
            let replica = self.store().replica(replica_id)?;
            let (Some(replica), Some(rec)) = (replica, self.failback_record(replica_id)?) else { continue };
            if replica.state == ReplicaState::ReadyToSwitch && rec.switch_at.is_some_and(|t| t <= now_secs()) {
                due.push((replica.vm, replica.job));
            }
        }
        Ok(due.into_iter().flat_map(|(vm, job)| self.failback_switch(&[vm], Some(&job), progress)).collect())
    }

    pub(super) fn switch_one(
        &self,
        name: &str,
        job: Option<&str>,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "failback switch")?;
        let replica = self.replica_of(name, job)?;
        self.switch_locked(&replica, progress, warnings)
    }

    pub(super) fn switch_locked(
        &self,
        replica: &ReplicaRecord,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        replica.state.apply(Transition::SwitchStarted)?;
        let mut rec = self.failback_record(replica.id)?.ok_or_else(|| missing_record(&replica.vm))?;
        let rd = self.replica_disks(replica)?;
        if rec.seq.is_none() {
            rec.seq = Some(self.store().take_seq(replica.id)?);
            self.save_failback(replica.id, &rec)?;
        }
        self.store().transition(
            replica.id,
            replica.state,
            Transition::SwitchStarted,
            Some(Step::Switch(SwitchStep::Shutdown)),
            FailoverPoint::Keep,
        )?;
        let was_running = self.vm_is_running(&rd.vm)?;
        if was_running {
            progress.step(&replica.vm, &format!("shutting down {}", rd.vm.name));
            let timeout = Duration::from_secs(rec.shutdown_secs);
            match self.shutdown_locked(&rd.vm, timeout) {
                Ok(true) => {}
                Ok(false) => warnings.push(format!(
                    "replica {} did not shut down within {} s and was powered off",
                    rd.vm.name, rec.shutdown_secs
                )),
                Err(e) => {
                    self.store().transition(
                        replica.id,
                        ReplicaState::Switching,
                        Transition::SwitchRolledBack,
                        None,
                        FailoverPoint::Keep,
                    )?;
                    return Err(e);
                }
            }
        }
        failpoint::hit("switch.after-shutdown");
        match self.finish_switch(replica, progress) {
            Ok(done) => Ok(done),
            Err(e) => {
                // Before the target's disks were touched, the replica simply runs on.
                let rec = self.failback_record(replica.id)?.ok_or_else(|| missing_record(&replica.vm))?;
                let tgt = self.host(&rec.host)?;
                let untouched = rec.working.iter().all(|w| tgt.file_exists(w).unwrap_or(false))
                    && self.store().replica(replica.id)?.and_then(|r| r.step)
                        == Some(Step::Switch(SwitchStep::FinalTransfer));
                if untouched {
                    let _ = tgt.nbd_stop_all(&nbd_prefix(replica.id));
                    if was_running && !self.vm_is_running(&rd.vm)? {
                        self.launch(&rd.vm)?;
                    }
                    self.store().transition(
                        replica.id,
                        ReplicaState::Switching,
                        Transition::SwitchRolledBack,
                        None,
                        FailoverPoint::Keep,
                    )?;
                    Err(EngineError::Invalid(format!(
                        "{}; the replica runs on, still ready to switch",
                        crate::chain(&e)
                    )))
                } else {
                    Err(EngineError::Invalid(format!(
                        "{}; the target's disks were being updated: run standby recover to finish the switch",
                        crate::chain(&e)
                    )))
                }
            }
        }
    }

    /// Phase 2 once the replica is down: last changes, commit into the target's disks, its
    /// new bitmap, the identity, state Failback. Idempotent, so recovery runs it again.
    pub(super) fn finish_switch(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let mut rec = self.failback_record(replica.id)?.ok_or_else(|| missing_record(name))?;
        let rd = self.replica_disks(replica)?;
        let tgt = self.host(&rec.host)?;
        let dr_host = self.host(&replica.target_host)?;
        if self.vm_is_running(&rd.vm)? {
            return Err(EngineError::Refused {
                vm: rd.vm.name.clone(),
                why: format!("replica {} still runs; it must be off to switch", rd.vm.name),
            });
        }
        let seq = rec.seq.ok_or_else(|| EngineError::Damaged {
            vm: rd.vm.name.clone(),
            what: "the switch reserved no sequence".into(),
        })?;

        // The working layers exist until they are committed: their absence means the
        // copy and commit are done.
        if rec.working.iter().all(|w| tgt.file_exists(w).unwrap_or(false)) {
            self.store().set_step(replica.id, Step::Switch(SwitchStep::FinalTransfer))?;
            rec.phase2 = Moved::default();
            for (i, top) in rd.vm.disks.iter().enumerate() {
                progress.step(name, &format!("disk {i}: changes since phase 1"));
                let stats = sync::copy(
                    &format!("{}d{i}", nbd_prefix(replica.id)),
                    End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &top.path)? },
                    End { host: tgt.as_ref(), chain: self.working_chain(&rec, i)? },
                    &Difference::Ranges { known: Vec::new(), top_layers: 1 },
                    &self.job_wire(&replica.job)?,
                    progress,
                    name,
                    &|| {},
                )?;
                rec.phase2.add(&stats);
            }
            self.save_failback(replica.id, &rec)?;
            failpoint::hit("switch.after-final-transfer");
        }
        self.store().set_step(replica.id, Step::Switch(SwitchStep::Commit))?;
        for (i, (d, w)) in rec.disks.iter().zip(&rec.working).enumerate() {
            if !tgt.file_exists(w)? {
                continue;
            }
            progress.step(name, &format!("disk {i}: committing into {}", d.path));
            tgt.image_commit(&self.working_chain(&rec, i)?)?;
            tgt.sync_file(&d.path)?;
            tgt.remove_file(w)?;
            failpoint::hit("switch.mid-commit");
        }
        // The replica's final UEFI variables go with its disks (the replica is off: they
        // no longer change, so this is done again as it is after a crash).
        if let Some(f) = &rd.vm.config.driver.firmware {
            if let Some(target) = self.target_vars(replica, &rec)? {
                progress.step(name, &format!("UEFI variables into {target}"));
                tgt.write_vm_state(&target, &dr_host.read_vm_state(&f.vars)?)?;
            }
        }
        // From the switch on, the bitmap of the point commit will publish records every
        // write production makes. Added after the commit so the commit is not in it.
        self.store().set_step(replica.id, Step::Switch(SwitchStep::Bitmap))?;
        let bitmap = crate::layout::bitmap_name(replica.id, seq);
        for d in &rec.disks {
            if d.format == Format::Qcow2
                && !tgt.image_info(&d.path, Format::Qcow2, false)?.bitmaps.iter().any(|b| b.name == bitmap)
            {
                tgt.image_bitmap(&d.path, Format::Qcow2, &bitmap, BitmapOp::Add)?;
            }
        }
        self.store().set_step(replica.id, Step::Switch(SwitchStep::Identity))?;
        self.move_identity(replica, &mut rec)?;
        // The replica's final TPM state goes to the VM now of record (the target), which
        // starts from it; like the variables, done again after a crash.
        let production = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let mut tpm_note = String::new();
        if rd.vm.config.driver.tpm.is_some() && production.config.driver.tpm.is_some() {
            progress.step(name, "TPM state");
            let (from, to) = (self.launch_of(&rd.vm)?, self.launch_of(&production)?);
            if !crate::tpm::carry(dr_host.as_ref(), &from, tgt.as_ref(), &to)? {
                tpm_note = format!("; replica {} had no TPM state, so {name}'s TPM keeps its own", rd.vm.name);
            }
        }
        failpoint::hit("switch.after-identity");
        rec.switched_at = Some(standby_store::now());
        self.save_failback(replica.id, &rec)?;
        self.store().transition(
            replica.id,
            ReplicaState::Switching,
            Transition::SwitchDone,
            None,
            FailoverPoint::Keep,
        )?;

        let production = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let mut msg = format!(
            "switched: {} holds the replica's final state (since phase 1: read {}, wrote {}){tpm_note}; state failback",
            rec.target,
            human(rec.phase2.read),
            human(rec.phase2.written + rec.phase2.zeroed)
        );
        if rec.power_on {
            self.launch(&production)?;
            msg.push_str(&format!("; {name} powered on on {}", production.host));
        } else {
            msg.push_str(&format!("; start it with: standby vm start {name}"));
        }
        msg.push_str(&format!("; then standby failback commit {name} (or undo)"));
        Ok(msg)
    }

    /// Where the target keeps its UEFI variables: the original's or the existing VM's own
    /// store, or a new one beside a `new:` target's disks. None for a target booting BIOS.
    fn target_vars(&self, replica: &ReplicaRecord, rec: &FailbackRecord) -> Result<Option<String>> {
        Ok(match &rec.target {
            FailbackTarget::Original => self.source_firmware(replica, rec)?.map(|f| f.vars),
            FailbackTarget::Existing { vm } => self
                .store()
                .vm(vm)?
                .and_then(|v| v.config.driver.firmware)
                .or_else(|| rec.prior.as_ref().and_then(|p| p.existing.as_ref()?.config.driver.firmware.clone()))
                .map(|f| f.vars),
            FailbackTarget::New { dir, .. } => Some(crate::layout::new_target_vars_path(dir, &replica.vm)),
        })
    }

    /// The source VM's firmware as it was before the switch moved any identity.
    fn source_firmware(
        &self,
        replica: &ReplicaRecord,
        rec: &FailbackRecord,
    ) -> Result<Option<standby_model::Firmware>> {
        Ok(match rec.prior.as_ref() {
            Some(p) => p.protected.config.driver.firmware.clone(),
            None => self.store().vm(&replica.vm)?.and_then(|v| v.config.driver.firmware),
        })
    }

    /// For `existing:` and `new:`: the protected VM becomes the target VM (its host,
    /// configuration and disks); what it was is kept for undo. Idempotent.
    pub(super) fn move_identity(&self, replica: &ReplicaRecord, rec: &mut FailbackRecord) -> Result<()> {
        let name = replica.vm.as_str();
        let protected = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        if matches!(rec.target, FailbackTarget::Original) || protected.disks == rec.disks {
            return Ok(());
        }
        if rec.prior.is_none() {
            let existing = match &rec.target {
                FailbackTarget::Existing { vm } => self.store().vm(vm)?.map(|v| as_new_vm(&v)),
                _ => None,
            };
            rec.prior = Some(Prior { protected: as_new_vm(&protected), existing });
            self.save_failback(replica.id, rec)?;
        }
        let prior = rec.prior.as_ref().ok_or_else(|| missing_record(name))?;
        // The configuration: the existing VM's own, or for a new VM the replica's
        // (which is the source's).
        let mut config = prior.existing.clone().unwrap_or_else(|| prior.protected.clone());
        // A new VM keeps its UEFI variables (and on standby's own driver, its TPM's state)
        // beside its disks.
        if let FailbackTarget::New { dir, .. } = &rec.target {
            if let Some(f) = &mut config.config.driver.firmware {
                f.vars = crate::layout::new_target_vars_path(dir, name);
            }
            if let Some(state) = config.config.driver.tpm.as_mut().and_then(|t| t.state.as_mut()) {
                *state = crate::layout::new_target_tpm_path(dir, name);
            }
        }
        let new = NewVm {
            name: name.into(),
            host: rec.host.clone(),
            disks: rec.disks.clone(),
            role: Role::Source,
            replica_id: None,
            ..config
        };
        if let Some(e) = &prior.existing {
            self.store().delete_vm(&e.name)?;
        }
        self.store().redefine_vm(&new)?;
        Ok(())
    }
}
