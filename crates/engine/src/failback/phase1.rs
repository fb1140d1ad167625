//! Failback phase 1: target off, working layers, the protective point on the replica,
//! the difference (quick rollback, digest or full) copied into the working layers.

use super::*;
use standby_model::tracking::{bitmap_trust, SeenBitmap};

impl Engine {
    pub fn failback(
        &self,
        vms: &[String],
        job: Option<&str>,
        opts: &FailbackOptions,
        progress: &dyn Progress,
    ) -> Vec<OpOutcome> {
        if vms.len() > 1 && matches!(opts.target, FailbackTarget::Existing { .. }) {
            return vms
                .iter()
                .map(|vm| OpOutcome {
                    vm: vm.clone(),
                    ok: false,
                    message: format!("{} can take only one VM; fail back one VM at a time to it", opts.target),
                    warnings: Vec::new(),
                })
                .collect();
        }
        self.batch(vms, |vm, warnings| {
            self.tracked("failback", vm, progress, |p| self.failback_one(vm, job, opts, p, warnings))
        })
    }

    pub(super) fn failback_one(
        &self,
        name: &str,
        job: Option<&str>,
        opts: &FailbackOptions,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "failback")?;
        let replica = self.replica_of(name, job)?;
        replica.state.apply(Transition::FailbackStarted)?;
        let rd = self.replica_disks(&replica)?;
        let source = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let (rec, target_vm) = self.plan_target(&replica, &rd, &source, opts)?;
        // A source a site loss left unfenced must be off, its disks kept, before a failback
        // writes over them; a fence on a host this failback does not touch may wait.
        // Bound first: the store's guard must not live through the match, which asks again.
        let fence = self.store().fence(replica.id)?;
        let fence = match fence {
            Some(f) if f.is_open() && f.host == rec.host => self.settle_fence(replica.id)?,
            other => other,
        };
        let fence_note = fence.as_ref().and_then(crate::fence::protective_note);

        // Nothing has changed so far; from here every step is recorded first.
        self.store().transition(
            replica.id,
            replica.state,
            Transition::FailbackStarted,
            Some(Step::Failback(FailbackStep::Start)),
            FailoverPoint::Keep,
        )?;
        self.save_failback(replica.id, &rec)?;
        let result = self.phase1(&replica, rec, target_vm.as_ref(), progress, warnings);
        let rec = match result {
            Ok(rec) => rec,
            Err(e) => {
                if let Err(r) = self.roll_back_phase1(&replica) {
                    warnings.push(format!("rolling back failed too: {}", crate::chain(&r)));
                }
                return Err(e);
            }
        };
        self.store().transition(
            replica.id,
            ReplicaState::FailingBack,
            Transition::FailbackSynced,
            None,
            FailoverPoint::Keep,
        )?;
        let mut done = format!(
            "phase 1 done to {} by {} ({}): read {}, wrote {}; ready to switch",
            rec.target,
            rec.method,
            rec.method_note,
            human(rec.phase1.read),
            human(rec.phase1.written + rec.phase1.zeroed)
        );
        if let Some(note) = fence_note {
            done.push_str(&format!("; {note}"));
        }
        match opts.switch {
            SwitchMode::Auto => {
                let replica =
                    self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
                let switched = self.switch_locked(&replica, progress, warnings);
                self.record(name, "failback switch", &switched, String::clone);
                match switched {
                    Ok(s) => Ok(format!("{done}; {s}")),
                    Err(e) => Err(EngineError::PartlyDone {
                        vm: name.into(),
                        done,
                        failed: format!("the switch failed: {}", crate::chain(&e)),
                    }),
                }
            }
            SwitchMode::Manual => Ok(format!("{done}; switch with: standby failback switch {name}")),
            SwitchMode::At(_) => Ok(format!("{done}; the switch runs {} under standby daemon", opts.switch)),
        }
    }

    /// Checks the target and describes the failback; changes nothing.
    pub(super) fn plan_target(
        &self,
        replica: &ReplicaRecord,
        rd: &ReplicaDisks,
        source: &VmRecord,
        opts: &FailbackOptions,
    ) -> Result<(FailbackRecord, Option<VmRecord>)> {
        let name = &replica.vm;
        let sizes: Vec<u64> = rd.point.disks.iter().map(|d| d.size).collect();
        let (host, disks, target_vm, created) = match &opts.target {
            FailbackTarget::Original => (source.host.clone(), source.disks.clone(), Some(source.clone()), false),
            FailbackTarget::Existing { vm } => {
                let t = self.store().vm(vm)?.ok_or_else(|| EngineError::BadArgument {
                    arg: "--to",
                    why: format!(
                        "unknown VM {vm:?}: register the recovered VM first (standby vm create {vm} --disk PATH ...)"
                    ),
                })?;
                let protected = !self.store().replicas_of_vm(vm)?.is_empty();
                if t.name == *name || t.replica_id.is_some() || protected {
                    return Err(EngineError::Refused {
                        vm: vm.clone(),
                        why: format!(
                            "VM {vm} cannot take {name}'s place: it is {}",
                            if t.name == *name {
                                "the same VM (use --to original)"
                            } else if t.replica_id.is_some() {
                                "a replica VM"
                            } else {
                                "protected by a job of its own"
                            }
                        ),
                    });
                }
                let boots = |f: &Option<standby_model::Firmware>| if f.is_some() { "UEFI" } else { "BIOS" };
                let (theirs, ours) = (boots(&t.config.driver.firmware), boots(&source.config.driver.firmware));
                if theirs != ours {
                    return Err(EngineError::Refused {
                        vm: vm.clone(),
                        why: format!(
                            "VM {vm} boots {theirs} and {name} {ours}: its disks would not boot there; fail back to \
                             the original or to a new VM (--to new:HOST:DIR)"
                        ),
                    });
                }
                let tpm = |c: &standby_model::VmConfig| c.driver.tpm.is_some();
                if tpm(&t.config) != tpm(&source.config) {
                    let has = |yes: bool| if yes { "has a TPM" } else { "has no TPM" };
                    return Err(EngineError::Refused {
                        vm: vm.clone(),
                        why: format!(
                            "VM {vm} {} and {name} {}: the keys its guest sealed to its TPM would not be there; fail \
                             back to the original or to a new VM (--to new:HOST:DIR)",
                            has(tpm(&t.config)),
                            has(tpm(&source.config))
                        ),
                    });
                }
                self.check_name_free(&t.host, name)?;
                (t.host.clone(), t.disks.clone(), Some(t), false)
            }
            FailbackTarget::New { host, dir } => {
                let h = self.host(host)?;
                // Checked, not created: a refused request creates nothing. Phase 1 creates it.
                let bad = |reason: String| EngineError::TargetDir { host: host.clone(), dir: dir.clone(), reason };
                if !dir.starts_with('/') {
                    return Err(bad("give an absolute path".into()));
                }
                if h.file_exists(dir)? {
                    h.canonical_dir(dir).map_err(|e| bad(crate::chain(&e)))?;
                }
                if dir.contains(',') && source.config.driver.tpm.as_ref().is_some_and(|t| t.state.is_some()) {
                    return Err(bad(format!(
                        "{name} has a TPM, and swtpm cannot keep its state in a path with a comma"
                    )));
                }
                self.check_name_free(host, name)?;
                let disks: Vec<DiskRecord> = (0..sizes.len())
                    .map(|i| DiskRecord { path: format!("{dir}/{name}-d{i}.qcow2"), format: Format::Qcow2 })
                    .collect();
                let vars =
                    source.config.driver.firmware.as_ref().map(|_| crate::layout::new_target_vars_path(dir, name));
                let tpm = source
                    .config
                    .driver
                    .tpm
                    .as_ref()
                    .and_then(|t| t.state.as_ref())
                    .map(|_| crate::layout::new_target_tpm_path(dir, name));
                for path in disks.iter().map(|d| &d.path).chain(vars.as_ref()).chain(tpm.as_ref()) {
                    if h.file_exists(path)? {
                        return Err(EngineError::BadArgument {
                            arg: "--to",
                            why: format!("{path} already exists on {host}; choose another directory or remove it"),
                        });
                    }
                }
                (host.clone(), disks, None, true)
            }
        };
        if created || target_vm.as_ref().is_some_and(|t| t.name != *name) {
            // The name moves to the target at the switch; a QEMU still running the old
            // source under that name would be a second writer nobody could address.
            if self.vm_is_running(source)? {
                return Err(EngineError::Refused {
                    vm: name.clone(),
                    why: format!(
                        "the old source VM {name} runs on {}; shut it down first (standby vm shutdown {name}): the \
                     failback gives its name to {}",
                        source.host, opts.target
                    ),
                });
            }
        }
        if disks.len() != sizes.len() {
            return Err(EngineError::BadArgument {
                arg: "--to",
                why: format!(
                    "{} has {} disk(s) and the replica {}; they must match",
                    opts.target,
                    disks.len(),
                    sizes.len()
                ),
            });
        }
        let h = self.host(&host)?;
        if !created {
            for (i, (d, size)) in disks.iter().zip(&sizes).enumerate() {
                let info = h.image_info(&d.path, d.format, true)?;
                if info.virtual_size != *size {
                    return Err(EngineError::BadArgument {
                        arg: "--to",
                        why: format!(
                            "disk {i} of {} ({}) is {} bytes and the replica's is {size}; they must be the same size",
                            opts.target, d.path, info.virtual_size
                        ),
                    });
                }
                if let Some(b) = info.backing_filename {
                    return Err(EngineError::BadArgument {
                        arg: "--to",
                        why: format!(
                        "disk {i} of {} ({}) has a backing file ({b}); flatten it first (qemu-img rebase -b '' ...)",
                        opts.target, d.path
                    ),
                    });
                }
            }
        }
        let switch_at = match opts.switch {
            SwitchMode::At(t) => Some(t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)),
            _ => None,
        };
        let rec = FailbackRecord {
            target: opts.target.clone(),
            working: disks.iter().map(|d| working_path(&d.path, replica.id)).collect(),
            host,
            disks,
            created_disks: created,
            defines_target: !matches!(opts.target, FailbackTarget::Original),
            method: String::new(),
            method_note: String::new(),
            switch: opts.switch.to_string(),
            switch_at,
            power_on: opts.power_on,
            shutdown_secs: opts.shutdown_timeout.as_secs(),
            seq: None,
            prior: None,
            phase1: Moved::default(),
            phase2: Moved::default(),
            started_at: standby_store::now(),
            switched_at: None,
        };
        Ok((rec, target_vm))
    }

    pub(super) fn phase1(
        &self,
        replica: &ReplicaRecord,
        mut rec: FailbackRecord,
        target_vm: Option<&VmRecord>,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<FailbackRecord> {
        let name = replica.vm.as_str();
        let tgt = self.host(&rec.host)?;
        let dr_host = self.host(&replica.target_host)?;
        self.store().set_step(replica.id, Step::Failback(FailbackStep::TargetOff))?;
        if let Some(t) = target_vm {
            if self.vm_is_running(t)? {
                progress.step(name, &format!("powering off {}", t.name));
                vm::power_off(tgt.as_ref(), &t.name)?;
                warnings.push(format!("{} was running on {} and was powered off", t.name, t.host));
            }
        }
        failpoint::hit("failback.after-target-off");

        self.store().set_step(replica.id, Step::Failback(FailbackStep::Working))?;
        let rd = self.replica_disks(replica)?;
        for (i, (d, w)) in rec.disks.iter().zip(&rec.working).enumerate() {
            let size = rd.point.disks[i].size;
            if rec.created_disks {
                if let Some((dir, _)) = d.path.rsplit_once('/') {
                    tgt.ensure_dir(dir)?;
                }
                tgt.image_create(&d.path, size, None)?;
            }
            tgt.image_create(w, size, Some((&d.path, d.format)))?;
        }
        failpoint::hit("failback.after-working");

        self.store().set_step(replica.id, Step::Failback(FailbackStep::Protect))?;
        progress.step(name, "protective point on the replica");
        let frozen = self.protect(replica, &rd)?;
        failpoint::hit("failback.after-protect");

        self.store().set_step(replica.id, Step::Failback(FailbackStep::Transfer))?;
        let rd = self.replica_disks(replica)?;
        let (diffs, method, note) = self.difference(replica, &rec, &rd, &frozen)?;
        rec.method = method.into();
        rec.method_note = note;
        self.save_failback(replica.id, &rec)?;
        let chunks = std::sync::atomic::AtomicU64::new(0);
        let on_chunk = || {
            if chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 1 {
                failpoint::hit("failback.mid-transfer");
            }
        };
        for (i, diff) in diffs.iter().enumerate() {
            progress.step(name, &format!("disk {i}: {method} to {}", rec.target));
            let stats = sync::copy(
                &format!("{}d{i}", nbd_prefix(replica.id)),
                End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &frozen[i])? },
                End { host: tgt.as_ref(), chain: self.working_chain(&rec, i)? },
                diff,
                &self.job_wire(&replica.job)?,
                progress,
                name,
                &on_chunk,
            )?;
            rec.phase1.add(&stats);
        }
        for w in &rec.working {
            tgt.sync_file(w)?;
        }
        self.save_failback(replica.id, &rec)?;
        Ok(rec)
    }

    /// Disk `i` of the target with its working layer on top.
    pub(super) fn working_chain(&self, rec: &FailbackRecord, i: usize) -> Result<Chain> {
        let d = &rec.disks[i];
        Ok(Chain::single(&d.path, d.format).with_top(&rec.working[i]))
    }

    /// The protective point: freezes the replica's top overlays (a QMP snapshot of every
    /// disk in one transaction if it runs) and moves its writes to new ones. Returns the
    /// frozen tops.
    pub(super) fn protect(&self, replica: &ReplicaRecord, rd: &ReplicaDisks) -> Result<Vec<String>> {
        let dr_host = self.host(&replica.target_host)?;
        let frozen: Vec<String> = rd.vm.disks.iter().map(|d| d.path.clone()).collect();
        let next: Vec<String> =
            frozen.iter().enumerate().map(|(i, top)| overlay_path(&replica.dir, i, overlay_gen(top) + 1)).collect();
        for n in &next {
            dr_host.remove_file(n)?;
        }
        // Created by standby for a running replica too, not by QEMU: a daemonized QEMU
        // creates files group-readable, and an overlay holds the guest's writes. QMP's
        // `existing` mode then opens them as given.
        for (i, (top, n)) in frozen.iter().zip(&next).enumerate() {
            dr_host.image_create(n, rd.point.disks[i].size, Some((top, Format::Qcow2)))?;
        }
        if self.vm_is_running(&rd.vm)? {
            let tops: Vec<(String, u32)> = next.iter().map(|n| (n.clone(), overlay_gen(n))).collect();
            dr_host.vm_protect(&rd.vm.name, &tops)?;
        }
        for (i, n) in next.iter().enumerate() {
            self.store().set_vm_disk(&rd.vm.name, i, &DiskRecord { path: n.clone(), format: Format::Qcow2 })?;
        }
        Ok(frozen)
    }

    /// After a crash around the protective point: the database follows what the replica
    /// really writes to (QEMU's answer while it runs; otherwise a newer overlay, which
    /// reads the same as the one below it until written, is adopted). Unused newer
    /// overlays are removed.
    pub(super) fn settle_replica_top(&self, replica: &ReplicaRecord) -> Result<()> {
        let Some(rvm) = self.store().replica_vm(replica.id)? else { return Ok(()) };
        let dr_host = self.host(&replica.target_host)?;
        let running = self.vm_is_running(&rvm)?;
        let files = if running { Some(dr_host.vm_top_files(&rvm.name, rvm.disks.len())?) } else { None };
        for (i, d) in rvm.disks.iter().enumerate() {
            let next = overlay_path(&replica.dir, i, overlay_gen(&d.path) + 1);
            let adopt = match &files {
                Some(f) => f[i] == next,
                None => dr_host.file_exists(&next)?,
            };
            if adopt {
                self.store().set_vm_disk(&rvm.name, i, &DiskRecord { path: next, format: Format::Qcow2 })?;
            } else {
                dr_host.remove_file(&next)?;
            }
        }
        Ok(())
    }

    /// What to copy for each disk, and how it was found.
    pub(super) fn difference(
        &self,
        replica: &ReplicaRecord,
        rec: &FailbackRecord,
        rd: &ReplicaDisks,
        frozen: &[String],
    ) -> Result<(Vec<Difference>, &'static str, String)> {
        let n = rec.disks.len();
        match &rec.target {
            FailbackTarget::New { .. } => {
                return Ok((vec![Difference::Full; n], "full", "a new VM gets every allocated block".into()))
            }
            FailbackTarget::Existing { .. } => {
                return Ok((
                    vec![Difference::Digest; n],
                    "digest",
                    "another VM's disks share no history with the replica".into(),
                ))
            }
            FailbackTarget::Original => {}
        }
        match self.quick_ranges(replica, rec, rd, frozen)? {
            Ok(diffs) => Ok((
                diffs,
                "quick",
                "the blocks the replica's overlays, newer restore points and the source's bitmap name".into(),
            )),
            Err(why) => Ok((vec![Difference::Digest; n], "digest", format!("no quick rollback: {why}"))),
        }
    }

    /// Quick rollback: per disk, every range where the original disk can differ from the
    /// replica's frozen state, from metadata alone: what the replica wrote (its overlays),
    /// the restore points newer than the failover point (their layers), and what the
    /// source wrote after its last restore point (its dirty bitmaps). Err says why the
    /// metadata cannot be trusted.
    pub(super) fn quick_ranges(
        &self,
        replica: &ReplicaRecord,
        rec: &FailbackRecord,
        rd: &ReplicaDisks,
        frozen: &[String],
    ) -> Result<std::result::Result<Vec<Difference>, String>> {
        let dr_host = self.host(&replica.target_host)?;
        let tgt = self.host(&rec.host)?;
        let Some(newest) = rd.points.last() else { return Ok(Err("no restore point".into())) };
        if let Some(p) = rd.newer_points().find(|p| p.disks.iter().any(|d| d.parent.is_none())) {
            return Ok(Err(format!("restore point {} is a full copy, not a layer over the one before", p.id)));
        }
        let mut out = Vec::new();
        for (i, d) in rec.disks.iter().enumerate() {
            let size = rd.point.disks[i].size;
            if d.format != Format::Qcow2 {
                return Ok(Err(format!("disk {i} is raw and has no dirty bitmap")));
            }
            let Some(current) = newest.disks.get(i).and_then(|x| x.bitmap.clone()) else {
                return Ok(Err(format!("restore point {} recorded no bitmap for disk {i}", newest.id)));
            };
            let Some(cur_seq) = crate::layout::bitmap_seq(replica.id, &current) else {
                return Ok(Err(format!("disk {i}: bitmap {current} is not standby's")));
            };
            let ours: Vec<_> = tgt
                .image_info(&d.path, Format::Qcow2, false)?
                .bitmaps
                .into_iter()
                .filter(|b| crate::layout::bitmap_seq(replica.id, &b.name).is_some_and(|s| s >= cur_seq))
                .collect();
            let seen: Vec<SeenBitmap> = ours
                .iter()
                .filter_map(|b| {
                    let seq = crate::layout::bitmap_seq(replica.id, &b.name)?;
                    Some(SeenBitmap { seq, inconsistent: b.in_use, recording: b.enabled })
                })
                .collect();
            // The source's writes since its last run are read from these bitmaps.
            if let Err(why) = bitmap_trust(Some(cur_seq), &seen, true) {
                return Ok(Err(format!("disk {i}: {} ({current})", why.reason())));
            }
            let mut lists = Vec::new();
            for b in &ours {
                lists.push(sync::bitmap_ranges(
                    &format!("{}bm-d{i}", nbd_prefix(replica.id)),
                    tgt.as_ref(),
                    &d.path,
                    &b.name,
                )?);
            }
            for p in rd.newer_points() {
                lists.push(dr_host.image_allocated(&p.disks[i].layer)?);
            }
            // What the replica wrote: its overlays, the top layers of the chain copied from.
            out.push(Difference::Ranges {
                known: transfer::union(&lists, size),
                top_layers: overlay_gen(&frozen[i]) + 1,
            });
        }
        Ok(Ok(out))
    }

    /// Undoes whatever part of phase 1 happened. The replica runs on (on a newer overlay
    /// if the protective point was taken: same content); the target's disks were never
    /// written, only the working layers, which go.
    pub(super) fn roll_back_phase1(&self, replica: &ReplicaRecord) -> Result<()> {
        self.host(&replica.target_host)?.nbd_stop_all(&nbd_prefix(replica.id))?;
        self.settle_replica_top(replica)?;
        if let Some(rec) = self.failback_record(replica.id)? {
            let tgt = self.host(&rec.host)?;
            tgt.nbd_stop_all(&nbd_prefix(replica.id))?;
            self.discard_working(&replica.vm, &rec)?;
        }
        self.store().delete_failback(replica.id)?;
        self.store().transition(
            replica.id,
            ReplicaState::FailingBack,
            Transition::FailbackRolledBack,
            None,
            FailoverPoint::Keep,
        )?;
        Ok(())
    }

    /// For a target VM standby defines at its start (`existing:`, `new:`): the target host
    /// must not hold a definition of that name already (libvirt: a domain), which the new
    /// VM would take over, with its TPM's state.
    fn check_name_free(&self, host: &str, name: &str) -> Result<()> {
        if self.host(host)?.vm_defined(name)? {
            return Err(EngineError::BadArgument {
                arg: "--to",
                why: format!(
                    "host {host} already holds a VM definition named {name} (virsh list --all), which the VM \
                     failed back to would take over: fail back to the original there (--to original); a \
                     definition left over from an earlier failback can be removed with virsh undefine --tpm {name}"
                ),
            });
        }
        Ok(())
    }

    /// Deletes the working layers, the disks (and variable store, TPM state) a `new:`
    /// failback of VM `vm` created, and the definition an `existing:` or `new:` one made.
    pub(super) fn discard_working(&self, vm: &str, rec: &FailbackRecord) -> Result<()> {
        let tgt = self.host(&rec.host)?;
        for w in &rec.working {
            tgt.remove_file(w)?;
        }
        if rec.created_disks {
            for d in &rec.disks {
                tgt.remove_file(&d.path)?;
            }
            // And the variable store and TPM state the switch gave it, if it got that far:
            // only the files phase 1 found absent (those of the VM's kinds), so none of
            // anyone else's goes.
            if let FailbackTarget::New { dir, .. } = &rec.target {
                let config = rec.prior.as_ref().map(|p| p.protected.config.clone());
                let config = match config {
                    Some(c) => Some(c),
                    None => self.store().vm(vm)?.map(|v| v.config),
                };
                let driver = config.map(|c| c.driver).unwrap_or_default();
                if driver.firmware.is_some() {
                    tgt.remove_file(&crate::layout::new_target_vars_path(dir, vm))?;
                }
                if driver.tpm.as_ref().is_some_and(|t| t.state.is_some()) {
                    tgt.remove_file(&crate::layout::new_target_tpm_path(dir, vm))?;
                }
            }
        }
        // A definition of the VM's name the target host did not hold before (libvirt: the
        // domain the switch or a start defined, with its TPM's state) goes too.
        if rec.defines_target {
            tgt.vm_forget(vm)?;
        }
        Ok(())
    }
}
