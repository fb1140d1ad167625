//! What an enrolled agent carries out: the host verbs on this machine's host (standby's
//! own QEMU driver, or libvirt), a
//! run's hold on a VM's disks, block streams for the agents that pull from it, and
//! transfers into the disks it serves, pulling straight from the source's agent.
//!
//! Who may ask what: the controller (its certificate is the one enrolment named) may ask
//! everything. Another agent of the same authority may only read a disk this host serves,
//! the one thing a transfer into its own disks needs: an agent taken over at one site
//! cannot change anything at the other.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use standby_host::transfer;
use standby_host::{BlockStream, Endpoint, Host, HostError};

use crate::proto::{Answer, Codec, DiskCall, HostCall, Request, StreamCall, WireError};
use crate::remote::RemoteStream;
use crate::wire::{self, Line, Meter};

/// Who is on the other end of a connection, from its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Controller,
    Agent,
}

/// An enrolled agent's means: its host, and how it reaches its peers.
#[derive(Debug)]
pub(crate) struct Service {
    pub(crate) host: ServedHost,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// This machine's host as the agent drives it (standby's own QEMU driver, or libvirt), and
/// the directories its runs make their NBD sockets in: all a peer may read from.
#[derive(Debug)]
pub(crate) struct ServedHost {
    pub(crate) driver: Box<dyn Host>,
    pub(crate) roots: Vec<std::path::PathBuf>,
}

type Result<T> = std::result::Result<T, HostError>;

fn to_value<T: Serialize>(v: T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| HostError::Invalid(e.to_string()))
}

fn answer<T: Serialize>(r: Result<T>) -> Answer {
    match r.and_then(to_value) {
        Ok(value) => Answer::Done { value },
        Err(e) => Answer::Failed { error: WireError::from_host(&e) },
    }
}

impl Service {
    /// Serves `first` and whatever follows it on `line`.
    pub(crate) fn serve<S: Read + Write + Send>(
        &self,
        peer: Peer,
        first: Request,
        line: &mut Line<S>,
    ) -> std::io::Result<()> {
        let refuse = |why: &str| Answer::Refused { why: why.into() };
        match (first, peer) {
            (Request::Stream { socket, export, contexts, codec }, _) => {
                self.stream(peer, &socket, &export, &contexts, codec, line)
            }
            (_, Peer::Agent) => line.write(&refuse("another host's agent may only read the disks this host serves")),
            (Request::Host { call }, Peer::Controller) => {
                let mut call = call;
                loop {
                    line.write(&self.call(call))?;
                    match line.read::<Request>() {
                        Ok(Request::Host { call: next }) => call = next,
                        Ok(_) => return line.write(&refuse("a host-call connection carries host calls only")),
                        // The controller is done with this connection.
                        Err(_) => return Ok(()),
                    }
                }
            }
            (Request::Disks { vm, running }, Peer::Controller) => self.disks(&vm, running, line),
            (Request::Transfer { plan, src, dst, wire }, Peer::Controller) => {
                self.transfer(&plan, &src, &dst, &wire, line)
            }
            (r, _) => line.write(&refuse(&format!("{r:?} is not something an enrolled agent does"))),
        }
    }

    fn call(&self, call: HostCall) -> Answer {
        let h = self.host.driver.as_ref();
        match call {
            HostCall::EnsureDir { dir } => answer(h.ensure_dir(&dir)),
            HostCall::CanonicalDir { dir } => answer(h.canonical_dir(&dir)),
            HostCall::CreateFileNew { path, content } => answer(h.create_file_new(&path, &content)),
            HostCall::ReadSmallFile { path } => answer(h.read_small_file(&path)),
            HostCall::ReadVmState { path } => answer(h.read_vm_state(&path)),
            HostCall::WriteVmState { path, data } => answer(h.write_vm_state(&path, &data)),
            HostCall::ListDir { dir } => answer(h.list_dir(&dir)),
            HostCall::FileExists { path } => answer(h.file_exists(&path)),
            HostCall::RemoveFile { path } => answer(h.remove_file(&path)),
            HostCall::RemoveEmptyDir { dir } => answer(h.remove_empty_dir(&dir)),
            HostCall::SyncFile { path } => answer(h.sync_file(&path)),
            HostCall::ImageInfo { path, format, shared } => answer(h.image_info(&path, format, shared)),
            HostCall::ImageProbe { path } => answer(h.image_probe(&path)),
            HostCall::ImageCreate { path, size, backing } => {
                answer(h.image_create(&path, size, backing.as_ref().map(|(p, f)| (p.as_str(), *f))))
            }
            HostCall::ImageAllocated { path } => answer(h.image_allocated(&path)),
            HostCall::ImageBitmap { path, format, name, op } => {
                answer(h.image_bitmap(&path, format, &name, op.as_host()))
            }
            HostCall::ImageCommit { chain } => answer(h.image_commit(&chain)),
            HostCall::ImageSetBackingName { path, backing } => {
                answer(h.image_set_backing_name(&path, backing.as_deref()))
            }
            HostCall::ImageFlatten { chain } => answer(h.image_flatten(&chain)),
            HostCall::ImageCompare { a, b } => answer(h.image_compare(&a, &b)),
            HostCall::ImageCopy { chain, dst } => answer(h.image_copy(&chain, &dst)),
            HostCall::CheckConfig { config } => answer(h.check_config(&config)),
            HostCall::ConfigNetworks { config } => answer(h.config_networks(&config)),
            HostCall::CheckNetwork { network } => answer(h.check_network(&network)),
            HostCall::CanRun { config } => answer(h.can_run(&config)),
            HostCall::VmDescribe { domain } => answer(h.vm_describe(&domain)),
            HostCall::VmAutostart { vm, on } => answer(h.vm_autostart(&vm, on)),
            HostCall::VmForget { vm } => answer(h.vm_forget(&vm)),
            HostCall::VmDefined { vm } => answer(h.vm_defined(&vm)),
            HostCall::VmUnchanged { vm } => answer(h.vm_unchanged(&vm)),
            HostCall::VmTpmState { vm } => answer(h.vm_tpm_state(&vm)),
            HostCall::VmSetTpmState { vm, state } => answer(h.vm_set_tpm_state(&vm, state.as_deref())),
            HostCall::VmStart { vm } => answer(h.vm_start(&vm)),
            HostCall::VmRuntime { vm } => answer(h.vm_runtime(&vm)),
            HostCall::VmPowerdown { vm } => answer(h.vm_powerdown(&vm)),
            HostCall::VmQuit { vm } => answer(h.vm_quit(&vm)),
            HostCall::VmPause { vm } => answer(h.vm_pause(&vm)),
            HostCall::VmResume { vm } => answer(h.vm_resume(&vm)),
            HostCall::VmPaused { vm } => answer(h.vm_paused(&vm)),
            HostCall::GuestFrozen { vm, timeout_ms } => answer(h.guest_frozen(&vm, Duration::from_millis(timeout_ms))),
            HostCall::GuestFreeze { vm, timeout_ms } => answer(h.guest_freeze(&vm, Duration::from_millis(timeout_ms))),
            HostCall::GuestThaw { vm, timeout_ms } => answer(h.guest_thaw(&vm, Duration::from_millis(timeout_ms))),
            HostCall::GuestExec { vm, command, timeout_ms } => {
                answer(h.guest_exec(&vm, &command, Duration::from_millis(timeout_ms)))
            }
            HostCall::VmTopFiles { vm, disks } => answer(h.vm_top_files(&vm, disks)),
            HostCall::VmProtect { vm, new_tops } => answer(h.vm_protect(&vm, &new_tops)),
            HostCall::VmFlatten { vm, disks, timeout_secs } => {
                answer(h.vm_flatten(&vm, disks, Duration::from_secs(timeout_secs)))
            }
            HostCall::VmKill { vm } => answer(h.vm_kill(&vm)),
            HostCall::VmConsole { vm, from } => answer(h.vm_console(&vm, from)),
            HostCall::VmScratchFiles { vm, prefix } => answer(h.vm_scratch_files(&vm, &prefix)),
            HostCall::Accel => answer(Ok(h.accel())),
            HostCall::ProbeAccel { kernel, initrd } => answer(h.probe_accel(&kernel, &initrd)),
            HostCall::NbdServe { spec } => answer(h.nbd_serve(&spec)),
            HostCall::NbdStopAll { prefix } => answer(h.nbd_stop_all(&prefix)),
        }
    }

    /// One run's hold on a VM's disks, for as long as the controller keeps the connection.
    fn disks<S: Read + Write>(&self, vm: &str, running: bool, line: &mut Line<S>) -> std::io::Result<()> {
        let mut access = match self.host.driver.vm_disks(vm, running) {
            Ok(a) => a,
            Err(e) => return line.write(&answer::<()>(Err(e))),
        };
        line.write(&Answer::Done { value: serde_json::Value::Null })?;
        loop {
            let Ok(call) = line.read::<DiskCall>() else { return Ok(()) };
            let a = match call {
                DiskCall::Bitmaps { disk } => answer(access.bitmaps(&disk)),
                DiskCall::RemoveBitmap { disk, name } => answer(access.remove_bitmap(&disk, &name)),
                DiskCall::MergeBitmap { disk, target, source } => answer(access.merge_bitmap(&disk, &target, &source)),
                DiskCall::EnableBitmap { disk, name } => answer(access.enable_bitmap(&disk, &name)),
                DiskCall::OpenViews { owner, disks, previous, trusted, new_bitmap } => {
                    answer(access.open_views(owner, &disks, &previous, &trusted, &new_bitmap))
                }
                DiskCall::CloseViews { owner, disk_count } => answer(access.close_views(owner, disk_count)),
            };
            line.write(&a)?;
        }
    }

    /// A socket this host's own runs made: a peer names nothing else on this machine.
    fn own_socket(&self, socket: &str) -> Result<()> {
        let p = Path::new(socket);
        // Resolved first: a directory QEMU's user owns (libvirt's) could hold a symlink
        // to a socket elsewhere.
        let resolved = std::fs::canonicalize(p).unwrap_or_default();
        let inside = self
            .host
            .roots
            .iter()
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .any(|root| p.starts_with(&root) && resolved.starts_with(&root))
            && p.components().all(|c| matches!(c, Component::Normal(_) | Component::RootDir));
        match inside {
            true => Ok(()),
            false => Err(HostError::Invalid(format!("{socket} is not a disk this host serves"))),
        }
    }

    fn open_local(&self, socket: &str, export: &str, contexts: &[String]) -> Result<standby_nbd::Client<UnixStream>> {
        self.own_socket(socket)?;
        let s = UnixStream::connect(socket).map_err(|source| HostError::Io {
            what: "cannot connect to".into(),
            path: socket.into(),
            source,
        })?;
        let ctx: Vec<&str> = contexts.iter().map(String::as_str).collect();
        Ok(standby_nbd::Client::connect(s, export, &ctx)?)
    }

    /// Serves one served disk to a peer: reads (compressed, checksummed), digests and
    /// block status to anyone enrolled; writes to the controller only.
    fn stream<S: Read + Write>(
        &self,
        peer: Peer,
        socket: &str,
        export: &str,
        contexts: &[String],
        codec: Codec,
        line: &mut Line<S>,
    ) -> std::io::Result<()> {
        let mut nbd = match self.open_local(socket, export, contexts) {
            Ok(c) => c,
            Err(e) => return line.write(&Answer::Failed { error: WireError::from_host(&e) }),
        };
        line.write(&Answer::Opened { size: nbd.size() })?;
        let failed = |e: standby_nbd::NbdError| Answer::Failed { error: WireError::from_host(&HostError::Nbd(e)) };
        let mut buf = Vec::new();
        loop {
            let Ok(call) = line.read::<StreamCall>() else { return Ok(()) };
            let a = match call {
                StreamCall::Read { offset, len } if len as usize <= wire::MAX_FRAME => {
                    buf.resize(len as usize, 0);
                    match nbd.read(offset, &mut buf) {
                        Ok(()) => {
                            let head = Answer::Data { len, digest: wire::digest(&buf) };
                            line.write_frame(&head, codec, &buf)?;
                            continue;
                        }
                        Err(e) => failed(e),
                    }
                }
                StreamCall::Read { len, .. } => refused(format!("a read of {len} bytes is too large")),
                StreamCall::BlockStatus { context, offset, len } => match nbd.block_status(&context, offset, len) {
                    Ok(ext) => Answer::Extents { extents: ext.iter().map(|e| (e.offset, e.length, e.flags)).collect() },
                    Err(e) => failed(e),
                },
                StreamCall::Digests { offset, len, block } => self.digests(&mut nbd, offset, len, block, &mut buf),
                StreamCall::Disconnect => {
                    let _ = nbd.disconnect();
                    return Ok(());
                }
                _ if peer == Peer::Agent => refused("another host's agent may only read".into()),
                StreamCall::Write { offset, len, digest } => {
                    line.read_frame(codec, len, &digest, &mut buf)?;
                    match nbd.write(offset, &buf) {
                        Ok(()) => Answer::Done { value: serde_json::Value::Null },
                        Err(e) => failed(e),
                    }
                }
                StreamCall::WriteZeroes { offset, len } => match nbd.write_zeroes(offset, len) {
                    Ok(()) => Answer::Done { value: serde_json::Value::Null },
                    Err(e) => failed(e),
                },
                StreamCall::Flush => match nbd.flush() {
                    Ok(()) => Answer::Done { value: serde_json::Value::Null },
                    Err(e) => failed(e),
                },
            };
            line.write(&a)?;
        }
    }

    fn digests(
        &self,
        nbd: &mut standby_nbd::Client<UnixStream>,
        offset: u64,
        len: u64,
        block: u64,
        buf: &mut Vec<u8>,
    ) -> Answer {
        if len as usize > wire::MAX_FRAME || block == 0 {
            return refused(format!("digests of {len} bytes in blocks of {block} are not asked for so"));
        }
        buf.resize(len as usize, 0);
        match nbd.read(offset, buf) {
            Ok(()) => Answer::Digests { digests: buf.chunks(block as usize).map(wire::digest).collect() },
            Err(e) => Answer::Failed { error: WireError::from_host(&HostError::Nbd(e)) },
        }
    }

    /// Connects to one side of a transfer: a disk of this host directly, another host's
    /// through its agent.
    fn connect(&self, end: &Endpoint, codec: Codec, meter: &Arc<Meter>) -> Result<Box<dyn BlockStream>> {
        match &end.address.agent {
            Some(a) if a.host != self.host.driver.name() => {
                Ok(Box::new(RemoteStream::open(a, self.tls.clone(), end, codec, Some(meter.clone()))?))
            }
            _ => Ok(Box::new(self.open_local(&end.address.socket, &end.export, &end.contexts)?)),
        }
    }

    fn transfer<S: Read + Write + Send>(
        &self,
        plan: &transfer::Plan,
        src: &Endpoint,
        dst: &Endpoint,
        wire: &transfer::Wire,
        line: &mut Line<S>,
    ) -> std::io::Result<()> {
        let (codec, meter) = (wire.compression, Meter::new(wire.bandwidth));
        let connect = || Ok((self.connect(src, codec, &meter)?, self.connect(dst, codec, &meter)?));
        // Progress at most a few times a second, and the controller's answer is the end.
        let out = Mutex::new((line, Instant::now(), Ok(())));
        let report = |done: u64, total: u64| {
            let mut g = out.lock().unwrap_or_else(|e| e.into_inner());
            if g.1.elapsed() >= Duration::from_millis(200) || done == total {
                g.1 = Instant::now();
                let r = g.0.write(&Answer::Progress { done, total, wire: meter.total(), wire_data: meter.data() });
                if g.2.is_ok() {
                    g.2 = r;
                }
            }
        };
        let window = Duration::from_secs(wire.retry_window_secs);
        let result = transfer::execute_resuming(plan, &connect, &report, window);
        let (line, _, progress) = out.into_inner().unwrap_or_else(|e| e.into_inner());
        progress?;
        match result {
            Ok(stats) => line.write(&Answer::Transferred { stats, wire_bytes: meter.total() }),
            Err(e) => line.write(&Answer::Failed { error: WireError::from_host(&e) }),
        }
    }
}

fn refused(why: String) -> Answer {
    Answer::Refused { why }
}
