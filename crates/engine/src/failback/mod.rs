//! Failback: the replica's state goes back to production, in two phases, and is then
//! committed or undone.
//!
//! Phase 1 (`failback`), while the replica runs on: the target VM is powered off; a
//! working layer is stacked over each of its disks (nothing written to the disks
//! themselves yet); a protective point is taken on the replica live (its top overlay is
//! frozen by a QMP snapshot and it writes to a new one from then on); what differs is
//! copied from the frozen chain into the working layers. State `ready_to_switch`.
//!
//! Phase 2 (`switch`): the replica's guest is shut down; what it wrote since phase 1 (its
//! newest overlay, known from metadata) goes into the working layers; the layers are
//! committed into the target's disks; a dirty bitmap started there (the next restore
//! point's); the protected VM's identity moves to the target if it is another VM. State
//! `failback`. The replica and all its overlays stay, powered off.
//!
//! Commit keeps the replica's final state as a new restore point over the newest one and
//! resumes replication, which then sends only what production wrote since the switch.
//! Undo powers production off, makes its disks read as the replica's final state again
//! (or discards the working layers before a switch) and starts the replica as it was.
//!
//! Each step is written to the replica row before its side effect. A killed phase 1 is
//! rolled back; a killed switch is rolled back while the replica still runs and completed
//! once it is down; commit and undo are always completed.

mod commit;
mod phase1;
mod switch;
mod sync;
mod undo;

use crate::transfer::human;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use standby_host::{BitmapOp, Chain, Format};
use standby_model::recovery::Recovery;
use standby_model::step::{CommitStep, FailbackStep, SwitchStep, UndoFailbackStep};
use standby_model::{
    FailbackTarget, Method, PointId, ReplicaId, ReplicaState, Role, Seq, Step, SwitchMode, Transition,
};
use standby_store::{
    DiskRecord, FailoverPoint, NewRestorePoint, NewVm, ReplicaRecord, RestorePointRecord, RpDiskRecord, VmRecord,
};

use crate::batch::OpOutcome;
use crate::layout::{overlay_gen, overlay_path};
use crate::lock::VmLock;
use crate::replica_dir;
use crate::replica_vm::{overlay_chain, replica_vm_name};
use crate::task::TaskProgress;
use crate::transfer::{self, Stats};
use crate::{failpoint, vm, Engine, EngineError, Progress, Result};
use sync::{Difference, End};

/// What `standby failback` was asked to do.
#[derive(Debug, Clone)]
pub struct FailbackOptions {
    pub target: FailbackTarget,
    pub switch: SwitchMode,
    pub power_on: bool,
    pub shutdown_timeout: Duration,
}

/// Bytes one phase moved.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Moved {
    pub read: u64,
    pub written: u64,
    pub zeroed: u64,
}

impl Moved {
    fn add(&mut self, s: &Stats) {
        self.read += s.read;
        self.written += s.written;
        self.zeroed += s.zeroed;
    }
}

/// A failback in progress, as the `failbacks` table keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FailbackRecord {
    target: FailbackTarget,
    /// The host of the target's disks.
    host: String,
    /// The target's disks, in the replica's disk order.
    disks: Vec<DiskRecord>,
    /// One working layer per disk, over it, until the switch commits them.
    working: Vec<String>,
    /// The disks were created by this failback (`new:`): undo deletes them.
    created_disks: bool,
    /// The target host held no VM definition of this name when phase 1 began (`existing:`,
    /// `new:`): one there afterwards is this failback's, and undo forgets it.
    #[serde(default)]
    defines_target: bool,
    /// How phase 1 found the difference: quick, digest or full.
    method: String,
    /// Why that method.
    method_note: String,
    switch: String,
    /// Scheduled switch, Unix seconds.
    switch_at: Option<u64>,
    power_on: bool,
    shutdown_secs: u64,
    /// The restore point sequence reserved at the switch: its bitmap starts there, and
    /// commit publishes the replica's final state under it.
    seq: Option<Seq>,
    /// Definitions the switch replaced when the identity moved (`existing:`, `new:`).
    prior: Option<Prior>,
    phase1: Moved,
    phase2: Moved,
    started_at: String,
    switched_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Prior {
    protected: NewVm,
    existing: Option<NewVm>,
}

/// A failback as `standby failback list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FailbackView {
    pub vm: String,
    pub job: String,
    pub state: String,
    pub target: String,
    pub method: String,
    pub method_note: String,
    pub switch: String,
    pub phase1: Moved,
    pub phase2: Moved,
    pub started_at: String,
    pub switched_at: Option<String>,
}

use crate::layout::{failback_prefix as nbd_prefix, working_path};

fn as_new_vm(vm: &VmRecord) -> NewVm {
    NewVm {
        name: vm.name.clone(),
        host: vm.host.clone(),
        config: vm.config.clone(),
        disks: vm.disks.clone(),
        role: vm.role,
        replica_id: vm.replica_id,
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where the replica runs from: its failover point and every point after it.
struct ReplicaDisks {
    points: Vec<RestorePointRecord>,
    point: RestorePointRecord,
    vm: VmRecord,
}

impl ReplicaDisks {
    /// Disk `idx` as the replica reads it, up to overlay `top`.
    fn chain(&self, dir: &str, idx: usize, top: &str) -> Result<Chain> {
        Ok(overlay_chain(replica_dir::chain_of(&self.points, &self.point.disks[idx].layer)?, dir, idx, top))
    }

    fn newer_points(&self) -> impl Iterator<Item = &RestorePointRecord> {
        self.points.iter().filter(|p| p.seq > self.point.seq)
    }
}

impl Engine {
    fn failback_record(&self, replica_id: ReplicaId) -> Result<Option<FailbackRecord>> {
        let raw = self.store().failback(replica_id)?;
        raw.map(|r| {
            serde_json::from_str(&r).map_err(|e| {
                EngineError::Invalid(format!("failback record of replica {replica_id} is unreadable: {e}"))
            })
        })
        .transpose()
    }

    fn save_failback(&self, replica_id: ReplicaId, rec: &FailbackRecord) -> Result<()> {
        let raw = serde_json::to_string(rec).map_err(|e| EngineError::Bug(e.to_string()))?;
        self.store().put_failback(replica_id, &raw)?;
        Ok(())
    }

    fn replica_disks(&self, replica: &ReplicaRecord) -> Result<ReplicaDisks> {
        let points = self.store().restore_points(replica.id, false)?;
        let point = points
            .iter()
            .find(|p| Some(p.id) == replica.failover_point)
            .ok_or_else(|| EngineError::Damaged {
                vm: replica.vm.clone(),
                what: format!("VM {}'s replica has no failover restore point", replica.vm),
            })?
            .clone();
        let vm = self.store().replica_vm(replica.id)?.ok_or_else(|| EngineError::Damaged {
            vm: replica.vm.clone(),
            what: format!("VM {} is in failover but its replica VM is not defined", replica.vm),
        })?;
        Ok(ReplicaDisks { points, point, vm })
    }

    /// Runs one VM's operation as a task another terminal can follow (`standby task
    /// show --follow`), and records it in the history.
    fn tracked(
        &self,
        operation: &str,
        vm: &str,
        progress: &dyn Progress,
        op: impl FnOnce(&dyn Progress) -> Result<String>,
    ) -> Result<String> {
        let task = TaskProgress::start(self, &operation.replace(' ', "-"), vm, progress);
        let r = match &task {
            Ok(t) => op(t),
            Err(_) => op(progress),
        };
        if let Ok(t) = &task {
            t.finish(&r);
        }
        self.record(vm, operation, &r, String::clone);
        r
    }

    /// Failbacks in progress.
    pub fn failback_list(&self) -> Result<Vec<FailbackView>> {
        let rows = self.store().failbacks()?;
        let mut out = Vec::new();
        for (replica_id, _) in rows {
            let replica = self.store().replica(replica_id)?;
            let (Some(replica), Some(rec)) = (replica, self.failback_record(replica_id)?) else { continue };
            out.push(FailbackView {
                vm: replica.vm,
                job: replica.job,
                state: replica.state.as_str().into(),
                target: rec.target.to_string(),
                method: rec.method,
                method_note: rec.method_note,
                switch: rec.switch,
                phase1: rec.phase1,
                phase2: rec.phase2,
                started_at: rec.started_at,
                switched_at: rec.switched_at,
            });
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- recovery

    /// Recovery of a failback a killed standby left; returns what it did.
    /// Recovery of a failback a killed standby left, as the recovery table decided.
    pub(crate) fn recover_failback(&self, replica: &ReplicaRecord, action: Recovery) -> Result<String> {
        let vm = replica.vm.as_str();
        let quiet = crate::NoProgress;
        let (op, outcome, note) = match action {
            Recovery::RollBackFailback => {
                self.roll_back_phase1(replica)?;
                ("failback", "rolled back", "phase 1 rolled back: the replica runs on, the target is as before")
            }
            Recovery::RollBackSwitch => {
                self.store().transition(
                    replica.id,
                    replica.state,
                    Transition::SwitchRolledBack,
                    None,
                    FailoverPoint::Keep,
                )?;
                ("failback switch", "rolled back", "switch rolled back: the replica runs on, ready to switch")
            }
            Recovery::FinishSwitch => {
                self.finish_switch(replica, &quiet)?;
                ("failback switch", "completed", "switch completed: production holds the replica's final state")
            }
            Recovery::FinishCommit => {
                self.finish_commit(replica, &quiet)?;
                ("commit failback", "completed", "commit failback completed")
            }
            Recovery::FinishUndoFailback => {
                self.finish_undo_failback(replica, &quiet)?;
                ("undo failback", "completed", "undo failback completed: the replica runs again")
            }
            other => return Err(EngineError::Bug(format!("{other:?} is no failback recovery"))),
        };
        self.record_raw(vm, op, outcome, "recovered after an interruption");
        Ok(format!("VM {vm}: {note}"))
    }

    /// Why `vm` must not start now: a failback not yet switched is writing to its disks,
    /// or it is a replica whose final state production took over.
    /// The protected VM whose failback in progress (any phase) goes to `vm` as an
    /// `existing:` target: undo would need `vm`'s definition back.
    pub(crate) fn failback_targeting(&self, vm: &str) -> Result<Option<String>> {
        let rows = self.store().failbacks()?;
        for (replica_id, _) in rows {
            let replica = self.store().replica(replica_id)?;
            let (Some(replica), Some(rec)) = (replica, self.failback_record(replica_id)?) else { continue };
            if matches!(&rec.target, FailbackTarget::Existing { vm: t } if t == vm) {
                return Ok(Some(replica.vm));
            }
        }
        Ok(None)
    }

    pub(crate) fn failback_holds(&self, vm: &VmRecord) -> Result<Option<String>> {
        let rows = self.store().failbacks()?;
        for (replica_id, _) in rows {
            let replica = self.store().replica(replica_id)?;
            let (Some(replica), Some(rec)) = (replica, self.failback_record(replica_id)?) else { continue };
            let state: std::result::Result<ReplicaState, ()> = Ok(replica.state);
            // After the switch the replica's final state is production's: one more write
            // on the replica and commit would keep a state production never had.
            let switched = matches!(
                state,
                Ok(ReplicaState::Switching | ReplicaState::Failback | ReplicaState::CommittingFailback)
            );
            if switched && vm.replica_id == Some(replica_id) {
                return Ok(Some(format!(
                    "VM {} is a replica whose state was switched to production ({}); to run it again, undo the \
                     failback (standby failback undo {})",
                    vm.name, replica.state, replica.vm
                )));
            }
            let unswitched =
                matches!(state, Ok(ReplicaState::FailingBack | ReplicaState::ReadyToSwitch | ReplicaState::Switching));
            let target_is_vm = match &rec.target {
                FailbackTarget::Original => replica.vm == vm.name,
                FailbackTarget::Existing { vm: t } => *t == vm.name,
                FailbackTarget::New { .. } => false,
            };
            if unswitched && target_is_vm {
                return Ok(Some(format!(
                    "VM {} is the target of {}'s failback ({}): its disks are being brought to the replica's state; \
                     switch (standby failback switch {}) or undo it (standby failback undo {}) first",
                    vm.name, replica.vm, replica.state, replica.vm, replica.vm
                )));
            }
        }
        Ok(None)
    }
}

fn missing_record(vm: &str) -> EngineError {
    EngineError::Damaged { vm: vm.into(), what: format!("VM {vm}'s failback record is missing") }
}
