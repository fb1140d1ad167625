//! Every operation on a host (run a VM, read or write a disk image, dirty bitmaps, NBD
//! exports) goes through [`Host`]. Paths in this interface are strings that mean something
//! on the named host only; process handles never leave it. [`LocalHost`] runs everything on
//! this machine; a network agent will implement the same trait.

mod local;
pub mod views;

use std::fmt::Debug;
use std::io::{Read, Write};

use serde_json::Value;
pub use standby_qemu::chain::{Chain, Format, Layer};
pub use standby_qemu::img::{BitmapInfo, BitmapOp, ImageInfo};
pub use standby_qemu::machine::{Accel, DiskSource};
pub use standby_qemu::QemuError;

pub use local::LocalHost;

/// Makes every file and socket this process and the programs it starts create (QEMU, its
/// QMP sockets and overlays, `qemu-img` layers, `qemu-nbd` sockets) owner-only. Restore
/// points hold whole disks and the monitors control VMs: nobody else may read or reach
/// them, whatever umask the operator's shell had. Process-wide, so call it first.
pub fn restrict_new_file_modes() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Nbd(#[from] standby_nbd::NbdError),
    #[error("{what} {path}")]
    Io { what: String, path: String, source: std::io::Error },
    #[error("VM {0} is not running")]
    NotRunning(String),
    #[error("VM {vm} did not start: {detail}")]
    StartFailed { vm: String, detail: String },
    #[error(
        "VM {vm} is still running as process {pid} after SIGKILL, so it is not off and nothing was deleted; \
         find out why it does not exit (`cat /proc/{pid}/status`), end it, and run the command again"
    )]
    StillRunning { vm: String, pid: u32 },
    #[error(
        "NBD server {id} is still running as process {pid} after SIGKILL; end it \
         (`cat /proc/{pid}/status` says why it does not exit) and run the command again"
    )]
    NbdStillRunning { id: String, pid: u32 },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, HostError>;

/// Each of a running VM's first `disks` disks: its top node and the file it writes to, as
/// QEMU reports them (the device of disk `i` is `vd<i>`).
fn block_tops(qmp: &mut dyn QmpChannel, disks: usize) -> Result<Vec<(String, String)>> {
    let blocks = qmp.execute("query-block", serde_json::json!({}))?;
    (0..disks)
        .map(|i| {
            let qdev = format!("/vd{i}/");
            blocks
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(&qdev))))
                .and_then(|b| {
                    Some((b["inserted"]["node-name"].as_str()?.to_owned(), b["inserted"]["file"].as_str()?.to_owned()))
                })
                .ok_or_else(|| HostError::Invalid(format!("QEMU does not report disk {i}")))
        })
        .collect()
}

/// What a host needs to run a VM.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<DiskSource>,
    pub nics: Vec<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRuntime {
    Running { pid: u32 },
    Stopped,
}

/// The node name QMP uses for a VM's disk `idx`: the same on every host.
pub fn disk_node(idx: usize) -> String {
    format!("disk{idx}")
}

/// A running VM's monitor.
pub trait QmpChannel: Debug + Send {
    fn execute(&mut self, command: &str, arguments: Value) -> std::result::Result<Value, QemuError>;
}

/// A byte stream to an NBD server on a host.
pub trait NbdStream: Read + Write + Send + Debug {}
impl<T: Read + Write + Send + Debug> NbdStream for T {}

pub type NbdClient = standby_nbd::Client<Box<dyn NbdStream>>;

/// Where an NBD server listens, as the host hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddress {
    pub socket: String,
}

/// What `nbd_serve` should publish.
#[derive(Debug, Clone)]
pub struct ServeSpec {
    /// Names the server; also how leftovers are found after a crash (see `nbd_stop_all`).
    pub id: String,
    pub chain: Chain,
    pub writable: bool,
    pub bitmap: Option<String>,
    /// Read and write past the page cache: for whole-disk comparisons, which would
    /// otherwise evict the host's working set and pay one more copy per byte.
    pub direct: bool,
}

pub trait Host: Debug + Send + Sync {
    fn name(&self) -> &str;

    // ---- files and images ----
    /// Creates `dir` if needed and proves it writable.
    fn ensure_dir(&self, dir: &str) -> Result<()>;
    /// `dir` (which must exist) as this host names it with every symlink, `.`, `..` and
    /// repeated `/` resolved: one directory, one spelling.
    fn canonical_dir(&self, dir: &str) -> Result<String>;
    /// Creates `path` (owner-only) holding `content`; Ok(false), changing nothing, when it
    /// exists already. How a directory is claimed, atomically.
    fn create_file_new(&self, path: &str, content: &str) -> Result<bool>;
    /// A small text file's content (at most 64 KiB), None when it does not exist.
    fn read_small_file(&self, path: &str) -> Result<Option<String>>;
    fn list_dir(&self, dir: &str) -> Result<Vec<String>>;
    fn file_exists(&self, path: &str) -> Result<bool>;
    /// Removes a file; a missing file is not an error.
    fn remove_file(&self, path: &str) -> Result<()>;
    /// Removes a directory if it is empty; a directory still holding files stays (Ok(false)).
    fn remove_empty_dir(&self, dir: &str) -> Result<bool>;
    /// Makes a file's data and its directory entry durable.
    fn sync_file(&self, path: &str) -> Result<()>;
    /// Reads an image's header as the format standby knows it has. `shared` reads one a
    /// running VM holds. No backing file is opened.
    fn image_info(&self, path: &str, format: Format, shared: bool) -> Result<ImageInfo>;
    /// Reads the header of an image whose format nobody stated, guessing it from the
    /// contents: once, when an operator registers a disk; never afterwards.
    fn image_probe(&self, path: &str) -> Result<ImageInfo>;
    /// Creates a qcow2 image, over `backing` (its path and format) if given.
    fn image_create(&self, path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()>;
    /// The ranges a qcow2 layer itself holds, from its metadata (its backing cut off).
    fn image_allocated(&self, path: &str) -> Result<Vec<(u64, u64)>>;
    fn image_bitmap(&self, path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()>;
    fn image_commit(&self, chain: &Chain) -> Result<()>;
    fn image_set_backing_name(&self, path: &str, backing: Option<&str>) -> Result<()>;
    /// Makes the chain's top layer standalone (its lower layers' data copied into it).
    fn image_flatten(&self, chain: &Chain) -> Result<()>;
    /// Whether two chains read the same.
    fn image_compare(&self, a: &Chain, b: &Chain) -> Result<bool>;

    // ---- VMs ----
    fn vm_start(&self, vm: &VmLaunch) -> Result<()>;
    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime>;
    /// The monitor for long operations.
    fn vm_qmp(&self, vm: &str) -> Result<Box<dyn QmpChannel>>;
    /// A second monitor for quick queries, never blocked by a long operation.
    fn vm_status_qmp(&self, vm: &str) -> Result<Box<dyn QmpChannel>>;
    /// Asks the guest to shut down (ACPI power button).
    fn vm_powerdown(&self, vm: &str) -> Result<()> {
        self.vm_status_qmp(vm)?.execute("system_powerdown", serde_json::json!({}))?;
        Ok(())
    }
    /// Asks QEMU to exit now, flushing its images and writing persistent bitmaps.
    fn vm_quit(&self, vm: &str) -> Result<()> {
        self.vm_status_qmp(vm)?.execute("quit", serde_json::json!({}))?;
        Ok(())
    }
    /// Stops the guest's CPUs; its images are flushed and written by nothing until resumed.
    fn vm_pause(&self, vm: &str) -> Result<()> {
        self.vm_status_qmp(vm)?.execute("stop", serde_json::json!({}))?;
        Ok(())
    }
    fn vm_resume(&self, vm: &str) -> Result<()> {
        self.vm_status_qmp(vm)?.execute("cont", serde_json::json!({}))?;
        Ok(())
    }
    /// Whether a running VM's guest is paused.
    fn vm_paused(&self, vm: &str) -> Result<bool> {
        let status = self.vm_status_qmp(vm)?.execute("query-status", serde_json::json!({}))?;
        Ok(status["running"].as_bool() == Some(false) && status["status"] == "paused")
    }
    /// The file each of a running VM's first `disks` disks writes to now.
    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>> {
        Ok(block_tops(self.vm_status_qmp(vm)?.as_mut(), disks)?.into_iter().map(|(_, f)| f).collect())
    }
    /// A protective point on a running VM, all disks at one instant: disk `i` writes to
    /// `new_tops[i].0` from now on (an image over its current top, created beforehand, so
    /// that standby sets its mode); `new_tops[i].1` tells the new layers apart.
    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()> {
        let mut qmp = self.vm_qmp(vm)?;
        let nodes = block_tops(qmp.as_mut(), new_tops.len())?;
        let actions: Vec<Value> = nodes
            .iter()
            .zip(new_tops)
            .enumerate()
            .map(|(i, ((node, _), (file, tag)))| {
                serde_json::json!({"type": "blockdev-snapshot-sync", "data": {
                    "node-name": node, "snapshot-file": file,
                    "snapshot-node-name": format!("{}-g{tag}", disk_node(i)),
                    "format": "qcow2", "mode": "existing"}})
            })
            .collect();
        qmp.execute("transaction", serde_json::json!({ "actions": actions }))?;
        Ok(())
    }
    /// Makes each of a running VM's disks standalone while it runs (every layer below its
    /// top pulled into the top), waiting at most `timeout`.
    fn vm_flatten(&self, vm: &str, disks: usize, timeout: std::time::Duration) -> Result<()> {
        let mut qmp = self.vm_qmp(vm)?;
        for (i, (node, _)) in block_tops(qmp.as_mut(), disks)?.iter().enumerate() {
            qmp.execute("block-stream", serde_json::json!({"device": node, "job-id": format!("flatten-d{i}")}))?;
        }
        let start = std::time::Instant::now();
        loop {
            let jobs = qmp.execute("query-block-jobs", serde_json::json!({}))?;
            let ours = jobs
                .as_array()
                .is_some_and(|a| a.iter().any(|j| j["device"].as_str().is_some_and(|d| d.starts_with("flatten-d"))));
            if !ours {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(HostError::Invalid(format!(
                    "flattening the disks of {vm} did not finish within {} s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    /// Ends the VM's QEMU process at once: the last resort after `quit` failed. Ok only
    /// when the process is gone; `StillRunning` names it otherwise.
    fn vm_kill(&self, vm: &str) -> Result<()>;
    /// Console output from byte `from`, at most 1 MiB of it; returns the bytes and the next
    /// offset (empty at the end of the log).
    fn vm_console(&self, vm: &str, from: u64) -> Result<(Vec<u8>, u64)>;
    /// A path for a temporary file that belongs to the VM's run (fleecing images).
    fn vm_scratch_path(&self, vm: &str, file: &str) -> String;
    /// Every scratch file of the VM whose name starts with `prefix`.
    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>>;
    /// The address a VM's own NBD server listens on, as QMP `nbd-server-start` wants it,
    /// and as `nbd_connect` takes it.
    fn vm_nbd_address(&self, vm: &str) -> (Value, NbdAddress);
    /// Which accelerator VMs start with here.
    fn accel(&self) -> Accel;
    /// Boots `kernel` + `initrd` (a guest that prints `STANDBY-GUEST up` on its serial
    /// console) under KVM; records and returns the accelerator later VMs get.
    fn probe_accel(&self, kernel: &str, initrd: &str) -> Result<Accel>;

    // ---- NBD ----
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress>;
    fn nbd_connect(&self, addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<NbdClient>;
    /// Stops every standby NBD server whose id starts with `prefix`; returns how many ran.
    /// A server whose process outlives SIGKILL is an error, and its files are kept.
    fn nbd_stop_all(&self, prefix: &str) -> Result<usize>;
}
