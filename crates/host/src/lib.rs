//! Every operation on a host (run a VM, read or write a disk image, dirty bitmaps, NBD
//! exports) goes through [`Host`], in DR words: no QMP and no JSON in any signature.
//! Paths in this interface are strings that mean something on the named host only;
//! process handles never leave it. [`LocalHost`] runs everything on this machine with
//! QEMU (its monitor side is `live.rs`); a network agent will implement the same trait.

pub mod libvirt;
mod live;
mod local;
mod nic;
mod state_file;
mod swtpm;
pub mod transfer;
pub mod views;

use std::fmt::Debug;
use std::io::{Read, Write};
use std::time::Duration;

use standby_nbd::{Extent, NbdError};

pub use standby_model::image::{Accel, BitmapInfo, BitmapOp, Chain, DiskSource, Format, ImageInfo, Layer};
pub use standby_model::VmConfig;
use standby_qemu::QemuError;

pub use libvirt::LibvirtHost;
pub use live::{fleece_prefix, serve_prefix};
pub use local::LocalHost;
pub use standby_qemu::machine::{OVMF_CODE, OVMF_VARS};
pub use views::{BitmapState, DiskAccess, SourceDisk, View};

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
    /// A VM configuration this driver cannot run; `arg` is the option at fault.
    #[error("{why}")]
    BadConfig { arg: &'static str, why: String },
    #[error("VM {vm}: its monitor")]
    Monitor { vm: String, source: QemuError },
    #[error("VM {vm}: QEMU does not report its disk {disk}; was the VM started by standby with its disks?")]
    DiskMissing { vm: String, disk: usize },
    #[error("VM {vm}: {what} did not finish within {secs} s; see `standby vm console {vm}` and the host's load")]
    Timeout { vm: String, what: String, secs: u64 },
    #[error("VM {vm}: block job {job} failed: {error}")]
    JobFailed { vm: String, job: String, error: String },
    #[error(
        "VM {vm}: the point-in-time view's copy job {job} stopped ({error}), so the view may have read data written \
         after its instant; nothing read from it is kept. Free space for the VM's scratch files and run again"
    )]
    ViewBroken { vm: String, job: String, error: String },
    #[error("{0}")]
    Invalid(String),
    /// The VM's guest agent did not do what was asked (or did not answer in time).
    #[error("VM {vm}: {source}")]
    Agent { vm: String, source: standby_qemu::guest_agent::AgentError },
    /// A call to a libvirt daemon failed; `hint` says what to do when the failure tells.
    #[error("libvirt at {uri}: {what}: {detail}{hint}")]
    Libvirt { uri: String, what: String, detail: String, hint: String },
    /// What went wrong on, or on the way to, a host reached through its agent.
    #[error("host {host}: {detail}")]
    Remote { host: String, detail: String },
    /// A transfer's link stayed down longer than its retry window.
    #[error(
        "one host could not reach the other for {secs} s, longer than the job's retry window ({detail}); \
         bring the link (or the agent) back and run again"
    )]
    LinkDown { secs: u64, detail: String },
    /// The host's agent could not be reached at all (no route, no answer, nothing
    /// listening): the one failure a site loss looks like.
    #[error("host {host} is unreachable: {detail}")]
    Unreachable { host: String, detail: String },
}

pub type Result<T> = std::result::Result<T, HostError>;

/// The largest UEFI variable store standby reads (OVMF's are 128 KiB and 528 KiB); small
/// enough to travel whole in one agent message.
pub const MAX_VARS_FILE: u64 = 2 << 20;

/// What a host needs to run a VM: its configuration, carried whole, and its disks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmLaunch {
    pub name: String,
    pub config: VmConfig,
    pub disks: Vec<DiskSource>,
}

/// How a command the guest agent ran in the guest ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestExit {
    pub code: i32,
    /// What it printed, as the agent captured it.
    pub output: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmRuntime {
    Running { pid: u32 },
    Stopped,
}

/// A connection to a served disk (the transport seam): what a transfer reads, writes and
/// asks block status of. QEMU's hosts serve NBD and this is an NBD client; a fake host
/// serves from memory.
pub trait BlockStream: Send + Debug {
    fn size(&self) -> u64;
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError>;
    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError>;
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError>;
    /// Makes every write so far durable on the serving side.
    fn flush(&mut self) -> std::result::Result<(), NbdError>;
    /// Extents of `context` (`base:allocation`, `qemu:allocation-depth`,
    /// `qemu:dirty-bitmap:NAME`) covering `offset..offset + len`.
    fn block_status(&mut self, context: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError>;
    /// A digest of each `block`-sized piece of `offset..offset + len`, computed where the
    /// data is, when that is elsewhere: a comparison then moves digests instead of blocks.
    /// None where reading the blocks costs no more than hashing them (a local disk).
    fn digests(&mut self, _offset: u64, _len: u64, _block: u64) -> std::result::Result<Option<Vec<String>>, NbdError> {
        Ok(None)
    }
    fn disconnect(self: Box<Self>) -> std::result::Result<(), NbdError>;
}

impl<S: Read + Write + Send + Debug> BlockStream for standby_nbd::Client<S> {
    fn size(&self) -> u64 {
        standby_nbd::Client::size(self)
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
        standby_nbd::Client::read(self, offset, buf)
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError> {
        standby_nbd::Client::write(self, offset, data)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        standby_nbd::Client::write_zeroes(self, offset, len)
    }
    fn flush(&mut self) -> std::result::Result<(), NbdError> {
        standby_nbd::Client::flush(self)
    }
    fn block_status(&mut self, context: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError> {
        standby_nbd::Client::block_status(self, context, offset, len)
    }
    fn disconnect(self: Box<Self>) -> std::result::Result<(), NbdError> {
        standby_nbd::Client::disconnect(*self)
    }
}

/// Where an NBD server listens, as the host hands it out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NbdAddress {
    /// A unix socket on the host that serves it.
    pub socket: String,
    /// The agent that serves it to other hosts, for a host reached over the network;
    /// None on this process's own hosts.
    #[serde(default)]
    pub agent: Option<AgentAddress>,
}

/// An agent as its peers reach it: the host's name (its certificate's) and `IP:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentAddress {
    pub host: String,
    pub address: String,
}

/// One side of a transfer: a served disk, and the block-status contexts it is read with.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Endpoint {
    pub address: NbdAddress,
    pub export: String,
    pub contexts: Vec<String>,
}

/// What `nbd_serve` should publish.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

/// A host: one machine standby reaches, by name, through three seams of its own.
pub trait Host: Storage + VmDriver + Transport + Debug + Send + Sync {
    fn name(&self) -> &str;
    /// When this process last had an answer from the host, for a host reached over the
    /// network (its silence, if one was recorded, ended then); None for the hosts this
    /// process drives itself, which cannot go silent.
    fn last_answer(&self) -> Option<std::time::SystemTime> {
        None
    }
}

/// Files and images on a host: directories, small files, image headers, layers and their
/// chains, persistent bitmaps of closed images.
pub trait Storage {
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
    /// A VM's state file beside its disks (a UEFI variable store, or a restore point's
    /// copy of one or of a TPM's state), whole (at most `MAX_VARS_FILE`).
    fn read_vm_state(&self, _path: &str) -> Result<Vec<u8>> {
        Err(HostError::Invalid("this host keeps no UEFI variable stores or TPM states".into()))
    }
    /// Replaces the state file at `path` with `data`, atomically (a crash leaves the old
    /// one or the new one) and durably, owner-only.
    fn write_vm_state(&self, _path: &str, _data: &[u8]) -> Result<()> {
        Err(HostError::Invalid("this host keeps no UEFI variable stores or TPM states".into()))
    }
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
    /// Copies the chain's content into a new standalone qcow2 image at `dst`; refused,
    /// changing nothing, when `dst` exists.
    fn image_copy(&self, chain: &Chain, dst: &str) -> Result<()>;
}

/// The VMs of a host, in DR verbs: start one from a disk chain, its status and console,
/// shut it down or end it, pause it, a protective point, a live flatten, and a run's hold
/// on its disks.
pub trait VmDriver {
    /// Checks the driver's part of a VM's configuration (device models, boot files)
    /// before it is stored: a VM standby accepts is one this host can start.
    fn check_config(&self, config: &VmConfig) -> Result<()>;
    fn vm_start(&self, vm: &VmLaunch) -> Result<()>;
    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime>;
    /// Asks the guest to shut down (ACPI power button).
    fn vm_powerdown(&self, vm: &str) -> Result<()>;
    /// Asks the VM to end now, flushing its images and writing persistent bitmaps.
    fn vm_quit(&self, vm: &str) -> Result<()>;
    /// Stops the guest's CPUs; its images are flushed and written by nothing until resumed.
    fn vm_pause(&self, vm: &str) -> Result<()>;
    fn vm_resume(&self, vm: &str) -> Result<()>;
    /// Whether a running VM's guest is paused.
    fn vm_paused(&self, vm: &str) -> Result<bool>;
    /// The file each of a running VM's first `disks` disks writes to now.
    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>>;
    /// A protective point on a running VM, all disks at one instant: disk `i` writes to
    /// `new_tops[i].0` from now on (an image over its current top, created beforehand, so
    /// that standby sets its mode); `new_tops[i].1` tells the new layers apart.
    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()>;
    /// Makes each of a running VM's disks standalone while it runs (every layer below its
    /// top pulled into the top), waiting at most `timeout`.
    fn vm_flatten(&self, vm: &str, disks: usize, timeout: Duration) -> Result<()>;
    /// A run's hold on the VM's disks: through the running VM when `running`, on its closed
    /// images otherwise (the caller knows which it is and keeps it so while it holds this).
    fn vm_disks<'a>(&'a self, vm: &str, running: bool) -> Result<Box<dyn DiskAccess + 'a>>;
    /// Ends the VM's QEMU process at once: the last resort after `quit` failed. Ok only
    /// when the process is gone; `StillRunning` names it otherwise.
    fn vm_kill(&self, vm: &str) -> Result<()>;
    /// Console output from byte `from`, at most 1 MiB of it; returns the bytes and the next
    /// offset (empty at the end of the log).
    fn vm_console(&self, vm: &str, from: u64) -> Result<(Vec<u8>, u64)>;
    /// Whether this driver can run a replica of a VM of this kind (a libvirt domain's needs
    /// a libvirt host; standby's own driver's, a host of standby's own driver).
    fn can_run(&self, config: &VmConfig) -> Result<()> {
        match config.driver.domain_xml {
            Some(_) => Err(HostError::BadConfig {
                arg: "--host",
                why: "it is a libvirt domain, and this host is not driven by libvirt; give the job a DR host added \
                      with `standby host add NAME --libvirt URI`"
                    .into(),
            }),
            None => Ok(()),
        }
    }
    /// Whether the host starts the VM when it boots, before this call (None: this driver
    /// has no such setting); changed to `on` when given.
    fn vm_autostart(&self, _vm: &str, _on: Option<bool>) -> Result<Option<bool>> {
        Ok(None)
    }
    /// Whether the VM is still as standby registered it, where its management layer may
    /// change it behind standby's back (libvirt: `virsh attach-disk`, an added TPM): an
    /// error names what changed, since a restore point would silently miss it.
    fn vm_unchanged(&self, _vm: &VmLaunch) -> Result<()> {
        Ok(())
    }
    /// Whether the host's management layer holds a definition of a VM of this name
    /// (libvirt: a domain, whoever defined it); standby's own driver keeps none.
    fn vm_defined(&self, _vm: &str) -> Result<bool> {
        Ok(false)
    }
    /// Drops the host's own definition of a VM standby defined (libvirt: undefines the
    /// domain, which must be off); a definition standby did not make stays. Idempotent.
    fn vm_forget(&self, _vm: &str) -> Result<()> {
        Ok(())
    }
    /// The networks (or `bridge:NAME`) a configuration's NICs are on, as `--network-map`
    /// names them; none for NICs that reach no network the map could name.
    fn config_networks(&self, _config: &VmConfig) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Whether a replica's NIC can go on `network` (as `--network-map` names it) here:
    /// an error says why not.
    fn check_network(&self, _network: &str) -> Result<()> {
        Ok(())
    }
    /// The persistent state of the VM's TPM now (swtpm's state file), None while its TPM
    /// has none (it never started). Asked of a VM that is off or whose CPUs are stopped.
    fn vm_tpm_state(&self, vm: &VmLaunch) -> Result<Option<Vec<u8>>> {
        Err(HostError::Invalid(format!("VM {} has a TPM, and this host keeps no TPM state", vm.name)))
    }
    /// Gives the VM's TPM `state` (None: a new TPM's) from its next start on; the VM is
    /// off. A VM this host defines at its start (a libvirt replica, a failback's new VM)
    /// gets it when it is defined.
    fn vm_set_tpm_state(&self, vm: &VmLaunch, _state: Option<&[u8]>) -> Result<()> {
        Err(HostError::Invalid(format!("VM {} has a TPM, and this host keeps no TPM state", vm.name)))
    }
    /// Reads a VM this host's management layer already runs, for `vm import`; changes
    /// nothing.
    fn vm_describe(&self, domain: &str) -> Result<libvirt::Imported> {
        Err(HostError::BadConfig {
            arg: "--host",
            why: format!(
                "this host is not driven by libvirt, so it has no domain {domain} to import; add one with \
                 `standby host add NAME --libvirt qemu:///system`"
            ),
        })
    }
    /// Freezes a running guest's filesystems through its qemu-guest-agent, waiting at most
    /// `timeout`; how many it froze, or None when the VM has no agent channel. The freeze
    /// lasts until [`VmDriver::guest_thaw`]: the guest writes nothing to a frozen
    /// filesystem, so whoever freezes must thaw, whatever happens in between.
    fn guest_freeze(&self, _vm: &str, _timeout: Duration) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Whether the running guest's filesystems are frozen, as its agent says, asked within
    /// `timeout` (a few seconds at most: a guest without an agent is told apart quickly);
    /// None without a channel.
    fn guest_frozen(&self, _vm: &str, _timeout: Duration) -> Result<Option<bool>> {
        Ok(None)
    }
    /// Thaws them; how many were frozen (0 when none was), None without a channel. An
    /// agent still busy with a freeze that timed out answers once the freeze is done.
    fn guest_thaw(&self, _vm: &str, _timeout: Duration) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Runs `command` with the guest's `/bin/sh -c` through its agent and waits at most
    /// `timeout` for it to end; None without a channel.
    fn guest_exec(&self, _vm: &str, _command: &str, _timeout: Duration) -> Result<Option<GuestExit>> {
        Ok(None)
    }
    /// Every scratch file of the VM whose name starts with `prefix`.
    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>>;
    /// Which accelerator VMs start with here.
    fn accel(&self) -> Accel;
    /// Boots `kernel` + `initrd` (a guest that prints `STANDBY-GUEST up` on its serial
    /// console) under KVM; records and returns the accelerator later VMs get.
    fn probe_accel(&self, kernel: &str, initrd: &str) -> Result<Accel>;
}

/// Block streams between hosts: serving a chain, connecting to one, and carrying out a
/// transfer plan next to the destination's data.
pub trait Transport: Sync {
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress>;
    fn nbd_connect(&self, addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<Box<dyn BlockStream>>;
    fn connect(&self, end: &Endpoint) -> Result<Box<dyn BlockStream>> {
        let contexts: Vec<&str> = end.contexts.iter().map(String::as_str).collect();
        self.nbd_connect(&end.address, &end.export, &contexts)
    }
    /// Carries out `plan` from `src` into `dst` here, on the host that holds `dst`: a host
    /// reached over the network runs it next to its data, and the bytes go from source to
    /// destination directly, as `wire` says. `report` follows it. This process's hosts
    /// (and the fake) run it right here, with no wire.
    fn transfer(
        &self,
        plan: &transfer::Plan,
        src: &Endpoint,
        dst: &Endpoint,
        _wire: &transfer::Wire,
        report: &(dyn Fn(transfer::Moved) + Sync),
    ) -> Result<transfer::Stats> {
        let report = |done, total| report(transfer::Moved { done, total, ..Default::default() });
        transfer::execute(plan, &|| Ok((self.connect(src)?, self.connect(dst)?)), &report)
    }
    /// Stops every standby NBD server whose id starts with `prefix`; returns how many ran.
    /// A server whose process outlives SIGKILL is an error, and its files are kept.
    fn nbd_stop_all(&self, prefix: &str) -> Result<usize>;
}
