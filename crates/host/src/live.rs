//! The QEMU driver's side of a VM's disks and monitor: every QMP command standby sends
//! (typed, `standby_qemu::qmp::commands`), and the offline equivalents on closed images
//! through `qemu-img` and `qemu-nbd`. The QEMU objects made here (node names, fleecing
//! nodes and their scratch files, exports, `qemu-nbd` servers) are named here only, from
//! the caller's `owner` id, so that leftovers of a killed run are found again.

use std::time::{Duration, Instant};

use standby_model::ReplicaId;
use standby_qemu::qmp::commands::*;
use standby_qemu::qmp::{Command, Qmp};

use crate::views::{BitmapState, DiskAccess, SourceDisk, View};
use crate::{BitmapOp, Chain, Format, HostError, LocalHost, QemuError, Result, ServeSpec};
use crate::{Storage, Transport, VmDriver};

/// A stopped VM's views: each closed image served read-only by `qemu-nbd`, with the
/// bitmap `exported` names for it (the changes since the previous point).
pub(crate) fn serve_closed(
    host: &dyn Transport,
    owner: ReplicaId,
    disks: &[SourceDisk],
    exported: &dyn Fn(&SourceDisk) -> Option<String>,
) -> Result<Vec<View>> {
    let mut views = Vec::new();
    for d in disks {
        let id = format!("{}d{}", serve_prefix(owner), d.idx);
        let address = host.nbd_serve(&ServeSpec {
            id: id.clone(),
            chain: Chain::single(&d.path, d.format),
            writable: false,
            bitmap: exported(d),
            direct: false,
        })?;
        views.push(View { address, export: id, bitmap: exported(d) });
    }
    Ok(views)
}

/// The node name of a VM's disk `idx`, on its command line and in QMP.
pub fn disk_node(idx: usize) -> String {
    format!("disk{idx}")
}

/// A live run's fleecing node for disk `idx` (also its job and export id).
pub fn fleece_node(owner: ReplicaId, idx: usize) -> String {
    format!("fleece-r{owner}-d{idx}")
}

/// The start of a live run's fleecing node, job, export and scratch file names.
pub fn fleece_prefix(owner: ReplicaId) -> String {
    format!("fleece-r{owner}-")
}

/// The `qemu-nbd` servers of a stopped VM's views.
pub fn serve_prefix(owner: ReplicaId) -> String {
    format!("src-r{owner}-")
}

/// How long a monitor command may take before the VM is taken for hung.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(120);
/// The same for quick queries on the second monitor.
pub(crate) const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// A monitor of VM `vm`, each command's failure naming the VM.
#[derive(Debug)]
pub(crate) struct Monitor {
    vm: String,
    qmp: Qmp,
}

impl Monitor {
    pub(crate) fn new(vm: &str, qmp: Qmp) -> Monitor {
        Monitor { vm: vm.into(), qmp }
    }

    pub(crate) fn run<C: Command>(&mut self, command: &C) -> Result<C::Reply> {
        self.qmp.run(command).map_err(|source| HostError::Monitor { vm: self.vm.clone(), source })
    }

    /// Teardown of something that may already be gone: QEMU's "not found" answers are fine.
    fn tolerate<C: Command>(&mut self, command: &C) -> Result<()> {
        match self.qmp.run(command) {
            Ok(_) | Err(QemuError::Qmp { .. }) => Ok(()),
            Err(source) => Err(HostError::Monitor { vm: self.vm.clone(), source }),
        }
    }

    /// Each of the VM's first `disks` disks: its top node and the file it writes to, as
    /// QEMU reports them (the device of disk `i` is `vd<i>`).
    pub(crate) fn block_tops(&mut self, disks: usize) -> Result<Vec<(String, String)>> {
        let blocks = self.run(&QueryBlock {})?;
        (0..disks)
            .map(|i| {
                let qdev = format!("/vd{i}/");
                blocks
                    .iter()
                    .find(|b| b.qdev.as_deref().is_some_and(|q| q.contains(&qdev)))
                    .and_then(|b| b.inserted.as_ref())
                    .map(|n| (n.node_name.clone(), n.file.clone()))
                    .ok_or_else(|| HostError::DiskMissing { vm: self.vm.clone(), disk: i })
            })
            .collect()
    }

    pub(crate) fn paused(&mut self) -> Result<bool> {
        let status = self.run(&QueryStatus {})?;
        Ok(!status.running && status.status == "paused")
    }

    /// See `Host::vm_protect`.
    pub(crate) fn protect(&mut self, new_tops: &[(String, u32)]) -> Result<()> {
        let nodes = self.block_tops(new_tops.len())?;
        let actions = nodes
            .into_iter()
            .zip(new_tops)
            .enumerate()
            .map(|(i, ((node_name, _), (file, tag)))| {
                Action::BlockdevSnapshotSync(BlockdevSnapshotSync {
                    node_name,
                    snapshot_file: file.clone(),
                    snapshot_node_name: format!("{}-g{tag}", disk_node(i)),
                    format: "qcow2",
                    mode: "existing",
                })
            })
            .collect();
        self.run(&Transaction { actions })?;
        Ok(())
    }

    /// See `Host::vm_flatten`. A stream job that fails is gone from `query-block-jobs` as
    /// one that finished is: its completion event tells them apart.
    pub(crate) fn flatten(&mut self, disks: usize, timeout: Duration) -> Result<()> {
        let job = |i: usize| format!("flatten-d{i}");
        self.qmp.take_events();
        for (i, (device, _)) in self.block_tops(disks)?.into_iter().enumerate() {
            self.run(&BlockStream { device, job_id: job(i) })?;
        }
        let start = Instant::now();
        loop {
            let jobs = self.run(&QueryBlockJobs {})?;
            for event in self.qmp.take_events() {
                if let (true, Some(error)) = (event.job().starts_with("flatten-d"), event.failure()) {
                    return Err(HostError::JobFailed { vm: self.vm.clone(), job: event.job().into(), error });
                }
            }
            if !jobs.iter().any(|j| j.device.starts_with("flatten-d")) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(HostError::Timeout {
                    vm: self.vm.clone(),
                    what: "flattening its disks".into(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The QEMU driver's hold on a VM's disks for one run.
#[derive(Debug)]
pub(crate) struct QemuDisks<'a> {
    pub(crate) host: &'a LocalHost,
    pub(crate) vm: String,
    /// The monitor when the VM runs; its closed image files otherwise.
    pub(crate) live: Option<Monitor>,
    /// The fleecing jobs this access started, which must still run when it closes them.
    pub(crate) fleecing: Vec<String>,
}

impl DiskAccess for QemuDisks<'_> {
    fn bitmaps(&mut self, disk: &SourceDisk) -> Result<Vec<BitmapState>> {
        if disk.format != Format::Qcow2 {
            return Ok(Vec::new());
        }
        match &mut self.live {
            Some(m) => {
                let node = disk_node(disk.idx);
                let nodes = m.run(&QueryNamedBlockNodes { flat: true })?;
                Ok(nodes
                    .into_iter()
                    .find(|n| n.node_name == node)
                    .map(|n| n.dirty_bitmaps)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|b| {
                        Some(BitmapState { name: b.name?, inconsistent: b.inconsistent, recording: b.recording })
                    })
                    .collect())
            }
            None => Ok(self
                .host
                .image_info(&disk.path, disk.format, false)?
                .bitmaps
                .into_iter()
                .map(|b| BitmapState { name: b.name, inconsistent: b.in_use, recording: b.enabled })
                .collect()),
        }
    }

    fn remove_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        match &mut self.live {
            Some(m) => m.run(&BlockDirtyBitmapRemove(bitmap(disk, name))).map(drop),
            None => self.host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Remove),
        }
    }

    fn merge_bitmap(&mut self, disk: &SourceDisk, target: &str, source: &str) -> Result<()> {
        match &mut self.live {
            Some(m) => m
                .run(&BlockDirtyBitmapMerge {
                    node: disk_node(disk.idx),
                    target: target.into(),
                    bitmaps: vec![source.into()],
                })
                .map(drop),
            None => self.host.image_bitmap(&disk.path, disk.format, target, BitmapOp::MergeFrom(source)),
        }
    }

    fn enable_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        match &mut self.live {
            Some(m) => m.run(&BlockDirtyBitmapEnable(bitmap(disk, name))).map(drop),
            None => self.host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Enable),
        }
    }

    fn open_views(
        &mut self,
        owner: ReplicaId,
        disks: &[SourceDisk],
        previous: &[Option<String>],
        trusted: &[bool],
        new_bitmap: &str,
    ) -> Result<Vec<View>> {
        let exported = |d: &SourceDisk| previous[d.idx].clone().filter(|_| trusted[d.idx]);
        let host = self.host;
        let Some(m) = &mut self.live else {
            for d in disks {
                if d.format == Format::Qcow2 {
                    host.image_bitmap(&d.path, d.format, new_bitmap, BitmapOp::Add)?;
                    if let Some(b) = exported(d) {
                        host.image_bitmap(&d.path, d.format, &b, BitmapOp::Disable)?;
                    }
                }
            }
            return serve_closed(host, owner, disks, &exported);
        };
        let mut actions = Vec::new();
        for d in disks {
            let node = fleece_node(owner, d.idx);
            let file = host.vm_scratch_path(&self.vm, &format!("{node}.qcow2"));
            host.image_create(&file, d.size, None)?;
            m.run(&BlockdevAddQcow2::new(node.clone(), file, disk_node(d.idx)))?;
            if d.format == Format::Qcow2 {
                actions.push(Action::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    node: disk_node(d.idx),
                    name: new_bitmap.into(),
                    persistent: true,
                }));
            }
            if let Some(b) = exported(d) {
                actions.push(Action::BlockDirtyBitmapDisable(bitmap(d, &b)));
            }
            actions.push(Action::BlockdevBackup(BlockdevBackup {
                device: disk_node(d.idx),
                target: node.clone(),
                sync: "none",
                job_id: node,
            }));
        }
        m.qmp.take_events();
        // The instant of the restore point, for every disk at once.
        m.run(&Transaction { actions })?;
        self.fleecing = disks.iter().map(|d| fleece_node(owner, d.idx)).collect();
        let address = host.vm_nbd_socket(&self.vm);
        m.run(&NbdServerStart { addr: LegacyUnixAddress::unix(address.socket.clone()) })?;
        let mut views = Vec::new();
        for d in disks {
            let node = fleece_node(owner, d.idx);
            let bitmaps = exported(d).map(|b| bitmap(d, &b)).into_iter().collect();
            m.run(&BlockExportAddNbd::read_only(node.clone(), node.clone(), bitmaps))?;
            views.push(View { address: address.clone(), export: node, bitmap: exported(d) });
        }
        Ok(views)
    }

    fn close_views(&mut self, owner: ReplicaId, disk_count: usize) -> Result<()> {
        let vm = self.vm.clone();
        let mut broken = None;
        if let Some(m) = &mut self.live {
            // Before anything is cancelled: a fleecing job that is gone, or that reported
            // an error, stopped copying old data aside, so its view may have read new data.
            broken = match self.fleecing.is_empty() {
                true => None,
                false => {
                    // Unknown is broken too; and teardown goes on either way.
                    let jobs = match m.run(&QueryBlockJobs {}) {
                        Ok(jobs) => jobs,
                        Err(e) => {
                            broken = Some((self.fleecing[0].clone(), format!("its state cannot be read: {e}")));
                            Vec::new()
                        }
                    };
                    let failed = m.qmp.take_events().into_iter().find_map(|e| {
                        self.fleecing.iter().any(|f| f == e.job()).then(|| e.failure()).flatten().map(|f| (e, f))
                    });
                    match (failed, broken.take()) {
                        (Some((e, error)), _) => Some((e.job().to_owned(), error)),
                        (None, Some(unknown)) => Some(unknown),
                        (None, None) => self
                            .fleecing
                            .iter()
                            .find(|f| !jobs.iter().any(|j| &j.device == *f && j.status == "running"))
                            .map(|f| (f.clone(), "it ended before the view was read".to_owned())),
                    }
                }
            };
            for idx in 0..disk_count {
                let node = fleece_node(owner, idx);
                m.tolerate(&BlockExportDel { id: node.clone(), mode: "hard" })?;
                m.tolerate(&BlockJobCancel { device: node, force: true })?;
            }
            // A cancelled job and a deleted export let go of the node asynchronously.
            let start = Instant::now();
            let prefix = fleece_prefix(owner);
            loop {
                let jobs = m.run(&QueryBlockJobs {})?;
                let exports = m.run(&QueryBlockExports {})?;
                if !jobs.iter().any(|j| j.device.starts_with(&prefix))
                    && !exports.iter().any(|e| e.id.starts_with(&prefix))
                {
                    break;
                }
                if start.elapsed() > Duration::from_secs(30) {
                    return Err(HostError::Timeout {
                        vm,
                        what: format!("removing the fleecing jobs and exports of replica {owner}"),
                        secs: 30,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for idx in 0..disk_count {
                m.tolerate(&BlockdevDel { node_name: fleece_node(owner, idx) })?;
            }
            m.tolerate(&NbdServerStop {})?;
            self.fleecing.clear();
        }
        self.host.nbd_stop_all(&serve_prefix(owner))?;
        for f in self.host.vm_scratch_files(&self.vm, &fleece_prefix(owner))? {
            self.host.remove_file(&f)?;
        }
        match broken {
            Some((job, error)) => Err(HostError::ViewBroken { vm, job, error }),
            None => Ok(()),
        }
    }
}

fn bitmap(disk: &SourceDisk, name: &str) -> BitmapRef {
    BitmapRef { node: disk_node(disk.idx), name: name.into() }
}
