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

mod sync;

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use standby_host::{BitmapOp, Chain, Format};
use standby_model::{FailbackTarget, ReplicaState, SwitchMode, Transition};
use standby_store::{DiskRecord, NewRestorePoint, NewVm, ReplicaRecord, RestorePointRecord, RpDiskRecord, VmRecord};

use crate::failover::{overlay_chain, overlay_gen, overlay_path, remove_overlays, replica_vm_name, OpOutcome};
use crate::lock::VmLock;
use crate::replication::{dr, source};
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
    seq: Option<i64>,
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

fn working_path(disk: &str, replica_id: i64) -> String {
    format!("{disk}.failback-r{replica_id}.qcow2")
}

fn nbd_prefix(replica_id: i64) -> String {
    format!("fb-r{replica_id}-")
}

fn as_new_vm(vm: &VmRecord) -> NewVm {
    NewVm {
        name: vm.name.clone(),
        host: vm.host.clone(),
        cpus: vm.cpus,
        memory_mib: vm.memory_mib,
        disks: vm.disks.clone(),
        nics: vm.nics.clone(),
        kernel: vm.kernel.clone(),
        initrd: vm.initrd.clone(),
        append: vm.append.clone(),
        role: vm.role.clone(),
        replica_id: vm.replica_id,
    }
}

fn format_of(d: &DiskRecord) -> Format {
    Format::parse(&d.format).unwrap_or(Format::Raw)
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
    fn chain(&self, dir: &str, idx: usize, top: &str) -> Chain {
        overlay_chain(dr::chain_of(&self.points, &self.point.disks[idx].layer), dir, idx, top)
    }

    fn newer_points(&self) -> impl Iterator<Item = &RestorePointRecord> {
        self.points.iter().filter(|p| p.seq > self.point.seq)
    }
}

impl Engine {
    fn failback_record(&self, replica_id: i64) -> Result<Option<FailbackRecord>> {
        let raw = self.store().failback(replica_id)?;
        raw.map(|r| {
            serde_json::from_str(&r).map_err(|e| {
                EngineError::Invalid(format!("failback record of replica {replica_id} is unreadable: {e}"))
            })
        })
        .transpose()
    }

    fn save_failback(&self, replica_id: i64, rec: &FailbackRecord) -> Result<()> {
        let raw = serde_json::to_string(rec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        self.store().put_failback(replica_id, &raw)?;
        Ok(())
    }

    fn replica_disks(&self, replica: &ReplicaRecord) -> Result<ReplicaDisks> {
        let points = self.store().restore_points(replica.id, false)?;
        let point = points
            .iter()
            .find(|p| Some(p.id) == replica.failover_point)
            .ok_or_else(|| EngineError::Invalid(format!("VM {}'s replica has no failover restore point", replica.vm)))?
            .clone();
        let vm = self.store().replica_vm(replica.id)?.ok_or_else(|| {
            EngineError::Invalid(format!("VM {} is in failover but its replica VM is not defined", replica.vm))
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
                state: replica.state,
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

    // ---------------------------------------------------------------- phase 1

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

    fn failback_one(
        &self,
        name: &str,
        job: Option<&str>,
        opts: &FailbackOptions,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "failback")?;
        let replica = self.replica_of(name, job)?;
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        let state: ReplicaState = replica.state.parse().map_err(EngineError::Invalid)?;
        let next = state.apply(Transition::FailbackStarted)?;
        let rd = self.replica_disks(&replica)?;
        let source = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let (rec, target_vm) = self.plan_target(&replica, &rd, &source, opts)?;

        // Nothing has changed so far; from here every step is recorded first.
        self.store().set_replica_op(replica.id, next.as_str(), Some("start"), replica.failover_point)?;
        self.save_failback(replica.id, &rec)?;
        let result = self.phase1(&replica, rec, target_vm.as_ref(), progress, warnings);
        let rec = match result {
            Ok(rec) => rec,
            Err(e) => {
                if let Err(r) = self.roll_back_phase1(&replica) {
                    warnings.push(format!("rolling back failed too: {}", vm::chain(&r)));
                }
                return Err(e);
            }
        };
        let ready = ReplicaState::FailingBack.apply(Transition::FailbackSynced)?;
        self.store().set_replica_op(replica.id, ready.as_str(), None, replica.failover_point)?;
        let done = format!(
            "phase 1 done to {} by {} ({}): read {}, wrote {}; ready to switch",
            rec.target,
            rec.method,
            rec.method_note,
            human(rec.phase1.read),
            human(rec.phase1.written + rec.phase1.zeroed)
        );
        match opts.switch {
            SwitchMode::Auto => {
                let replica =
                    self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
                let switched = self.switch_locked(&replica, progress, warnings);
                self.record(name, "failback switch", &switched, String::clone);
                match switched {
                    Ok(s) => Ok(format!("{done}; {s}")),
                    Err(e) => Err(EngineError::Invalid(format!("{done}; the switch failed: {}", vm::chain(&e)))),
                }
            }
            SwitchMode::Manual => Ok(format!("{done}; switch with: standby failback switch {name}")),
            SwitchMode::At(_) => Ok(format!("{done}; the switch runs {} under standby daemon", opts.switch)),
        }
    }

    /// Checks the target and describes the failback; changes nothing.
    fn plan_target(
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
                let t = self.store().vm(vm)?.ok_or_else(|| {
                    EngineError::Invalid(format!(
                        "unknown VM {vm:?}: register the recovered VM first (standby vm create {vm} --disk PATH ...)"
                    ))
                })?;
                let protected = !self.store().replicas_of_vm(vm)?.is_empty();
                if t.name == *name || t.replica_id.is_some() || protected {
                    return Err(EngineError::Invalid(format!(
                        "VM {vm} cannot take {name}'s place: it is {}",
                        if t.name == *name {
                            "the same VM (use --to original)"
                        } else if t.replica_id.is_some() {
                            "a replica VM"
                        } else {
                            "protected by a job of its own"
                        }
                    )));
                }
                (t.host.clone(), t.disks.clone(), Some(t), false)
            }
            FailbackTarget::New { host, dir } => {
                let h = self.host(host)?;
                h.ensure_dir(dir).map_err(|e| EngineError::TargetDir {
                    host: host.clone(),
                    dir: dir.clone(),
                    reason: vm::chain(&e),
                })?;
                let disks: Vec<DiskRecord> = (0..sizes.len())
                    .map(|i| DiskRecord { path: format!("{dir}/{name}-d{i}.qcow2"), format: "qcow2".into() })
                    .collect();
                for d in &disks {
                    if h.file_exists(&d.path)? {
                        return Err(EngineError::Invalid(format!(
                            "{} already exists on {host}; choose another directory or remove it",
                            d.path
                        )));
                    }
                }
                (host.clone(), disks, None, true)
            }
        };
        if created || target_vm.as_ref().is_some_and(|t| t.name != *name) {
            // The name moves to the target at the switch; a QEMU still running the old
            // source under that name would be a second writer nobody could address.
            if self.vm_is_running(source)? {
                return Err(EngineError::Invalid(format!(
                    "the old source VM {name} runs on {}; shut it down first (standby vm shutdown {name}): the \
                     failback gives its name to {}",
                    source.host, opts.target
                )));
            }
        }
        if disks.len() != sizes.len() {
            return Err(EngineError::Invalid(format!(
                "{} has {} disk(s) and the replica {}; they must match",
                opts.target,
                disks.len(),
                sizes.len()
            )));
        }
        let h = self.host(&host)?;
        if !created {
            for (i, (d, size)) in disks.iter().zip(&sizes).enumerate() {
                let info = h.image_info(&d.path, true)?;
                if info.virtual_size != *size {
                    return Err(EngineError::Invalid(format!(
                        "disk {i} of {} ({}) is {} bytes and the replica's is {size}; they must be the same size",
                        opts.target, d.path, info.virtual_size
                    )));
                }
                if let Some(b) = info.backing_filename {
                    return Err(EngineError::Invalid(format!(
                        "disk {i} of {} ({}) has a backing file ({b}); flatten it first (qemu-img rebase -b '' ...)",
                        opts.target, d.path
                    )));
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

    fn phase1(
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
        self.store().set_replica_step(replica.id, "target-off")?;
        if let Some(t) = target_vm {
            if self.vm_is_running(t)? {
                progress.step(name, &format!("powering off {}", t.name));
                vm::power_off(tgt.as_ref(), &t.name)?;
                warnings.push(format!("{} was running on {} and was powered off", t.name, t.host));
            }
        }
        failpoint::hit("failback.after-target-off");

        self.store().set_replica_step(replica.id, "working")?;
        let rd = self.replica_disks(replica)?;
        for (i, (d, w)) in rec.disks.iter().zip(&rec.working).enumerate() {
            let size = rd.point.disks[i].size;
            if rec.created_disks {
                tgt.image_create(&d.path, size, None)?;
            }
            tgt.image_create(w, size, Some((&d.path, format_of(d))))?;
        }
        failpoint::hit("failback.after-working");

        self.store().set_replica_step(replica.id, "protect")?;
        progress.step(name, "protective point on the replica");
        let frozen = self.protect(replica, &rd)?;
        failpoint::hit("failback.after-protect");

        self.store().set_replica_step(replica.id, "transfer")?;
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
                End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &frozen[i]) },
                End { host: tgt.as_ref(), chain: self.working_chain(&rec, i) },
                diff,
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
    fn working_chain(&self, rec: &FailbackRecord, i: usize) -> Chain {
        let d = &rec.disks[i];
        Chain::single(&d.path, format_of(d)).with_top(&rec.working[i])
    }

    /// The protective point: freezes the replica's top overlays (a QMP snapshot of every
    /// disk in one transaction if it runs) and moves its writes to new ones. Returns the
    /// frozen tops.
    fn protect(&self, replica: &ReplicaRecord, rd: &ReplicaDisks) -> Result<Vec<String>> {
        let dr_host = self.host(&replica.target_host)?;
        let frozen: Vec<String> = rd.vm.disks.iter().map(|d| d.path.clone()).collect();
        let next: Vec<String> =
            frozen.iter().enumerate().map(|(i, top)| overlay_path(&replica.dir, i, overlay_gen(top) + 1)).collect();
        for n in &next {
            dr_host.remove_file(n)?;
        }
        if self.vm_is_running(&rd.vm)? {
            let mut qmp = dr_host.vm_qmp(&rd.vm.name)?;
            let nodes = top_nodes(qmp.as_mut(), frozen.len())?;
            let actions: Vec<_> = nodes
                .iter()
                .zip(&next)
                .enumerate()
                .map(|(i, (node, file))| {
                    json!({"type": "blockdev-snapshot-sync", "data": {
                        "node-name": node, "snapshot-file": file,
                        "snapshot-node-name": format!("{}-g{}", standby_host::disk_node(i), overlay_gen(file)),
                        "format": "qcow2", "mode": "absolute-paths"}})
                })
                .collect();
            qmp.execute("transaction", json!({ "actions": actions }))?;
        } else {
            for (i, (top, n)) in frozen.iter().zip(&next).enumerate() {
                dr_host.image_create(n, rd.point.disks[i].size, Some((top, Format::Qcow2)))?;
            }
        }
        for (i, n) in next.iter().enumerate() {
            self.store().set_vm_disk(&rd.vm.name, i, &DiskRecord { path: n.clone(), format: "qcow2".into() })?;
        }
        Ok(frozen)
    }

    /// After a crash around the protective point: the database follows what the replica
    /// really writes to (QEMU's answer while it runs; otherwise a newer overlay, which
    /// reads the same as the one below it until written, is adopted). Unused newer
    /// overlays are removed.
    fn settle_replica_top(&self, replica: &ReplicaRecord) -> Result<()> {
        let Some(rvm) = self.store().replica_vm(replica.id)? else { return Ok(()) };
        let dr_host = self.host(&replica.target_host)?;
        let running = self.vm_is_running(&rvm)?;
        let files =
            if running { Some(top_files(dr_host.vm_status_qmp(&rvm.name)?.as_mut(), rvm.disks.len())?) } else { None };
        for (i, d) in rvm.disks.iter().enumerate() {
            let next = overlay_path(&replica.dir, i, overlay_gen(&d.path) + 1);
            let adopt = match &files {
                Some(f) => f[i] == next,
                None => dr_host.file_exists(&next)?,
            };
            if adopt {
                self.store().set_vm_disk(&rvm.name, i, &DiskRecord { path: next, format: "qcow2".into() })?;
            } else {
                dr_host.remove_file(&next)?;
            }
        }
        Ok(())
    }

    /// What to copy for each disk, and how it was found.
    fn difference(
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
    fn quick_ranges(
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
            if format_of(d) != Format::Qcow2 {
                return Ok(Err(format!("disk {i} is raw and has no dirty bitmap")));
            }
            let Some(current) = newest.disks.get(i).and_then(|x| x.bitmap.clone()) else {
                return Ok(Err(format!("restore point {} recorded no bitmap for disk {i}", newest.id)));
            };
            let Some(cur_seq) = source::bitmap_seq(replica.id, &current) else {
                return Ok(Err(format!("disk {i}: bitmap {current} is not standby's")));
            };
            let ours: Vec<_> = tgt
                .image_info(&d.path, false)?
                .bitmaps
                .into_iter()
                .filter(|b| source::bitmap_seq(replica.id, &b.name).is_some_and(|s| s >= cur_seq))
                .collect();
            if !ours.iter().any(|b| b.name == current) {
                return Ok(Err(format!("disk {i}: bitmap {current} is gone")));
            }
            if ours.iter().any(|b| b.in_use) {
                return Ok(Err(format!("disk {i}: a dirty bitmap was not saved cleanly (the VM crashed)")));
            }
            if !ours.iter().any(|b| b.enabled) {
                return Ok(Err(format!("disk {i}: no dirty bitmap is recording")));
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
    fn roll_back_phase1(&self, replica: &ReplicaRecord) -> Result<()> {
        self.host(&replica.target_host)?.nbd_stop_all(&nbd_prefix(replica.id))?;
        self.settle_replica_top(replica)?;
        if let Some(rec) = self.failback_record(replica.id)? {
            let tgt = self.host(&rec.host)?;
            tgt.nbd_stop_all(&nbd_prefix(replica.id))?;
            self.discard_working(&rec)?;
        }
        self.store().delete_failback(replica.id)?;
        let back = ReplicaState::FailingBack.apply(Transition::FailbackRolledBack)?;
        self.store().set_replica_op(replica.id, back.as_str(), None, replica.failover_point)?;
        Ok(())
    }

    /// Deletes the working layers, and the disks a `new:` failback created.
    fn discard_working(&self, rec: &FailbackRecord) -> Result<()> {
        let tgt = self.host(&rec.host)?;
        for w in &rec.working {
            tgt.remove_file(w)?;
        }
        if rec.created_disks {
            for d in &rec.disks {
                tgt.remove_file(&d.path)?;
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- phase 2

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
            if replica.state == ReplicaState::ReadyToSwitch.as_str() && rec.switch_at.is_some_and(|t| t <= now_secs()) {
                due.push((replica.vm, replica.job));
            }
        }
        Ok(due.into_iter().flat_map(|(vm, job)| self.failback_switch(&[vm], Some(&job), progress)).collect())
    }

    fn switch_one(
        &self,
        name: &str,
        job: Option<&str>,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "failback switch")?;
        let replica = self.replica_of(name, job)?;
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        self.switch_locked(&replica, progress, warnings)
    }

    fn switch_locked(
        &self,
        replica: &ReplicaRecord,
        progress: &dyn Progress,
        warnings: &mut Vec<String>,
    ) -> Result<String> {
        let state: ReplicaState = replica.state.parse().map_err(EngineError::Invalid)?;
        let next = state.apply(Transition::SwitchStarted)?;
        let mut rec = self.failback_record(replica.id)?.ok_or_else(|| missing_record(&replica.vm))?;
        let rd = self.replica_disks(replica)?;
        if rec.seq.is_none() {
            rec.seq = Some(self.store().take_seq(replica.id)?);
            self.save_failback(replica.id, &rec)?;
        }
        self.store().set_replica_op(replica.id, next.as_str(), Some("shutdown"), replica.failover_point)?;
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
                    self.store().set_replica_op(replica.id, state.as_str(), None, replica.failover_point)?;
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
                    && self.store().replica(replica.id)?.and_then(|r| r.op_step).as_deref() == Some("final-transfer");
                if untouched {
                    let _ = tgt.nbd_stop_all(&nbd_prefix(replica.id));
                    if was_running && !self.vm_is_running(&rd.vm)? {
                        self.launch(&rd.vm)?;
                    }
                    let back = ReplicaState::Switching.apply(Transition::SwitchRolledBack)?;
                    self.store().set_replica_op(replica.id, back.as_str(), None, replica.failover_point)?;
                    Err(EngineError::Invalid(format!("{}; the replica runs on, still ready to switch", vm::chain(&e))))
                } else {
                    Err(EngineError::Invalid(format!(
                        "{}; the target's disks were being updated: run any standby command to finish the switch",
                        vm::chain(&e)
                    )))
                }
            }
        }
    }

    /// Phase 2 once the replica is down: last changes, commit into the target's disks, its
    /// new bitmap, the identity, state Failback. Idempotent, so recovery runs it again.
    fn finish_switch(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let mut rec = self.failback_record(replica.id)?.ok_or_else(|| missing_record(name))?;
        let rd = self.replica_disks(replica)?;
        let tgt = self.host(&rec.host)?;
        let dr_host = self.host(&replica.target_host)?;
        if self.vm_is_running(&rd.vm)? {
            return Err(EngineError::Invalid(format!("replica {} still runs; it must be off to switch", rd.vm.name)));
        }
        let seq = rec.seq.ok_or_else(|| EngineError::Invalid("the switch reserved no sequence".into()))?;

        // The working layers exist until they are committed: their absence means the
        // copy and commit are done.
        if rec.working.iter().all(|w| tgt.file_exists(w).unwrap_or(false)) {
            self.store().set_replica_step(replica.id, "final-transfer")?;
            rec.phase2 = Moved::default();
            for (i, top) in rd.vm.disks.iter().enumerate() {
                progress.step(name, &format!("disk {i}: changes since phase 1"));
                let stats = sync::copy(
                    &format!("{}d{i}", nbd_prefix(replica.id)),
                    End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &top.path) },
                    End { host: tgt.as_ref(), chain: self.working_chain(&rec, i) },
                    &Difference::Ranges { known: Vec::new(), top_layers: 1 },
                    progress,
                    name,
                    &|| {},
                )?;
                rec.phase2.add(&stats);
            }
            self.save_failback(replica.id, &rec)?;
            failpoint::hit("switch.after-final-transfer");
        }
        self.store().set_replica_step(replica.id, "commit")?;
        for (i, (d, w)) in rec.disks.iter().zip(&rec.working).enumerate() {
            if !tgt.file_exists(w)? {
                continue;
            }
            progress.step(name, &format!("disk {i}: committing into {}", d.path));
            tgt.image_commit(&self.working_chain(&rec, i))?;
            tgt.sync_file(&d.path)?;
            tgt.remove_file(w)?;
            failpoint::hit("switch.mid-commit");
        }
        // From the switch on, the bitmap of the point commit will publish records every
        // write production makes. Added after the commit so the commit is not in it.
        self.store().set_replica_step(replica.id, "bitmap")?;
        let bitmap = source::bitmap_name(replica.id, seq);
        for d in &rec.disks {
            if format_of(d) == Format::Qcow2
                && !tgt.image_info(&d.path, false)?.bitmaps.iter().any(|b| b.name == bitmap)
            {
                tgt.image_bitmap(&d.path, Format::Qcow2, &bitmap, BitmapOp::Add)?;
            }
        }
        self.store().set_replica_step(replica.id, "identity")?;
        self.move_identity(replica, &mut rec)?;
        failpoint::hit("switch.after-identity");
        rec.switched_at = Some(standby_store::now());
        self.save_failback(replica.id, &rec)?;
        let done = ReplicaState::Switching.apply(Transition::SwitchDone)?;
        self.store().set_replica_op(replica.id, done.as_str(), None, replica.failover_point)?;

        let production = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
        let mut msg = format!(
            "switched: {} holds the replica's final state (since phase 1: read {}, wrote {}); state failback",
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

    /// For `existing:` and `new:`: the protected VM becomes the target VM (its host,
    /// configuration and disks); what it was is kept for undo. Idempotent.
    fn move_identity(&self, replica: &ReplicaRecord, rec: &mut FailbackRecord) -> Result<()> {
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
        let config = prior.existing.clone().unwrap_or_else(|| prior.protected.clone());
        let new = NewVm {
            name: name.into(),
            host: rec.host.clone(),
            disks: rec.disks.clone(),
            role: "source".into(),
            replica_id: None,
            ..config
        };
        if let Some(e) = &prior.existing {
            self.store().delete_vm(&e.name)?;
        }
        self.store().redefine_vm(&new)?;
        Ok(())
    }

    // ---------------------------------------------------------------- commit

    pub fn failback_commit(&self, vms: &[String], job: Option<&str>, progress: &dyn Progress) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| self.tracked("commit failback", vm, progress, |p| self.commit_one(vm, job, p)))
    }

    fn commit_one(&self, name: &str, job: Option<&str>, progress: &dyn Progress) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "commit failback")?;
        let replica = self.replica_of(name, job)?;
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        let state: ReplicaState = replica.state.parse().map_err(EngineError::Invalid)?;
        let next = state.apply(Transition::CommitStarted)?;
        let rd = self.replica_disks(&replica)?;
        if self.vm_is_running(&rd.vm)? {
            return Err(EngineError::Invalid(format!(
                "replica {} runs; shut it down first (standby vm shutdown {}) so that production is the only writer",
                rd.vm.name, rd.vm.name
            )));
        }
        self.store().set_replica_op(replica.id, next.as_str(), Some("point"), replica.failover_point)?;
        self.finish_commit(&replica, progress)
    }

    /// Keeps the replica's final state as a restore point over the newest one, then
    /// deletes the replica VM and its overlays; state Ready. Idempotent.
    fn finish_commit(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let dr_host = self.host(&replica.target_host)?;
        let Some(rec) = self.failback_record(replica.id)? else {
            // Only the final state change was left.
            let done = ReplicaState::CommittingFailback.apply(Transition::CommitDone)?;
            self.store().set_replica_op(replica.id, done.as_str(), None, None)?;
            return Ok("failback committed".into());
        };
        let seq = rec.seq.ok_or_else(|| EngineError::Invalid("the failback reserved no sequence".into()))?;
        let exists = self.store().restore_points(replica.id, false)?.iter().any(|p| p.seq == seq);
        let mut kept = None;
        if !exists {
            let rd = self.replica_disks(replica)?;
            kept = Some(self.keep_final_state(replica, &rec, &rd, seq, progress)?);
        }
        failpoint::hit("commit.after-point");
        self.store().set_replica_step(replica.id, "cleanup")?;
        let rvm = self.store().replica_vm(replica.id)?;
        if let Some(rvm) = rvm {
            self.store().delete_vm(&rvm.name)?;
        }
        remove_overlays(dr_host.as_ref(), &replica.dir)?;
        self.store().delete_failback(replica.id)?;
        let done = ReplicaState::CommittingFailback.apply(Transition::CommitDone)?;
        self.store().set_replica_op(replica.id, done.as_str(), None, None)?;
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
    fn keep_final_state(
        &self,
        replica: &ReplicaRecord,
        rec: &FailbackRecord,
        rd: &ReplicaDisks,
        seq: i64,
        progress: &dyn Progress,
    ) -> Result<(i64, Moved)> {
        let dr_host = self.host(&replica.target_host)?;
        let newest = rd.points.last().ok_or_else(|| EngineError::Invalid("the replica has no restore point".into()))?;
        let full_newer = rd.newer_points().any(|p| p.disks.iter().any(|d| d.parent.is_none()));
        let mut moved = Moved::default();
        let mut layers = Vec::new();
        let started = std::time::Instant::now();
        for (i, top) in rd.vm.disks.iter().enumerate() {
            let base = &newest.disks[i];
            let layer = dr::layer_path(&replica.dir, seq, i);
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
                End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &top.path) },
                End { host: dr_host.as_ref(), chain: dr::chain_of(&rd.points, &base.layer).with_top(&layer) },
                &diff,
                progress,
                &replica.vm,
                &|| {},
            )?;
            dr_host.sync_file(&layer)?;
            moved.add(&stats);
            let bitmap = (format_of(&rec.disks[i]) == Format::Qcow2).then(|| source::bitmap_name(replica.id, seq));
            layers.push(RpDiskRecord {
                idx: i as u32,
                layer,
                parent: Some(base.layer.clone()),
                size: base.size,
                method: if full_newer { "digest" } else { "cbt" }.into(),
                bitmap,
                bytes_transferred: stats.written,
            });
        }
        let id = self.store().insert_restore_point(&NewRestorePoint {
            replica_id: replica.id,
            seq,
            created_at: rec.switched_at.clone().unwrap_or_else(standby_store::now),
            method: if full_newer { "digest" } else { "cbt" }.into(),
            bytes_transferred: moved.written,
            bytes_read: moved.read,
            duration_ms: started.elapsed().as_millis() as u64,
            disks: layers,
        })?;
        Ok((id, moved))
    }

    // ---------------------------------------------------------------- undo

    pub fn failback_undo(&self, vms: &[String], job: Option<&str>, progress: &dyn Progress) -> Vec<OpOutcome> {
        self.batch(vms, |vm, _| self.tracked("undo failback", vm, progress, |p| self.undo_failback_one(vm, job, p)))
    }

    fn undo_failback_one(&self, name: &str, job: Option<&str>, progress: &dyn Progress) -> Result<String> {
        let _lock = VmLock::acquire(&self.data_dir, name, "undo failback")?;
        let replica = self.replica_of(name, job)?;
        let replica = self.store().replica(replica.id)?.ok_or_else(|| EngineError::NoReplica { vm: name.into() })?;
        let state: ReplicaState = replica.state.parse().map_err(EngineError::Invalid)?;
        let next = state.apply(Transition::UndoFailbackStarted)?;
        self.store().set_replica_op(replica.id, next.as_str(), Some("stop"), replica.failover_point)?;
        self.finish_undo_failback(&replica, progress)
    }

    /// Production off; its disks read as the replica's final state again (after a switch)
    /// or lose their working layers (before one); the identity goes back; the replica
    /// runs again as it was. Idempotent.
    fn finish_undo_failback(&self, replica: &ReplicaRecord, progress: &dyn Progress) -> Result<String> {
        let name = replica.vm.as_str();
        let Some(rec) = self.failback_record(replica.id)? else {
            let done = ReplicaState::UndoingFailback.apply(Transition::UndoFailbackDone)?;
            self.store().set_replica_op(replica.id, done.as_str(), None, replica.failover_point)?;
            return Ok("failback undone".into());
        };
        let tgt = self.host(&rec.host)?;
        let dr_host = self.host(&replica.target_host)?;
        tgt.nbd_stop_all(&nbd_prefix(replica.id))?;
        let mut restored = Moved::default();
        if rec.switched_at.is_some() {
            self.store().set_replica_step(replica.id, "stop")?;
            let production = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))?;
            if production.disks == rec.disks && self.vm_is_running(&production)? {
                progress.step(name, "powering off production");
                vm::power_off(tgt.as_ref(), name)?;
            }
            failpoint::hit("undo-failback.after-stop");
            self.store().set_replica_step(replica.id, "restore")?;
            if !rec.created_disks {
                let rd = self.replica_disks(replica)?;
                let bitmap = rec.seq.map(|s| source::bitmap_name(replica.id, s));
                for (i, d) in rec.disks.iter().enumerate() {
                    let trusted = match (&bitmap, format_of(d)) {
                        (Some(b), Format::Qcow2) => {
                            tgt.image_info(&d.path, false)?.bitmaps.iter().any(|x| x.name == *b && !x.in_use)
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
                        End { host: dr_host.as_ref(), chain: rd.chain(&replica.dir, i, &rd.vm.disks[i].path) },
                        End { host: tgt.as_ref(), chain: Chain::single(&d.path, format_of(d)) },
                        &diff,
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
            self.store().set_replica_step(replica.id, "identity")?;
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
        self.discard_working(&rec)?;
        self.store().set_replica_step(replica.id, "start-replica")?;
        let rvm = self.store().replica_vm(replica.id)?;
        let mut started = false;
        if let Some(rvm) = rvm {
            if !self.vm_is_running(&rvm)? {
                self.launch(&rvm)?;
                started = true;
            }
        }
        self.store().delete_failback(replica.id)?;
        let done = ReplicaState::UndoingFailback.apply(Transition::UndoFailbackDone)?;
        self.store().set_replica_op(replica.id, done.as_str(), None, replica.failover_point)?;
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

    // ---------------------------------------------------------------- recovery

    /// Recovery of a failback a killed standby left; returns what it did.
    pub(crate) fn recover_failback(&self, replica: &ReplicaRecord) -> Result<Option<String>> {
        let state: ReplicaState = replica.state.parse().map_err(EngineError::Invalid)?;
        let vm = replica.vm.as_str();
        let quiet = crate::NoProgress;
        let (op, outcome, note) = match state {
            ReplicaState::FailingBack => {
                self.roll_back_phase1(replica)?;
                ("failback", "rolled back", "phase 1 rolled back: the replica runs on, the target is as before")
            }
            ReplicaState::Switching => {
                let rvm = self.store().replica_vm(replica.id)?;
                let running = match rvm {
                    Some(v) => self.vm_is_running(&v)?,
                    None => false,
                };
                if running && replica.op_step.as_deref() == Some("shutdown") {
                    let back = state.apply(Transition::SwitchRolledBack)?;
                    self.store().set_replica_op(replica.id, back.as_str(), None, replica.failover_point)?;
                    ("failback switch", "rolled back", "switch rolled back: the replica runs on, ready to switch")
                } else {
                    self.finish_switch(replica, &quiet)?;
                    ("failback switch", "completed", "switch completed: production holds the replica's final state")
                }
            }
            ReplicaState::CommittingFailback => {
                self.finish_commit(replica, &quiet)?;
                ("commit failback", "completed", "commit failback completed")
            }
            ReplicaState::UndoingFailback => {
                self.finish_undo_failback(replica, &quiet)?;
                ("undo failback", "completed", "undo failback completed: the replica runs again")
            }
            _ => return Ok(None),
        };
        self.record_raw(vm, op, outcome, "recovered after an interruption");
        Ok(Some(format!("VM {vm}: {note}")))
    }

    /// Why `vm` must not start now: a failback not yet switched is writing to its disks,
    /// or it is a replica whose final state production took over.
    pub(crate) fn failback_holds(&self, vm: &VmRecord) -> Result<Option<String>> {
        let rows = self.store().failbacks()?;
        for (replica_id, _) in rows {
            let replica = self.store().replica(replica_id)?;
            let (Some(replica), Some(rec)) = (replica, self.failback_record(replica_id)?) else { continue };
            let state = replica.state.parse::<ReplicaState>();
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
    EngineError::Invalid(format!("VM {vm}'s failback record is missing"))
}

/// The node and file at the top of each of a running VM's disks, from `query-block`.
fn block_tops(qmp: &mut dyn standby_host::QmpChannel, disks: usize) -> Result<Vec<(String, String)>> {
    let blocks = qmp.execute("query-block", json!({}))?;
    (0..disks)
        .map(|i| {
            let qdev = format!("/vd{i}/");
            blocks
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(&qdev))))
                .and_then(|b| {
                    Some((b["inserted"]["node-name"].as_str()?.to_owned(), b["inserted"]["file"].as_str()?.to_owned()))
                })
                .ok_or_else(|| EngineError::Invalid(format!("QEMU does not report disk {i}")))
        })
        .collect()
}

pub(crate) fn top_nodes(qmp: &mut dyn standby_host::QmpChannel, disks: usize) -> Result<Vec<String>> {
    Ok(block_tops(qmp, disks)?.into_iter().map(|(n, _)| n).collect())
}

fn top_files(qmp: &mut dyn standby_host::QmpChannel, disks: usize) -> Result<Vec<String>> {
    Ok(block_tops(qmp, disks)?.into_iter().map(|(_, f)| f).collect())
}

fn human(bytes: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}
