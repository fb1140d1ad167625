//! An in-memory host, for engine tests that run in milliseconds: images are maps of 64 KiB
//! clusters with their backing file and dirty bitmaps, VMs are records that "write" only
//! when a test says so ([`FakeHost::guest_write`]), and NBD exports are served without a
//! socket. It keeps the promises of the [`Host`] trait that the engine relies on (a read
//! through a chain is the first layer holding the cluster, a running VM's writes mark its
//! enabled bitmaps, a killed VM leaves its bitmaps inconsistent, a view is frozen at its
//! instant) and nothing more: the real-QEMU tests prove the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use standby_host::{
    Accel, BitmapInfo, BitmapOp, BitmapState, BlockStream, Chain, DiskAccess, DiskSource, Format, Host, HostError,
    ImageInfo, NbdAddress, Result, ServeSpec, SourceDisk, Storage, Transport, View, VmConfig, VmDriver, VmLaunch,
    VmRuntime,
};
use standby_model::ReplicaId;
use standby_nbd::{Extent, NbdError};

pub const CLUSTER: u64 = 64 << 10;

#[derive(Debug, Clone, Default)]
struct Bitmap {
    enabled: bool,
    /// Left by a VM that was killed while the bitmap recorded: it may miss writes.
    inconsistent: bool,
    dirty: BTreeSet<u64>,
}

#[derive(Debug, Clone)]
struct Image {
    format: Format,
    size: u64,
    backing: Option<String>,
    clusters: BTreeMap<u64, Vec<u8>>,
    bitmaps: BTreeMap<String, Bitmap>,
}

impl Image {
    fn new(format: Format, size: u64) -> Image {
        Image { format, size, backing: None, clusters: BTreeMap::new(), bitmaps: BTreeMap::new() }
    }
}

#[derive(Debug, Clone)]
enum Entry {
    Text(String),
    Image(Image),
}

#[derive(Debug, Clone)]
struct Vm {
    pid: u32,
    paused: bool,
    disks: Vec<Chain>,
}

#[derive(Debug, Clone)]
struct Export {
    chain: Chain,
    writable: bool,
    bitmap: Option<String>,
}

#[derive(Debug, Default)]
struct World {
    files: BTreeMap<String, Entry>,
    dirs: BTreeSet<String>,
    vms: BTreeMap<String, Vm>,
    exports: BTreeMap<String, Export>,
    next_pid: u32,
    /// Every host call by name, for tests that prove something was (not) done.
    calls: Vec<String>,
}

fn invalid(what: impl Into<String>) -> HostError {
    HostError::Invalid(what.into())
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| if d.is_empty() { "/" } else { d })
}

impl World {
    fn image(&self, path: &str) -> Result<&Image> {
        match self.files.get(path) {
            Some(Entry::Image(i)) => Ok(i),
            Some(Entry::Text(_)) => Err(invalid(format!("{path} is not an image"))),
            None => Err(invalid(format!("no image {path}"))),
        }
    }

    fn image_mut(&mut self, path: &str) -> Result<&mut Image> {
        match self.files.get_mut(path) {
            Some(Entry::Image(i)) => Ok(i),
            _ => Err(invalid(format!("no image {path}"))),
        }
    }

    /// The chain an image's own header names (what QEMU opens for `DiskSource::Image`).
    fn chain_of(&self, path: &str) -> Result<Chain> {
        let mut layers = Vec::new();
        let mut next = Some(path.to_owned());
        while let Some(p) = next {
            let img = self.image(&p)?;
            layers.push(standby_host::Layer { path: p.clone(), format: img.format });
            next = img.backing.clone();
            if layers.len() > 64 {
                return Err(invalid(format!("{path}: backing loop")));
            }
        }
        Ok(Chain { layers })
    }

    /// Cluster `c` as the chain reads it, and the depth of the layer that holds it (1 is
    /// the top, 0 none: zeros).
    fn read_cluster(&self, chain: &Chain, c: u64) -> Result<(Vec<u8>, u32)> {
        for (depth, layer) in chain.layers.iter().enumerate() {
            let img = self.image(&layer.path)?;
            if c * CLUSTER >= img.size {
                break;
            }
            if let Some(data) = img.clusters.get(&c) {
                return Ok((data.clone(), depth as u32 + 1));
            }
            if img.format == Format::Raw {
                return Ok((vec![0; CLUSTER as usize], depth as u32 + 1));
            }
        }
        Ok((vec![0; CLUSTER as usize], 0))
    }

    fn read(&self, chain: &Chain, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (data, _) = self.read_cluster(chain, at / CLUSTER)?;
            let within = (at % CLUSTER) as usize;
            let n = (CLUSTER as usize - within).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&data[within..within + n]);
            pos += n;
        }
        Ok(())
    }

    /// Writes into the chain's top layer, copying partial clusters up from below, and marks
    /// the top's recording bitmaps.
    fn write(&mut self, chain: &Chain, offset: u64, data: &[u8]) -> Result<()> {
        let top = chain.layers[0].path.clone();
        let size = self.image(&top)?.size;
        if offset + data.len() as u64 > size {
            return Err(invalid(format!("write past the end of {top}")));
        }
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let c = at / CLUSTER;
            let (mut cluster, _) = self.read_cluster(chain, c)?;
            let within = (at % CLUSTER) as usize;
            let n = (CLUSTER as usize - within).min(data.len() - pos);
            cluster[within..within + n].copy_from_slice(&data[pos..pos + n]);
            let img = self.image_mut(&top)?;
            img.clusters.insert(c, cluster);
            for b in img.bitmaps.values_mut().filter(|b| b.enabled) {
                b.dirty.insert(c);
            }
            pos += n;
        }
        Ok(())
    }

    fn size(&self, chain: &Chain) -> Result<u64> {
        Ok(self.image(&chain.layers[0].path)?.size)
    }

    /// Everything a chain reads, cluster by cluster.
    fn contents(&self, chain: &Chain) -> Result<Vec<u8>> {
        let mut buf = vec![0; self.size(chain)? as usize];
        self.read(chain, 0, &mut buf)?;
        Ok(buf)
    }

    fn vm(&self, name: &str) -> Result<&Vm> {
        self.vms.get(name).ok_or_else(|| HostError::NotRunning(name.into()))
    }
}

/// The in-memory host. Clones share one world.
#[derive(Debug, Clone)]
pub struct FakeHost {
    name: String,
    world: Arc<Mutex<World>>,
}

impl FakeHost {
    pub fn new(name: &str) -> FakeHost {
        let world = World { next_pid: 1000, ..World::default() };
        FakeHost { name: name.into(), world: Arc::new(Mutex::new(world)) }
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn call(&self, what: &str) -> MutexGuard<'_, World> {
        let mut w = self.world();
        w.calls.push(what.into());
        w
    }

    fn note(&self, what: &str) {
        self.world().calls.push(what.into());
    }

    // ---- what a test does to the world ----

    /// Makes a standalone image (a VM's disk) holding `data` from offset 0.
    pub fn put_image(&self, path: &str, format: Format, size: u64, data: &[(u64, &[u8])]) {
        let mut w = self.world();
        w.dirs.insert(parent(path).into());
        w.files.insert(path.into(), Entry::Image(Image::new(format, size)));
        let chain = Chain::single(path, format);
        for (at, bytes) in data {
            w.write(&chain, *at, bytes).expect("write the test's data");
        }
    }

    /// The guest of running VM `vm` writes `data` to its disk `disk`.
    pub fn guest_write(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) {
        let mut w = self.world();
        let chain = w.vm(vm).expect("the VM runs").disks[disk].clone();
        w.write(&chain, offset, data).expect("guest write");
    }

    /// Writes to an image that no VM runs on (the operator, or a broken tool).
    pub fn write_image(&self, path: &str, offset: u64, data: &[u8]) {
        let mut w = self.world();
        w.write(&Chain::single(path, Format::Qcow2), offset, data).expect("write");
    }

    /// Everything a chain reads, as QEMU would read it.
    pub fn read_chain(&self, chain: &Chain) -> Vec<u8> {
        self.world().contents(chain).expect("read the chain")
    }

    /// Everything an image reads through the backing files its header names.
    pub fn read_image(&self, path: &str) -> Vec<u8> {
        let w = self.world();
        let chain = w.chain_of(path).expect("an image");
        w.contents(&chain).expect("read the image")
    }

    /// Drops a bitmap behind standby's back, as an operator's `qemu-img bitmap --remove` does.
    pub fn drop_bitmap(&self, path: &str, name: &str) {
        self.world().image_mut(path).expect("an image").bitmaps.remove(name);
    }

    pub fn bitmap_names(&self, path: &str) -> Vec<String> {
        self.world().image(path).map(|i| i.bitmaps.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn files(&self) -> Vec<String> {
        self.world().files.keys().cloned().collect()
    }

    pub fn exports(&self) -> Vec<String> {
        self.world().exports.keys().cloned().collect()
    }

    /// The disk chains a running VM has, top first.
    pub fn vm_chains(&self, vm: &str) -> Option<Vec<Chain>> {
        self.world().vms.get(vm).map(|v| v.disks.clone())
    }

    pub fn calls(&self) -> Vec<String> {
        self.world().calls.clone()
    }

    /// The QEMU of `vm` dies (the host lost power under it): its bitmaps are inconsistent.
    pub fn crash_vm(&self, vm: &str) {
        let mut w = self.world();
        if let Some(v) = w.vms.remove(vm) {
            for chain in v.disks {
                for layer in &chain.layers {
                    if let Ok(img) = w.image_mut(&layer.path) {
                        for b in img.bitmaps.values_mut().filter(|b| b.enabled) {
                            b.inconsistent = true;
                        }
                    }
                }
            }
        }
    }

    fn stop_vm(&self, vm: &str, clean: bool) -> Result<()> {
        if !clean {
            self.crash_vm(vm);
            return Ok(());
        }
        self.world().vms.remove(vm).map(drop).ok_or_else(|| HostError::NotRunning(vm.into()))
    }
}

fn bitmap_infos(img: &Image, in_use: bool) -> Vec<BitmapInfo> {
    img.bitmaps
        .iter()
        .map(|(n, b)| BitmapInfo { name: n.clone(), in_use: b.inconsistent || in_use, enabled: b.enabled })
        .collect()
}

fn merge_extents(flags: impl Iterator<Item = (u64, u32)>, offset: u64, end: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (c, f) in flags {
        let start = (c * CLUSTER).max(offset);
        let stop = ((c + 1) * CLUSTER).min(end);
        match out.last_mut() {
            Some(e) if e.flags == f && e.offset + e.length == start => e.length += stop - start,
            _ => out.push(Extent { offset: start, length: stop - start, flags: f }),
        }
    }
    out
}

/// A connection to an export: reads and writes the world as they happen.
#[derive(Debug)]
struct FakeStream {
    world: Arc<Mutex<World>>,
    export: Export,
    contexts: Vec<String>,
    size: u64,
}

impl FakeStream {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(e: HostError) -> NbdError {
        NbdError::Protocol(e.to_string())
    }
}

impl BlockStream for FakeStream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
        self.world().read(&self.export.chain, offset, buf).map_err(Self::fail)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError> {
        if !self.export.writable {
            return Err(NbdError::ReadOnly);
        }
        self.world().write(&self.export.chain, offset, data).map_err(Self::fail)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        self.write(offset, &vec![0; len as usize])
    }

    fn flush(&mut self) -> std::result::Result<(), NbdError> {
        Ok(())
    }

    fn block_status(&mut self, context: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError> {
        if !self.contexts.iter().any(|c| c == context) {
            return Err(NbdError::NoContext(context.into()));
        }
        let end = (offset + len).min(self.size);
        let clusters = offset / CLUSTER..end.div_ceil(CLUSTER);
        let w = self.world();
        let chain = &self.export.chain;
        let flags: Vec<(u64, u32)> = if let Some(name) = context.strip_prefix("qemu:dirty-bitmap:") {
            if self.export.bitmap.as_deref() != Some(name) {
                return Err(NbdError::NoContext(context.into()));
            }
            let img = w.image(&chain.layers[0].path).map_err(Self::fail)?;
            let b = img.bitmaps.get(name).ok_or_else(|| NbdError::NoContext(context.into()))?;
            clusters.map(|c| (c, u32::from(b.dirty.contains(&c)))).collect()
        } else {
            let depth = |c| w.read_cluster(chain, c).map(|(_, d)| d).map_err(Self::fail);
            match context {
                "base:allocation" => clusters
                    .map(|c| Ok((c, if depth(c)? == 0 { 3 } else { 0 })))
                    .collect::<std::result::Result<_, NbdError>>()?,
                "qemu:allocation-depth" => {
                    clusters.map(|c| Ok((c, depth(c)?))).collect::<std::result::Result<_, NbdError>>()?
                }
                _ => return Err(NbdError::NoContext(context.into())),
            }
        };
        Ok(merge_extents(flags.into_iter(), offset, end))
    }

    fn disconnect(self: Box<Self>) -> std::result::Result<(), NbdError> {
        Ok(())
    }
}

/// A run's hold on a fake VM's disks. Views are frozen copies taken at `open_views`.
#[derive(Debug)]
struct FakeDisks {
    host: FakeHost,
    vm: String,
    running: bool,
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

fn no_bitmap(name: &str) -> HostError {
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
            views.push(View { address: NbdAddress { socket: format!("fake:{id}") }, export: id, bitmap: exported });
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

impl Host for FakeHost {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Storage for FakeHost {
    fn ensure_dir(&self, dir: &str) -> Result<()> {
        if !dir.starts_with('/') {
            return Err(invalid(format!("{dir} is not an absolute path")));
        }
        let mut w = self.call("ensure_dir");
        let mut d = dir.trim_end_matches('/').to_owned();
        while !d.is_empty() {
            w.dirs.insert(d.clone());
            d = parent(&d).trim_end_matches('/').to_owned();
        }
        Ok(())
    }

    fn canonical_dir(&self, dir: &str) -> Result<String> {
        let d = dir.trim_end_matches('/');
        match self.world().dirs.contains(d) {
            true => Ok(d.into()),
            false => Err(invalid(format!("{dir} is not a directory"))),
        }
    }

    fn create_file_new(&self, path: &str, content: &str) -> Result<bool> {
        let mut w = self.call("create_file_new");
        if w.files.contains_key(path) {
            return Ok(false);
        }
        w.files.insert(path.into(), Entry::Text(content.into()));
        Ok(true)
    }

    fn read_small_file(&self, path: &str) -> Result<Option<String>> {
        Ok(match self.world().files.get(path) {
            Some(Entry::Text(t)) => Some(t.clone()),
            Some(Entry::Image(_)) => Some(String::new()),
            None => None,
        })
    }

    fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        let w = self.world();
        let d = dir.trim_end_matches('/');
        let files = w.files.keys().chain(w.dirs.iter()).filter(|p| parent(p) == d);
        let mut names: Vec<String> = files.map(|p| p.rsplit('/').next().unwrap_or_default().to_owned()).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn file_exists(&self, path: &str) -> Result<bool> {
        let w = self.world();
        Ok(w.files.contains_key(path) || w.dirs.contains(path))
    }

    fn remove_file(&self, path: &str) -> Result<()> {
        self.call(&format!("remove_file {path}")).files.remove(path);
        Ok(())
    }

    fn remove_empty_dir(&self, dir: &str) -> Result<bool> {
        let mut w = self.call("remove_empty_dir");
        let d = dir.trim_end_matches('/');
        if w.files.keys().chain(w.dirs.iter()).any(|p| parent(p) == d) {
            return Ok(false);
        }
        w.dirs.remove(d);
        Ok(true)
    }

    fn sync_file(&self, path: &str) -> Result<()> {
        match self.file_exists(path)? {
            true => Ok(()),
            false => Err(invalid(format!("cannot sync {path}: no such file"))),
        }
    }

    fn image_info(&self, path: &str, format: Format, _shared: bool) -> Result<ImageInfo> {
        let w = self.world();
        let img = w.image(path)?;
        if img.format != format {
            return Err(invalid(format!("{path} is {}, not {}", img.format.as_str(), format.as_str())));
        }
        let in_use = w.vms.values().any(|v| v.disks.iter().any(|c| c.layers[0].path == path));
        Ok(ImageInfo {
            format,
            virtual_size: img.size,
            bitmaps: bitmap_infos(img, in_use),
            backing_filename: img.backing.clone(),
        })
    }

    fn image_probe(&self, path: &str) -> Result<ImageInfo> {
        let format = self.world().image(path)?.format;
        self.image_info(path, format, true)
    }

    fn image_create(&self, path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
        let mut w = self.call(&format!("image_create {path}"));
        if let Some((b, _)) = backing {
            w.image(b)?;
        }
        if !w.dirs.contains(parent(path)) {
            return Err(invalid(format!("cannot create {path}: no directory")));
        }
        let mut img = Image::new(Format::Qcow2, size);
        img.backing = backing.map(|(b, _)| b.to_owned());
        w.files.insert(path.into(), Entry::Image(img));
        Ok(())
    }

    fn image_allocated(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        let w = self.world();
        let img = w.image(path)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &c in img.clusters.keys() {
            match out.last_mut() {
                Some(r) if r.0 + r.1 == c * CLUSTER => r.1 += CLUSTER,
                _ => out.push((c * CLUSTER, CLUSTER)),
            }
        }
        Ok(out)
    }

    fn image_bitmap(&self, path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()> {
        let mut w = self.call(&format!("image_bitmap {name}"));
        let img = w.image_mut(path)?;
        if img.format != format || format != Format::Qcow2 {
            return Err(invalid(format!("{path} holds no bitmaps")));
        }
        let bs = &mut img.bitmaps;
        match op {
            BitmapOp::Add if bs.contains_key(name) => return Err(invalid(format!("bitmap {name} exists"))),
            BitmapOp::Add => drop(bs.insert(name.into(), Bitmap { enabled: true, ..Bitmap::default() })),
            BitmapOp::Remove => drop(bs.remove(name).ok_or_else(|| no_bitmap(name))?),
            BitmapOp::Enable => bs.get_mut(name).ok_or_else(|| no_bitmap(name))?.enabled = true,
            BitmapOp::Disable => bs.get_mut(name).ok_or_else(|| no_bitmap(name))?.enabled = false,
            BitmapOp::MergeFrom(src) => {
                let add = bs.get(src).ok_or_else(|| no_bitmap(src))?.dirty.clone();
                bs.get_mut(name).ok_or_else(|| no_bitmap(name))?.dirty.extend(add);
            }
        }
        Ok(())
    }

    fn image_commit(&self, chain: &Chain) -> Result<()> {
        let mut w = self.call("image_commit");
        let top = w.image(&chain.layers[0].path)?.clone();
        let below = Chain { layers: chain.layers[1..].to_vec() };
        for (c, data) in top.clusters {
            w.write(&below, c * CLUSTER, &data)?;
        }
        Ok(())
    }

    fn image_set_backing_name(&self, path: &str, backing: Option<&str>) -> Result<()> {
        self.call("image_set_backing_name").image_mut(path)?.backing = backing.map(str::to_owned);
        Ok(())
    }

    fn image_flatten(&self, chain: &Chain) -> Result<()> {
        let mut w = self.call("image_flatten");
        let size = w.size(chain)?;
        let mut clusters = BTreeMap::new();
        for c in 0..size.div_ceil(CLUSTER) {
            if let (data, 1..) = w.read_cluster(chain, c)? {
                clusters.insert(c, data);
            }
        }
        let top = w.image_mut(&chain.layers[0].path)?;
        top.clusters = clusters;
        top.backing = None;
        Ok(())
    }

    fn image_compare(&self, a: &Chain, b: &Chain) -> Result<bool> {
        let w = self.call("image_compare");
        Ok(w.contents(a)? == w.contents(b)?)
    }
}

impl VmDriver for FakeHost {
    /// Any NIC model; a kernel and an initrd must be files of this host.
    fn check_config(&self, config: &VmConfig) -> Result<()> {
        let d = &config.driver;
        for (arg, path) in [("--kernel", &d.kernel), ("--initrd", &d.initrd)] {
            if let Some(p) = path {
                if !self.file_exists(p)? {
                    return Err(HostError::BadConfig { arg, why: format!("{p} does not exist") });
                }
            }
        }
        Ok(())
    }

    fn vm_start(&self, vm: &VmLaunch) -> Result<()> {
        let mut w = self.call(&format!("vm_start {}", vm.name));
        if w.vms.contains_key(&vm.name) {
            return Err(HostError::StartFailed { vm: vm.name.clone(), detail: "already running".into() });
        }
        let disks = vm
            .disks
            .iter()
            .map(|d| match d {
                DiskSource::Image { path, .. } => w.chain_of(path),
                DiskSource::Chain(c) => {
                    c.layers.iter().try_for_each(|l| w.image(&l.path).map(drop)).map(|()| c.clone())
                }
            })
            .collect::<Result<Vec<_>>>()?;
        w.next_pid += 1;
        let pid = w.next_pid;
        w.vms.insert(vm.name.clone(), Vm { pid, paused: false, disks });
        Ok(())
    }

    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime> {
        Ok(match self.world().vms.get(vm) {
            Some(v) => VmRuntime::Running { pid: v.pid },
            None => VmRuntime::Stopped,
        })
    }

    fn vm_powerdown(&self, vm: &str) -> Result<()> {
        self.note(&format!("vm_powerdown {vm}"));
        self.stop_vm(vm, true)
    }

    fn vm_quit(&self, vm: &str) -> Result<()> {
        self.note(&format!("vm_quit {vm}"));
        self.stop_vm(vm, true)
    }

    fn vm_pause(&self, vm: &str) -> Result<()> {
        let mut w = self.call("vm_pause");
        w.vms.get_mut(vm).map(|v| v.paused = true).ok_or_else(|| HostError::NotRunning(vm.into()))
    }

    fn vm_resume(&self, vm: &str) -> Result<()> {
        let mut w = self.call("vm_resume");
        w.vms.get_mut(vm).map(|v| v.paused = false).ok_or_else(|| HostError::NotRunning(vm.into()))
    }

    fn vm_paused(&self, vm: &str) -> Result<bool> {
        Ok(self.world().vm(vm)?.paused)
    }

    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>> {
        let w = self.world();
        Ok(w.vm(vm)?.disks.iter().take(disks).map(|c| c.layers[0].path.clone()).collect())
    }

    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()> {
        let mut w = self.call("vm_protect");
        for (file, _) in new_tops {
            w.image(file)?;
        }
        let v = w.vms.get_mut(vm).ok_or_else(|| HostError::NotRunning(vm.into()))?;
        for (chain, (file, _)) in v.disks.iter_mut().zip(new_tops) {
            *chain = chain.with_top(file);
        }
        Ok(())
    }

    fn vm_flatten(&self, vm: &str, disks: usize, _timeout: Duration) -> Result<()> {
        let chains = self.world().vm(vm)?.disks.clone();
        for chain in chains.iter().take(disks) {
            self.image_flatten(chain)?;
        }
        let mut w = self.world();
        let v = w.vms.get_mut(vm).ok_or_else(|| HostError::NotRunning(vm.into()))?;
        for chain in v.disks.iter_mut().take(disks) {
            *chain = Chain::single(&chain.layers[0].path, Format::Qcow2);
        }
        Ok(())
    }

    fn vm_disks<'a>(&'a self, vm: &str, running: bool) -> Result<Box<dyn DiskAccess + 'a>> {
        if running {
            self.world().vm(vm)?;
        }
        Ok(Box::new(FakeDisks { host: self.clone(), vm: vm.into(), running }))
    }

    fn vm_kill(&self, vm: &str) -> Result<()> {
        self.note(&format!("vm_kill {vm}"));
        self.stop_vm(vm, false)
    }

    fn vm_console(&self, _vm: &str, _from: u64) -> Result<(Vec<u8>, u64)> {
        Ok((Vec::new(), 0))
    }

    fn vm_scratch_path(&self, vm: &str, file: &str) -> String {
        format!("/fake/run/{vm}/{file}")
    }

    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>> {
        let start = format!("/fake/run/{vm}/{prefix}");
        Ok(self.world().files.keys().filter(|p| p.starts_with(&start)).cloned().collect())
    }

    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    fn probe_accel(&self, _kernel: &str, _initrd: &str) -> Result<Accel> {
        Ok(Accel::Tcg)
    }
}

impl Transport for FakeHost {
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress> {
        let mut w = self.call(&format!("nbd_serve {}", spec.id));
        for l in &spec.chain.layers {
            w.image(&l.path)?;
        }
        let export = Export { chain: spec.chain.clone(), writable: spec.writable, bitmap: spec.bitmap.clone() };
        w.exports.insert(spec.id.clone(), export);
        Ok(NbdAddress { socket: format!("fake:{}", spec.id) })
    }

    fn nbd_connect(&self, _addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<Box<dyn BlockStream>> {
        let w = self.world();
        let e = w.exports.get(export).cloned().ok_or_else(|| invalid(format!("no export {export}")))?;
        let size = w.size(&e.chain)?;
        drop(w);
        let contexts = contexts.iter().map(|c| c.to_string()).collect();
        Ok(Box::new(FakeStream { world: self.world.clone(), export: e, contexts, size }))
    }

    fn nbd_stop_all(&self, prefix: &str) -> Result<usize> {
        let mut w = self.call(&format!("nbd_stop_all {prefix}"));
        let before = w.exports.len();
        w.exports.retain(|id, _| !id.starts_with(prefix));
        Ok(before - w.exports.len())
    }
}
