//! An in-memory host, for engine tests that run in milliseconds: images are maps of 64 KiB
//! clusters with their backing file and dirty bitmaps, VMs are records that "write" only
//! when a test says so ([`FakeHost::guest_write`]), and NBD exports are served without a
//! socket. It keeps the promises of the [`Host`] trait that the engine relies on (a read
//! through a chain is the first layer holding the cluster, a running VM's writes mark its
//! enabled bitmaps, a killed VM leaves its bitmaps inconsistent, a view is frozen at its
//! instant) and nothing more: the real-QEMU tests prove the rest.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use standby_host::{
    Accel, BitmapInfo, BitmapOp, BlockStream, Chain, DiskAccess, DiskSource, Format, GuestExit, Host, HostError,
    ImageInfo, NbdAddress, Result, ServeSpec, Storage, Transport, VmConfig, VmDriver, VmLaunch, VmRuntime,
};

pub const CLUSTER: u64 = 64 << 10;

mod disks;
mod stream;
mod world;

use disks::{no_bitmap, FakeDisks};
use stream::FakeStream;
use world::{invalid, parent, Bitmap, Entry, Export, Image, Vm, World};

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
    /// Whether the VM runs with its guest's filesystems frozen.
    pub fn frozen(&self, vm: &str) -> bool {
        self.world().vms.get(vm).is_some_and(|v| v.frozen)
    }

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

    fn image_copy(&self, chain: &Chain, dst: &str) -> Result<()> {
        let mut w = self.call(&format!("image_copy {dst}"));
        if w.files.contains_key(dst) {
            return Err(invalid(format!("{dst} exists already")));
        }
        if !w.dirs.contains(parent(dst)) {
            return Err(invalid(format!("cannot create {dst}: no directory")));
        }
        let mut img = Image::new(Format::Qcow2, w.size(chain)?);
        for c in 0..img.size.div_ceil(CLUSTER) {
            if let (data, 1..) = w.read_cluster(chain, c)? {
                img.clusters.insert(c, data);
            }
        }
        w.files.insert(dst.into(), Entry::Image(img));
        Ok(())
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
        w.vms.insert(vm.name.clone(), Vm { pid, paused: false, frozen: false, disks });
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

    fn guest_frozen(&self, vm: &str, _timeout: Duration) -> Result<Option<bool>> {
        Ok(Some(self.world().vm(vm)?.frozen))
    }

    /// Every fake guest runs an agent with one filesystem, which answers at once.
    fn guest_freeze(&self, vm: &str, _timeout: Duration) -> Result<Option<u64>> {
        let mut w = self.call("guest_freeze");
        w.vms
            .get_mut(vm)
            .map(|v| Some(u64::from(!std::mem::replace(&mut v.frozen, true))))
            .ok_or_else(|| HostError::NotRunning(vm.into()))
    }

    fn guest_thaw(&self, vm: &str, _timeout: Duration) -> Result<Option<u64>> {
        let mut w = self.call("guest_thaw");
        w.vms
            .get_mut(vm)
            .map(|v| Some(u64::from(std::mem::replace(&mut v.frozen, false))))
            .ok_or_else(|| HostError::NotRunning(vm.into()))
    }

    fn guest_exec(&self, vm: &str, command: &str, _timeout: Duration) -> Result<Option<GuestExit>> {
        self.note(&format!("guest_exec {vm} {command}"));
        self.world().vm(vm)?;
        Ok(Some(GuestExit { code: 0, output: String::new() }))
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
        Ok(NbdAddress { socket: format!("fake:{}", spec.id), agent: None })
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
