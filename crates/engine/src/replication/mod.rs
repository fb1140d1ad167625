//! Replication runs: one job run gives every VM of the job a new restore point, or leaves
//! that VM's replica exactly as it was.
//!
//! The life of one VM's run (each step is safe to interrupt; see ARCHITECTURE.md):
//! 1. lock the VM, recover whatever a killed run left (views, servers, layer files);
//! 2. decide per disk: full (no previous layer), cbt (bitmap trusted), digest (otherwise);
//! 3. take the instant (all disks at once) and publish each disk's frozen view over NBD;
//! 4. create the new DR layers over the previous restore point and copy into them;
//! 5. close the views, make the layers durable, and publish the restore point in one
//!    database transaction;
//! 6. retire the previous bitmaps, apply retention.

pub(crate) mod source;
mod views;

use views::point_view;
pub use views::{ReplicaView, RestorePointView, RpDiskView};

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use standby_host::{Chain, Endpoint, Format, Host, ServeSpec};
use standby_model::recovery::{recovery, Recovery as Action, Seen};
use standby_model::tracking::{choose_method, DiskSeen};
use standby_model::{Consistency, Method, PointId, ReplicaId, ReplicaState, Seq, Transition};
use standby_store::{FailoverPoint, NewRestorePoint, ReplicaRecord, RestorePointRecord, RpDiskRecord, VmRecord};

use crate::lock::VmLock;
use crate::quiesce::{self, Freeze};
use crate::replica_dir;
use crate::task::TaskProgress;
use crate::transfer::{self, Plan, Stats, BASE_ALLOCATION};
use crate::{failpoint, Engine, EngineError, Progress, Result};
use standby_host::SourceDisk;

/// What a recovery did: what it finished or rolled back, and what it could not.
#[derive(Debug, Default)]
pub struct Recovery {
    pub notes: Vec<String>,
    /// Replicas left as they were, each with why and what to do.
    pub attention: Vec<String>,
}

/// Whether a run is an operation of its own or part of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunWithin {
    /// A job run: the replica goes through `replicating`.
    Own,
    /// A planned failover's sync: the replica stays `preparing_failover`.
    PlannedFailover,
}

/// What one VM's run ended with.
#[derive(Debug, Serialize)]
pub struct RunOutcome {
    pub vm: String,
    pub restore_point: Option<RestorePointView>,
    pub error: Option<String>,
    /// Notes for the operator: recovered leftovers, fallbacks, removed points.
    pub notes: Vec<String>,
}

impl Engine {
    /// Runs a job: every VM in parallel, each with its own outcome.
    pub fn job_run(&self, name: &str, progress: &dyn Progress) -> Result<Vec<RunOutcome>> {
        let job = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        if !job.enabled {
            return Err(EngineError::JobRefused {
                job: name.into(),
                why: format!("job {name} is disabled; enable it first (standby job enable {name})"),
            });
        }
        self.store().set_job_last_run(job.id, &standby_store::now())?;
        // A replica whose row cannot be read fails on its own; the others run.
        let mut unreadable = Vec::new();
        let mut replicas = Vec::new();
        let rows = self.store().replica_rows_of_job(job.id)?;
        for (id, row) in rows {
            match row {
                Ok(r) => replicas.push(r),
                Err(e) => unreadable.push(RunOutcome {
                    vm: self
                        .store()
                        .replica_names(id)
                        .ok()
                        .flatten()
                        .map_or_else(|| format!("(replicas row {id})"), |n| n.0),
                    restore_point: None,
                    error: Some(format!(
                        "replicas row {id} cannot be read ({}); repair it, the other VMs of the job run on",
                        crate::chain(&e)
                    )),
                    notes: Vec::new(),
                }),
            }
        }
        let task = TaskProgress::start(self, "job-run", name, progress)?;
        let mut outcomes: Vec<RunOutcome> = std::thread::scope(|s| {
            let handles: Vec<_> = replicas
                .iter()
                .map(|r| {
                    let task = &task;
                    s.spawn(move || self.replicate(r, job.retain, task))
                })
                .collect();
            handles
                .into_iter()
                .zip(&replicas)
                .map(|(h, r)| {
                    h.join().unwrap_or_else(|_| RunOutcome {
                        vm: r.vm.clone(),
                        restore_point: None,
                        error: Some("the run panicked; this is a bug".into()),
                        notes: Vec::new(),
                    })
                })
                .collect()
        });
        for o in &unreadable {
            self.record_raw(&format!("job:{name}"), "replication", "failed", o.error.as_deref().unwrap_or_default());
        }
        outcomes.extend(unreadable);
        let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
        let summary = if failed == 0 {
            Ok(format!("{} restore point(s) created", outcomes.len()))
        } else {
            Err(EngineError::JobFailed { job: name.into(), failed, total: outcomes.len() })
        };
        task.finish(&summary);
        Ok(outcomes)
    }

    fn replicate(&self, replica: &ReplicaRecord, retain: u32, progress: &dyn Progress) -> RunOutcome {
        let mut notes = Vec::new();
        let state = replica.state;
        {
            if !state.replicates() {
                let why = format!(
                    "skipped: its replica is in state {state}; replication resumes after the failover is undone"
                );
                self.record_raw(&replica.vm, "replication", "skipped", &why);
                return RunOutcome { vm: replica.vm.clone(), restore_point: None, error: Some(why), notes };
            }
        }
        let result = self.replicate_inner(replica, retain, progress, &mut notes);
        self.record(&replica.vm, "replication", &result, |rp| format!("restore point {} ({})", rp.id, rp.method));
        match result {
            Ok(rp) => {
                progress.step(&replica.vm, "done");
                RunOutcome { vm: replica.vm.clone(), restore_point: Some(rp), error: None, notes }
            }
            Err(e) => {
                progress.step(&replica.vm, "failed");
                RunOutcome { vm: replica.vm.clone(), restore_point: None, error: Some(crate::chain(&e)), notes }
            }
        }
    }

    fn replicate_inner(
        &self,
        replica: &ReplicaRecord,
        retain: u32,
        progress: &dyn Progress,
        notes: &mut Vec<String>,
    ) -> Result<RestorePointView> {
        let _lock = VmLock::acquire(&self.data_dir, &replica.vm, &format!("replication job {}", replica.job))?;
        self.replicate_locked(replica, retain, progress, notes, RunWithin::Own)
    }

    /// One run for a caller that holds the VM's lock. `Own` runs move the replica through
    /// `replicating`; a planned failover's runs happen inside its own state.
    pub(crate) fn replicate_locked(
        &self,
        replica: &ReplicaRecord,
        retain: u32,
        progress: &dyn Progress,
        notes: &mut Vec<String>,
        within: RunWithin,
    ) -> Result<RestorePointView> {
        // Re-read under the lock: a failover may have started since the job was read.
        let replica =
            &self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: replica.vm.clone() })?;
        let vm = self.store().vm(&replica.vm)?.ok_or_else(|| EngineError::UnknownVm(replica.vm.clone()))?;
        let src_host = self.host(&vm.host)?;
        let dr_host = self.host(&replica.target_host)?;
        progress.step(&vm.name, "recovering");
        let interrupted = replica.state == ReplicaState::Replicating;
        self.recover_replica(replica, &vm, src_host.as_ref(), dr_host.as_ref(), notes, interrupted)?;
        if within == RunWithin::PlannedFailover {
            if replica.state != ReplicaState::PreparingFailover {
                return Err(EngineError::Bug(format!("VM {} is not preparing a planned failover", replica.vm)));
            }
            return self.run_once(replica, &vm, src_host.as_ref(), dr_host.as_ref(), retain, progress, notes);
        }
        let from = if interrupted {
            // A killed run nobody recovered yet: its leftovers went just now.
            self.store().transition(replica.id, replica.state, Transition::RunFailed, None, FailoverPoint::Keep)?
        } else {
            replica.state
        };
        self.store().transition(replica.id, from, Transition::RunStarted, None, FailoverPoint::Keep)?;
        let result = self.run_once(replica, &vm, src_host.as_ref(), dr_host.as_ref(), retain, progress, notes);
        let end = if result.is_ok() { Transition::RunFinished } else { Transition::RunFailed };
        self.store().transition(replica.id, ReplicaState::Replicating, end, None, FailoverPoint::Keep)?;
        result
    }

    /// Finishes what killed standby processes left: every replica in a transitional state
    /// (or with a step recorded) whose VM no live process holds is recovered now, each on
    /// its own. `standby recover` and every command that changes state run this first.
    pub fn recover_interrupted(&self) -> Result<Recovery> {
        let mut done = Recovery::default();
        let rows = self.store().replica_rows()?;
        for (id, row) in rows {
            // A row that cannot be read flags its replica and leaves the others to go on.
            let replica = match row {
                Ok(r) => r,
                Err(e) => {
                    done.attention.push(format!(
                        "{} needs attention: {}; standby leaves that replica alone until the row is repaired",
                        self.row_name(id),
                        crate::chain(&e)
                    ));
                    continue;
                }
            };
            if replica.state.is_idle() && replica.step.is_none() {
                continue;
            }
            // A live operation holds the lock: then nothing was interrupted.
            let Ok(_lock) = VmLock::acquire(&self.data_dir, &replica.vm, "recovery") else {
                continue;
            };
            // As it stands now, under the lock: an operation may have ended since the read.
            let replica = match self.store().replica(id) {
                Ok(Some(r)) if !(r.state.is_idle() && r.step.is_none()) => r,
                Ok(_) => continue,
                Err(e) => {
                    done.attention.push(format!("{} needs attention: {}", self.row_name(id), crate::chain(&e)));
                    continue;
                }
            };
            // One VM that cannot be recovered must not stop standby for all the others.
            match self.recover_one(&replica) {
                Ok(n) => done.notes.extend(n),
                Err(e) => {
                    let why = crate::chain(&e);
                    self.record_raw(&replica.vm, "recovery", "failed", &why);
                    done.attention.push(format!(
                        "VM {} needs attention: its interrupted {} could not be recovered: {why}; fix that \
                         and run standby recover to retry (standby history {} shows what happened)",
                        replica.vm, replica.state, replica.vm
                    ));
                }
            }
        }
        Ok(done)
    }

    /// Exists while a run holds VM `vm` paused for a UEFI instant.
    pub(crate) fn paused_marker(&self, vm: &str) -> std::path::PathBuf {
        self.data_dir.join("locks").join(format!("{vm}.paused-for-instant"))
    }

    /// A replica row as an operator finds it: by its VM and job when those can be read.
    pub(crate) fn row_name(&self, id: ReplicaId) -> String {
        match self.store().replica_names(id) {
            Ok(Some((vm, job))) => format!("VM {vm} (job {job}, replicas row {id})"),
            _ => format!("replicas row {id}"),
        }
    }

    /// Carries out what the recovery table decides for one replica.
    fn recover_one(&self, replica: &ReplicaRecord) -> Result<Vec<String>> {
        let replica_runs = match self.store().replica_vm(replica.id)? {
            Some(v) => self.vm_is_running(&v)?,
            None => false,
        };
        let action = recovery(replica.state, replica.step, Seen { replica_runs });
        let mut notes = Vec::new();
        let note = match action {
            Action::Nothing => return Ok(Vec::new()),
            Action::RollBackRun => {
                notes = self.roll_back_run(replica)?;
                self.store().transition(replica.id, replica.state, Transition::RunFailed, None, FailoverPoint::Keep)?;
                self.record_raw(&replica.vm, "replication", "rolled back", "recovered after an interruption");
                format!("VM {}, job {}: rolled back an interrupted replication run", replica.vm, replica.job)
            }
            Action::RollBackPlanned { restart_source } => {
                notes = self.roll_back_run(replica)?;
                self.recover_planned(replica, restart_source)?
            }
            Action::CompleteFailover | Action::RollBackFailover { .. } | Action::FinishUndo => {
                self.recover_failover(replica, action)?
            }
            Action::RollBackPermanent { resume_guest } => self.roll_back_permanent(replica, resume_guest)?,
            Action::FinishPermanent => self.complete_permanent(replica)?,
            Action::RollBackFailback
            | Action::RollBackSwitch
            | Action::FinishSwitch
            | Action::FinishCommit
            | Action::FinishUndoFailback => self.recover_failback(replica, action)?,
        };
        notes.insert(0, note);
        Ok(notes)
    }

    /// What a killed run left (views, servers, unfinished layers, a frozen guest) goes;
    /// notes on what was found.
    fn roll_back_run(&self, replica: &ReplicaRecord) -> Result<Vec<String>> {
        let vm = self.store().vm(&replica.vm)?.ok_or_else(|| EngineError::UnknownVm(replica.vm.clone()))?;
        let mut notes = Vec::new();
        self.recover_replica(
            replica,
            &vm,
            self.host(&vm.host)?.as_ref(),
            self.host(&replica.target_host)?.as_ref(),
            &mut notes,
            true,
        )?;
        Ok(notes)
    }

    /// Removes this replica's dirty bitmaps from the source VM's disks: a replica that is
    /// deleted must not leave its change tracking behind in production images.
    pub(crate) fn forget_source_bitmaps(&self, replica: &ReplicaRecord, vm: &VmRecord) -> Result<()> {
        let src = self.host(&vm.host)?;
        let running = self.vm_is_running(vm)?;
        let mut access = src.vm_disks(&vm.name, running)?;
        access.close_views(replica.id, vm.disks.len())?;
        for (idx, d) in vm.disks.iter().enumerate() {
            let disk = SourceDisk { idx, path: d.path.clone(), format: d.format, size: 0 };
            // Without a current bitmap nothing is trusted: every one of this replica goes.
            let _untrusted = source::reconcile(access.as_mut(), &disk, replica.id, None)?;
        }
        Ok(())
    }

    /// Clears what an interrupted run of this replica left behind. Idempotent.
    fn recover_replica(
        &self,
        replica: &ReplicaRecord,
        vm: &VmRecord,
        src: &dyn Host,
        dr: &dyn Host,
        notes: &mut Vec<String>,
        interrupted: bool,
    ) -> Result<()> {
        let running = self.vm_is_running(vm)?;
        // A VM an earlier run paused for its UEFI instant runs again (killed, or its resume
        // failed), and a killed run's freeze is thawed; both, whatever the other gives.
        let resumed = crate::firmware::after_kill(src, &vm.name, running, &self.paused_marker(&vm.name), notes);
        if interrupted && running {
            let q = self.store().job(&replica.job)?.map(|j| j.quiesce).unwrap_or_default();
            quiesce::after_kill(src, &vm.name, &q, notes);
        }
        resumed?;
        src.vm_disks(&vm.name, running)?.close_views(replica.id, vm.disks.len())?;
        dr.nbd_stop_all(&target_prefix(replica.id))?;
        self.check_replica_dir(dr, replica)?;
        let removed = self.finish_pruning(dr, replica.id, &replica.dir, interrupted)?;
        if interrupted || !removed.is_empty() {
            notes.push(format!(
                "recovered an interrupted run: no restore point was made by it; removed {} unfinished layer file(s)",
                removed.len()
            ));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_once(
        &self,
        replica: &ReplicaRecord,
        vm: &VmRecord,
        src: &dyn Host,
        dr: &dyn Host,
        retain: u32,
        progress: &dyn Progress,
        notes: &mut Vec<String>,
    ) -> Result<RestorePointView> {
        let started = Instant::now();
        let fail = |step: &'static str| {
            let vm = vm.name.clone();
            move |e: EngineError| EngineError::Run { vm, step, source: Box::new(e) }
        };
        let running = self.vm_is_running(vm)?;
        // Before anything: a point of a domain that gained a disk or a TPM in libvirt would
        // silently lack it. (Only libvirt's domains change behind standby's back.)
        if vm.config.driver.domain_xml.is_some() {
            src.vm_unchanged(&self.launch_of(vm)?).map_err(|e| fail("checking the VM's definition")(e.into()))?;
        }
        let points = self.store().restore_points(replica.id, false)?;
        let prev = points.last();

        // Disks as they are now, and what each one's previous layer and bitmap are.
        let mut disks = Vec::new();
        for (idx, d) in vm.disks.iter().enumerate() {
            let format = d.format;
            let info =
                src.image_info(&d.path, format, running).map_err(|e| fail("reading the source disks")(e.into()))?;
            disks.push(SourceDisk { idx, path: d.path.clone(), format, size: info.virtual_size });
        }
        let prev_disk = |idx: usize| prev.and_then(|p| p.disks.iter().find(|d| d.idx as usize == idx));

        progress.step(&vm.name, "checking bitmaps");
        let mut access = src.vm_disks(&vm.name, running)?;
        let mut methods = Vec::new();
        let mut previous_bitmaps = Vec::new();
        let mut trusted = Vec::new();
        for d in &disks {
            let pd = prev_disk(d.idx);
            let prev_bitmap = pd.and_then(|p| p.bitmap.clone());
            let trust = source::reconcile(access.as_mut(), d, replica.id, prev_bitmap.as_deref())
                .map_err(fail("reconciling dirty bitmaps"))?;
            let (method, why) = choose_method(DiskSeen {
                previous_size: pd.map(|p| p.size),
                size: d.size,
                raw: d.format == Format::Raw,
                bitmap: trust,
            });
            if let Some(why) = why {
                notes.push(format!("disk {}: {why}", d.idx));
            }
            methods.push(method);
            previous_bitmaps.push(prev_bitmap);
            trusted.push(method == Method::Cbt);
        }

        let seq = self.store().take_seq(replica.id)?;
        let new_bitmap = crate::layout::bitmap_name(replica.id, seq);
        let q = self.store().job(&replica.job)?.map(|j| j.quiesce).unwrap_or_default();
        let freeze = if running {
            progress.step(&vm.name, "freezing the guest's filesystems");
            quiesce::before_instant(src, &vm.name, &q, notes)
        } else {
            Freeze::none()
        };
        if freeze.is_frozen() {
            failpoint::hit("replicate.while-frozen");
        }
        progress.step(&vm.name, "taking the point-in-time view");
        let created_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let marker = self.paused_marker(&vm.name);
        let tpm_of = vm.config.driver.tpm.as_ref().map(|_| self.launch_of(vm)).transpose()?;
        let (views, beside) = crate::firmware::at_instant(src, vm, tpm_of.as_ref(), running, &marker, || {
            access.open_views(replica.id, &disks, &previous_bitmaps, &trusted, &new_bitmap).map_err(EngineError::from)
        });
        // The views hold the instant: the guest goes on at once, whether they opened or not.
        let consistency =
            if running { quiesce::after_instant(src, &vm.name, &q, freeze, notes) } else { Consistency::Offline };
        let vars_file = crate::layout::vars_path(&replica.dir, seq);
        let tpm_file = crate::layout::tpm_path(&replica.dir, seq);
        let result = views.map_err(fail("taking the point-in-time view")).and_then(|views| {
            failpoint::hit("replicate.after-checkpoint");
            let beside = beside.map_err(fail("reading the UEFI variables and TPM state"))?;
            let moved = self.transfer_disks(replica, vm, dr, &disks, &views, &methods, &points, seq, progress)?;
            let keep = |data: &Option<Vec<u8>>, file: &String, what: &'static str| {
                data.as_ref()
                    .map(|d| dr.write_vm_state(file, d).map(|()| file.clone()).map_err(|e| fail(what)(e.into())))
                    .transpose()
            };
            let nvram = keep(&beside.vars, &vars_file, "keeping the UEFI variables")?;
            let tpm_state = keep(&beside.tpm, &tpm_file, "keeping the TPM state")?;
            Ok((moved, Kept { nvram, tpm_state }))
        });
        // Views go whatever happened; on failure the bitmaps are reconciled so that the
        // bitmap of the last restore point again covers every change.
        let closed = access.close_views(replica.id, disks.len()).map_err(EngineError::from);
        let ((stats, layers), kept) = match (result, closed) {
            (Ok(r), Ok(())) => r,
            (Err(e), _) | (Ok(_), Err(e)) => {
                let _ = dr.nbd_stop_all(&target_prefix(replica.id));
                let _ = dr.remove_file(&vars_file);
                let _ = dr.remove_file(&tpm_file);
                for d in &disks {
                    let _ = dr.remove_file(&crate::layout::layer_path(&replica.dir, seq, d.idx));
                    let _ = source::reconcile(access.as_mut(), d, replica.id, previous_bitmaps[d.idx].as_deref());
                }
                return Err(e);
            }
        };

        notes.extend(disks.iter().zip(&stats).filter_map(|(d, st)| transfer::wire_note(d.idx, st)));
        failpoint::hit("replicate.before-commit");
        progress.step(&vm.name, "committing");
        let committed = self.commit_point(
            replica,
            dr,
            &disks,
            layers,
            &stats,
            (&methods, consistency, kept),
            seq,
            &new_bitmap,
            created_at,
            started,
        );
        let rp_id = match committed {
            Ok(id) => id,
            Err(e) => {
                let _ = dr.remove_file(&vars_file);
                let _ = dr.remove_file(&tpm_file);
                for d in &disks {
                    let _ = dr.remove_file(&crate::layout::layer_path(&replica.dir, seq, d.idx));
                    let _ = source::reconcile(access.as_mut(), d, replica.id, previous_bitmaps[d.idx].as_deref());
                }
                return Err(fail("publishing the restore point")(e));
            }
        };
        failpoint::hit("replicate.after-commit");

        // The previous bitmaps have served their purpose. Failing to drop one is harmless
        // (the next run's reconcile removes it), so it is a note, not a failed run.
        for d in &disks {
            if let (true, Some(prev)) = (trusted[d.idx], &previous_bitmaps[d.idx]) {
                if let Err(e) = source::retire(access.as_mut(), d, prev) {
                    notes.push(format!(
                        "disk {}: old bitmap {prev} stays until the next run: {}",
                        d.idx,
                        crate::chain(&e)
                    ));
                }
            }
        }
        progress.step(&vm.name, "retention");
        let dropped = self.apply_retention(dr, replica.id, &replica.dir, retain)?;
        if dropped > 0 {
            notes.push(format!("retention removed {dropped} old restore point(s)"));
        }
        let rp = self
            .store()
            .restore_points(replica.id, false)?
            .into_iter()
            .find(|p| p.id == rp_id)
            .ok_or_else(|| EngineError::Bug("the new restore point vanished".into()))?;
        Ok(point_view(rp, &replica.vm, &replica.job))
    }

    /// Step 5: the layers made durable, then the restore point published in one
    /// transaction. Returns its id.
    #[allow(clippy::too_many_arguments)]
    fn commit_point(
        &self,
        replica: &ReplicaRecord,
        dr: &dyn Host,
        disks: &[SourceDisk],
        layers: Vec<RpDiskRecord>,
        stats: &[Stats],
        (methods, consistency, kept): (&[Method], Consistency, Kept),
        seq: Seq,
        new_bitmap: &str,
        created_at: String,
        started: Instant,
    ) -> Result<PointId> {
        for l in &layers {
            dr.sync_file(&l.layer)?;
        }
        let mut total = Stats::default();
        for s in stats {
            total += *s;
        }
        let rp_disks: Vec<RpDiskRecord> = layers
            .into_iter()
            .zip(disks)
            .map(|(mut l, d)| {
                l.bitmap = (d.format == Format::Qcow2).then(|| new_bitmap.to_owned());
                l
            })
            .collect();
        Ok(self.store().insert_restore_point(&NewRestorePoint {
            replica_id: replica.id,
            seq,
            created_at,
            method: Method::overall(methods.iter().copied()),
            consistency,
            nvram: kept.nvram,
            tpm_state: kept.tpm_state,
            bytes_transferred: total.written,
            bytes_read: total.read,
            duration_ms: started.elapsed().as_millis() as u64,
            disks: rp_disks,
        })?)
    }

    /// Step 4: new layers on the DR host, filled from the views. Returns per-disk stats and
    /// the layers' records (not yet published).
    #[allow(clippy::too_many_arguments)]
    fn transfer_disks(
        &self,
        replica: &ReplicaRecord,
        vm: &VmRecord,
        dr: &dyn Host,
        disks: &[SourceDisk],
        views: &[standby_host::View],
        methods: &[Method],
        points: &[RestorePointRecord],
        seq: Seq,
        progress: &dyn Progress,
    ) -> Result<(Vec<Stats>, Vec<RpDiskRecord>)> {
        let src = self.host(&vm.host)?;
        let wire = self.job_wire(&replica.job)?;
        let prev = points.last();
        let chunks = AtomicU64::new(0);
        let on_chunk = || {
            if chunks.fetch_add(1, Ordering::Relaxed) == 1 {
                failpoint::hit("replicate.mid-transfer");
            }
        };
        let mut all_stats = Vec::new();
        let mut layers = Vec::new();
        for (d, (view, method)) in disks.iter().zip(views.iter().zip(methods)) {
            let what = match method {
                Method::Full => "full copy",
                Method::Cbt => "changed blocks",
                Method::Digest => "digest comparison",
            };
            progress.step(&vm.name, &format!("disk {}: {what}", d.idx));
            let layer = crate::layout::layer_path(&replica.dir, seq, d.idx);
            let parent = match method {
                Method::Full => None,
                _ => prev.and_then(|p| p.disks.iter().find(|x| x.idx as usize == d.idx)).map(|x| x.layer.clone()),
            };
            dr.image_create(&layer, d.size, parent.as_deref().map(|p| (p, Format::Qcow2)))?;
            let chain = match &parent {
                Some(p) => replica_dir::chain_of(points, p)?.with_top(&layer),
                None => Chain::single(&layer, Format::Qcow2),
            };
            let id = format!("{}d{}", target_prefix(replica.id), d.idx);
            let address =
                dr.nbd_serve(&ServeSpec { id: id.clone(), chain, writable: true, bitmap: None, direct: false })?;
            let mut contexts = vec![BASE_ALLOCATION.to_owned()];
            if let Some(b) = &view.bitmap {
                contexts.push(transfer::bitmap_context(b));
            }
            let ctx: Vec<&str> = contexts.iter().map(String::as_str).collect();
            let connect_src = || src.nbd_connect(&view.address, &view.export, &ctx);
            let connect_dst = || dr.nbd_connect(&address, &id, &[BASE_ALLOCATION]);
            // The planning connections stay open until the workers are done: qemu-nbd
            // exits when its last client leaves.
            let mut plan_src = connect_src()?;
            let mut plan_dst = connect_dst()?;
            let err = |source| EngineError::Transfer { source };
            let plan = match method {
                Method::Full => Plan::full(&mut plan_src),
                Method::Cbt => Plan::cbt(&mut plan_src, view.bitmap.as_deref().unwrap_or_default()),
                Method::Digest => Plan::digest(&mut plan_src, &mut plan_dst),
            }
            .map_err(err)?;
            let src_end = Endpoint { address: view.address.clone(), export: view.export.clone(), contexts };
            let dst_end = Endpoint { address, export: id.clone(), contexts: vec![BASE_ALLOCATION.into()] };
            let stats = transfer::run(dr, &plan, (&src_end, &dst_end), &wire, progress, &vm.name, &on_chunk)?;
            plan_dst.flush().map_err(err)?;
            let _ = plan_dst.disconnect();
            let _ = plan_src.disconnect();
            // qemu-nbd exits once its clients are gone; wait for it so the layer is closed.
            dr.nbd_stop_all(&id)?;
            all_stats.push(stats);
            layers.push(RpDiskRecord {
                idx: d.idx as u32,
                layer,
                parent,
                size: d.size,
                method: *method,
                bitmap: None,
                bytes_transferred: stats.written,
            });
        }
        Ok((all_stats, layers))
    }
}

use crate::layout::target_prefix;

/// The copies of a VM's state beside its disks a new point keeps (files on the DR host).
struct Kept {
    nvram: Option<String>,
    tpm_state: Option<String>,
}
