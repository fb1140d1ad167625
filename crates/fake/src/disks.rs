//! A run's hold on a fake VM's disks: bitmaps on its top images, and views that are
//! frozen copies taken at `open_views`.

use std::collections::BTreeMap;

use standby_host::{BitmapState, Chain, DiskAccess, Format, HostError, NbdAddress, Result, SourceDisk, View};
use standby_model::ReplicaId;

use crate::world::{invalid, Bitmap, Entry, Export, Image, World};
use crate::{FakeHost, CLUSTER};

/// A run's hold on a fake VM's disks. Views are frozen copies taken at `open_views`.
#[derive(Debug)]
pub(crate) struct FakeDisks {
    pub(crate) host: FakeHost,
    pub(crate) vm: String,
    pub(crate) running: bool,
}

fn view_id(owner: ReplicaId, idx: usize) -> String {
    format!("fake-view-r{owner}-d{idx}")
}

impl FakeDisks {
    /// The image that holds disk `disk`'s bitmaps: the running VM's top, or the file.
    fn top(&self, w: &World, disk: &SourceDisk) -> Result<String> {
        match self.running {
            true => Ok(w.vm(&self.vm)?.disks[disk.idx].layers[0].path.clone()),
            false => Ok(disk.path.clone()),
        }
    }

    fn with_bitmaps<T>(
        &self,
        disk: &SourceDisk,
        f: impl FnOnce(&mut BTreeMap<String, Bitmap>) -> Result<T>,
    ) -> Result<T> {
        let mut w = self.host.world();
        let top = self.top(&w, disk)?;
        f(&mut w.image_mut(&top)?.bitmaps)
    }
}

pub(crate) fn no_bitmap(name: &str) -> HostError {
    invalid(format!("no bitmap {name}"))
}

impl DiskAccess for FakeDisks {
    fn bitmaps(&mut self, disk: &SourceDisk) -> Result<Vec<BitmapState>> {
        if disk.format != Format::Qcow2 {
            return Ok(Vec::new());
        }
        self.with_bitmaps(disk, |bs| {
            Ok(bs
                .iter()
                .map(|(n, b)| BitmapState { name: n.clone(), inconsistent: b.inconsistent, recording: b.enabled })
                .collect())
        })
    }

    fn remove_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        self.with_bitmaps(disk, |bs| bs.remove(name).map(drop).ok_or_else(|| no_bitmap(name)))
    }

    fn merge_bitmap(&mut self, disk: &SourceDisk, target: &str, source: &str) -> Result<()> {
        self.with_bitmaps(disk, |bs| {
            let add = bs.get(source).ok_or_else(|| no_bitmap(source))?.dirty.clone();
            bs.get_mut(target).ok_or_else(|| no_bitmap(target))?.dirty.extend(add);
            Ok(())
        })
    }

    fn enable_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        self.with_bitmaps(disk, |bs| bs.get_mut(name).map(|b| b.enabled = true).ok_or_else(|| no_bitmap(name)))
    }

    fn open_views(
        &mut self,
        owner: ReplicaId,
        disks: &[SourceDisk],
        previous: &[Option<String>],
        trusted: &[bool],
        new_bitmap: &str,
    ) -> Result<Vec<View>> {
        let mut w = self.host.call("open_views");
        let mut views = Vec::new();
        // One lock over every disk: the instant is the same for all.
        for d in disks {
            let chain = match self.running {
                true => w.vm(&self.vm)?.disks[d.idx].clone(),
                false => Chain::single(&d.path, d.format),
            };
            let exported = previous[d.idx].clone().filter(|_| trusted[d.idx]);
            let top = chain.layers[0].path.clone();
            let mut frozen = Image::new(Format::Qcow2, w.size(&chain)?);
            for c in 0..frozen.size.div_ceil(CLUSTER) {
                if let (data, 1..) = w.read_cluster(&chain, c)? {
                    frozen.clusters.insert(c, data);
                }
            }
            let img = w.image_mut(&top)?;
            if d.format == Format::Qcow2 {
                if img.bitmaps.contains_key(new_bitmap) {
                    return Err(invalid(format!("bitmap {new_bitmap} exists")));
                }
                img.bitmaps.insert(new_bitmap.into(), Bitmap { enabled: true, ..Bitmap::default() });
            }
            if let Some(b) = &exported {
                let bitmap = img.bitmaps.get_mut(b).ok_or_else(|| no_bitmap(b))?;
                bitmap.enabled = false;
                frozen.bitmaps.insert(b.clone(), bitmap.clone());
            }
            let id = view_id(owner, d.idx);
            let path = format!("/fake/views/{id}");
            w.files.insert(path.clone(), Entry::Image(frozen));
            w.exports.insert(
                id.clone(),
                Export { chain: Chain::single(&path, Format::Qcow2), writable: false, bitmap: exported.clone() },
            );
            views.push(View {
                address: NbdAddress { socket: format!("fake:{id}"), agent: None },
                export: id,
                bitmap: exported,
            });
        }
        Ok(views)
    }

    fn close_views(&mut self, owner: ReplicaId, _disk_count: usize) -> Result<()> {
        let mut w = self.host.call("close_views");
        let prefix = format!("fake-view-r{owner}-");
        w.exports.retain(|id, _| !id.starts_with(&prefix));
        w.files.retain(|p, _| !p.starts_with(&format!("/fake/views/{prefix}")));
        Ok(())
    }
}
