//! Plain rows, as the database holds them.

use serde::{Deserialize, Serialize};
use standby_model::image::Format;
use standby_model::wire::Wire;
use standby_model::{Consistency, Method, PointId, Quiesce, ReplicaId, ReplicaState, Role, Seq, Step, VmConfig};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub path: String,
    pub format: Format,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewVm {
    pub name: String,
    pub host: String,
    /// Flattened: failback records written before it was one type read the same.
    #[serde(flatten)]
    pub config: VmConfig,
    pub disks: Vec<DiskRecord>,
    pub role: Role,
    pub replica_id: Option<ReplicaId>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmRecord {
    pub id: i64,
    pub name: String,
    pub host: String,
    pub config: VmConfig,
    pub disks: Vec<DiskRecord>,
    pub created_at: String,
    pub role: Role,
    /// For a replica VM: the replica it runs.
    pub replica_id: Option<ReplicaId>,
}

/// A host standby knows: `local`, or one reached through an agent at `address`.
#[derive(Debug, Clone)]
pub struct HostRecord {
    pub name: String,
    /// `local`, `agent` or `libvirt`.
    pub kind: String,
    pub address: Option<String>,
    pub version: Option<String>,
    pub last_seen: Option<String>,
    /// Silence after which the controller declares the host lost by itself; None: never.
    pub lost_after_secs: Option<u64>,
    /// The first failed contact since the host last answered.
    pub silent_since: Option<String>,
    /// A libvirt host's daemon, as `virsh -c` names it (`qemu:///system`).
    pub libvirt_uri: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub name: String,
    pub target_host: String,
    pub target_dir: String,
    pub retain: u32,
    pub every_secs: Option<u64>,
    pub replica_suffix: String,
    pub wire: Wire,
    /// Each source network (or bridge) of its VMs' NICs to the one replicas are put on.
    pub network_map: std::collections::BTreeMap<String, String>,
    /// How a running guest is frozen around each run's instant.
    pub quiesce: Quiesce,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRecord {
    pub id: i64,
    pub name: String,
    pub target_host: String,
    pub target_dir: String,
    pub retain: u32,
    pub every_secs: Option<u64>,
    pub replica_suffix: String,
    /// How its data travels between hosts.
    pub wire: Wire,
    pub network_map: std::collections::BTreeMap<String, String>,
    pub quiesce: Quiesce,
    pub last_run_at: Option<String>,
    pub created_at: String,
    pub vms: Vec<String>,
    /// A disabled job does not run: the daemon skips it and `job run` refuses it.
    pub enabled: bool,
}

#[derive(Debug, Clone)]
pub struct ReplicaRecord {
    pub id: ReplicaId,
    pub job_id: i64,
    pub job: String,
    pub vm_id: i64,
    pub vm: String,
    pub state: ReplicaState,
    pub dir: String,
    pub next_seq: Seq,
    pub target_host: String,
    pub replica_suffix: String,
    pub failover_point: Option<PointId>,
    /// The step an operation in progress reached; None when none is in progress.
    pub step: Option<Step>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RpDiskRecord {
    pub idx: u32,
    /// This restore point's own layer for the disk.
    pub layer: String,
    /// The layer below it; None for a base layer.
    pub parent: Option<String>,
    pub size: u64,
    pub method: Method,
    /// The source-side dirty bitmap started at this restore point's instant.
    pub bitmap: Option<String>,
    pub bytes_transferred: u64,
}

#[derive(Debug, Clone)]
pub struct NewRestorePoint {
    pub replica_id: ReplicaId,
    pub seq: Seq,
    pub created_at: String,
    pub method: Method,
    pub bytes_transferred: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
    pub consistency: Consistency,
    /// The copy of a UEFI VM's variable store taken at the point's instant.
    pub nvram: Option<String>,
    /// The copy of the VM's TPM state taken at the instant; None without a TPM, or while
    /// its TPM had no state yet.
    pub tpm_state: Option<String>,
    pub disks: Vec<RpDiskRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestorePointRecord {
    pub id: PointId,
    pub replica_id: ReplicaId,
    pub seq: Seq,
    pub created_at: String,
    pub method: Method,
    pub bytes_transferred: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
    pub consistency: Consistency,
    pub nvram: Option<String>,
    pub tpm_state: Option<String>,
    pub pruning: bool,
    pub disks: Vec<RpDiskRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TaskRecord {
    pub id: i64,
    pub kind: String,
    pub subject: String,
    pub status: String,
    pub step: String,
    pub pid: u32,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// The task's transfers between hosts sent `wire_data_bytes` of blocks as
    /// `wire_bytes` on the wire (compressed).
    pub wire_data_bytes: u64,
    pub wire_bytes: u64,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryRecord {
    pub id: i64,
    pub at: String,
    pub vm: String,
    pub operation: String,
    pub command: String,
    /// `ok`, `failed`, `rolled back`, `completed` (by recovery) or `warning`.
    pub result: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanVm {
    pub vm: String,
    /// Seconds to wait after this VM started before starting the next.
    pub delay_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanRecord {
    pub name: String,
    pub vms: Vec<PlanVm>,
    pub pre_command: Option<String>,
    pub post_command: Option<String>,
    /// `stop` or `continue` when a VM fails over unsuccessfully (or a command fails).
    pub on_failure: String,
    /// Seconds a pre- or post-command may run before it is killed.
    pub hook_timeout_secs: u64,
    pub created_at: String,
}
