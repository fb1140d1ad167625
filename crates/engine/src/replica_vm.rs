//! The replica VM of a replica in failover: its name and the chain each of its disks
//! reads (the restore point's layers, then every overlay generation).

use standby_host::Chain;
use standby_store::ReplicaRecord;

use crate::layout::{overlay_gen, overlay_path};

/// A replica disk's whole chain: the restore point's layers, then every overlay
/// generation up to `top`.
pub(crate) fn overlay_chain(point: Chain, dir: &str, idx: usize, top: &str) -> Chain {
    (0..=overlay_gen(top)).fold(point, |chain, g| chain.with_top(&overlay_path(dir, idx, g)))
}

/// The replica VM's name: the source's plus the job's suffix.
pub(crate) fn replica_vm_name(replica: &ReplicaRecord) -> String {
    format!("{}{}", replica.vm, replica.replica_suffix)
}
