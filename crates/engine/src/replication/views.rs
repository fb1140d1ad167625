//! What `replica list` and `replica points` show of replicas and their restore points.

use serde::Serialize;
use standby_model::PointId;
use standby_store::RestorePointRecord;

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
