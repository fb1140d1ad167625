//! The local host: VMs, images and NBD servers on this machine, under one root directory.
//!
//! Layout under the root:
//! - `vms/NAME/`: a VM's monitors (`qmp.sock`, `qmp-status.sock`), `qemu.pid`,
//!   `console.log`, its NBD server socket and scratch files of replication runs;
//! - `nbd/ID.sock`, `nbd/ID.pid`: qemu-nbd servers standby started.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use standby_qemu::guest_agent::{AgentChannel, GuestAgent};
use standby_qemu::machine::{opt_value, Machine, MachineDisk, OVMF_CODE, QEMU_SYSTEM};
use standby_qemu::nbd_server::{NbdServe, QEMU_NBD};
use standby_qemu::qmp::Qmp;
use standby_qemu::{img, QemuError};

use standby_qemu::qmp::commands::{Cont, Quit, Stop, SystemPowerdown};

use crate::live::{disk_node, Monitor, QemuDisks, QMP_TIMEOUT, STATUS_TIMEOUT};
use crate::nic::{self, Net, Nic};
use crate::state_file::{read_state_file, write_state_file};
use crate::swtpm::{self, tpm_file};
use crate::*;

/// How long a guest agent may take to answer the synchronisation that starts each
/// conversation: a running agent answers in milliseconds.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug)]
pub struct LocalHost {
    name: String,
    root: PathBuf,
    accel: Accel,
}

pub(crate) fn io_err(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> HostError {
    let (what, path) = (what.to_owned(), path.display().to_string());
    move |source| HostError::Io { what, path, source }
}

impl LocalHost {
    /// `root` holds this host's run files. The accelerator comes from `STANDBY_ACCEL`
    /// (`kvm` or `tcg`); without it, KVM only where `root/accel` records a passed probe.
    pub fn new(name: &str, root: &Path) -> Result<LocalHost> {
        fs::create_dir_all(root.join("vms")).map_err(io_err("cannot create", root))?;
        fs::create_dir_all(root.join("nbd")).map_err(io_err("cannot create", root))?;
        let accel = match std::env::var("STANDBY_ACCEL").ok().as_deref() {
            Some("kvm") => Accel::Kvm,
            Some("tcg") => Accel::Tcg,
            _ => match fs::read_to_string(root.join("accel")).ok().as_deref().map(str::trim) {
                Some("kvm") if Path::new("/dev/kvm").exists() => Accel::Kvm,
                _ => Accel::Tcg,
            },
        };
        Ok(LocalHost { name: name.into(), root: root.into(), accel })
    }

    /// The directory under which every file and socket of this host's runs lives.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path for a temporary file that belongs to the VM's run (fleecing images).
    pub(crate) fn vm_scratch_path(&self, vm: &str, file: &str) -> String {
        self.vm_file(vm, file)
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    /// What a VM's QEMU command line holds and no other process's does: its monitor path,
    /// as written in its option string.
    fn vm_marker(&self, vm: &str) -> String {
        opt_value(&self.vm_file(vm, "qmp.sock"))
    }

    /// The monitor for long operations.
    fn monitor(&self, vm: &str) -> Result<Monitor> {
        self.monitor_at(vm, "qmp.sock", QMP_TIMEOUT)
    }

    /// A second monitor for quick queries, never blocked by a long operation.
    fn status_monitor(&self, vm: &str) -> Result<Monitor> {
        self.monitor_at(vm, "qmp-status.sock", STATUS_TIMEOUT)
    }

    fn monitor_at(&self, vm: &str, socket: &str, timeout: Duration) -> Result<Monitor> {
        if self.vm_runtime(vm)? == VmRuntime::Stopped {
            return Err(HostError::NotRunning(vm.into()));
        }
        let qmp = Qmp::connect(&self.vm_file(vm, socket), timeout)
            .map_err(|source| HostError::Monitor { vm: vm.into(), source })?;
        Ok(Monitor::new(vm, qmp))
    }

    /// The running VM's guest agent, synchronised; None when its QEMU has no agent port
    /// (started by a standby from before there was one). The synchronisation gets a few
    /// seconds at most: a guest that runs no agent is told apart without waiting out a
    /// whole freeze timeout.
    fn guest_agent(&self, vm: &str, timeout: Duration) -> Result<Option<GuestAgent>> {
        if self.vm_runtime(vm)? == VmRuntime::Stopped {
            return Err(HostError::NotRunning(vm.into()));
        }
        let socket = self.vm_file(vm, "qga.sock");
        if !Path::new(&socket).exists() {
            return Ok(None);
        }
        GuestAgent::connect(&socket, timeout.min(AGENT_SYNC_TIMEOUT))
            .map(Some)
            .map_err(|source| HostError::Agent { vm: vm.into(), source })
    }

    /// Where a VM's own NBD server (its live views) listens.
    pub(crate) fn vm_nbd_socket(&self, vm: &str) -> NbdAddress {
        NbdAddress { socket: self.vm_file(vm, "nbd.sock"), agent: None }
    }

    fn vm_file(&self, vm: &str, file: &str) -> String {
        self.vm_dir(vm).join(file).display().to_string()
    }

    fn socket(&self, path: String) -> Result<String> {
        if path.len() > MAX_SOCKET_PATH {
            return Err(HostError::Invalid(format!(
                "socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --data-dir or VM name"
            )));
        }
        Ok(path)
    }

    /// The pid in `pidfile` if that process is alive and its command line names `marker`
    /// (a stale pid file may name a reused pid).
    fn live_pid(pidfile: &Path, marker: &str) -> Option<u32> {
        let pid: u32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
            .unwrap_or(true);
        (cmdline.contains(marker) && !zombie).then_some(pid)
    }

    fn wait_gone(pidfile: &Path, marker: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while Self::live_pid(pidfile, marker).is_some() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

/// Whether a real Linux guest gets through its boot under KVM. A KVM device that opens is
/// not enough: under nested virtualisation guests have been seen to hang at boot.
fn boots_under_kvm(root: &Path, kernel: &str, initrd: &str) -> Result<bool> {
    const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
    let console = root.join("kvm-probe-console.log");
    let _ = fs::remove_file(&console);
    let mut child = Command::new(QEMU_SYSTEM)
        .args(["-accel", "kvm", "-nodefaults", "-display", "none", "-no-user-config", "-m", "128", "-no-reboot"])
        .args(["-kernel", kernel, "-initrd", initrd])
        .args(["-append", "console=ttyS0 quiet panic=-1 standby.workload=probe"])
        .args(["-chardev", &format!("file,id=console,path={}", console.display()), "-serial", "chardev:console"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|source| QemuError::Spawn { program: QEMU_SYSTEM.into(), source })?;
    let start = Instant::now();
    let mut booted = false;
    while start.elapsed() < PROBE_TIMEOUT {
        if fs::read_to_string(&console).is_ok_and(|c| c.contains("STANDBY-GUEST up")) {
            booted = true;
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(booted)
}

/// The most of a console log one read returns.
const CONSOLE_CHUNK: u64 = 1 << 20;
/// A console log larger than this at a VM's start becomes `console.log.1` (replacing the
/// previous one): a VM's console costs at most about twice this plus one run's output.
pub const CONSOLE_ROTATE_BYTES: u64 = 8 << 20;

fn rotate_console(log: &Path) -> Result<()> {
    match fs::metadata(log) {
        Ok(m) if m.len() > CONSOLE_ROTATE_BYTES => {
            fs::rename(log, log.with_extension("log.1")).map_err(io_err("cannot rotate", log))
        }
        _ => Ok(()),
    }
}

/// A console log from byte `from`, at most `CONSOLE_CHUNK` of it, and the next offset.
pub(crate) fn read_console(path: &Path, from: u64) -> Result<(Vec<u8>, u64)> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(io_err("cannot read", path)(e)),
    };
    // A log shorter than the offset was rotated at a restart: the new one is read whole.
    let len = f.metadata().map_err(io_err("cannot read", path))?.len();
    let from = if from > len { 0 } else { from };
    f.seek(SeekFrom::Start(from)).map_err(io_err("cannot read", path))?;
    // A bounded piece: a guest that wrote gigabytes must not cost that much memory.
    let mut buf = Vec::new();
    f.take(CONSOLE_CHUNK).read_to_end(&mut buf).map_err(io_err("cannot read", path))?;
    let next = from + buf.len() as u64;
    Ok((buf, next))
}

impl Host for LocalHost {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Storage for LocalHost {
    fn ensure_dir(&self, dir: &str) -> Result<()> {
        let path = Path::new(dir);
        if !path.is_absolute() {
            return Err(HostError::Invalid(format!("{dir} is not an absolute path")));
        }
        fs::create_dir_all(path).map_err(io_err("cannot create directory", path))?;
        let probe = path.join(".standby-write-probe");
        fs::write(&probe, b"probe").map_err(io_err("cannot write in directory", path))?;
        fs::remove_file(&probe).map_err(io_err("cannot remove a file in", path))?;
        Ok(())
    }

    fn canonical_dir(&self, dir: &str) -> Result<String> {
        let path = Path::new(dir);
        let canonical = fs::canonicalize(path).map_err(io_err("cannot resolve", path))?;
        if !canonical.is_dir() {
            return Err(HostError::Invalid(format!("{dir} is not a directory")));
        }
        canonical
            .to_str()
            .map(str::to_owned)
            .ok_or_else(|| HostError::Invalid(format!("{} is not valid UTF-8", canonical.display())))
    }

    fn create_file_new(&self, path: &str, content: &str) -> Result<bool> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = Path::new(path);
        let mut f = match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err("cannot create", p)(e)),
        };
        f.write_all(content.as_bytes()).and_then(|()| f.sync_all()).map_err(io_err("cannot write", p))?;
        self.sync_file(path)?;
        Ok(true)
    }

    fn read_small_file(&self, path: &str) -> Result<Option<String>> {
        let p = Path::new(path);
        let f = match fs::File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot open", p)(e)),
        };
        let mut text = String::new();
        f.take(64 << 10).read_to_string(&mut text).map_err(io_err("cannot read", p))?;
        Ok(Some(text))
    }

    fn read_vm_state(&self, path: &str) -> Result<Vec<u8>> {
        read_state_file(path, "VM state file")?.ok_or_else(|| {
            io_err("cannot open the VM state file", Path::new(path))(std::io::ErrorKind::NotFound.into())
        })
    }

    fn write_vm_state(&self, path: &str, data: &[u8]) -> Result<()> {
        write_state_file(path, data)?;
        self.sync_file(path)
    }

    fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        let path = Path::new(dir);
        let entries = match fs::read_dir(path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("cannot list", path)(e)),
        };
        let mut names = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("cannot list", path))?;
            names.push(e.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn file_exists(&self, path: &str) -> Result<bool> {
        Ok(Path::new(path).exists())
    }

    fn remove_file(&self, path: &str) -> Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("cannot remove", Path::new(path))(e)),
            _ => Ok(()),
        }
    }

    fn remove_empty_dir(&self, dir: &str) -> Result<bool> {
        match fs::remove_dir(dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(false),
            Err(e) => Err(io_err("cannot remove", Path::new(dir))(e)),
        }
    }

    fn sync_file(&self, path: &str) -> Result<()> {
        let p = Path::new(path);
        fs::File::open(p).and_then(|f| f.sync_all()).map_err(io_err("cannot sync", p))?;
        if let Some(dir) = p.parent() {
            fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err("cannot sync", dir))?;
        }
        Ok(())
    }

    fn image_info(&self, path: &str, format: Format, shared: bool) -> Result<ImageInfo> {
        Ok(img::info(path, format, shared)?)
    }

    fn image_probe(&self, path: &str) -> Result<ImageInfo> {
        Ok(img::probe(path)?)
    }

    fn image_create(&self, path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
        img::create_qcow2(path, size, backing)?;
        // Explicitly too, not only through the umask: a layer holds a disk's data.
        let p = Path::new(path);
        fs::set_permissions(p, fs::Permissions::from_mode(0o600)).map_err(io_err("cannot restrict", p))
    }

    fn image_allocated(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        Ok(img::allocated(path)?)
    }

    fn image_bitmap(&self, path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()> {
        Ok(img::bitmap(path, format, name, op)?)
    }

    fn image_commit(&self, chain: &Chain) -> Result<()> {
        Ok(img::commit_keep_top(chain)?)
    }

    fn image_set_backing_name(&self, path: &str, backing: Option<&str>) -> Result<()> {
        Ok(img::set_backing_name(path, backing)?)
    }

    fn image_flatten(&self, chain: &Chain) -> Result<()> {
        Ok(img::flatten(chain)?)
    }

    fn image_compare(&self, a: &Chain, b: &Chain) -> Result<bool> {
        Ok(img::compare(a, b)?)
    }

    fn image_copy(&self, chain: &Chain, dst: &str) -> Result<()> {
        if Path::new(dst).symlink_metadata().is_ok() {
            return Err(HostError::Invalid(format!("{dst} exists already; standby never overwrites it")));
        }
        Ok(img::convert(chain, dst)?)
    }
}

impl VmDriver for LocalHost {
    fn check_config(&self, config: &VmConfig) -> Result<()> {
        self.can_run(config)?;
        let d = &config.driver;
        for nic in &d.nics {
            Nic::parse(nic).map_err(|why| HostError::BadConfig { arg: "--nic", why })?;
        }
        if let Some(f) = &d.firmware {
            if !Path::new(&f.loader).exists() {
                let why =
                    format!("UEFI firmware {} is not installed; install Debian's ovmf (make deps does)", f.loader);
                return Err(HostError::BadConfig { arg: "--uefi", why });
            }
            let vars = Path::new(&f.vars);
            if !vars.is_absolute() || !vars.parent().is_some_and(Path::is_dir) || vars.is_dir() {
                let why = format!("--nvram {}: give an absolute file path in a directory that exists", f.vars);
                return Err(HostError::BadConfig { arg: "--nvram", why });
            }
            // An existing store must be one this firmware reads: OVMF's template's size.
            if let (Ok(have), true, Ok(want)) =
                (fs::metadata(vars), f.loader == OVMF_CODE, fs::metadata(crate::OVMF_VARS))
            {
                if have.len() != want.len() {
                    let why = format!(
                        "--nvram {}: it holds {} bytes, not the {} of a variable store for {OVMF_CODE}; give a path \
                         that does not exist (standby makes it) or the VM's own store",
                        f.vars,
                        have.len(),
                        want.len()
                    );
                    return Err(HostError::BadConfig { arg: "--nvram", why });
                }
            }
        }
        if let Some(t) = &d.tpm {
            let state = t.state.as_deref().ok_or_else(|| HostError::BadConfig {
                arg: "--tpm",
                why: "standby's own driver keeps a TPM's state in a file; give it with --tpm PATH".into(),
            })?;
            if let Some(why) = swtpm::check_state_path(state) {
                return Err(HostError::BadConfig { arg: "--tpm", why });
            }
            if !["tpm-tis", "tpm-crb"].contains(&t.model.as_str()) {
                let why = format!("TPM device {} is not one QEMU emulates (tpm-tis, tpm-crb)", t.model);
                return Err(HostError::BadConfig { arg: "--tpm", why });
            }
        }
        // A name, not options: QEMU itself says whether it knows it, when the VM starts.
        for (arg, value) in [("--machine", &d.machine), ("--cpu-model", &d.cpu_model)] {
            if let Some(v) = value {
                let ok = !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    let why = format!(
                        "{arg} {v:?} is not a name such as q35 or qemu64 (`{QEMU_SYSTEM} {} help` lists them)",
                        if arg == "--machine" { "-machine" } else { "-cpu" }
                    );
                    return Err(HostError::BadConfig { arg, why });
                }
            }
        }
        if d.kernel.is_none() && (d.initrd.is_some() || d.append.is_some()) {
            return Err(HostError::BadConfig { arg: "--kernel", why: "--initrd and --append need --kernel".into() });
        }
        for (arg, what, path) in [("--kernel", "kernel", &d.kernel), ("--initrd", "initrd", &d.initrd)] {
            if let Some(p) = path {
                if !Path::new(p).is_absolute() || !Path::new(p).exists() {
                    let why = format!("{what} {p} does not exist (give an absolute path)");
                    return Err(HostError::BadConfig { arg, why });
                }
            }
        }
        Ok(())
    }

    fn config_networks(&self, config: &VmConfig) -> Result<Vec<String>> {
        let mut networks = Vec::new();
        for spec in &config.driver.nics {
            let nic = Nic::parse(spec).map_err(|why| HostError::BadConfig { arg: "--nic", why })?;
            networks.extend(nic.network());
        }
        Ok(networks)
    }

    fn check_network(&self, network: &str) -> Result<()> {
        let why = match Net::parse(network) {
            Some(net) if net.exists() => return Ok(()),
            Some(Net::Bridge(b)) => {
                format!("host {} has no bridge {b}; create it (`ip link add {b} type bridge`)", self.name)
            }
            Some(Net::Tap(t)) => format!(
                "host {} has no tap device {t}; create it (`ip tuntap add dev {t} mode tap; ip link set {t} up`) \
                 and wire it as the site does",
                self.name
            ),
            None => format!(
                "standby's own driver puts NICs on bridges and taps only: write bridge:NAME or tap:NAME, not {network}"
            ),
        };
        Err(HostError::BadConfig { arg: "--network-map", why })
    }

    fn vm_start(&self, vm: &VmLaunch) -> Result<()> {
        let dir = self.vm_dir(&vm.name);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let (nics, bridges) = nic::place(vm, &self.root, &self.name)?;
        let machine = Machine {
            name: vm.name.clone(),
            config: vm.config.clone(),
            nics,
            disks: vm
                .disks
                .iter()
                .enumerate()
                .map(|(i, source)| MachineDisk { source: source.clone(), node: disk_node(i) })
                .collect(),
            accel: self.accel,
            qmp_socket: self.socket(self.vm_file(&vm.name, "qmp.sock"))?,
            qmp_status_socket: self.socket(self.vm_file(&vm.name, "qmp-status.sock"))?,
            guest_agent_socket: self.socket(self.vm_file(&vm.name, "qga.sock"))?,
            console_log: self.vm_file(&vm.name, "console.log"),
            pidfile: self.vm_file(&vm.name, "qemu.pid"),
            start_paused: !bridges.is_empty(),
            tpm: match &vm.config.driver.tpm {
                Some(t) => Some((t.model.clone(), self.socket(self.vm_file(&vm.name, swtpm::SOCKET))?)),
                None => None,
            },
        };
        rotate_console(&dir.join("console.log"))?;
        if let Some(state) = vm.config.driver.tpm.as_ref().and_then(|t| t.state.as_deref()) {
            swtpm::start(&vm.name, &dir, state)?;
        }
        let out = Command::new(QEMU_SYSTEM)
            .args(machine.args())
            .output()
            .map_err(|source| QemuError::Spawn { program: QEMU_SYSTEM.into(), source })?;
        if !out.status.success() {
            swtpm::stop(&dir, Duration::ZERO);
            return Err(HostError::StartFailed {
                vm: vm.name.clone(),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // A daemonized QEMU sets its own umask (027): its monitors and console log would
        // be group-readable. The monitors control the VM, the log shows its console.
        for file in ["qmp.sock", "qmp-status.sock", "qga.sock", "console.log", "qemu.pid"] {
            let p = dir.join(file);
            if p.exists() {
                if let Err(e) = fs::set_permissions(&p, fs::Permissions::from_mode(0o600)) {
                    // Not left running (perhaps paused for its NICs) with its monitors open.
                    let _ = self.vm_kill(&vm.name);
                    return Err(io_err("cannot restrict", &p)(e));
                }
            }
        }
        match self.vm_runtime(&vm.name)? {
            VmRuntime::Running { .. } => {}
            VmRuntime::Stopped => {
                swtpm::stop(&dir, Duration::ZERO);
                return Err(HostError::StartFailed {
                    vm: vm.name.clone(),
                    detail: "QEMU exited right after starting; see `standby vm console`".into(),
                });
            }
        }
        // The guest has not run yet: on its bridges first, then its CPUs go.
        let attached = bridges.iter().try_for_each(|(tap, bridge)| nic::attach(tap, bridge));
        if let Err(e) = attached.and_then(|()| if bridges.is_empty() { Ok(()) } else { self.vm_resume(&vm.name) }) {
            // A VM that is not on its network is not started: no half-made VM runs.
            let _ = self.vm_kill(&vm.name);
            return Err(HostError::StartFailed { vm: vm.name.clone(), detail: e.to_string() });
        }
        Ok(())
    }

    fn vm_tpm_state(&self, vm: &VmLaunch) -> Result<Option<Vec<u8>>> {
        swtpm::read_state(&tpm_file(vm)?)
    }

    fn vm_set_tpm_state(&self, vm: &VmLaunch, state: Option<&[u8]>) -> Result<()> {
        let file = tpm_file(vm)?;
        match state {
            Some(data) => {
                write_state_file(&file, data)?;
                self.sync_file(&file)
            }
            // swtpm starts a new TPM where it finds no state.
            None => self.remove_file(&file),
        }
    }

    fn guest_freeze(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        let Some(mut agent) = self.guest_agent(vm, timeout)? else { return Ok(None) };
        agent.freeze(timeout).map(Some).map_err(|source| HostError::Agent { vm: vm.into(), source })
    }

    fn guest_frozen(&self, vm: &str, timeout: Duration) -> Result<Option<bool>> {
        let Some(mut agent) = self.guest_agent(vm, timeout)? else { return Ok(None) };
        let status = agent.freeze_status(timeout).map_err(|source| HostError::Agent { vm: vm.into(), source })?;
        Ok(Some(status == "frozen"))
    }

    fn guest_thaw(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        let Some(mut agent) = self.guest_agent(vm, timeout)? else { return Ok(None) };
        agent.thaw(timeout).map(Some).map_err(|source| HostError::Agent { vm: vm.into(), source })
    }

    fn guest_exec(&self, vm: &str, command: &str, timeout: Duration) -> Result<Option<GuestExit>> {
        let Some(mut agent) = self.guest_agent(vm, timeout)? else { return Ok(None) };
        let exited = agent.exec(command, timeout).map_err(|source| HostError::Agent { vm: vm.into(), source })?;
        Ok(Some(GuestExit { code: exited.code, output: exited.output }))
    }

    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime> {
        let marker = self.vm_marker(vm);
        Ok(match Self::live_pid(&self.vm_dir(vm).join("qemu.pid"), &marker) {
            Some(pid) => VmRuntime::Running { pid },
            None => VmRuntime::Stopped,
        })
    }

    fn vm_powerdown(&self, vm: &str) -> Result<()> {
        self.status_monitor(vm)?.run(&SystemPowerdown {}).map(drop)
    }

    fn vm_quit(&self, vm: &str) -> Result<()> {
        self.status_monitor(vm)?.run(&Quit {}).map(drop)
    }

    fn vm_pause(&self, vm: &str) -> Result<()> {
        self.status_monitor(vm)?.run(&Stop {}).map(drop)
    }

    fn vm_resume(&self, vm: &str) -> Result<()> {
        self.status_monitor(vm)?.run(&Cont {}).map(drop)
    }

    fn vm_paused(&self, vm: &str) -> Result<bool> {
        self.status_monitor(vm)?.paused()
    }

    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>> {
        Ok(self.status_monitor(vm)?.block_tops(disks)?.into_iter().map(|(_, f)| f).collect())
    }

    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()> {
        self.monitor(vm)?.protect(new_tops)
    }

    fn vm_flatten(&self, vm: &str, disks: usize, timeout: Duration) -> Result<()> {
        self.monitor(vm)?.flatten(disks, timeout)
    }

    fn vm_disks<'a>(&'a self, vm: &str, running: bool) -> Result<Box<dyn DiskAccess + 'a>> {
        let live = if running { Some(self.monitor(vm)?) } else { None };
        Ok(Box::new(QemuDisks { host: self, vm: vm.into(), live, fleecing: Vec::new() }))
    }

    fn vm_kill(&self, vm: &str) -> Result<()> {
        let pidfile = self.vm_dir(vm).join("qemu.pid");
        let marker = self.vm_marker(vm);
        if let Some(pid) = Self::live_pid(&pidfile, &marker) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            if !Self::wait_gone(&pidfile, &marker, Duration::from_secs(10)) {
                return Err(HostError::StillRunning { vm: vm.into(), pid });
            }
        }
        // Its TPM ends with it (given time to finish writing); one a killed start left
        // before its QEMU ran ends here.
        swtpm::stop(&self.vm_dir(vm), Duration::from_secs(3));
        Ok(())
    }

    fn vm_console(&self, vm: &str, from: u64) -> Result<(Vec<u8>, u64)> {
        read_console(&self.vm_dir(vm).join("console.log"), from)
    }

    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>> {
        let dir = self.vm_dir(vm).display().to_string();
        Ok(self.list_dir(&dir)?.into_iter().filter(|n| n.starts_with(prefix)).map(|n| format!("{dir}/{n}")).collect())
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn probe_accel(&self, kernel: &str, initrd: &str) -> Result<Accel> {
        let accel = if Path::new("/dev/kvm").exists() { boots_under_kvm(&self.root, kernel, initrd)? } else { false };
        let accel = if accel { Accel::Kvm } else { Accel::Tcg };
        let file = self.root.join("accel");
        fs::write(&file, accel.as_str()).map_err(io_err("cannot write", &file))?;
        Ok(accel)
    }
}

impl Transport for LocalHost {
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress> {
        let dir = self.root.join("nbd");
        let socket = self.socket(dir.join(format!("{}.sock", spec.id)).display().to_string())?;
        let pidfile = dir.join(format!("{}.pid", spec.id)).display().to_string();
        let serve = |direct: bool| {
            let _ = fs::remove_file(&socket);
            let args = NbdServe {
                chain: &spec.chain,
                socket: &socket,
                pidfile: &pidfile,
                export_name: &spec.id,
                writable: spec.writable,
                bitmap: spec.bitmap.as_deref(),
                direct,
            }
            .args();
            let out = Command::new(QEMU_NBD)
                .args(&args)
                .output()
                .map_err(|source| QemuError::Spawn { program: QEMU_NBD.into(), source })?;
            if !out.status.success() {
                return Err(QemuError::Failed {
                    program: QEMU_NBD.into(),
                    args: args.join(" "),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                });
            }
            Ok(())
        };
        // Direct I/O where asked and the filesystem allows it (tmpfs, for one, does not).
        match spec.direct {
            true => serve(true).or_else(|_| serve(false))?,
            false => serve(false)?,
        }
        Ok(NbdAddress { socket, agent: None })
    }

    fn nbd_connect(&self, addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<Box<dyn BlockStream>> {
        let stream = UnixStream::connect(&addr.socket).map_err(io_err("cannot connect to", Path::new(&addr.socket)))?;
        Ok(Box::new(standby_nbd::Client::connect(stream, export, contexts)?))
    }

    fn nbd_stop_all(&self, prefix: &str) -> Result<usize> {
        let dir = self.root.join("nbd");
        let mut stopped = 0;
        for name in self.list_dir(&dir.display().to_string())? {
            let Some(id) = name.strip_suffix(".pid") else {
                continue;
            };
            if !id.starts_with(prefix) {
                continue;
            }
            let pidfile = dir.join(&name);
            let marker = dir.join(format!("{id}.sock")).display().to_string();
            if let Some(pid) = Self::live_pid(&pidfile, &marker) {
                stopped += 1;
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                if !Self::wait_gone(&pidfile, &marker, Duration::from_secs(10)) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    if !Self::wait_gone(&pidfile, &marker, Duration::from_secs(5)) {
                        return Err(HostError::NbdStillRunning { id: id.into(), pid });
                    }
                }
            }
            let _ = fs::remove_file(&pidfile);
            let _ = fs::remove_file(&marker);
        }
        Ok(stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_read_in_bounded_pieces_and_from_the_start_after_a_rotation() {
        let dir = std::env::temp_dir().join(format!("standby-console-test-{}", std::process::id()));
        let host = LocalHost::new("t", &dir).unwrap();
        fs::create_dir_all(host.vm_dir("v")).unwrap();
        let log = host.vm_dir("v").join("console.log");
        let text: Vec<u8> = (0..(5 * CONSOLE_CHUNK / 2)).map(|i| b'a' + (i % 26) as u8).collect();
        fs::write(&log, &text).unwrap();
        let mut got = Vec::new();
        let mut pos = 0;
        loop {
            let (piece, next) = host.vm_console("v", pos).unwrap();
            assert!(piece.len() as u64 <= CONSOLE_CHUNK, "a piece of {} bytes", piece.len());
            if piece.is_empty() {
                break;
            }
            assert_eq!(next, pos + piece.len() as u64);
            got.extend(piece);
            pos = next;
        }
        assert_eq!(got, text, "the pieces make up the log");
        // Rotated at a restart: the offset is past the new log's end, which is read whole.
        fs::write(&log, b"new boot\n").unwrap();
        assert_eq!(host.vm_console("v", pos).unwrap(), (b"new boot\n".to_vec(), 9));
        fs::remove_dir_all(&dir).unwrap();
    }
}
