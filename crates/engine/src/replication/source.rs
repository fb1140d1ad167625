//! The rotation of a replica's dirty bitmaps on the source's disks, which never loses a
//! change when a run fails or is killed. (The disks' point-in-time views and the bitmap
//! primitives are the driver's: `standby_host::DiskAccess`.)
//!
//! Bitmaps are named `standby-r<replica>-<seq>`: the bitmap of run `seq` starts at that
//! run's instant. The previous restore point records the bitmap it started (`L`). At the
//! next instant, one transaction disables `L` and adds the new one (`N`); `L` then holds
//! exactly the changes since the previous restore point. Whatever happens afterwards,
//! merging every newer `standby-r<replica>-*` bitmap into `L` restores the rule "`L`
//! covers everything since the last restore point", which is what [`reconcile`] does.

use standby_host::{BitmapState, DiskAccess, SourceDisk};
use standby_model::tracking::{bitmap_trust, Distrust, SeenBitmap};
use standby_model::ReplicaId;

use crate::layout::bitmap_seq;
use crate::Result;

/// Restores the rule that `current` (the bitmap the last restore point started) holds
/// every change since that restore point, after any interrupted run. Returns whether
/// `current` can be trusted, or why not; when it cannot, every bitmap of this replica is
/// removed and the disk must be compared by digest.
pub fn reconcile(
    access: &mut dyn DiskAccess,
    disk: &SourceDisk,
    replica_id: ReplicaId,
    current: Option<&str>,
) -> Result<std::result::Result<(), Distrust>> {
    let ours: Vec<BitmapState> =
        access.bitmaps(disk)?.into_iter().filter(|b| bitmap_seq(replica_id, &b.name).is_some()).collect();
    let current_seq = current.and_then(|c| bitmap_seq(replica_id, c));
    let cur = current.and_then(|c| ours.iter().find(|b| b.name == c));
    let seen: Vec<SeenBitmap> = ours
        .iter()
        .filter_map(|b| {
            let seq = bitmap_seq(replica_id, &b.name)?;
            Some(SeenBitmap { seq, inconsistent: b.inconsistent, recording: b.recording })
        })
        .collect();
    // An interrupted run may have left `current` disabled: it is enabled again below.
    let trust = bitmap_trust(current_seq, &seen, false);
    let trusted = trust.is_ok();
    for b in &ours {
        if Some(b.name.as_str()) == current {
            continue;
        }
        let newer = bitmap_seq(replica_id, &b.name) > current_seq;
        if trusted && newer {
            access.merge_bitmap(disk, current.unwrap_or_default(), &b.name)?;
        }
        access.remove_bitmap(disk, &b.name)?;
    }
    match (trusted, cur) {
        // A `current` disabled by an interrupted run must track again.
        (true, Some(c)) if !c.recording => access.enable_bitmap(disk, &c.name)?,
        (true, _) => {}
        (false, Some(c)) => access.remove_bitmap(disk, &c.name)?,
        (false, None) => {}
    }
    Ok(trust)
}

/// After the restore point is durable: the previous bitmap has served its purpose.
pub fn retire(access: &mut dyn DiskAccess, disk: &SourceDisk, previous: &str) -> Result<()> {
    Ok(access.remove_bitmap(disk, previous)?)
}
