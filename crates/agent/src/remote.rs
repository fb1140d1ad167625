//! A host reached through its agent: [`RemoteHost`] implements [`Host`] by sending each
//! verb to the agent, so the engine takes a remote host exactly as it takes `local`.
//! [`RemoteStream`] is a block stream on a disk another host serves, read and written
//! through that host's agent; a transfer runs on the agent of the destination, which
//! pulls from the source's agent: disk data never passes through the controller.

use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde::de::DeserializeOwned;
use standby_host::transfer::{Moved, Plan, Stats, Wire};
use standby_host::views::{BitmapState, DiskAccess, SourceDisk, View};
use standby_host::{
    Accel, AgentAddress, BitmapOp, BlockStream, Chain, Endpoint, Format, GuestExit, Host, HostError, ImageInfo,
    NbdAddress, ServeSpec, Storage, Transport, VmConfig, VmDriver, VmLaunch, VmRuntime,
};
use standby_model::ReplicaId;
use standby_nbd::{Extent, NbdError};

use crate::proto::{self, Answer, Codec, DiskCall, HostCall, Request, StreamCall};
use crate::wire::{Line, Meter};
use crate::AgentError;

type Conn = Line<StreamOwned<ClientConnection, TcpStream>>;
type Result<T> = std::result::Result<T, HostError>;

/// How long an answer to an ordinary host verb may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a transfer's stream waits for an answer before it counts the link as down.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle connection older than this is not reused: the agent drops idle ones at 30 s.
const IDLE_REUSE: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct RemoteHost {
    name: String,
    address: String,
    tls: Arc<ClientConfig>,
    idle: Mutex<Vec<(Instant, Conn)>>,
    last_answer: Mutex<Option<std::time::SystemTime>>,
}

fn remote(host: &str, e: impl Into<AgentError>) -> HostError {
    match e.into() {
        AgentError::Unreachable { address, source, .. } => {
            HostError::Unreachable { host: host.into(), detail: format!("no answer at {address}: {source}") }
        }
        e => HostError::Remote { host: host.into(), detail: crate::chain(&e) },
    }
}

fn said(host: &str, a: Answer) -> HostError {
    match a {
        Answer::Failed { error } => error.into_host(host),
        Answer::Refused { why } => HostError::Remote { host: host.into(), detail: format!("refused: {why}") },
        other => HostError::Remote { host: host.into(), detail: format!("broke the protocol: answered {other:?}") },
    }
}

impl RemoteHost {
    /// Host `name`, whose agent listens on `address`, reached with the controller's `tls`.
    pub fn new(name: &str, address: &str, tls: Arc<ClientConfig>) -> RemoteHost {
        RemoteHost {
            name: name.into(),
            address: address.into(),
            tls,
            idle: Mutex::new(Vec::new()),
            last_answer: Mutex::new(None),
        }
    }

    fn agent(&self) -> AgentAddress {
        AgentAddress { host: self.name.clone(), address: self.address.clone() }
    }

    fn open(&self) -> Result<Conn> {
        crate::connect(&self.name, &self.address, self.tls.clone(), &self.name).map_err(|e| remote(&self.name, e))
    }

    fn exchange(&self, conn: &mut Conn, request: &Request, timeout: Duration) -> Result<Answer> {
        let wire = crate::wire_error(&self.name, &self.address);
        let _ = conn.get_ref().sock.set_read_timeout(Some(timeout));
        conn.write(request).map_err(|e| remote(&self.name, wire(e)))?;
        let answer = conn.read::<Answer>().map_err(|e| remote(&self.name, wire(e)))?;
        *self.last_answer.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::SystemTime::now());
        Ok(answer)
    }

    fn call_within<T: DeserializeOwned>(&self, call: HostCall, timeout: Duration) -> Result<T> {
        let pooled = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|(at, _)| at.elapsed() < IDLE_REUSE);
            idle.pop().map(|(_, c)| c)
        };
        let mut conn = match pooled {
            Some(c) => c,
            None => self.open()?,
        };
        match self.exchange(&mut conn, &Request::Host { call }, timeout)? {
            Answer::Done { value } => {
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).push((Instant::now(), conn));
                serde_json::from_value(value).map_err(|e| HostError::Remote {
                    host: self.name.clone(),
                    detail: format!("answered what this controller cannot read: {e}"),
                })
            }
            a => Err(said(&self.name, a)),
        }
    }

    fn call<T: DeserializeOwned>(&self, call: HostCall) -> Result<T> {
        self.call_within(call, CALL_TIMEOUT)
    }
}

impl Host for RemoteHost {
    fn name(&self) -> &str {
        &self.name
    }
    fn last_answer(&self) -> Option<std::time::SystemTime> {
        *self.last_answer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for RemoteHost {
    fn ensure_dir(&self, dir: &str) -> Result<()> {
        self.call(HostCall::EnsureDir { dir: dir.into() })
    }
    fn canonical_dir(&self, dir: &str) -> Result<String> {
        self.call(HostCall::CanonicalDir { dir: dir.into() })
    }
    fn create_file_new(&self, path: &str, content: &str) -> Result<bool> {
        self.call(HostCall::CreateFileNew { path: path.into(), content: content.into() })
    }
    fn read_vm_state(&self, path: &str) -> Result<Vec<u8>> {
        self.call(HostCall::ReadVmState { path: path.into() })
    }
    fn write_vm_state(&self, path: &str, data: &[u8]) -> Result<()> {
        self.call(HostCall::WriteVmState { path: path.into(), data: data.to_vec() })
    }
    fn read_small_file(&self, path: &str) -> Result<Option<String>> {
        self.call(HostCall::ReadSmallFile { path: path.into() })
    }
    fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        self.call(HostCall::ListDir { dir: dir.into() })
    }
    fn file_exists(&self, path: &str) -> Result<bool> {
        self.call(HostCall::FileExists { path: path.into() })
    }
    fn remove_file(&self, path: &str) -> Result<()> {
        self.call(HostCall::RemoveFile { path: path.into() })
    }
    fn remove_empty_dir(&self, dir: &str) -> Result<bool> {
        self.call(HostCall::RemoveEmptyDir { dir: dir.into() })
    }
    fn sync_file(&self, path: &str) -> Result<()> {
        self.call(HostCall::SyncFile { path: path.into() })
    }
    fn image_info(&self, path: &str, format: Format, shared: bool) -> Result<ImageInfo> {
        self.call(HostCall::ImageInfo { path: path.into(), format, shared })
    }
    fn image_probe(&self, path: &str) -> Result<ImageInfo> {
        self.call(HostCall::ImageProbe { path: path.into() })
    }
    fn image_create(&self, path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
        self.call(HostCall::ImageCreate { path: path.into(), size, backing: backing.map(|(p, f)| (p.into(), f)) })
    }
    fn image_allocated(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        self.call(HostCall::ImageAllocated { path: path.into() })
    }
    fn image_bitmap(&self, path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()> {
        let op = proto::BitmapOp::from_host(op);
        self.call(HostCall::ImageBitmap { path: path.into(), format, name: name.into(), op })
    }
    fn image_commit(&self, chain: &Chain) -> Result<()> {
        self.call_within(HostCall::ImageCommit { chain: chain.clone() }, LONG)
    }
    fn image_set_backing_name(&self, path: &str, backing: Option<&str>) -> Result<()> {
        self.call(HostCall::ImageSetBackingName { path: path.into(), backing: backing.map(Into::into) })
    }
    fn image_flatten(&self, chain: &Chain) -> Result<()> {
        self.call_within(HostCall::ImageFlatten { chain: chain.clone() }, LONG)
    }
    fn image_compare(&self, a: &Chain, b: &Chain) -> Result<bool> {
        self.call_within(HostCall::ImageCompare { a: a.clone(), b: b.clone() }, LONG)
    }
    fn image_copy(&self, chain: &Chain, dst: &str) -> Result<()> {
        self.call_within(HostCall::ImageCopy { chain: chain.clone(), dst: dst.into() }, LONG)
    }
}

/// Whole-image work (commit, flatten, compare) runs as long as the disk is large.
const LONG: Duration = Duration::from_secs(6 * 3600);

impl VmDriver for RemoteHost {
    fn check_config(&self, config: &VmConfig) -> Result<()> {
        self.call(HostCall::CheckConfig { config: config.clone() })
    }
    fn vm_start(&self, vm: &VmLaunch) -> Result<()> {
        self.call(HostCall::VmStart { vm: vm.clone() })
    }
    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime> {
        self.call(HostCall::VmRuntime { vm: vm.into() })
    }
    fn vm_powerdown(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmPowerdown { vm: vm.into() })
    }
    fn vm_quit(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmQuit { vm: vm.into() })
    }
    fn vm_pause(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmPause { vm: vm.into() })
    }
    fn vm_resume(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmResume { vm: vm.into() })
    }
    fn vm_paused(&self, vm: &str) -> Result<bool> {
        self.call(HostCall::VmPaused { vm: vm.into() })
    }
    fn can_run(&self, config: &VmConfig) -> Result<()> {
        self.call(HostCall::CanRun { config: config.clone() })
    }
    fn vm_describe(&self, domain: &str) -> Result<standby_host::libvirt::Imported> {
        self.call(HostCall::VmDescribe { domain: domain.into() })
    }
    fn vm_autostart(&self, vm: &str, on: Option<bool>) -> Result<Option<bool>> {
        self.call(HostCall::VmAutostart { vm: vm.into(), on })
    }
    fn vm_forget(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmForget { vm: vm.into() })
    }
    fn vm_unchanged(&self, vm: &VmLaunch) -> Result<()> {
        self.call(HostCall::VmUnchanged { vm: vm.clone() })
    }
    fn vm_defined(&self, vm: &str) -> Result<bool> {
        self.call(HostCall::VmDefined { vm: vm.into() })
    }
    fn vm_tpm_state(&self, vm: &VmLaunch) -> Result<Option<Vec<u8>>> {
        self.call(HostCall::VmTpmState { vm: vm.clone() })
    }
    fn vm_set_tpm_state(&self, vm: &VmLaunch, state: Option<&[u8]>) -> Result<()> {
        self.call(HostCall::VmSetTpmState { vm: vm.clone(), state: state.map(<[u8]>::to_vec) })
    }
    fn check_network(&self, network: &str) -> Result<()> {
        self.call(HostCall::CheckNetwork { network: network.into() })
    }
    fn config_networks(&self, config: &VmConfig) -> Result<Vec<String>> {
        self.call(HostCall::ConfigNetworks { config: config.clone() })
    }
    fn guest_frozen(&self, vm: &str, timeout: Duration) -> Result<Option<bool>> {
        let call = HostCall::GuestFrozen { vm: vm.into(), timeout_ms: timeout.as_millis() as u64 };
        self.call_within(call, timeout + CALL_TIMEOUT)
    }
    fn guest_freeze(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        let call = HostCall::GuestFreeze { vm: vm.into(), timeout_ms: timeout.as_millis() as u64 };
        self.call_within(call, timeout + CALL_TIMEOUT)
    }
    fn guest_thaw(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        let call = HostCall::GuestThaw { vm: vm.into(), timeout_ms: timeout.as_millis() as u64 };
        self.call_within(call, timeout + CALL_TIMEOUT)
    }
    fn guest_exec(&self, vm: &str, command: &str, timeout: Duration) -> Result<Option<GuestExit>> {
        let call =
            HostCall::GuestExec { vm: vm.into(), command: command.into(), timeout_ms: timeout.as_millis() as u64 };
        self.call_within(call, timeout + CALL_TIMEOUT)
    }
    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>> {
        self.call(HostCall::VmTopFiles { vm: vm.into(), disks })
    }
    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()> {
        self.call(HostCall::VmProtect { vm: vm.into(), new_tops: new_tops.to_vec() })
    }
    fn vm_flatten(&self, vm: &str, disks: usize, timeout: Duration) -> Result<()> {
        let call = HostCall::VmFlatten { vm: vm.into(), disks, timeout_secs: timeout.as_secs().max(1) };
        self.call_within(call, timeout + CALL_TIMEOUT)
    }
    fn vm_disks<'a>(&'a self, vm: &str, running: bool) -> Result<Box<dyn DiskAccess + 'a>> {
        let mut conn = self.open()?;
        match self.exchange(&mut conn, &Request::Disks { vm: vm.into(), running }, CALL_TIMEOUT)? {
            Answer::Done { .. } => Ok(Box::new(RemoteDisks { host: self.name.clone(), agent: self.agent(), conn })),
            a => Err(said(&self.name, a)),
        }
    }
    fn vm_kill(&self, vm: &str) -> Result<()> {
        self.call(HostCall::VmKill { vm: vm.into() })
    }
    fn vm_console(&self, vm: &str, from: u64) -> Result<(Vec<u8>, u64)> {
        self.call(HostCall::VmConsole { vm: vm.into(), from })
    }
    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>> {
        self.call(HostCall::VmScratchFiles { vm: vm.into(), prefix: prefix.into() })
    }
    fn accel(&self) -> Accel {
        // Only ever shown; an agent that does not answer runs nothing anyway.
        self.call(HostCall::Accel).unwrap_or(Accel::Tcg)
    }
    fn probe_accel(&self, kernel: &str, initrd: &str) -> Result<Accel> {
        self.call_within(HostCall::ProbeAccel { kernel: kernel.into(), initrd: initrd.into() }, LONG)
    }
}

impl Transport for RemoteHost {
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress> {
        let mut addr: NbdAddress = self.call(HostCall::NbdServe { spec: spec.clone() })?;
        addr.agent = Some(self.agent());
        Ok(addr)
    }

    fn nbd_connect(&self, addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<Box<dyn BlockStream>> {
        let agent = addr.agent.clone().ok_or_else(|| {
            HostError::Invalid(format!(
                "{} is served on the controller's machine, which host {} cannot reach; run `standby agent` there too",
                addr.socket, self.name
            ))
        })?;
        let end = Endpoint {
            address: addr.clone(),
            export: export.into(),
            contexts: contexts.iter().map(|c| (*c).to_owned()).collect(),
        };
        // What the controller reads itself is block status, never bulk data.
        Ok(Box::new(RemoteStream::open(&agent, self.tls.clone(), &end, Codec::None, None)?))
    }

    fn transfer(
        &self,
        plan: &Plan,
        src: &Endpoint,
        dst: &Endpoint,
        wire: &Wire,
        report: &(dyn Fn(Moved) + Sync),
    ) -> Result<Stats> {
        for end in [src, dst] {
            if end.address.agent.is_none() {
                return Err(HostError::Invalid(format!(
                    "a transfer on host {} cannot reach {}, a disk served on the controller's machine; \
                     replicate between hosts that run `standby agent`",
                    self.name, end.address.socket
                )));
            }
        }
        let mut conn = self.open()?;
        let request = Request::Transfer { plan: plan.clone(), src: src.clone(), dst: dst.clone(), wire: *wire };
        let mut answer = self.exchange(&mut conn, &request, CALL_TIMEOUT)?;
        loop {
            match answer {
                Answer::Progress { done, total, wire, wire_data } => report(Moved { done, total, wire, wire_data }),
                Answer::Transferred { stats, wire_bytes } => return Ok(Stats { wire: wire_bytes, ..stats }),
                a => return Err(said(&self.name, a)),
            }
            let lost = crate::lost_error(&self.name, &self.address);
            answer = conn.read::<Answer>().map_err(|e| remote(&self.name, lost(e)))?;
        }
    }

    fn nbd_stop_all(&self, prefix: &str) -> Result<usize> {
        self.call(HostCall::NbdStopAll { prefix: prefix.into() })
    }
}

/// A run's hold on a remote VM's disks: one connection, which the agent's side of the
/// hold lives on.
#[derive(Debug)]
struct RemoteDisks {
    host: String,
    /// Where the views it opens are served to other hosts.
    agent: AgentAddress,
    conn: Conn,
}

impl RemoteDisks {
    fn call<T: DeserializeOwned>(&mut self, call: DiskCall) -> Result<T> {
        let host = self.host.clone();
        // The hold was answered when it was taken: an ended connection now is a loss.
        let to_agent = crate::lost_error(&self.agent.host, &self.agent.address);
        let wire = |e| remote(&host, to_agent(e));
        self.conn.write(&call).map_err(wire)?;
        match self.conn.read::<Answer>().map_err(wire)? {
            Answer::Done { value } => serde_json::from_value(value).map_err(|e| HostError::Remote {
                host: host.clone(),
                detail: format!("answered what this controller cannot read: {e}"),
            }),
            a => Err(said(&host, a)),
        }
    }
}

impl DiskAccess for RemoteDisks {
    fn bitmaps(&mut self, disk: &SourceDisk) -> Result<Vec<BitmapState>> {
        self.call::<proto::Bitmaps>(DiskCall::Bitmaps { disk: disk.clone() })
    }
    fn remove_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        self.call(DiskCall::RemoveBitmap { disk: disk.clone(), name: name.into() })
    }
    fn merge_bitmap(&mut self, disk: &SourceDisk, target: &str, source: &str) -> Result<()> {
        self.call(DiskCall::MergeBitmap { disk: disk.clone(), target: target.into(), source: source.into() })
    }
    fn enable_bitmap(&mut self, disk: &SourceDisk, name: &str) -> Result<()> {
        self.call(DiskCall::EnableBitmap { disk: disk.clone(), name: name.into() })
    }
    fn open_views(
        &mut self,
        owner: ReplicaId,
        disks: &[SourceDisk],
        previous: &[Option<String>],
        trusted: &[bool],
        new_bitmap: &str,
    ) -> Result<Vec<View>> {
        let call = DiskCall::OpenViews {
            owner,
            disks: disks.to_vec(),
            previous: previous.to_vec(),
            trusted: trusted.to_vec(),
            new_bitmap: new_bitmap.into(),
        };
        let mut views: proto::Views = self.call(call)?;
        for v in &mut views {
            v.address.agent = Some(self.agent.clone());
        }
        Ok(views)
    }
    fn close_views(&mut self, owner: ReplicaId, disk_count: usize) -> Result<()> {
        self.call(DiskCall::CloseViews { owner, disk_count })
    }
}

/// A block stream on a disk another host serves, through that host's agent.
#[derive(Debug)]
pub struct RemoteStream {
    host: String,
    conn: Conn,
    size: u64,
    codec: Codec,
    /// Where this stream's wire bytes are counted (and paced), frame by frame.
    meter: Option<Arc<Meter>>,
    buf: Vec<u8>,
}

/// What failed on the connection itself, keeping its kind: a transfer resumes after a
/// dropped link ([`standby_host::transfer::is_link_error`]) and after nothing else.
fn link_err(host: &str, e: std::io::Error) -> NbdError {
    NbdError::Io(std::io::Error::new(e.kind(), format!("host {host}: {e}")))
}

fn nbd_err(host: &str, detail: impl std::fmt::Display) -> NbdError {
    NbdError::Io(std::io::Error::other(format!("host {host}: {detail}")))
}

impl RemoteStream {
    /// Opens `end` (served by `agent`) with `tls`; block data travels in `codec`.
    pub(crate) fn open(
        agent: &AgentAddress,
        tls: Arc<ClientConfig>,
        end: &Endpoint,
        codec: Codec,
        meter: Option<Arc<Meter>>,
    ) -> Result<RemoteStream> {
        let host = &agent.host;
        let mut conn = crate::connect(host, &agent.address, tls, host).map_err(|e| remote(host, e))?;
        // A transfer's stream (metered) waits for one chunk at most: longer means the link
        // is gone, and the transfer resumes on a new connection. The controller's own
        // streams read block status of whole disks, which may take longer.
        let timeout = if meter.is_some() { LINK_TIMEOUT } else { CALL_TIMEOUT };
        let _ = conn.get_ref().sock.set_read_timeout(Some(timeout));
        let request = Request::Stream {
            socket: end.address.socket.clone(),
            export: end.export.clone(),
            contexts: end.contexts.clone(),
            codec,
        };
        let wire = crate::wire_error(host, &agent.address);
        conn.write(&request).map_err(|e| remote(host, wire(e)))?;
        match conn.read::<Answer>().map_err(|e| remote(host, wire(e)))? {
            Answer::Opened { size } => {
                Ok(RemoteStream { host: host.clone(), conn, size, codec, meter, buf: Vec::new() })
            }
            a => Err(said(host, a)),
        }
    }

    /// Counts the frame bytes since `before` on the meter, which may pace them.
    fn metered(&self, before: u64, data: usize) {
        if let Some(m) = &self.meter {
            m.add(self.conn.wire_bytes - before, data as u64);
        }
    }

    fn ask(&mut self, call: &StreamCall) -> std::result::Result<Answer, NbdError> {
        self.conn.write(call).map_err(|e| link_err(&self.host, e))?;
        self.conn.read::<Answer>().map_err(|e| link_err(&self.host, e))
    }

    fn done(&mut self, call: &StreamCall) -> std::result::Result<(), NbdError> {
        match self.ask(call)? {
            Answer::Done { .. } => Ok(()),
            a => Err(nbd_err(&self.host, said(&self.host, a))),
        }
    }
}

impl BlockStream for RemoteStream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
        match self.ask(&StreamCall::Read { offset, len: buf.len() as u64 })? {
            Answer::Data { len, digest } if len == buf.len() as u64 => {
                let mut data = std::mem::take(&mut self.buf);
                let before = self.conn.wire_bytes;
                let r = self.conn.read_frame(self.codec, len, &digest, &mut data);
                r.map_err(|e| link_err(&self.host, e))?;
                self.metered(before, data.len());
                buf.copy_from_slice(&data);
                self.buf = data;
                Ok(())
            }
            a => Err(nbd_err(&self.host, said(&self.host, a))),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError> {
        let head = StreamCall::Write { offset, len: data.len() as u64, digest: crate::wire::digest(data) };
        let before = self.conn.wire_bytes;
        self.conn.write_frame(&head, self.codec, data).map_err(|e| link_err(&self.host, e))?;
        self.metered(before, data.len());
        match self.conn.read::<Answer>().map_err(|e| link_err(&self.host, e))? {
            Answer::Done { .. } => Ok(()),
            a => Err(nbd_err(&self.host, said(&self.host, a))),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        self.done(&StreamCall::WriteZeroes { offset, len })
    }

    fn flush(&mut self) -> std::result::Result<(), NbdError> {
        self.done(&StreamCall::Flush)
    }

    fn block_status(&mut self, context: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError> {
        match self.ask(&StreamCall::BlockStatus { context: context.into(), offset, len })? {
            Answer::Extents { extents } => {
                Ok(extents.into_iter().map(|(offset, length, flags)| Extent { offset, length, flags }).collect())
            }
            a => Err(nbd_err(&self.host, said(&self.host, a))),
        }
    }

    fn digests(&mut self, offset: u64, len: u64, block: u64) -> std::result::Result<Option<Vec<String>>, NbdError> {
        match self.ask(&StreamCall::Digests { offset, len, block })? {
            Answer::Digests { digests } => Ok(Some(digests)),
            a => Err(nbd_err(&self.host, said(&self.host, a))),
        }
    }

    fn disconnect(mut self: Box<Self>) -> std::result::Result<(), NbdError> {
        let _ = self.conn.write(&StreamCall::Disconnect);
        Ok(())
    }
}
