//! A replication run's hold on a libvirt domain's disks, in libvirt's own change tracking:
//! each bitmap the engine names is a libvirt checkpoint of that name (QEMU's bitmap and
//! libvirt's metadata created together, so they always agree), and a running domain's
//! point-in-time view is a pull-mode backup (`virsh backup-begin`) whose NBD export
//! carries the changes since the previous checkpoint. A stopped domain's view is its
//! closed images served read-only with the same bitmaps, the new one added with
//! `qemu-img` and its checkpoint recorded in libvirt with `--redefine`.
//!
//! libvirt keeps every checkpoint's bitmap recording: a checkpoint's bitmap holds every
//! change since its instant, whoever took later ones. So two jobs protecting one domain
//! each use their own checkpoints and never break each other's incrementals, and merging
//! a newer bitmap into an older one is already done.

use std::collections::BTreeMap;

use roxmltree::Document;
use standby_model::image::{BitmapOp, Format};
use standby_model::ReplicaId;

use super::domain::{esc, DomainDisk};
use super::LibvirtHost;
use crate::live::{fleece_prefix, serve_closed, serve_prefix};
use crate::{BitmapState, DiskAccess, HostError, NbdAddress, Result, SourceDisk, Storage, Transport, View, VmDriver};

#[derive(Debug)]
pub(crate) struct LibvirtDisks<'a> {
    host: &'a LibvirtHost,
    vm: String,
    running: bool,
    /// Each replicated disk (its guest name, `vda`, and image), in the engine's order.
    disks: Vec<DomainDisk>,
    /// This access began a backup job, which must still run when its views close.
    began: bool,
    /// Checkpoints and, per disk target, whether libvirt can still use its bitmap.
    checkpoints: Option<BTreeMap<String, BTreeMap<String, bool>>>,
}

impl<'a> LibvirtDisks<'a> {
    pub(crate) fn new(host: &'a LibvirtHost, vm: &str, running: bool, disks: Vec<DomainDisk>) -> Self {
        LibvirtDisks { host, vm: vm.into(), running, disks, began: false, checkpoints: None }
    }

    /// The guest's name of the domain's disk that is `disk`. The domain must still hold it
    /// where `vm import` found it: a disk added, removed or moved since would read another
    /// disk into this one's restore points.
    fn target(&self, disk: &SourceDisk) -> Result<&str> {
        let d =
            self.disks.get(disk.idx).ok_or_else(|| HostError::DiskMissing { vm: self.vm.clone(), disk: disk.idx })?;
        if d.path != disk.path {
            return Err(HostError::Invalid(format!(
                "domain {}: its disk {} ({}) is {}, but standby registered {}; the domain's disks changed since \
                 `vm import`: delete its replicas and import it again",
                self.vm, disk.idx, d.target, d.path, disk.path
            )));
        }
        Ok(&d.target)
    }

    /// Every checkpoint of the domain with its disks; read once per access. A standby
    /// bitmap in an image without its checkpoint (the switch of a failback adds one with
    /// `qemu-img`; a run killed before recording its checkpoint leaves one) is recorded in
    /// libvirt first, so that libvirt can use it, and standby can judge and remove it.
    fn checkpoints(&mut self) -> Result<&BTreeMap<String, BTreeMap<String, bool>>> {
        if self.checkpoints.is_none() {
            self.load_checkpoints()?;
            let known = self.checkpoints.take().unwrap_or_default();
            let mut unknown: BTreeMap<String, Vec<&str>> = BTreeMap::new();
            for d in self.disks.iter().filter(|d| d.format == Format::Qcow2) {
                for b in self.host.image_info(&d.path, d.format, self.running)?.bitmaps {
                    if b.name.starts_with("standby-r") && !known.contains_key(&b.name) {
                        unknown.entry(b.name).or_default().push(&d.target);
                    }
                }
            }
            if unknown.is_empty() {
                self.checkpoints = Some(known);
            } else {
                for (name, targets) in unknown {
                    let disks: String = targets
                        .iter()
                        .map(|t| format!("<disk name='{}' checkpoint='bitmap' bitmap='{}'/>", esc(t), esc(&name)))
                        .collect();
                    let xml = format!(
                        "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>{disks}</disks>\
                         </domaincheckpoint>",
                        esc(&name),
                        unix_now()
                    );
                    self.host.virsh.run_with(
                        &format!("recording checkpoint {name} of {} (its bitmap is in the image)", self.vm),
                        &["checkpoint-create", &self.vm, "--redefine"],
                        &[&xml],
                    )?;
                }
                self.load_checkpoints()?;
            }
        }
        Ok(self.checkpoints.get_or_insert_with(BTreeMap::new))
    }

    fn load_checkpoints(&mut self) -> Result<()> {
        {
            let virsh = &self.host.virsh;
            let names = virsh
                .run(&format!("listing the checkpoints of {}", self.vm), &["checkpoint-list", &self.vm, "--name"])?;
            let mut all = BTreeMap::new();
            for name in names.lines().map(str::trim).filter(|n| !n.is_empty()) {
                // `--size` asks QEMU for each bitmap: one libvirt cannot use has no size.
                let mut args = vec!["checkpoint-dumpxml", &self.vm, name, "--no-domain"];
                if self.running {
                    args.push("--size");
                }
                let xml = virsh.run(&format!("reading checkpoint {name} of {}", self.vm), &args)?;
                let doc = Document::parse(&xml)
                    .map_err(|e| HostError::Invalid(format!("checkpoint {name} of {}: {e}", self.vm)))?;
                let disks = doc
                    .descendants()
                    .filter(|n| n.has_tag_name("disk") && n.attribute("checkpoint") == Some("bitmap"))
                    .filter_map(|n| Some((n.attribute("name")?.to_owned(), !self.running || n.has_attribute("size"))))
                    .collect();
                all.insert(name.to_owned(), disks);
            }
            self.checkpoints = Some(all);
        }
        Ok(())
    }

    fn backup_socket(&self, owner: ReplicaId) -> Result<String> {
        let dir = self.host.run_dir(&self.vm, self.host.pid(&self.vm))?;
        Ok(dir.join(format!("{}backup.sock", fleece_prefix(owner))).display().to_string())
    }

    /// The backup job libvirt runs on the domain, if it is this replica's (its socket).
    /// libvirt ends an aborted backup job in the background: until it is gone, the domain
    /// takes no new one and its checkpoints cannot change. Waits for that, 30 s at most.
    fn wait_backup_gone(&self, owner: ReplicaId) -> Result<()> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.our_backup(owner)? {
            if std::time::Instant::now() >= until {
                return Err(self.host.virsh.error(
                    &format!("ending the backup of {}", self.vm),
                    "the aborted backup job was still there after 30 s; `virsh domjobinfo` shows it".into(),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    }

    fn our_backup(&self, owner: ReplicaId) -> Result<bool> {
        match self.host.virsh.run(&format!("reading the backup job of {}", self.vm), &["backup-dumpxml", &self.vm]) {
            Ok(xml) => Ok(xml.contains(&format!("{}backup.sock", fleece_prefix(owner)))),
            // No backup job runs (or the domain does not): nothing of this run's is left.
            Err(HostError::Libvirt { detail, .. })
                if detail.contains("no domain backup job") || detail.contains("domain is not running") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl DiskAccess for LibvirtDisks<'_> {
    fn bitmaps(&mut self, disk: &SourceDisk) -> Result<Vec<BitmapState>> {
        if disk.format != Format::Qcow2 {
            return Ok(Vec::new());
        }
        let target = self.target(disk)?.to_owned();
        let mut found: BTreeMap<String, BitmapState> = BTreeMap::new();
        for (name, disks) in self.checkpoints()? {
            if let Some(usable) = disks.get(&target) {
                found.insert(name.clone(), BitmapState { name: name.clone(), inconsistent: !usable, recording: true });
            }
        }
        if !self.running {
            // The image is the truth for a stopped domain: a checkpoint whose bitmap is
            // gone or was not saved cleanly cannot be used, and a bitmap without its
            // checkpoint (a run killed before recording it) is reported to be removed.
            let info = self.host.image_info(&disk.path, disk.format, false)?;
            for state in found.values_mut() {
                state.inconsistent |= !info.bitmaps.iter().any(|b| b.name == state.name && !b.in_use);
            }
            for b in info.bitmaps {
                found.entry(b.name.clone()).or_insert(BitmapState {
                    name: b.name,
                    inconsistent: true,
                    recording: b.enabled,
                });
            }
        }
        Ok(found.into_values().collect())
    }

    fn remove_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        let known = self.checkpoints()?.contains_key(name);
        let virsh = &self.host.virsh;
        let what = format!("deleting checkpoint {name} of {}", self.vm);
        if self.running {
            if known {
                virsh.run(&what, &["checkpoint-delete", &self.vm, name])?;
            }
        } else {
            // libvirt deletes checkpoints of running domains only: the bitmap goes with
            // qemu-img, the metadata with `--metadata`.
            let info = self.host.image_info(&disk.path, disk.format, false)?;
            if info.bitmaps.iter().any(|b| b.name == name) {
                self.host.image_bitmap(&disk.path, disk.format, name, BitmapOp::Remove)?;
            }
            if known {
                virsh.run(&what, &["checkpoint-delete", &self.vm, name, "--metadata"])?;
            }
        }
        if let Some(all) = &mut self.checkpoints {
            all.remove(name);
        }
        Ok(())
    }

    fn merge_bitmap(&mut self, _disk: &SourceDisk, _target: &str, _source: &str) -> Result<()> {
        // Every checkpoint's bitmap records: the older one holds the newer one's changes.
        Ok(())
    }

    fn enable_bitmap(&mut self, _disk: &SourceDisk, _name: &str) -> Result<()> {
        Ok(())
    }

    fn open_views(
        &mut self,
        owner: ReplicaId,
        disks: &[SourceDisk],
        previous: &[Option<String>],
        trusted: &[bool],
        new_bitmap: &str,
    ) -> Result<Vec<View>> {
        let exported = |d: &SourceDisk| previous[d.idx].clone().filter(|_| trusted[d.idx] && d.format == Format::Qcow2);
        let export = |d: &SourceDisk| format!("{}d{}", serve_prefix(owner), d.idx);
        let mut checkpoint = format!("<domaincheckpoint><name>{}</name>", esc(new_bitmap));
        if !self.running {
            // A redefined checkpoint says when it was taken; libvirt stamps the others.
            checkpoint.push_str(&format!("<creationTime>{}</creationTime>", unix_now()));
        }
        checkpoint.push_str("<disks>");
        for d in disks {
            let mode = if d.format == Format::Qcow2 { "bitmap" } else { "no" };
            let bitmap =
                if self.running || mode == "no" { String::new() } else { format!(" bitmap='{}'", esc(new_bitmap)) };
            checkpoint.push_str(&format!("<disk name='{}' checkpoint='{mode}'{bitmap}/>", esc(self.target(d)?)));
        }
        checkpoint.push_str("</disks></domaincheckpoint>");
        let any_qcow2 = disks.iter().any(|d| d.format == Format::Qcow2);

        if !self.running {
            let host = self.host;
            for d in disks.iter().filter(|d| d.format == Format::Qcow2) {
                host.image_bitmap(&d.path, d.format, new_bitmap, BitmapOp::Add)?;
            }
            if any_qcow2 {
                host.virsh.run_with(
                    &format!("recording checkpoint {new_bitmap} of {}", self.vm),
                    &["checkpoint-create", &self.vm, "--redefine"],
                    &[&checkpoint],
                )?;
            }
            self.checkpoints = None;
            return serve_closed(host, owner, disks, &exported);
        }

        let socket = self.backup_socket(owner)?;
        let dir = std::path::Path::new(&socket).parent().map(|p| p.display().to_string()).unwrap_or_default();
        let _ = std::fs::remove_file(&socket);
        let mut backup =
            format!("<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>", esc(&socket));
        for d in disks {
            let scratch = format!("{dir}/{}d{}.qcow2", fleece_prefix(owner), d.idx);
            let _ = std::fs::remove_file(&scratch);
            let incremental = match exported(d) {
                Some(b) => format!(" incremental='{}' exportbitmap='{}'", esc(&b), esc(&b)),
                None => String::new(),
            };
            backup.push_str(&format!(
                "<disk name='{}' backup='yes' type='file' exportname='{}'{incremental}><scratch file='{}'/></disk>",
                esc(self.target(d)?),
                esc(&export(d)),
                esc(&scratch)
            ));
        }
        backup.push_str("</disks></domainbackup>");
        let mut documents = vec![backup.as_str()];
        if any_qcow2 {
            documents.push(&checkpoint);
        }
        // The instant of the restore point, for every disk at once; the checkpoint is
        // created in the same step, so libvirt's metadata and QEMU's bitmaps agree.
        self.host.virsh.run_with(
            &format!("starting the backup of {} (its point-in-time view)", self.vm),
            &["backup-begin", &self.vm],
            &documents,
        )?;
        self.began = true;
        self.checkpoints = None;
        let address = NbdAddress { socket, agent: None };
        Ok(disks.iter().map(|d| View { address: address.clone(), export: export(d), bitmap: exported(d) }).collect())
    }

    fn close_views(&mut self, owner: ReplicaId, _disk_count: usize) -> Result<()> {
        let mut broken = None;
        let mut failed = None;
        if self.running || self.began {
            match self.our_backup(owner) {
                Ok(ours) => {
                    if self.began && !ours {
                        // The backup job ended under the run (its scratch file filled, QEMU
                        // failed): its view may have read what the guest wrote after the instant.
                        broken = Some("libvirt's backup job is no longer running".to_owned());
                    }
                    if ours {
                        let what = format!("ending the backup of {}", self.vm);
                        failed = self.host.virsh.run(&what, &["domjobabort", &self.vm]).err();
                        if failed.is_none() {
                            failed = self.wait_backup_gone(owner).err();
                        }
                    }
                }
                Err(e) => failed = Some(e),
            }
            self.began = false;
        }
        // Whatever runs now: a killed run's scratch files stay even if the domain stopped.
        for f in self.host.vm_scratch_files(&self.vm, &fleece_prefix(owner))? {
            let _ = std::fs::remove_file(f);
        }
        self.host.nbd_stop_all(&serve_prefix(owner))?;
        if let Some(e) = failed {
            return Err(e);
        }
        match broken {
            Some(error) => Err(HostError::ViewBroken { vm: self.vm.clone(), job: "backup".into(), error }),
            None => Ok(()),
        }
    }
}
