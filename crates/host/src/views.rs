//! A running or stopped VM's disks as a run reads them: their dirty bitmaps (through the
//! running QEMU, or the closed image files), and a frozen point-in-time view of every disk
//! at one instant, published over NBD with a bitmap of the changes since. The QEMU objects
//! this makes (fleecing nodes and their scratch files, exports, `qemu-nbd` servers) are
//! named here from the caller's `owner` id, so that leftovers of a killed run are found
//! again by the same names.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{
    disk_node, BitmapOp, Chain, Format, Host, HostError, NbdAddress, QemuError, QmpChannel, Result, ServeSpec,
};

/// A live run's fleecing node for disk `idx`.
pub fn fleece_node(owner: i64, idx: usize) -> String {
    format!("fleece-r{owner}-d{idx}")
}

/// The start of a live run's fleecing scratch files.
pub fn fleece_file_prefix(owner: i64) -> String {
    format!("fleece-r{owner}-")
}

/// The `qemu-nbd` servers of a stopped VM's views.
pub fn serve_prefix(owner: i64) -> String {
    format!("src-r{owner}-")
}

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
        disk_node(self.idx)
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
        Err(e) => Err(HostError::Qemu(e)),
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

    pub fn remove(&mut self, host: &dyn Host, disk: &SourceDisk, name: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                qmp.execute("block-dirty-bitmap-remove", json!({"node": disk.node(), "name": name}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Remove)?,
        }
        Ok(())
    }

    pub fn merge_into(&mut self, host: &dyn Host, disk: &SourceDisk, target: &str, source: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                let node = disk.node();
                qmp.execute("block-dirty-bitmap-merge", json!({"node": node, "target": target, "bitmaps": [source]}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, target, BitmapOp::MergeFrom(source))?,
        }
        Ok(())
    }

    pub fn enable(&mut self, host: &dyn Host, disk: &SourceDisk, name: &str) -> Result<()> {
        match self {
            Access::Live(qmp) => {
                qmp.execute("block-dirty-bitmap-enable", json!({"node": disk.node(), "name": name}))?;
            }
            Access::Offline => host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Enable)?,
        }
        Ok(())
    }
}

/// One disk's view, ready to read: where, under what export name, with which bitmap.
#[derive(Debug, Clone)]
pub struct View {
    pub address: NbdAddress,
    pub export: String,
    pub bitmap: Option<String>,
}

/// Takes the instant: one QMP transaction (live) or the bitmap rotation on the closed
/// images (offline), then publishes every disk over NBD. `trusted[i]` says whether disk
/// `i`'s previous bitmap `previous[i]` is exported for CBT.
#[allow(clippy::too_many_arguments)]
pub fn open_views(
    access: &mut Access,
    host: &dyn Host,
    vm: &str,
    owner: i64,
    disks: &[SourceDisk],
    previous: &[Option<String>],
    trusted: &[bool],
    new_bitmap: &str,
) -> Result<Vec<View>> {
    match access {
        Access::Live(qmp) => {
            let mut actions = Vec::new();
            for d in disks {
                let node = fleece_node(owner, d.idx);
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
                let node = fleece_node(owner, d.idx);
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
                let id = format!("{}d{}", serve_prefix(owner), d.idx);
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
pub fn close_views(access: &mut Access, host: &dyn Host, vm: &str, owner: i64, disk_count: usize) -> Result<()> {
    if let Access::Live(qmp) = access {
        for idx in 0..disk_count {
            let node = fleece_node(owner, idx);
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
                    a.iter().any(|j| j[key].as_str().is_some_and(|d| d.starts_with(&format!("fleece-r{owner}-"))))
                })
            };
            if !ours(&jobs, "device") && !ours(&exports, "id") {
                break;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(HostError::Invalid(format!(
                    "VM {vm}: the fleecing job or export of replica {owner} did not go away"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for idx in 0..disk_count {
            tolerate(qmp.execute("blockdev-del", json!({"node-name": fleece_node(owner, idx)})))?;
        }
        tolerate(qmp.execute("nbd-server-stop", json!({})))?;
    }
    host.nbd_stop_all(&serve_prefix(owner))?;
    for f in host.vm_scratch_files(vm, &fleece_file_prefix(owner))? {
        host.remove_file(&f)?;
    }
    Ok(())
}
