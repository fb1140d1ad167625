//! What `replica list` and `replica points` show of replicas and their restore points,
//! and the reads behind them (which recover nothing).

use serde::Serialize;
use standby_model::PointId;
use standby_store::{ReplicaRecord, RestorePointRecord};

use crate::lock::VmLock;
use crate::{Engine, EngineError, Result};

#[derive(Debug, Clone, Serialize)]
pub struct RpDiskView {
    pub index: u32,
    /// Opens this restore point's content with `qemu-img` (its header names the chain).
    pub path: String,
    pub size: u64,
    pub method: String,
    pub bytes_transferred: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestorePointView {
    pub id: PointId,
    pub vm: String,
    pub job: String,
    pub created_at: String,
    pub method: String,
    pub bytes_transferred: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
    /// `application` (the guest's filesystems were frozen at its instant), `crash`, or
    /// `offline` (the VM was not running).
    pub consistency: String,
    /// A UEFI VM's variable store as it was at the point's instant (a copy of its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uefi_vars: Option<String>,
    /// The VM's TPM state as it was at the point's instant (a copy of its own); absent
    /// without a TPM, or while its TPM had none yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm_state: Option<String>,
    pub disks: Vec<RpDiskView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaView {
    pub vm: String,
    pub job: String,
    pub target_host: String,
    pub dir: String,
    pub state: String,
    pub restore_points: usize,
    pub latest: Option<String>,
    /// In failover: the restore point the replica VM runs from, and that VM's name.
    pub failover_point: Option<PointId>,
    pub replica_vm: Option<String>,
    /// The newest history entry of the VM: `operation result at`.
    pub last_operation: Option<String>,
    /// Set when an interrupted operation could not be recovered: what to do.
    pub needs_attention: Option<String>,
    /// A failover made while the source's host was unreachable: whether its source is
    /// fenced yet, or where its disks were kept.
    pub fence: Option<String>,
}

pub(super) fn point_view(rp: RestorePointRecord, vm: &str, job: &str) -> RestorePointView {
    RestorePointView {
        id: rp.id,
        vm: vm.into(),
        job: job.into(),
        created_at: rp.created_at,
        method: rp.method.as_str().into(),
        bytes_transferred: rp.bytes_transferred,
        bytes_read: rp.bytes_read,
        duration_ms: rp.duration_ms,
        consistency: rp.consistency.as_str().into(),
        uefi_vars: rp.nvram,
        tpm_state: rp.tpm_state,
        disks: rp
            .disks
            .into_iter()
            .map(|d| RpDiskView {
                index: d.idx,
                path: d.layer,
                size: d.size,
                method: d.method.as_str().into(),
                bytes_transferred: d.bytes_transferred,
            })
            .collect(),
    }
}

impl Engine {
    /// Replicas with their state. Reads only: an interrupted operation is reported (in
    /// `needs_attention`), not recovered; a replica whose row cannot be read is listed as
    /// needing attention, naming the row, and the others are listed as usual.
    pub fn replica_list(&self) -> Result<Vec<ReplicaView>> {
        let rows = self.store().replica_rows()?;
        let mut views = Vec::new();
        for (id, row) in rows {
            let view = row.map_err(EngineError::from).and_then(|r| self.replica_view(r));
            let names = self.store().replica_names(id).ok().flatten();
            views.push(view.unwrap_or_else(|e| ReplicaView {
                vm: names.as_ref().map_or_else(|| format!("(replicas row {id})"), |n| n.0.clone()),
                job: names.as_ref().map_or_else(|| "?".into(), |n| n.1.clone()),
                target_host: "?".into(),
                dir: "?".into(),
                state: "unreadable".into(),
                restore_points: 0,
                latest: None,
                failover_point: None,
                replica_vm: None,
                last_operation: None,
                fence: None,
                needs_attention: Some(format!(
                    "replicas row {id} cannot be read ({}); standby leaves this replica alone until the row is \
                     repaired or restored from a backup of the database",
                    crate::chain(&e)
                )),
            }));
        }
        views.sort_by(|a, b| (&a.vm, &a.job).cmp(&(&b.vm, &b.job)));
        Ok(views)
    }

    fn replica_view(&self, r: ReplicaRecord) -> Result<ReplicaView> {
        let points = self.store().restore_points(r.id, false)?;
        let replica_vm = self.store().replica_vm(r.id)?.map(|v| v.name);
        let last_operation =
            self.store().last_history(&r.vm)?.map(|h| format!("{} {} at {}", h.operation, h.result, h.at));
        let needs_attention = self.pending_recovery(&r).map(|what| {
            format!("{what} waits for recovery: run standby recover (standby history {} shows what happened)", r.vm)
        });
        let fence = self.store().fence(r.id)?.as_ref().and_then(crate::fence::protective_note);
        Ok(ReplicaView {
            fence,
            needs_attention,
            vm: r.vm,
            job: r.job,
            target_host: r.target_host,
            dir: r.dir,
            state: r.state.as_str().into(),
            restore_points: points.len(),
            latest: points.last().map(|p| p.created_at.clone()),
            failover_point: r.failover_point,
            replica_vm,
            last_operation,
        })
    }

    /// What an interrupted operation left for recovery on this replica, if anything. One
    /// still running (it holds the VM's lock) is not interrupted.
    fn pending_recovery(&self, r: &ReplicaRecord) -> Option<String> {
        let state = r.state;
        if state.is_idle() && r.step.is_none() {
            return None;
        }
        VmLock::acquire(&self.data_dir, &r.vm, "status").ok()?;
        Some(match &r.step {
            Some(step) => format!("an interrupted {state} (at step {step})"),
            None => format!("an interrupted {state}"),
        })
    }

    /// What recovery would do, without doing it: for commands that only read.
    pub fn recovery_needed(&self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        // Bound first: the store's guard must not live through the loop, which asks again.
        let rows = self.store().replica_rows()?;
        for (id, row) in rows {
            let r = match row {
                Ok(r) => r,
                Err(e) => {
                    notes.push(format!(
                        "{} cannot be read ({}); it needs attention",
                        self.row_name(id),
                        crate::chain(&e)
                    ));
                    continue;
                }
            };
            if let Some(what) = self.pending_recovery(&r) {
                notes.push(format!("VM {} (job {}): {what} waits for recovery; run standby recover", r.vm, r.job));
            }
        }
        Ok(notes)
    }

    pub(crate) fn replica_of(&self, vm: &str, job: Option<&str>) -> Result<ReplicaRecord> {
        if self.store().vm(vm)?.is_none() {
            return Err(EngineError::UnknownVm(vm.into()));
        }
        let mut all = self.store().replicas_of_vm(vm)?;
        if let Some(j) = job {
            all.retain(|r| r.job == j);
        }
        match all.len() {
            0 => Err(EngineError::NoReplica { vm: vm.into() }),
            1 => Ok(all.remove(0)),
            _ => Err(EngineError::BadArgument {
                arg: "--job",
                why: format!(
                    "VM {vm} has replicas from jobs {}; name one with --job",
                    all.iter().map(|r| r.job.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// Restore points of a VM's replica, oldest first.
    pub fn replica_points(&self, vm: &str, job: Option<&str>) -> Result<Vec<RestorePointView>> {
        let r = self.replica_of(vm, job)?;
        let points = self.store().restore_points(r.id, false)?;
        Ok(points.into_iter().map(|p| point_view(p, &r.vm, &r.job)).collect())
    }
}
