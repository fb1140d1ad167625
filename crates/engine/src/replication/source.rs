//! The source side of a run: a frozen point-in-time view of every disk of one VM, taken at
//! one instant, published over NBD with the previous run's dirty bitmap; and the rotation
//! of those bitmaps, which never loses a change when a run fails or is killed.
//!
//! Bitmaps are named `standby-r<replica>-<seq>`: the bitmap of run `seq` starts at that
//! run's instant. The previous restore point records the bitmap it started (`L`). At the
//! next instant, one transaction disables `L` and adds the new one (`N`); `L` then holds
//! exactly the changes since the previous restore point. Whatever happens afterwards,
//! merging every newer `standby-r<replica>-*` bitmap into `L` restores the rule "`L`
//! covers everything since the last restore point", which is what [`reconcile`] does.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use standby_host::{BitmapOp, Chain, Format, Host, NbdAddress, QemuError, QmpChannel, ServeSpec};

use crate::{EngineError, Result};
use standby_model::tracking::{bitmap_trust, SeenBitmap};

/// One disk of the source VM as this run sees it.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    pub idx: usize,
    pub path: String,
    pub format: Format,
    pub size: u64,
}

impl SourceDisk {
    pub fn node(&self) -> String {
        standby_host::disk_node(self.idx)
    }
}

/// What standby can see of one bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    pub name: String,
    /// QEMU did not save it cleanly (the VM crashed): it may miss writes.
    pub inconsistent: bool,
    /// Still recording changes (not disabled by a run that was interrupted).
    pub recording: bool,
}

use crate::layout::bitmap_seq;

/// How standby reaches the source's disks: through the running QEMU, or through the image
/// files of a stopped VM.
#[derive(Debug)]
pub enum Access {
    Live(Box<dyn QmpChannel>),
    Offline,
}

/// Teardown of something that may already be gone: QEMU's "not found" answers are fine.
fn tolerate(r: std::result::Result<Value, QemuError>) -> Result<()> {
    match r {
        Ok(_) | Err(QemuError::Qmp { .. }) => Ok(()),
        Err(e) => Err(EngineError::Host(e.into())),
    }
}

impl Access {
    pub fn open(host: &dyn Host, vm: &str, running: bool) -> Result<Access> {
        Ok(if running { Access::Live(host.vm_qmp(vm)?) } else { Access::Offline })
    }

    /// The bitmaps of one disk.
    pub fn bitmaps(&mut self, host: &dyn Host, disk: &SourceDisk) -> Result<Vec<BitmapState>> {
        if disk.format != Format::Qcow2 {
            return Ok(Vec::new());
        }
        match self {
            Access::Live(qmp) => {
                let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
                let node = disk.node();
                let list = nodes
                    .as_array()
                    .and_then(|ns| ns.iter().find(|n| n["node-name"] == node.as_str()))
                    .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
                    .unwrap_or_default();
                Ok(list
                    .iter()
                    .filter_map(|b| {
                        Some(BitmapState {
                            name: b["name"].as_str()?.to_owned(),
                            inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                            recording: b["recording"].as_bool().unwrap_or(false),
                        })
                    })
                    .collect())
            }
            Access::Offline => Ok(host
                .image_info(&disk.path, disk.format, false)?
                .bitmaps
                .into_iter()
                .map(|b| BitmapState { name: b.name, inconsistent: b.in_use, recording: b.enabled })
                .collect()),
        }
    }

    fn remove(&mut self, host: &dyn Host, disk: &SourceDisk, name: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                qmp.execute("block-dirty-bitmap-remove", json!({"node": disk.node(), "name": name}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Remove)?,
        }
        Ok(())
    }

    fn merge_into(&mut self, host: &dyn Host, disk: &SourceDisk, target: &str, source: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                let node = disk.node();
                qmp.execute("block-dirty-bitmap-merge", json!({"node": node, "target": target, "bitmaps": [source]}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, target, BitmapOp::MergeFrom(source))?,
        }
        Ok(())
    }

    /// Restores the rule that `current` (the bitmap the last restore point started) holds
    /// every change since that restore point, after any interrupted run. Returns whether
    /// `current` can be trusted; when it cannot, every bitmap of this replica is removed
    /// and the disk must be compared by digest.
    pub fn reconcile(
        &mut self,
        host: &dyn Host,
        disk: &SourceDisk,
        replica_id: i64,
        current: Option<&str>,
    ) -> Result<bool> {
        let ours: Vec<BitmapState> =
            self.bitmaps(host, disk)?.into_iter().filter(|b| bitmap_seq(replica_id, &b.name).is_some()).collect();
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
        let trusted = bitmap_trust(current_seq, &seen, false).is_ok();
        for b in &ours {
            if Some(b.name.as_str()) == current {
                continue;
            }
            let newer = bitmap_seq(replica_id, &b.name) > current_seq;
            if trusted && newer {
                self.merge_into(host, disk, current.unwrap_or_default(), &b.name)?;
            }
            self.remove(host, disk, &b.name)?;
        }
        match (trusted, cur) {
            // A `current` disabled by an interrupted run must track again.
            (true, Some(c)) if !c.recording => self.enable(host, disk, &c.name)?,
            (true, _) => {}
            (false, Some(c)) => self.remove(host, disk, &c.name)?,
            (false, None) => {}
        }
        Ok(trusted)
    }

    fn enable(&mut self, host: &dyn Host, disk: &SourceDisk, name: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                qmp.execute("block-dirty-bitmap-enable", json!({"node": disk.node(), "name": name}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Enable)?,
        }
        Ok(())
    }

    /// After the restore point is durable: the previous bitmap has served its purpose.
    pub fn retire(&mut self, host: &dyn Host, disk: &SourceDisk, previous: &str) -> Result<()> {
        self.remove(host, disk, previous)
    }
}

/// One disk's view, ready to read: where, under what export name, with which bitmap.
#[derive(Debug, Clone)]
pub struct View {
    pub address: NbdAddress,
    pub export: String,
    pub bitmap: Option<String>,
}

// The run's QEMU objects are named from the replica (`layout`), so that leftovers of a
// killed run are found again.
use crate::layout::{fleece_file_prefix, fleece_node, serve_prefix};

/// Takes the instant: one QMP transaction (live) or the bitmap rotation on the closed
/// images (offline), then publishes every disk over NBD. `trusted[i]` says whether disk
/// `i`'s previous bitmap `previous[i]` is exported for CBT.
#[allow(clippy::too_many_arguments)]
pub fn open_views(
    access: &mut Access,
    host: &dyn Host,
    vm: &str,
    replica_id: i64,
    disks: &[SourceDisk],
    previous: &[Option<String>],
    trusted: &[bool],
    new_bitmap: &str,
) -> Result<Vec<View>> {
    match access {
        Access::Live(qmp) => {
            let mut actions = Vec::new();
            for d in disks {
                let node = fleece_node(replica_id, d.idx);
                let file = host.vm_scratch_path(vm, &format!("{node}.qcow2"));
                host.image_create(&file, d.size, None)?;
                qmp.execute(
                    "blockdev-add",
                    json!({"driver": "qcow2", "node-name": node,
                           "file": {"driver": "file", "filename": file},
                           "backing": d.node()}),
                )?;
                if d.format == Format::Qcow2 {
                    actions.push(json!({"type": "block-dirty-bitmap-add",
                        "data": {"node": d.node(), "name": new_bitmap, "persistent": true}}));
                }
                if trusted[d.idx] {
                    if let Some(prev) = &previous[d.idx] {
                        actions.push(json!({"type": "block-dirty-bitmap-disable",
                            "data": {"node": d.node(), "name": prev}}));
                    }
                }
                actions.push(json!({"type": "blockdev-backup",
                    "data": {"device": d.node(), "target": node, "sync": "none", "job-id": node}}));
            }
            // The instant of the restore point, for every disk at once.
            qmp.execute("transaction", json!({"actions": actions}))?;
            let (addr_json, address) = host.vm_nbd_address(vm);
            qmp.execute("nbd-server-start", json!({"addr": addr_json}))?;
            let mut views = Vec::new();
            for d in disks {
                let node = fleece_node(replica_id, d.idx);
                let bitmap = previous[d.idx].clone().filter(|_| trusted[d.idx]);
                let mut args = json!({"type": "nbd", "id": node, "node-name": node, "name": node, "writable": false});
                if let Some(b) = &bitmap {
                    args["bitmaps"] = json!([{"node": d.node(), "name": b}]);
                }
                qmp.execute("block-export-add", args)?;
                views.push(View { address: address.clone(), export: node, bitmap });
            }
            Ok(views)
        }
        Access::Offline => {
            let mut views = Vec::new();
            for d in disks {
                let bitmap = previous[d.idx].clone().filter(|_| trusted[d.idx]);
                if d.format == Format::Qcow2 {
                    host.image_bitmap(&d.path, d.format, new_bitmap, BitmapOp::Add)?;
                    if let Some(b) = &bitmap {
                        host.image_bitmap(&d.path, d.format, b, BitmapOp::Disable)?;
                    }
                }
            }
            for d in disks {
                let bitmap = previous[d.idx].clone().filter(|_| trusted[d.idx]);
                let id = format!("{}d{}", serve_prefix(replica_id), d.idx);
                let address = host.nbd_serve(&ServeSpec {
                    id: id.clone(),
                    chain: Chain::single(&d.path, d.format),
                    writable: false,
                    bitmap: bitmap.clone(),
                    direct: false,
                })?;
                views.push(View { address, export: id, bitmap });
            }
            Ok(views)
        }
    }
}

/// Removes everything `open_views` may have created for this replica, whether or not it
/// exists: safe after a failure, after a kill, and twice.
pub fn close_views(access: &mut Access, host: &dyn Host, vm: &str, replica_id: i64, disk_count: usize) -> Result<()> {
    if let Access::Live(qmp) = access {
        for idx in 0..disk_count {
            let node = fleece_node(replica_id, idx);
            tolerate(qmp.execute("block-export-del", json!({"id": node, "mode": "hard"})))?;
            tolerate(qmp.execute("block-job-cancel", json!({"device": node, "force": true})))?;
        }
        // A cancelled job and a deleted export let go of the node asynchronously.
        let start = Instant::now();
        loop {
            let jobs = qmp.execute("query-block-jobs", json!({}))?;
            let exports = qmp.execute("query-block-exports", json!({}))?;
            let ours = |v: &Value, key: &str| {
                v.as_array().is_some_and(|a| {
                    a.iter().any(|j| j[key].as_str().is_some_and(|d| d.starts_with(&format!("fleece-r{replica_id}-"))))
                })
            };
            if !ours(&jobs, "device") && !ours(&exports, "id") {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(EngineError::Invalid(format!(
                    "VM {vm}: the fleecing job or export of replica {replica_id} did not go away"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for idx in 0..disk_count {
            tolerate(qmp.execute("blockdev-del", json!({"node-name": fleece_node(replica_id, idx)})))?;
        }
        tolerate(qmp.execute("nbd-server-stop", json!({})))?;
    }
    host.nbd_stop_all(&serve_prefix(replica_id))?;
    for f in host.vm_scratch_files(vm, &fleece_file_prefix(replica_id))? {
        host.remove_file(&f)?;
    }
    Ok(())
}
