//! What goes over an agent connection: one JSON line per request and answer, and after
//! some of them one binary frame (`wire.rs`). The host verbs are those of
//! [`standby_host::Host`], one for one, in owned values; a connection's first request
//! says what it is for: host calls (as many as the controller likes), one run's hold on
//! a VM's disks, one block stream, or one transfer.

use serde::{Deserialize, Serialize};
use standby_host::transfer::{Plan, Stats};
use standby_host::{
    Accel, BitmapState, Chain, Endpoint, Format, HostError, ServeSpec, SourceDisk, View, VmConfig, VmLaunch,
};
use standby_model::ReplicaId;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    /// `controller_pem` is the certificate the controller connects with: the one peer
    /// that may ask this agent for anything.
    Enrol {
        secret: String,
        name: String,
        ca_pem: String,
        controller_pem: String,
    },
    Certificate {
        cert_pem: String,
    },
    Hello,
    /// The authority's revocation list, from the controller: certificates it names are
    /// refused from now on.
    Revocations {
        crl_pem: String,
    },
    /// One host verb; more may follow on the same connection.
    Host {
        call: HostCall,
    },
    /// Opens a run's hold on `vm`'s disks; [`DiskCall`]s follow until the connection ends.
    Disks {
        vm: String,
        running: bool,
    },
    /// Opens a block stream on a served disk of this host; [`StreamCall`]s follow.
    Stream {
        socket: String,
        export: String,
        contexts: Vec<String>,
        codec: Codec,
    },
    /// Carries out a transfer into a disk this host serves; progress lines, then its end.
    Transfer {
        plan: Plan,
        src: Endpoint,
        dst: Endpoint,
        /// The job's compression, bandwidth limit and retry window.
        wire: Wire,
    },
}

/// How block data travels between agents: the job's compression.
pub use standby_host::transfer::Compression as Codec;
use standby_host::transfer::Wire;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(crate) enum Answer {
    Csr {
        csr_pem: String,
    },
    Enrolled {
        version: String,
    },
    Hello {
        name: String,
        version: String,
        accel: Accel,
        /// The fingerprint of the revocation list this agent holds, if any.
        #[serde(default)]
        crl: Option<String>,
        /// The libvirt daemon it drives its VMs through; None for standby's own driver.
        #[serde(default)]
        libvirt: Option<String>,
    },
    Refused {
        why: String,
    },
    /// The revocation list is in place.
    Revoked {},
    /// A call's result, as the JSON of the verb's return type.
    Done {
        value: serde_json::Value,
    },
    Failed {
        error: WireError,
    },
    /// A block stream is open on a disk of `size` bytes.
    Opened {
        size: u64,
    },
    /// Block data follows in one frame: `len` bytes once decoded, `digest` over them.
    Data {
        len: u64,
        digest: String,
    },
    Extents {
        extents: Vec<(u64, u64, u32)>,
    },
    Digests {
        digests: Vec<String>,
    },
    Progress {
        done: u64,
        total: u64,
        /// Bytes on the wire so far, compressed, for `wire_data` bytes of blocks: the live
        /// compression ratio.
        #[serde(default)]
        wire: u64,
        #[serde(default)]
        wire_data: u64,
    },
    Transferred {
        stats: Stats,
        wire_bytes: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub(crate) enum HostCall {
    EnsureDir { dir: String },
    CanonicalDir { dir: String },
    CreateFileNew { path: String, content: String },
    ReadSmallFile { path: String },
    ReadVmState { path: String },
    WriteVmState { path: String, data: Vec<u8> },
    ListDir { dir: String },
    FileExists { path: String },
    RemoveFile { path: String },
    RemoveEmptyDir { dir: String },
    SyncFile { path: String },
    ImageInfo { path: String, format: Format, shared: bool },
    ImageProbe { path: String },
    ImageCreate { path: String, size: u64, backing: Option<(String, Format)> },
    ImageAllocated { path: String },
    ImageBitmap { path: String, format: Format, name: String, op: BitmapOp },
    ImageCommit { chain: Chain },
    ImageSetBackingName { path: String, backing: Option<String> },
    ImageFlatten { chain: Chain },
    ImageCompare { a: Chain, b: Chain },
    ImageCopy { chain: Chain, dst: String },
    CheckConfig { config: VmConfig },
    ConfigNetworks { config: VmConfig },
    CheckNetwork { network: String },
    CanRun { config: VmConfig },
    VmDescribe { domain: String },
    VmAutostart { vm: String, on: Option<bool> },
    VmForget { vm: String },
    VmDefined { vm: String },
    VmUnchanged { vm: VmLaunch },
    VmTpmState { vm: VmLaunch },
    VmSetTpmState { vm: VmLaunch, state: Option<Vec<u8>> },
    VmStart { vm: VmLaunch },
    VmRuntime { vm: String },
    VmPowerdown { vm: String },
    VmQuit { vm: String },
    VmPause { vm: String },
    VmResume { vm: String },
    VmPaused { vm: String },
    VmTopFiles { vm: String, disks: usize },
    VmProtect { vm: String, new_tops: Vec<(String, u32)> },
    VmFlatten { vm: String, disks: usize, timeout_secs: u64 },
    VmKill { vm: String },
    GuestFrozen { vm: String, timeout_ms: u64 },
    GuestFreeze { vm: String, timeout_ms: u64 },
    GuestThaw { vm: String, timeout_ms: u64 },
    GuestExec { vm: String, command: String, timeout_ms: u64 },
    VmConsole { vm: String, from: u64 },
    VmScratchFiles { vm: String, prefix: String },
    Accel,
    ProbeAccel { kernel: String, initrd: String },
    NbdServe { spec: ServeSpec },
    NbdStopAll { prefix: String },
}

/// [`standby_host::BitmapOp`], owned.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum BitmapOp {
    Add,
    Remove,
    Enable,
    Disable,
    MergeFrom(String),
}

impl BitmapOp {
    pub(crate) fn from_host(op: standby_host::BitmapOp<'_>) -> BitmapOp {
        match op {
            standby_host::BitmapOp::Add => BitmapOp::Add,
            standby_host::BitmapOp::Remove => BitmapOp::Remove,
            standby_host::BitmapOp::Enable => BitmapOp::Enable,
            standby_host::BitmapOp::Disable => BitmapOp::Disable,
            standby_host::BitmapOp::MergeFrom(s) => BitmapOp::MergeFrom(s.into()),
        }
    }
    pub(crate) fn as_host(&self) -> standby_host::BitmapOp<'_> {
        match self {
            BitmapOp::Add => standby_host::BitmapOp::Add,
            BitmapOp::Remove => standby_host::BitmapOp::Remove,
            BitmapOp::Enable => standby_host::BitmapOp::Enable,
            BitmapOp::Disable => standby_host::BitmapOp::Disable,
            BitmapOp::MergeFrom(s) => standby_host::BitmapOp::MergeFrom(s),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum DiskCall {
    Bitmaps {
        disk: SourceDisk,
    },
    RemoveBitmap {
        disk: SourceDisk,
        name: String,
    },
    MergeBitmap {
        disk: SourceDisk,
        target: String,
        source: String,
    },
    EnableBitmap {
        disk: SourceDisk,
        name: String,
    },
    OpenViews {
        owner: ReplicaId,
        disks: Vec<SourceDisk>,
        previous: Vec<Option<String>>,
        trusted: Vec<bool>,
        new_bitmap: String,
    },
    CloseViews {
        owner: ReplicaId,
        disk_count: usize,
    },
}

/// The answers of [`DiskCall`]s that return something.
pub(crate) type Bitmaps = Vec<BitmapState>;
pub(crate) type Views = Vec<View>;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum StreamCall {
    Read {
        offset: u64,
        len: u64,
    },
    /// One frame of `len` decoded bytes follows, with `digest` over them.
    Write {
        offset: u64,
        len: u64,
        digest: String,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Flush,
    BlockStatus {
        context: String,
        offset: u64,
        len: u64,
    },
    /// A digest of each `block`-sized piece of `offset..offset + len`, hashed where the
    /// data is: a comparison across hosts moves digests, not blocks.
    Digests {
        offset: u64,
        len: u64,
        block: u64,
    },
    Disconnect,
}

/// A host error as it crosses the wire: the variants the engine decides on keep their
/// shape; the rest travel as their message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum WireError {
    NotRunning { vm: String },
    StillRunning { vm: String, pid: u32 },
    BadConfig { arg: String, why: String },
    ViewBroken { vm: String, job: String, error: String },
    Other { message: String },
}

/// The options of a VM's configuration a driver may refuse (`HostError::BadConfig`).
const CONFIG_ARGS: &[&str] = &["--nic", "--kernel", "--initrd", "--append", "--cpus", "--memory"];

impl WireError {
    pub(crate) fn from_host(e: &HostError) -> WireError {
        match e {
            HostError::NotRunning(vm) => WireError::NotRunning { vm: vm.clone() },
            HostError::StillRunning { vm, pid } => WireError::StillRunning { vm: vm.clone(), pid: *pid },
            HostError::BadConfig { arg, why } => WireError::BadConfig { arg: (*arg).into(), why: why.clone() },
            HostError::ViewBroken { vm, job, error } => {
                WireError::ViewBroken { vm: vm.clone(), job: job.clone(), error: error.clone() }
            }
            e => WireError::Other { message: crate::chain(e) },
        }
    }

    pub(crate) fn into_host(self, host: &str) -> HostError {
        match self {
            WireError::NotRunning { vm } => HostError::NotRunning(vm),
            WireError::StillRunning { vm, pid } => HostError::StillRunning { vm, pid },
            WireError::BadConfig { arg, why } => match CONFIG_ARGS.iter().find(|a| **a == arg) {
                Some(arg) => HostError::BadConfig { arg, why },
                None => HostError::BadConfig { arg: "--config", why },
            },
            WireError::ViewBroken { vm, job, error } => HostError::ViewBroken { vm, job, error },
            WireError::Other { message } => HostError::Remote { host: host.into(), detail: message },
        }
    }
}
