//! Failover, planned failover and undo failover.
//!
//! Failover brings a replica to a restore point and powers it on as a VM of its own, on
//! the DR host, with the source's configuration. Its writes go to an overlay per disk
//! (`failover-d<i>.qcow2` in the replica directory) over the restore point's layer, so the
//! restore point never changes. Undo powers it off and deletes the overlays. Planned
//! failover adds, before that, a run with the source up, its shutdown, a final run and a
//! proof that the newest point equals the stopped source.
//!
//! Each step is recorded in the replica row before its side effect, so that recovery
//! (`standby_model::recovery`) knows what a killed standby left: a failover whose replica VM
//! was not running yet is rolled back, one whose VM runs is completed; an undo is always
//! completed; a planned failover is rolled back and its source started again if it ran.

use std::time::Duration;

use standby_host::{Chain, Format, Host, HostError};
use standby_model::recovery::Recovery;
use standby_model::step::{FailoverStep, PlannedStep, UndoStep};
use standby_model::{PointId, ReplicaId, ReplicaState, Role, Step, Transition};
use standby_store::{FailoverPoint, NewVm, ReplicaRecord, VmRecord};

use crate::batch::OpOutcome;
use crate::fence::DECLARED_BY_FLAG;
use crate::layout::{self, overlay_path};
use crate::lock::VmLock;
use crate::replica_dir;
use crate::replica_vm::{overlay_chain, replica_vm_name};
use crate::replication::RunWithin;
use crate::{failpoint, verify, vm, Engine, EngineError, Result};

/// How long a failover waits for a connection to a source host declared lost before it
/// goes on without it: a round trip on any link replication runs over, with room.
const QUICK_LOOK: Duration = Duration::from_millis(500);

/// What a failover goes ahead despite, when the operator says so.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Despite {
    /// The source VM runs: two copies then run (e.g. for a test).
    pub source_running: bool,
    /// The source's host does not answer: the operator declared its site lost. The source
    /// is fenced when its host answers again.
    pub source_unreachable: bool,
}

/// Which restore point a failover goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointChoice {
    Latest,
    Id(PointId),
}

impl Engine {
    /// Deletes every failover overlay in the replica's directory (the replica's writes
    /// are gone), once the directory proved to be its own.
    pub(crate) fn remove_overlays(&self, dr: &dyn Host, replica: &ReplicaRecord) -> Result<()> {
        self.check_replica_dir(dr, replica)?;
        let dir = &replica.dir;
        for name in dr.list_dir(dir)? {
            if layout::is_overlay(&name) {
                dr.remove_file(&format!("{dir}/{name}"))?;
            }
        }
        Ok(())
    }

    pub fn failover(&self, vms: &[String], job: Option<&str>, point: PointChoice, despite: Despite) -> Vec<OpOutcome> {
        self.batch(vms, |vm, warnings| {
            let r = self.failover_one(vm, job, point, despite, warnings);
            self.record(vm, "failover", &r, String::clone);
            r
        })
    }

    /// Planned failover: sync while the source runs, shut it down, sync again, prove the
    /// replica equals the source, then fail over to that newest point. Zero data loss.
    pub fn failover_planned(&self, vms: &[String], job: Option<&str>, shutdown_timeout: Duration) -> Vec<OpOutcome> {
        self.batch(vms, |vm, warnings| {
            let r = self.planned_one(vm, job, shutdown_timeout, warnings);
            self.record(vm, "planned failover", &r, String::clone);
            r
        })
    }

    fn planned_one(
        &self,
        name: &str,
        job: Option<&str>,
        timeout: Duration,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "planned failover")?;
        let replica = self.replica_of(name, job)?;
        replica.state.apply(Transition::PlannedStarted)?;
        let source = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let retain = self.store().job(&replica.job)?.map(|j| j.retain).unwrap_or(standby_model::DEFAULT_RETAIN);
        let was_running = self.vm_is_running(&source)?;
        // Recorded first: a planned failover interrupted anywhere starts the source again
        // if it was running.
        self.store().transition(
            replica.id,
            replica.state,
            Transition::PlannedStarted,
            Some(Step::Planned { source_ran: was_running, at: PlannedStep::Sync }),
            FailoverPoint::Set(None),
        )?;
        let result = self.planned_steps(&replica, &source, retain, was_running, timeout, warnings);
        if result.is_err() {
            match self.roll_back_planned(replica.id, was_running) {
                Ok(true) => warnings.push(format!("source VM {name} was started again, as it ran before")),
                Ok(false) => {}
                Err(e) => warnings.push(format!(
                    "source VM {name} ran before and could not be started again: {}; start it (standby vm start \
                     {name})",
                    crate::chain(&e)
                )),
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn planned_steps(
        &self,
        replica: &ReplicaRecord,
        source: &VmRecord,
        retain: u32,
        was_running: bool,
        timeout: Duration,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let mut notes = Vec::new();
        let within = RunWithin::PlannedFailover;
        if was_running {
            self.replicate_locked(replica, retain, &crate::NoProgress, &mut notes, within)?;
            failpoint::hit("planned.after-first-sync");
            if !self.shutdown_locked(source, timeout)? {
                warnings.push(format!(
                    "source VM {} did not shut down within {} s and was powered off",
                    source.name,
                    timeout.as_secs()
                ));
            }
            failpoint::hit("planned.after-shutdown");
        }
        let rp = self.replicate_locked(replica, retain, &crate::NoProgress, &mut notes, within)?;
        failpoint::hit("planned.after-final-sync");
        // Zero loss, proven: the stopped source and the newest restore point read the same.
        let points = self.store().restore_points(replica.id, false)?;
        let point = points
            .iter()
            .find(|p| p.id == rp.id)
            .ok_or_else(|| EngineError::Damaged { vm: source.name.clone(), what: "restore point vanished".into() })?;
        let (src, dr) = (self.host(&source.host)?, self.host(&replica.target_host)?);
        for (disk, layer) in source.disks.iter().zip(&point.disks) {
            let differing = verify::differing_bytes(
                &layout::verify_id(replica.id, layer.idx),
                verify::Side { host: src.as_ref(), chain: Chain::single(&disk.path, disk.format) },
                verify::Side { host: dr.as_ref(), chain: replica_dir::chain_of(&points, &layer.layer)? },
            )?;
            if differing != 0 {
                return Err(EngineError::Mismatch { vm: source.name.clone(), what: format!(
                    "disk {} of restore point {} differs from the stopped source in {differing} bytes; not failing over",
                    layer.idx, rp.id
                ) });
            }
        }
        let done = self.failover_locked(
            &replica.vm,
            Some(&replica.job),
            PointChoice::Id(rp.id),
            Despite::default(),
            warnings,
            Some(was_running),
        )?;
        Ok(format!("source shut down, restore point {} verified equal to it; {done}", rp.id))
    }

    /// Puts things back as they were before a planned failover that did not complete: its
    /// failover, if it began, is rolled back; the source runs again if it ran. The state
    /// says which part began, and stays until the source runs. Whether the source was
    /// started.
    fn roll_back_planned(&self, replica_id: ReplicaId, source_ran: bool) -> Result<bool> {
        let replica =
            self.store().replica(replica_id)?.ok_or_else(|| EngineError::Invalid("replica vanished".into()))?;
        match replica.state {
            ReplicaState::PreparingFailover => {
                let started = self.restart_source(&replica, source_ran)?;
                self.store().transition(
                    replica.id,
                    replica.state,
                    Transition::PlannedRolledBack,
                    None,
                    FailoverPoint::Set(None),
                )?;
                Ok(started)
            }
            ReplicaState::FailingOver => {
                let dr = self.host(&replica.target_host)?;
                self.roll_back_failover(&replica, dr.as_ref(), &replica_vm_name(&replica), Some(source_ran))
            }
            _ => Ok(false),
        }
    }

    /// Starts the source of a planned failover again if it ran before; whether it did now.
    fn restart_source(&self, replica: &ReplicaRecord, source_ran: bool) -> Result<bool> {
        let source = self.store().vm(&replica.vm)?.ok_or_else(|| EngineError::UnknownVm(replica.vm.clone()))?;
        // A comparison's servers a kill left hold the source's disks open: they go first.
        for host in [self.host(&source.host)?, self.host(&replica.target_host)?] {
            host.nbd_stop_all(&layout::verify_prefix(replica.id))?;
        }
        if source_ran && !self.vm_is_running(&source)? {
            self.launch(&source)?;
            return Ok(true);
        }
        Ok(false)
    }

    pub fn failover_undo(&self, vms: &[String], job: Option<&str>) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| {
            let r = self.undo_one(vm, job);
            self.record(vm, "undo failover", &r, String::clone);
            r
        })
    }

    fn failover_one(
        &self,
        name: &str,
        job: Option<&str>,
        point: PointChoice,
        despite: Despite,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "failover")?;
        self.failover_locked(name, job, point, despite, warnings, None)
    }

    /// Failover for a caller that holds the VM's lock. A planned failover passes whether
    /// its source ran: every step recorded carries it, so that recovery of a kill in the
    /// middle still knows.
    fn failover_locked(
        &self,
        name: &str,
        job: Option<&str>,
        point: PointChoice,
        despite: Despite,
        warnings: &mut Vec<String>,
        planned: Option<bool>,
    ) -> Result<String> {
        let replica = self.replica_of(name, job)?;
        // Re-read under the lock: another command may have changed it meanwhile.
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        replica.state.apply(Transition::FailoverStarted)?;
        if planned.is_none() && replica.state == ReplicaState::PreparingFailover {
            return Err(EngineError::Refused {
                vm: name.into(),
                why: format!("VM {name} is in an interrupted planned failover; run standby recover first"),
            });
        }
        self.check_replica_dir(self.host(&replica.target_host)?.as_ref(), &replica)?;
        let points = self.store().restore_points(replica.id, false)?;
        let rp = match point {
            PointChoice::Latest => points.last(),
            PointChoice::Id(id) => points.iter().find(|p| p.id == id),
        }
        .ok_or_else(|| match point {
            PointChoice::Latest => EngineError::NoRestorePoint { vm: name.into() },
            PointChoice::Id(id) => EngineError::UnknownPoint {
                vm: name.into(),
                point: id,
                known: points.iter().map(|p| p.id.to_string()).collect::<Vec<_>>().join(", "),
            },
        })?
        .clone();
        let source = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        // None: the source's host does not answer, and it is declared lost (by whom:
        // `declared_by`).
        let mut declared_by = None;
        // A host the operator declared lost gets a short first look instead of a whole
        // connect timeout: a failover out of a lost site starts as fast as one out of a
        // live site. A host slower than this to accept a connection is treated as lost, as
        // declared, and fenced when it answers. A host declared lost by its silence alone
        // gets the whole timeout: nobody vouched that it is gone.
        let address = self.store().host(&source.host)?.and_then(|h| h.address);
        let first_look = match address.filter(|_| despite.source_unreachable) {
            Some(address) => standby_agent::knocks(&address, QUICK_LOOK).map_err(|e| {
                EngineError::Host(HostError::Unreachable {
                    host: source.host.clone(),
                    detail: format!("nothing accepts a connection at {address} within {QUICK_LOOK:?}: {e}"),
                })
            }),
            None => Ok(()),
        };
        let source_running = match first_look.and_then(|()| self.vm_is_running(&source)) {
            Ok(running) => {
                self.store().host_answered(&source.host)?;
                Some(running)
            }
            Err(EngineError::Host(HostError::Unreachable { host, detail })) => {
                let (since, by_timeout) = self.host_silence(&host)?;
                let by = match (despite.source_unreachable, by_timeout) {
                    (true, _) => DECLARED_BY_FLAG.to_owned(),
                    (false, Some(by)) => by,
                    (false, None) => {
                        let lost_after = self.store().host(&host)?.and_then(|h| h.lost_after_secs);
                        let wait = match lost_after {
                            Some(secs) => format!(
                                "; the controller declares it lost by itself after {} of silence (silent since {})",
                                humantime::format_duration(std::time::Duration::from_secs(secs)),
                                since.as_deref().unwrap_or("now")
                            ),
                            None => String::new(),
                        };
                        return Err(EngineError::Refused {
                            vm: name.into(),
                            why: format!(
                                "host {host} is unreachable ({detail}), so standby cannot tell whether source VM \
                                 {name} still runs; if its site is lost, run the failover again with \
                                 --source-unreachable: the source is then fenced (paused, powered off, its disks \
                                 kept) as soon as {host} answers again{wait}"
                            ),
                        });
                    }
                };
                declared_by = Some(by);
                None
            }
            Err(e) => return Err(e),
        };
        if source_running == Some(true) {
            if !despite.source_running {
                return Err(EngineError::TwoWriters {
                    vm: replica_vm_name(&replica),
                    other: name.into(),
                    host: source.host.clone(),
                });
            }
            warnings.push(format!(
                "source VM {name} is still running on {}: two copies of it now run (--force)",
                source.host
            ));
        }
        let vm_name = replica_vm_name(&replica);
        if self.store().vm(&vm_name)?.is_some() {
            return Err(EngineError::Refused {
                vm: name.into(),
                why: format!(
                    "a VM named {vm_name} already exists; rename it, or set another replica suffix on job {}",
                    replica.job
                ),
            });
        }
        let dr = self.host(&replica.target_host)?;
        // Before any step: a failover that is rolled back removes the fence with it.
        match source_running {
            None => {
                let by = declared_by.as_deref().unwrap_or(DECLARED_BY_FLAG);
                self.store().open_fence(replica.id, name, &source.host, &source.disks, by)?
            }
            // An earlier fence, carried out long ago, no longer describes this failover.
            Some(_) => {
                let done = self.store().fence(replica.id)?.is_some_and(|f| !f.is_open());
                if done {
                    self.store().delete_fence(replica.id)?;
                }
            }
        }

        // FailingOver, step "overlays": from here a crash is rolled back.
        let step = |at| Step::Failover { planned, at };
        self.store().transition(
            replica.id,
            replica.state,
            Transition::FailoverStarted,
            Some(step(FailoverStep::Overlays)),
            FailoverPoint::Set(Some(rp.id)),
        )?;
        let result = self.bring_up(&replica, &source, &rp, dr.as_ref(), &vm_name, &step);
        if let Err(e) = result {
            // A planned failover's caller rolls the whole of it back, source included.
            if planned.is_none() {
                let replica = self.store().replica(replica.id)?.unwrap_or(replica);
                let _ = self.roll_back_failover(&replica, dr.as_ref(), &vm_name, None);
            }
            return Err(e);
        }
        failpoint::hit("failover.after-start");
        self.store().transition(
            replica.id,
            ReplicaState::FailingOver,
            Transition::FailoverDone,
            None,
            FailoverPoint::Keep,
        )?;
        // A source its host starts at boot would run beside the replica after a reboot.
        let mut autostart = String::new();
        if source_running.is_some() {
            match self.host(&source.host).and_then(|h| Ok(h.vm_autostart(name, Some(false))?)) {
                Ok(Some(true)) => {
                    self.store().set_source_autostart_off(replica.id, true)?;
                    autostart = format!(
                        "; autostart of {name} on {} switched off (restored when it is the VM of record again)",
                        source.host
                    );
                }
                Ok(_) => {}
                Err(e) => warnings.push(format!(
                    "the autostart of {name} on {} could not be switched off ({}); switch it off by hand \
                     (virsh autostart {name} --disable), or a reboot of {} starts it beside its replica",
                    source.host,
                    crate::chain(&e),
                    source.host
                )),
            }
        }
        // The history keeps who declared the source's host lost, with the failover.
        let lost = declared_by.map_or_else(String::new, |by| {
            format!(
                "; host {} is unreachable and declared lost by {by}: VM {name} is fenced when {} answers again",
                source.host, source.host
            )
        });
        Ok(format!(
            "replica {vm_name} runs on {} from restore point {} ({}){lost}{autostart}",
            replica.target_host, rp.id, rp.created_at
        ))
    }

    /// Overlays, the replica VM's definition, and its start.
    fn bring_up(
        &self,
        replica: &ReplicaRecord,
        source: &VmRecord,
        rp: &standby_store::RestorePointRecord,
        dr: &dyn Host,
        vm_name: &str,
        step: &dyn Fn(FailoverStep) -> Step,
    ) -> Result<()> {
        let mut overlays = Vec::new();
        for d in &rp.disks {
            let overlay = overlay_path(&replica.dir, d.idx as usize, 0);
            dr.image_create(&overlay, d.size, Some((&d.layer, Format::Qcow2)))?;
            overlays.push(standby_store::DiskRecord { path: overlay, format: Format::Qcow2 });
        }
        failpoint::hit("failover.after-overlays");
        self.store().set_step(replica.id, step(FailoverStep::Define))?;
        // The replica's NICs go where the job maps them on the DR host.
        let mut config = source.config.clone();
        config.driver.network_map = self.store().job(&replica.job)?.map(|j| j.network_map).unwrap_or_default();
        if let Some(f) = &source.config.driver.firmware {
            let vars = layout::replica_vars_path(&replica.dir);
            config.driver.firmware = Some(crate::firmware::for_replica(dr, f, rp.nvram.as_deref(), &vars)?);
        }
        if let Some(t) = &source.config.driver.tpm {
            config.driver.tpm = Some(crate::tpm::for_replica(t, &replica.dir));
        }
        self.store().insert_vm(&NewVm {
            name: vm_name.into(),
            host: replica.target_host.clone(),
            config,
            disks: overlays,
            role: Role::Replica,
            replica_id: Some(replica.id),
        })?;
        let vm = self.store().vm(vm_name)?.ok_or_else(|| EngineError::UnknownVm(vm_name.into()))?;
        // Once the VM is recorded, so that a rollback forgets what waits for its start.
        if vm.config.driver.tpm.is_some() {
            crate::tpm::from_point(dr, &self.launch_of(&vm)?, rp.tpm_state.as_deref())?;
        }
        failpoint::hit("failover.after-define");
        self.store().set_step(replica.id, step(FailoverStep::Start))?;
        self.launch(&vm)?;
        Ok(())
    }

    /// Undoes whatever part of a failover happened: the replica VM, its definition, the
    /// overlays. The restore points were never written. A planned failover's source then
    /// runs again if it ran (the step says so until it does). Whether the source started.
    fn roll_back_failover(
        &self,
        replica: &ReplicaRecord,
        dr: &dyn Host,
        vm_name: &str,
        planned: Option<bool>,
    ) -> Result<bool> {
        let vm = self.store().vm(vm_name)?;
        if let Some(vm) = vm {
            if self.vm_is_running(&vm)? {
                vm::power_off(dr, vm_name)?;
            }
            dr.vm_forget(vm_name)?;
            self.store().delete_vm(vm_name)?;
        }
        self.remove_overlays(dr, replica)?;
        self.store().delete_fence(replica.id)?;
        let mut started = false;
        if let Some(ran) = planned {
            self.store().set_step(replica.id, Step::Failover { planned, at: FailoverStep::RestartSource })?;
            started = self.restart_source(replica, ran)?;
        }
        self.store().transition(
            replica.id,
            ReplicaState::FailingOver,
            Transition::FailoverRolledBack,
            None,
            FailoverPoint::Set(None),
        )?;
        Ok(started)
    }

    fn undo_one(&self, name: &str, job: Option<&str>) -> Result<String> {
        let replica = self.replica_of(name, job)?;
        let _lock = VmLock::acquire(&self.data_dir, name, "undo failover")?;
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        self.store().transition(
            replica.id,
            replica.state,
            Transition::UndoStarted,
            Some(Step::Undo(UndoStep::Stop)),
            FailoverPoint::Keep,
        )?;
        let fence = self.store().fence(replica.id)?.filter(|f| f.is_open());
        self.finish_undo(&replica)?;
        let mut note =
            format!("replica {} powered off, its writes discarded; replication resumes", replica_vm_name(&replica));
        if let Some(f) = fence {
            note.push_str(&format!(
                "; source VM {name} on {} is the VM of record again and is not fenced when {} answers",
                f.host, f.host
            ));
        }
        Ok(note)
    }

    /// Powers the replica VM off and discards its overlays. Idempotent, so recovery can
    /// run it again after a crash at any step.
    fn finish_undo(&self, replica: &ReplicaRecord) -> Result<()> {
        let dr = self.host(&replica.target_host)?;
        let vm = self.store().replica_vm(replica.id)?;
        if let Some(vm) = vm {
            if self.vm_is_running(&vm)? {
                vm::power_off(dr.as_ref(), &vm.name)?;
            }
            failpoint::hit("undo.after-stop");
            self.store().set_step(replica.id, Step::Undo(UndoStep::Discard))?;
            dr.vm_forget(&vm.name)?;
            self.store().delete_vm(&vm.name)?;
        }
        self.remove_overlays(dr.as_ref(), replica)?;
        // The source is the VM of record again: whatever it wrote meanwhile is the truth.
        self.store().delete_fence(replica.id)?;
        self.restore_source_autostart(replica);
        failpoint::hit("undo.after-discard");
        self.store().transition(
            replica.id,
            ReplicaState::UndoingFailover,
            Transition::UndoDone,
            None,
            FailoverPoint::Set(None),
        )?;
        Ok(())
    }

    /// Switches the source's autostart back on if a failover switched it off, recording
    /// either outcome; a host that does not answer keeps it for the next time.
    pub(crate) fn restore_source_autostart(&self, replica: &ReplicaRecord) {
        let result = (|| -> Result<Option<String>> {
            if !self.store().source_autostart_off(replica.id)? {
                return Ok(None);
            }
            let vm = self.store().vm(&replica.vm)?.ok_or_else(|| EngineError::UnknownVm(replica.vm.clone()))?;
            self.host(&vm.host)?.vm_autostart(&vm.name, Some(true))?;
            self.store().set_source_autostart_off(replica.id, false)?;
            Ok(Some(format!("autostart of {} on {} switched back on", vm.name, vm.host)))
        })();
        match result {
            Ok(Some(what)) => self.record_raw(&replica.vm, "autostart", "ok", &what),
            Ok(None) => {}
            Err(e) => self.record_raw(
                &replica.vm,
                "autostart",
                "warning",
                &format!(
                    "autostart of {} not switched back on: {}; `virsh autostart {}` does it",
                    replica.vm,
                    crate::chain(&e),
                    replica.vm
                ),
            ),
        }
    }

    /// Recovery of a failover or undo a killed standby left, as the recovery table
    /// decided; returns what it did.
    pub(crate) fn recover_failover(&self, replica: &ReplicaRecord, action: Recovery) -> Result<String> {
        let dr = self.host(&replica.target_host)?;
        let vm_name = replica_vm_name(replica);
        match action {
            Recovery::CompleteFailover => {
                self.store().transition(
                    replica.id,
                    replica.state,
                    Transition::FailoverDone,
                    None,
                    FailoverPoint::Keep,
                )?;
                self.record_raw(
                    &replica.vm,
                    "failover",
                    "completed",
                    "recovered after an interruption: the replica runs",
                );
                Ok(format!("VM {}: completed an interrupted failover ({vm_name} runs)", replica.vm))
            }
            Recovery::RollBackFailover { restart_source } => {
                let planned = match replica.step {
                    Some(Step::Failover { planned, .. }) => planned,
                    _ => None,
                };
                let started = self.roll_back_failover(replica, dr.as_ref(), &vm_name, planned)?;
                match planned {
                    Some(ran) => Ok(self.planned_note(replica, ran || restart_source, started)),
                    None => {
                        self.record_raw(&replica.vm, "failover", "rolled back", "recovered after an interruption");
                        Ok(format!("VM {}: rolled back an interrupted failover", replica.vm))
                    }
                }
            }
            Recovery::FinishUndo => {
                self.finish_undo(replica)?;
                self.record_raw(&replica.vm, "undo failover", "completed", "recovered after an interruption");
                Ok(format!("VM {}: completed an interrupted undo failover", replica.vm))
            }
            other => Err(EngineError::Bug(format!("{other:?} is no failover recovery"))),
        }
    }

    /// Rolls back a planned failover a kill interrupted before its failover, restarting
    /// the source if it ran before.
    pub(crate) fn recover_planned(&self, replica: &ReplicaRecord, restart_source: bool) -> Result<String> {
        let started = self.roll_back_planned(replica.id, restart_source)?;
        Ok(self.planned_note(replica, restart_source, started))
    }

    fn planned_note(&self, replica: &ReplicaRecord, ran: bool, started: bool) -> String {
        let what = match (started, ran) {
            (true, _) => format!("source {} started again, as it ran before", replica.vm),
            (false, true) => format!("source {} still runs", replica.vm),
            (false, false) => format!("source {} stays stopped, as it was", replica.vm),
        };
        self.record_raw(
            &replica.vm,
            "planned failover",
            "rolled back",
            &format!("recovered after an interruption: {what}"),
        );
        format!("VM {}: rolled back an interrupted planned failover; {what}", replica.vm)
    }

    /// The disks a VM starts with: its own images, or for a replica VM its overlays over
    /// the restore point's chain, described layer by layer.
    pub(crate) fn launch_disks(&self, vm: &VmRecord) -> Result<Vec<standby_host::DiskSource>> {
        let Some(replica_id) = vm.replica_id else {
            return vm
                .disks
                .iter()
                .map(|d| Ok(standby_host::DiskSource::Image { path: d.path.clone(), format: d.format }))
                .collect();
        };
        let replica =
            self.store().replica(replica_id)?.ok_or_else(|| EngineError::NoReplica { vm: vm.name.clone() })?;
        let points = self.store().restore_points(replica_id, true)?;
        let rp = points.iter().find(|p| Some(p.id) == replica.failover_point).ok_or_else(|| EngineError::Damaged {
            vm: vm.name.clone(),
            what: format!("replica VM {} has no restore point to run from", vm.name),
        })?;
        let mut disks = Vec::new();
        for (d, overlay) in rp.disks.iter().zip(&vm.disks) {
            let chain =
                overlay_chain(replica_dir::chain_of(&points, &d.layer)?, &replica.dir, d.idx as usize, &overlay.path);
            disks.push(standby_host::DiskSource::Chain(chain));
        }
        Ok(disks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_generations() {
        let c = overlay_chain(Chain::single("/r/1-d0.qcow2", Format::Qcow2), "/r", 0, "/r/failover-d0.g2.qcow2");
        let paths: Vec<_> = c.layers.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/r/failover-d0.g2.qcow2", "/r/failover-d0.g1.qcow2", "/r/failover-d0.qcow2", "/r/1-d0.qcow2"]
        );
    }
}
