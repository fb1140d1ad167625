//! The libvirt driver, `LibvirtHost`: a host whose VMs are libvirt domains, driven through
//! the daemon they already live in, so that they stay visible and usable in virsh the
//! whole time. Start, shutdown, power off, pause and status are libvirt's verbs; a
//! replication run's views are libvirt's checkpoints and pull-mode backups (`disks.rs`);
//! a VM standby starts from a domain (a replica) is defined from the source's definition
//! (`domain.rs`). Files, images and NBD are the machine's own, as for standby's own
//! driver: a `LocalHost` on the same machine does them.

mod agent;
mod disks;
pub mod domain;
mod tpm;
mod virsh;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use standby_model::image::{Accel, Chain, DiskSource, Format, ImageInfo};
use standby_model::{DriverConfig, Tpm, VmConfig};

use crate::transfer::{Moved, Plan, Stats, Wire};
use crate::{
    BitmapOp, DiskAccess, Endpoint, GuestExit, Host, HostError, LocalHost, NbdAddress, Result, ServeSpec, Storage,
    Transport, VmDriver, VmLaunch, VmRuntime,
};
use domain::Derived;
use standby_qemu::guest_agent::{AgentChannel, AgentError};
use virsh::Virsh;

/// Where standby keeps what a domain's QEMU itself opens (backup sockets and scratch
/// files, a replica's console): outside standby's owner-only data directory, in a
/// directory owned by the user QEMU runs as.
const RUN_ROOT: &str = "/var/lib/libvirt/standby";

#[derive(Debug)]
pub struct LibvirtHost {
    name: String,
    virsh: Virsh,
    local: LocalHost,
}

/// A domain as `vm import` registers it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Imported {
    pub config: VmConfig,
    pub disks: Vec<(String, Format)>,
}

impl LibvirtHost {
    /// The host `name`, whose domains the daemon at `uri` holds; standby's own files for
    /// it go under `root`.
    pub fn new(name: &str, uri: &str, root: &Path) -> Result<LibvirtHost> {
        let local = LocalHost::new(name, root)?;
        Ok(LibvirtHost { name: name.into(), virsh: Virsh { uri: uri.into(), scratch: root.join("xml") }, local })
    }

    fn agent<'a>(&'a self, vm: &'a str) -> agent::VirshAgent<'a> {
        agent::VirshAgent { virsh: &self.virsh, domain: vm }
    }

    /// Where this host's runs make the NBD sockets peers read from: standby's own
    /// directory, and the one QEMU opens files in for libvirt's backups.
    pub fn socket_dirs(&self) -> Vec<PathBuf> {
        vec![self.local.root().to_path_buf(), Path::new(RUN_ROOT).join(&self.name)]
    }

    pub fn uri(&self) -> &str {
        &self.virsh.uri
    }

    /// The daemon's version, or why it does not answer.
    pub fn version(&self) -> Result<String> {
        answers(&self.virsh)
    }

    /// Whether the daemon at `uri` answers (its version), before anything is made for it.
    pub fn probe(uri: &str) -> Result<String> {
        // Asking writes no document: the scratch directory is never used.
        answers(&Virsh { uri: uri.into(), scratch: PathBuf::new() })
    }

    /// Reads domain `name` as `vm import` registers it, changing nothing.
    pub fn describe(&self, name: &str) -> Result<Imported> {
        let xml = self.virsh.run(&format!("reading domain {name}"), &["dumpxml", "--inactive", name])?;
        let d = domain::parse(&xml)
            .map_err(|why| HostError::BadConfig { arg: "DOMAIN", why: format!("domain {name}: {why}") })?;
        if let Some(disk) = d.disks.iter().find(|x| x.chained) {
            return Err(HostError::BadConfig {
                arg: "DOMAIN",
                why: format!(
                    "domain {name}: its disk {} has a backing chain; standby protects standalone disks only: \
                     flatten it first (virsh blockpull {name} {})",
                    disk.target, disk.target
                ),
            });
        }
        if let Some(why) = d.tpm.as_ref().and_then(domain::DomainTpm::unsupported) {
            return Err(HostError::BadConfig { arg: "DOMAIN", why: format!("domain {name}: {why}") });
        }
        if d.standby_made {
            return Err(HostError::BadConfig {
                arg: "DOMAIN",
                why: format!("domain {name} is one standby defined (a replica); import the VM it replicates instead"),
            });
        }
        Ok(Imported {
            config: VmConfig {
                cpus: d.vcpus,
                memory_mib: d.memory_mib,
                driver: DriverConfig {
                    domain_xml: Some(xml),
                    firmware: d.firmware,
                    // libvirt keeps the state under the domain's UUID: no path of standby's.
                    tpm: d.tpm.map(|t| Tpm { model: t.model, state: None }),
                    ..DriverConfig::default()
                },
            },
            disks: d.disks.into_iter().map(|x| (x.path, x.format)).collect(),
        })
    }

    /// The domain's definition as libvirt holds it now (`inactive`: the one it starts
    /// from), None when libvirt has no such domain.
    fn definition(&self, vm: &str, inactive: bool) -> Result<Option<String>> {
        let mut args = vec!["dumpxml", vm];
        if inactive {
            args.insert(1, "--inactive");
        }
        match self.virsh.run(&format!("reading domain {vm}"), &args) {
            Ok(xml) => Ok(Some(xml)),
            Err(e) if virsh::is_missing_domain(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn domain(&self, vm: &str, inactive: bool) -> Result<domain::Domain> {
        let xml = self.definition(vm, inactive)?.ok_or_else(|| HostError::NotRunning(vm.into()))?;
        domain::parse(&xml).map_err(|why| HostError::Invalid(format!("domain {vm}: {why}")))
    }

    fn state(&self, vm: &str) -> Result<Option<String>> {
        match self.virsh.run(&format!("reading the state of domain {vm}"), &["domstate", vm]) {
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(e) if virsh::is_missing_domain(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory of a domain's QEMU-opened files, owned by the user its QEMU runs as
    /// (`pid`'s owner; root's when stopped).
    pub(crate) fn run_dir(&self, vm: &str, pid: Option<u32>) -> Result<PathBuf> {
        let dir = Path::new(RUN_ROOT).join(&self.name).join(vm);
        let io = |what: &str, path: &Path| {
            let (what, path) = (what.to_owned(), path.display().to_string());
            move |source| HostError::Io { what, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        // Others may pass through, not list: QEMU reaches its own directory below.
        for up in [Path::new(RUN_ROOT).to_path_buf(), Path::new(RUN_ROOT).join(&self.name)] {
            std::fs::set_permissions(&up, std::fs::Permissions::from_mode(0o711)).map_err(io("cannot open", &up))?;
        }
        if let Some(pid) = pid {
            use std::os::unix::fs::MetadataExt;
            if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}")) {
                std::os::unix::fs::chown(&dir, Some(meta.uid()), Some(meta.gid())).map_err(|source| HostError::Io {
                    what: "cannot give QEMU's user".into(),
                    path: dir.display().to_string(),
                    source,
                })?;
            }
        }
        Ok(dir)
    }

    /// The definition libvirt holds of a VM standby defines from a domain (a replica, a
    /// failback's new VM), None before its first start; an error when the name is taken by
    /// a domain standby did not define.
    fn derived_definition(&self, vm: &str) -> Result<Option<domain::Domain>> {
        let Some(xml) = self.definition(vm, true)? else { return Ok(None) };
        let existing = domain::parse(&xml).map_err(HostError::Invalid)?;
        if !existing.standby_made {
            return Err(HostError::StartFailed {
                vm: vm.into(),
                detail: format!(
                    "libvirt at {} holds a domain named {vm} that standby did not define; rename it (virsh \
                     domrename) or give the job another --replica-suffix",
                    self.virsh.uri
                ),
            });
        }
        Ok(Some(existing))
    }

    fn pid(&self, vm: &str) -> Option<u32> {
        virsh::qemu_pid(&self.virsh.uri, vm)
    }

    fn wait_stopped(&self, vm: &str, timeout: Duration) -> Result<bool> {
        let until = std::time::Instant::now() + timeout;
        loop {
            if matches!(self.vm_runtime(vm)?, VmRuntime::Stopped) {
                return Ok(true);
            }
            if std::time::Instant::now() > until {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether `vm` is the domain `source` itself (started as libvirt holds it), not a VM
/// standby defines from it.
fn is_own(vm: &VmLaunch, source: &domain::Domain) -> bool {
    source.name == vm.name
        && vm.disks.len() == source.disks.len()
        && vm
            .disks
            .iter()
            .zip(&source.disks)
            .all(|(d, s)| matches!(d, DiskSource::Image { path, format } if *path == s.path && *format == s.format))
}

impl Host for LibvirtHost {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Storage for LibvirtHost {
    fn ensure_dir(&self, dir: &str) -> Result<()> {
        self.local.ensure_dir(dir)?;
        // A replica's QEMU runs as libvirt's user and must pass through to its layers
        // (libvirt gives it the files themselves); nobody else may list them.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(|source| HostError::Io {
            what: "cannot open for libvirt's QEMU".into(),
            path: dir.into(),
            source,
        })
    }
    fn canonical_dir(&self, dir: &str) -> Result<String> {
        self.local.canonical_dir(dir)
    }
    fn create_file_new(&self, path: &str, content: &str) -> Result<bool> {
        self.local.create_file_new(path, content)
    }
    fn read_vm_state(&self, path: &str) -> Result<Vec<u8>> {
        self.local.read_vm_state(path)
    }
    fn write_vm_state(&self, path: &str, data: &[u8]) -> Result<()> {
        self.local.write_vm_state(path, data)
    }
    fn read_small_file(&self, path: &str) -> Result<Option<String>> {
        self.local.read_small_file(path)
    }
    fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        self.local.list_dir(dir)
    }
    fn file_exists(&self, path: &str) -> Result<bool> {
        self.local.file_exists(path)
    }
    fn remove_file(&self, path: &str) -> Result<()> {
        self.local.remove_file(path)
    }
    fn remove_empty_dir(&self, dir: &str) -> Result<bool> {
        self.local.remove_empty_dir(dir)
    }
    fn sync_file(&self, path: &str) -> Result<()> {
        self.local.sync_file(path)
    }
    fn image_info(&self, path: &str, format: Format, shared: bool) -> Result<ImageInfo> {
        self.local.image_info(path, format, shared)
    }
    fn image_probe(&self, path: &str) -> Result<ImageInfo> {
        self.local.image_probe(path)
    }
    fn image_create(&self, path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
        self.local.image_create(path, size, backing)
    }
    fn image_allocated(&self, path: &str) -> Result<Vec<(u64, u64)>> {
        self.local.image_allocated(path)
    }
    fn image_bitmap(&self, path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()> {
        self.local.image_bitmap(path, format, name, op)
    }
    fn image_commit(&self, chain: &Chain) -> Result<()> {
        self.local.image_commit(chain)
    }
    fn image_set_backing_name(&self, path: &str, backing: Option<&str>) -> Result<()> {
        self.local.image_set_backing_name(path, backing)
    }
    fn image_flatten(&self, chain: &Chain) -> Result<()> {
        self.local.image_flatten(chain)
    }
    fn image_compare(&self, a: &Chain, b: &Chain) -> Result<bool> {
        self.local.image_compare(a, b)
    }
    fn image_copy(&self, chain: &Chain, dst: &str) -> Result<()> {
        self.local.image_copy(chain, dst)
    }
}

impl Transport for LibvirtHost {
    fn nbd_serve(&self, spec: &ServeSpec) -> Result<NbdAddress> {
        self.local.nbd_serve(spec)
    }
    fn nbd_connect(&self, addr: &NbdAddress, export: &str, contexts: &[&str]) -> Result<Box<dyn crate::BlockStream>> {
        self.local.nbd_connect(addr, export, contexts)
    }
    fn transfer(
        &self,
        plan: &Plan,
        src: &Endpoint,
        dst: &Endpoint,
        wire: &Wire,
        report: &(dyn Fn(Moved) + Sync),
    ) -> Result<Stats> {
        self.local.transfer(plan, src, dst, wire, report)
    }
    fn nbd_stop_all(&self, prefix: &str) -> Result<usize> {
        self.local.nbd_stop_all(prefix)
    }
}

impl VmDriver for LibvirtHost {
    fn check_config(&self, config: &VmConfig) -> Result<()> {
        match &config.driver.domain_xml {
            Some(xml) => domain::parse(xml).map(drop).map_err(|why| HostError::BadConfig { arg: "DOMAIN", why }),
            None => Err(HostError::BadConfig {
                arg: "--host",
                why: format!(
                    "host {} is driven by libvirt: register its domains with `standby vm import DOMAIN --host {}`, \
                     and define VMs of standby's own driver on another host",
                    self.name, self.name
                ),
            }),
        }
    }

    fn can_run(&self, config: &VmConfig) -> Result<()> {
        self.check_config(config)
    }

    fn config_networks(&self, config: &VmConfig) -> Result<Vec<String>> {
        let Some(xml) = &config.driver.domain_xml else { return Ok(Vec::new()) };
        let d = domain::parse(xml).map_err(HostError::Invalid)?;
        Ok(d.nics.iter().map(domain::DomainNic::key).collect())
    }

    fn vm_describe(&self, domain: &str) -> Result<Imported> {
        self.describe(domain)
    }

    fn vm_start(&self, vm: &VmLaunch) -> Result<()> {
        let xml = vm.config.driver.domain_xml.as_deref().ok_or_else(|| HostError::BadConfig {
            arg: "--host",
            why: format!("VM {} has no libvirt definition", vm.name),
        })?;
        let source = domain::parse(xml).map_err(HostError::Invalid)?;
        let own = is_own(vm, &source);
        if !own {
            // A VM standby makes from the domain: defined anew at each start, since its
            // chains change (protective points, generations).
            let existing = self.derived_definition(&vm.name)?;
            let console = self.run_dir(&vm.name, None)?.join("console.log");
            let _ = std::fs::remove_file(&console);
            let derived = domain::derive(
                xml,
                &Derived {
                    name: &vm.name,
                    uuid: existing.as_ref().and_then(|e| e.uuid.as_deref()),
                    disks: &vm.disks,
                    network_map: &vm.config.driver.network_map,
                    console_file: console.to_str(),
                    nvram: vm.config.driver.firmware.as_ref().map(|f| f.vars.as_str()),
                    of: &source.name,
                },
            )
            .map_err(|detail| HostError::StartFailed { vm: vm.name.clone(), detail })?;
            self.virsh.run_with(&format!("defining domain {}", vm.name), &["define"], &[&derived])?;
        }
        // A replica's first start: its TPM gets the state it waited with, now that it has a UUID.
        if vm.config.driver.tpm.is_some() {
            self.place_tpm_seed(vm)?;
        }
        self.virsh
            .run(&format!("starting domain {}", vm.name), &["start", &vm.name])
            .map_err(|e| HostError::StartFailed { vm: vm.name.clone(), detail: e.to_string() })?;
        Ok(())
    }

    fn vm_runtime(&self, vm: &str) -> Result<VmRuntime> {
        Ok(match self.state(vm)?.as_deref() {
            Some("running" | "paused" | "in shutdown" | "pmsuspended" | "blocked") => {
                VmRuntime::Running { pid: self.pid(vm).unwrap_or(0) }
            }
            _ => VmRuntime::Stopped,
        })
    }

    fn vm_powerdown(&self, vm: &str) -> Result<()> {
        self.virsh.run(&format!("shutting down domain {vm}"), &["shutdown", vm, "--mode", "acpi"]).map(drop)
    }

    fn vm_quit(&self, vm: &str) -> Result<()> {
        // SIGTERM: QEMU flushes its images and writes the persistent bitmaps.
        self.virsh.run(&format!("ending domain {vm}"), &["destroy", vm, "--graceful"]).map(drop)
    }

    fn vm_pause(&self, vm: &str) -> Result<()> {
        self.virsh.run(&format!("pausing domain {vm}"), &["suspend", vm]).map(drop)
    }

    fn vm_resume(&self, vm: &str) -> Result<()> {
        self.virsh.run(&format!("resuming domain {vm}"), &["resume", vm]).map(drop)
    }

    fn vm_paused(&self, vm: &str) -> Result<bool> {
        Ok(self.state(vm)?.as_deref() == Some("paused"))
    }

    fn vm_top_files(&self, vm: &str, disks: usize) -> Result<Vec<String>> {
        let d = self.domain(vm, false)?;
        if d.disks.len() < disks {
            return Err(HostError::DiskMissing { vm: vm.into(), disk: d.disks.len() });
        }
        Ok(d.disks.into_iter().take(disks).map(|x| x.path).collect())
    }

    fn vm_protect(&self, vm: &str, new_tops: &[(String, u32)]) -> Result<()> {
        let d = self.domain(vm, false)?;
        if d.disks.len() < new_tops.len() {
            return Err(HostError::DiskMissing { vm: vm.into(), disk: d.disks.len() });
        }
        // One external snapshot of every disk at once onto the images standby made, no
        // libvirt metadata: the chain is standby's, recorded in its own database.
        let mut args = vec![
            "snapshot-create-as".to_owned(),
            vm.to_owned(),
            "--disk-only".into(),
            "--no-metadata".into(),
            "--reuse-external".into(),
            "--atomic".into(),
        ];
        for (disk, (top, _)) in d.disks.iter().zip(new_tops) {
            // virsh splits a diskspec at commas; a comma in a path is written twice.
            args.push("--diskspec".into());
            args.push(format!("{},snapshot=external,driver=qcow2,file={}", disk.target, top.replace(',', ",,")));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.virsh.run(&format!("taking a protective point of {vm}"), &args).map(drop)
    }

    fn vm_flatten(&self, vm: &str, disks: usize, timeout: Duration) -> Result<()> {
        let d = self.domain(vm, false)?;
        let secs = timeout.as_secs().max(1).to_string();
        for disk in d.disks.iter().take(disks) {
            self.virsh
                .run(
                    &format!("pulling the chain of {vm}'s disk {} into its top", disk.target),
                    &["blockpull", vm, &disk.target, "--wait", "--timeout", &secs],
                )
                .map_err(|e| HostError::JobFailed {
                    vm: vm.into(),
                    job: format!("blockpull {}", disk.target),
                    error: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn vm_disks<'a>(&'a self, vm: &str, running: bool) -> Result<Box<dyn DiskAccess + 'a>> {
        let disks = self.domain(vm, !running)?.disks;
        Ok(Box::new(disks::LibvirtDisks::new(self, vm, running, disks)))
    }

    fn vm_kill(&self, vm: &str) -> Result<()> {
        if matches!(self.vm_runtime(vm)?, VmRuntime::Stopped) {
            return Ok(());
        }
        let pid = self.pid(vm).unwrap_or(0);
        let _ = self.virsh.run(&format!("destroying domain {vm}"), &["destroy", vm]);
        if !self.wait_stopped(vm, Duration::from_secs(10))? {
            return Err(HostError::StillRunning { vm: vm.into(), pid });
        }
        Ok(())
    }

    fn vm_autostart(&self, vm: &str, on: Option<bool>) -> Result<Option<bool>> {
        let info = self.virsh.run(&format!("reading domain {vm}"), &["dominfo", vm])?;
        let was =
            info.lines().find_map(|l| l.strip_prefix("Autostart:")).map(|v| v.trim() == "enable").ok_or_else(|| {
                self.virsh.error(&format!("reading domain {vm}"), "dominfo shows no Autostart".into())
            })?;
        match on {
            Some(true) if !was => {
                self.virsh.run(&format!("setting autostart of {vm}"), &["autostart", vm]).map(drop)?
            }
            Some(false) if was => self
                .virsh
                .run(&format!("switching off autostart of {vm}"), &["autostart", vm, "--disable"])
                .map(drop)?,
            _ => {}
        }
        Ok(Some(was))
    }

    fn vm_forget(&self, vm: &str) -> Result<()> {
        let Some(xml) = self.definition(vm, true)? else { return self.forget_tpm_seed(vm) };
        let d = domain::parse(&xml).map_err(HostError::Invalid)?;
        if !d.standby_made {
            // Only what standby defined goes; an operator's domain is never undefined.
            return Ok(());
        }
        self.virsh.run(
            &format!("undefining domain {vm}"),
            // The variable store is not the replica's to delete; its TPM's state is, even
            // when the source's definition asks libvirt to keep it (persistent_state).
            &["undefine", vm, "--checkpoints-metadata", "--snapshots-metadata", "--keep-nvram", "--tpm"],
        )?;
        let _ = std::fs::remove_dir_all(Path::new(RUN_ROOT).join(&self.name).join(vm));
        Ok(())
    }

    fn vm_unchanged(&self, vm: &VmLaunch) -> Result<()> {
        let xml = vm.config.driver.domain_xml.as_deref().ok_or_else(|| HostError::BadConfig {
            arg: "--host",
            why: format!("VM {} has no libvirt definition", vm.name),
        })?;
        let stored = domain::parse(xml).map_err(HostError::Invalid)?;
        // A VM standby defines from the domain is redefined from the stored definition at
        // each start: only an operator's own domain can drift.
        if !is_own(vm, &stored) {
            return Ok(());
        }
        let disks = |d: &domain::Domain| d.disks.iter().map(|x| (x.path.clone(), x.format)).collect::<Vec<_>>();
        let mut changes: Vec<&str> = Vec::new();
        // The definition it starts from, and while it runs the one it runs with (a disk
        // attached without --config is in that one only).
        for inactive in [true, false] {
            let Some(xml) = self.definition(&vm.name, inactive)? else {
                return Err(HostError::Invalid(format!(
                    "domain {} is no longer defined in libvirt at {} (undefined or renamed since `vm import`); \
                     define it again under that name",
                    vm.name, self.virsh.uri
                )));
            };
            if !inactive && !matches!(self.vm_runtime(&vm.name)?, VmRuntime::Running { .. }) {
                break;
            }
            let live = domain::parse(&xml)
                .map_err(|why| HostError::Invalid(format!("domain {} changed since `vm import`: {why}", vm.name)))?;
            for (changed, what) in [
                (disks(&live) != disks(&stored), "its disks"),
                (live.tpm.is_some() != stored.tpm.is_some(), "its TPM"),
                (live.firmware.is_some() != stored.firmware.is_some(), "its UEFI variable store"),
            ] {
                if changed && !changes.contains(&what) {
                    changes.push(what);
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        Err(HostError::Invalid(format!(
            "domain {}: {} changed since `vm import`, so its restore points would miss what is new; protect it as \
             it is now: delete its replicas (standby replica delete), then standby vm delete {} and standby vm \
             import {} again",
            vm.name,
            changes.join(" and "),
            vm.name,
            vm.name
        )))
    }

    fn vm_defined(&self, vm: &str) -> Result<bool> {
        Ok(self.definition(vm, true)?.is_some())
    }

    fn vm_tpm_state(&self, vm: &VmLaunch) -> Result<Option<Vec<u8>>> {
        self.tpm_state(vm)
    }

    fn vm_set_tpm_state(&self, vm: &VmLaunch, state: Option<&[u8]>) -> Result<()> {
        self.set_tpm_state(vm, state)
    }

    fn guest_freeze(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        agent_answer(vm, self.agent(vm).freeze(timeout))
    }

    fn check_network(&self, network: &str) -> Result<()> {
        if network.starts_with("tap:") {
            return Err(HostError::BadConfig {
                arg: "--network-map",
                why: format!("{network}: a libvirt host puts NICs on libvirt networks and bridges (bridge:NAME)"),
            });
        }
        match network.strip_prefix("bridge:") {
            Some(b) if crate::nic::Net::Bridge(b.into()).exists() => Ok(()),
            Some(b) => Err(HostError::BadConfig {
                arg: "--network-map",
                why: format!("host {} has no bridge {b}; create it, or map to a libvirt network", self.name),
            }),
            None => {
                self.virsh.run(&format!("reading libvirt network {network}"), &["net-info", network]).map(drop).map_err(
                    |e| HostError::BadConfig {
                        arg: "--network-map",
                        why: format!("{e}; `virsh net-list --all` shows the networks host {} has", self.name),
                    },
                )
            }
        }
    }

    fn guest_frozen(&self, vm: &str, timeout: Duration) -> Result<Option<bool>> {
        // libvirt waits 5 s for the agent's synchronisation itself; the status answers at once.
        let status = agent_answer(vm, self.agent(vm).freeze_status(timeout.min(Duration::from_secs(5))))?;
        Ok(status.map(|s| s == "frozen"))
    }

    fn guest_thaw(&self, vm: &str, timeout: Duration) -> Result<Option<u64>> {
        agent_answer(vm, self.agent(vm).thaw(timeout))
    }

    fn guest_exec(&self, vm: &str, command: &str, timeout: Duration) -> Result<Option<GuestExit>> {
        let exited = agent_answer(vm, self.agent(vm).exec(command, timeout))?;
        Ok(exited.map(|e| GuestExit { code: e.code, output: e.output }))
    }

    fn vm_console(&self, vm: &str, from: u64) -> Result<(Vec<u8>, u64)> {
        let d = self.domain(vm, false)?;
        let Some(file) = d.console_file else {
            return Err(HostError::Invalid(format!(
                "domain {vm} has no serial port writing to a file; `virsh console {vm}` shows its console"
            )));
        };
        crate::local::read_console(Path::new(&file), from)
    }

    fn vm_scratch_files(&self, vm: &str, prefix: &str) -> Result<Vec<String>> {
        let dir = Path::new(RUN_ROOT).join(&self.name).join(vm);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .map(|n| dir.join(n).display().to_string())
            .collect())
    }

    fn accel(&self) -> Accel {
        self.local.accel()
    }

    fn probe_accel(&self, kernel: &str, initrd: &str) -> Result<Accel> {
        self.local.probe_accel(kernel, initrd)
    }
}

fn answers(virsh: &Virsh) -> Result<String> {
    // `virsh version` probes the hypervisor for seconds; the connection alone tells
    // whether the daemon answers, and it runs the library virsh was built with.
    virsh.run("connecting", &["uri"])?;
    let v = virsh.run("asking its version", &["--version"]).unwrap_or_default();
    Ok(format!("libvirt {}", v.trim()))
}

/// A domain without an agent channel has no agent to ask: None, as on every driver.
fn agent_answer<T>(vm: &str, answer: std::result::Result<T, AgentError>) -> Result<Option<T>> {
    match answer {
        Ok(v) => Ok(Some(v)),
        Err(AgentError::NotConfigured) => Ok(None),
        Err(source) => Err(HostError::Agent { vm: vm.into(), source }),
    }
}
