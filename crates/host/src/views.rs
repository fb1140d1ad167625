//! What a replication run asks of a VM's disks, in DR words and whatever the driver: the
//! bitmaps that track their changes, and a frozen point-in-time view of every disk at one
//! instant, published as block streams with the changes since a named bitmap. How a
//! driver makes them (QEMU: fleecing nodes and NBD exports through QMP, or `qemu-nbd` on
//! the closed images) and what it names them is its own business; the names the engine
//! chooses are the bitmaps' (`layout.rs`) and the run's `owner` id, from which a driver
//! derives its own names so that a killed run's leftovers are found again.

use std::fmt::Debug;

use standby_model::ReplicaId;

use crate::{Format, NbdAddress, Result};

/// One disk of the source VM as this run sees it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SourceDisk {
    pub idx: usize,
    pub path: String,
    pub format: Format,
    pub size: u64,
}

/// What standby can see of one bitmap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitmapState {
    pub name: String,
    /// The driver did not save it cleanly (the VM crashed): it may miss writes.
    pub inconsistent: bool,
    /// Still recording changes (not disabled by a run that was interrupted).
    pub recording: bool,
}

/// One disk's view, ready to read: where, under what export name, with which bitmap.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct View {
    pub address: NbdAddress,
    pub export: String,
    pub bitmap: Option<String>,
}

/// One run's hold on a VM's disks, live (the VM runs) or offline (its images are closed);
/// see [`crate::Host::vm_disks`].
pub trait DiskAccess: Debug + Send {
    /// The bitmaps of one disk (none on a raw disk).
    fn bitmaps(&mut self, disk: &SourceDisk) -> Result<Vec<BitmapState>>;
    fn remove_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()>;
    /// Adds `source`'s changes to `target`.
    fn merge_bitmap(&mut self, disk: &SourceDisk, target: &str, source: &str) -> Result<()>;
    /// Makes a bitmap record changes again.
    fn enable_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()>;
    /// Takes the instant for every disk at once: adds `new_bitmap` (qcow2 disks), stops
    /// `previous[i]` recording where `trusted[i]`, and publishes each disk's view with that
    /// bitmap exported. Until [`DiskAccess::close_views`], the views read the disks as they
    /// were at the instant, however the VM writes.
    fn open_views(
        &mut self,
        owner: ReplicaId,
        disks: &[SourceDisk],
        previous: &[Option<String>],
        trusted: &[bool],
        new_bitmap: &str,
    ) -> Result<Vec<View>>;
    /// Removes everything `open_views` may have made for `owner`, whether or not it exists:
    /// safe after a failure, after a kill, and twice. When this access opened the views,
    /// an error also says they may not have held the instant (a live view whose copy job
    /// failed reads what the VM wrote since): what was read from them is not a restore
    /// point.
    fn close_views(&mut self, owner: ReplicaId, disk_count: usize) -> Result<()>;
}
