//! VM definitions and their lifecycle: create, start, guest shutdown, power off, status.

use std::time::{Duration, Instant};

use serde::Serialize;
use standby_host::{Format, Host, HostError, VmLaunch, VmRuntime};
use standby_model::{ReplicaState, Role, VmChange, VmConfig, VmName};
use standby_store::{DiskRecord, NewVm, VmRecord};

use crate::lock::VmLock;
use crate::{Engine, EngineError, Result};

/// What an operator asks for with `standby vm create`.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub host: String,
    pub disks: Vec<String>,
    /// One format per disk, in order (`qcow2` or `raw`); empty to probe each disk once.
    pub formats: Vec<String>,
    pub config: VmConfig,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    pub name: String,
    pub host: String,
    /// `running` or `stopped`.
    pub state: &'static str,
    /// `source` for a VM standby protects or manages.
    pub role: &'static str,
    pub pid: Option<u32>,
    /// `libvirt` for a domain libvirt manages, `qemu` for standby's own driver.
    pub driver: &'static str,
    /// Flattened: `--json` keeps `cpus`, `memory_mib`, `nics`, `kernel`, ... at the top.
    #[serde(flatten)]
    pub config: VmConfig,
    pub disks: Vec<DiskRecord>,
    pub created_at: String,
}

impl Engine {
    pub fn vm_create(&self, spec: &VmSpec) -> Result<VmView> {
        let name = VmName::new(&spec.name)?;
        if self.store().vm(name.as_str())?.is_some() {
            return Err(EngineError::VmExists(spec.name.clone()));
        }
        let host = self.host(&spec.host)?;
        if spec.disks.is_empty() {
            return Err(EngineError::BadArgument { arg: "--disk", why: "a VM needs at least one --disk".into() });
        }
        check_config(host.as_ref(), &spec.config)?;
        if !spec.formats.is_empty() && spec.formats.len() != spec.disks.len() {
            return Err(EngineError::BadArgument {
                arg: "--format",
                why: format!(
                    "{} --format for {} --disk; give one format per disk, in order, or none to probe them",
                    spec.formats.len(),
                    spec.disks.len()
                ),
            });
        }
        let formats = spec
            .formats
            .iter()
            .map(|f| {
                Format::parse(f).ok_or_else(|| EngineError::BadArgument {
                    arg: "--format",
                    why: format!("--format {f:?} is neither qcow2 nor raw"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut disks = Vec::new();
        for (i, path) in spec.disks.iter().enumerate() {
            disks.push(self.check_disk(host.as_ref(), path, formats.get(i).copied(), &disks)?);
        }
        // A UEFI store and a TPM state file are one VM's own: neither another VM's file
        // (disk, store, TPM state) nor another file of this one.
        let vars = spec.config.driver.firmware.as_ref().map(|f| f.vars.as_str());
        let tpm = spec.config.driver.tpm.as_ref().and_then(|t| t.state.as_deref());
        for (arg, path, others) in [("--nvram", vars, [tpm]), ("--tpm", tpm, [vars])] {
            let Some(path) = path else { continue };
            if let Some(other) = self.vm_using_file(path)? {
                let why = format!("{arg} {path} is already VM {other}'s; give the VM a file of its own");
                return Err(EngineError::BadArgument { arg, why });
            }
            if disks.iter().any(|d| d.path == path) || others.contains(&Some(path)) {
                let why = format!("{arg} {path} is another file of this VM (a disk, its UEFI store or TPM state)");
                return Err(EngineError::BadArgument { arg, why });
            }
        }
        // A new UEFI VM's variable store starts as the firmware's template.
        let mut made = None;
        if let Some(f) = &spec.config.driver.firmware {
            if !host.file_exists(&f.vars)? {
                host.write_vm_state(&f.vars, &host.read_vm_state(standby_host::OVMF_VARS)?)?;
                made = Some(&f.vars);
            }
        }
        let inserted = self.store().insert_vm(&NewVm {
            name: spec.name.clone(),
            host: spec.host.clone(),
            config: spec.config.clone(),
            disks,
            role: Role::Source,
            replica_id: None,
        });
        if let Err(e) = inserted {
            // A refused VM leaves nothing: the store made for it goes.
            if let Some(vars) = made {
                let _ = host.remove_file(vars);
            }
            return Err(e.into());
        }
        self.record_raw(&spec.name, "vm create", "ok", &format!("{} disk(s) on host {}", spec.disks.len(), spec.host));
        self.vm_show(&spec.name)
    }

    /// Registers libvirt domain `domain` of `host` as a VM of the same name, changing
    /// nothing in libvirt: its disks, their formats and its configuration are read from
    /// its definition, and each disk is checked as `vm create` checks one.
    pub fn vm_import(&self, domain: &str, host_name: &str) -> Result<VmView> {
        let name = VmName::new(domain).map_err(|_| EngineError::BadArgument {
            arg: "DOMAIN",
            why: format!(
                "domain name {domain:?} holds characters standby's VM names do not (letters, digits, '-', '_', '.'); \
                 rename it first (virsh domrename)"
            ),
        })?;
        if self.store().vm(name.as_str())?.is_some() {
            return Err(EngineError::VmExists(domain.into()));
        }
        let host = self.host(host_name)?;
        let imported = host.vm_describe(domain)?;
        let mut disks = Vec::new();
        for (path, format) in &imported.disks {
            disks.push(self.check_disk(host.as_ref(), path, Some(*format), &disks)?);
        }
        self.store().insert_vm(&NewVm {
            name: domain.into(),
            host: host_name.into(),
            config: imported.config,
            disks,
            role: Role::Source,
            replica_id: None,
        })?;
        self.record_raw(
            domain,
            "vm import",
            "ok",
            &format!("libvirt domain {domain} on host {host_name}, {} disk(s)", imported.disks.len()),
        );
        self.vm_show(domain)
    }

    /// Checks a disk an operator registers. Its format is the one stated, or probed here
    /// once and stored: every later open states it, so a raw disk whose guest writes a
    /// qcow2 header is never read as qcow2.
    fn check_disk(
        &self,
        host: &dyn Host,
        path: &str,
        stated: Option<Format>,
        so_far: &[DiskRecord],
    ) -> Result<DiskRecord> {
        let bad = |reason: String| EngineError::BadDisk { path: path.into(), reason };
        if !path.starts_with('/') {
            return Err(bad("give an absolute path".into()));
        }
        if path.chars().any(char::is_control) {
            return Err(bad("the path holds a control character; rename the file".into()));
        }
        if !host.file_exists(path)? {
            return Err(bad(format!("no such file on host {}; create it first (qemu-img create)", host.name())));
        }
        if so_far.iter().any(|d| d.path == path) {
            return Err(bad("given twice".into()));
        }
        if let Some(other) = self.store().vms_using_disk(path)?.first() {
            return Err(bad(format!("already a disk of VM {other}")));
        }
        if let Some(other) = self.vm_using_file(path)? {
            return Err(bad(format!("it is VM {other}'s UEFI store or TPM state, not a disk")));
        }
        let info = match stated {
            Some(format) => host.image_info(path, format, false),
            None => host.image_probe(path),
        }
        .map_err(|e| bad(format!("not a usable disk image: {}", crate::chain(&e))))?;
        if let Some(backing) = &info.backing_filename {
            return Err(bad(format!(
                "it has a backing file ({backing}); standby protects standalone disks only: flatten it first \
                 (qemu-img convert -O qcow2 {path} NEW.qcow2, then register NEW.qcow2)"
            )));
        }
        Ok(DiskRecord { path: path.into(), format: info.format })
    }

    /// The VM whose UEFI store or TPM state file `path` is, if any.
    fn vm_using_file(&self, path: &str) -> Result<Option<String>> {
        let uses = |v: &VmRecord| {
            v.config.driver.firmware.as_ref().is_some_and(|f| f.vars == path)
                || v.config.driver.tpm.as_ref().is_some_and(|t| t.state.as_deref() == Some(path))
                || v.disks.iter().any(|d| d.path == path)
        };
        Ok(self.store().vms()?.into_iter().find(uses).map(|v| v.name))
    }

    fn vm_record(&self, name: &str) -> Result<VmRecord> {
        self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.into()))
    }

    fn view(&self, vm: VmRecord) -> Result<VmView> {
        let runtime = self.host(&vm.host)?.vm_runtime(&vm.name)?;
        let (state, pid) = match runtime {
            VmRuntime::Running { pid } => ("running", Some(pid)),
            VmRuntime::Stopped => ("stopped", None),
        };
        Ok(VmView {
            name: vm.name,
            host: vm.host,
            state,
            role: vm.role.as_str(),
            pid,
            driver: if vm.config.driver.domain_xml.is_some() { "libvirt" } else { "qemu" },
            config: vm.config,
            disks: vm.disks,
            created_at: vm.created_at,
        })
    }

    pub fn vm_show(&self, name: &str) -> Result<VmView> {
        let vm = self.vm_record(name)?;
        self.view(vm)
    }

    pub fn vm_list(&self) -> Result<Vec<VmView>> {
        let vms = self.store().vms()?;
        vms.into_iter().map(|vm| self.view(vm)).collect()
    }

    pub(crate) fn vm_is_running(&self, vm: &VmRecord) -> Result<bool> {
        Ok(matches!(self.host(&vm.host)?.vm_runtime(&vm.name)?, VmRuntime::Running { .. }))
    }

    /// Starts a VM. Refuses while its counterpart (the source of a replica VM, or the
    /// replica VM of a source) runs, unless `force`.
    pub fn vm_start(&self, name: &str, force: bool) -> Result<VmView> {
        let vm = self.vm_record(name)?;
        // A replica VM shares its lock with its source: both are one protected VM.
        let lock_name = self.protected_name(&vm)?;
        let _lock = VmLock::acquire(&self.data_dir, &lock_name, "vm start")?;
        if self.vm_is_running(&vm)? {
            return Err(EngineError::VmState { vm: name.into(), state: "running", hint: "nothing to start" });
        }
        // A source whose host came back after a site loss is fenced before anything else.
        if vm.replica_id.is_none() {
            let replicas = self.store().replicas_of_vm(name)?;
            for r in replicas {
                self.settle_fence(r.id)?;
            }
        }
        // Not even with --force: its disks are being written under it.
        if let Some(why) = self.failback_holds(&vm)? {
            return Err(EngineError::Refused { vm: name.into(), why });
        }
        if vm.role == Role::Retired {
            let replacement = self
                .store()
                .replicas_of_vm(name)?
                .iter()
                .find(|r| r.state == ReplicaState::Permanent)
                .map_or_else(|| "its replica".to_owned(), crate::replica_vm::replica_vm_name);
            if !force {
                return Err(EngineError::Retired { vm: name.into(), replacement });
            }
            self.record_raw(
                &lock_name,
                "vm start",
                "warning",
                &format!(
                    "{name} started with --force although permanent failover retired it; {replacement} replaced it"
                ),
            );
        }
        if let Some(other) = self.running_counterpart(&vm)? {
            if !force {
                return Err(EngineError::TwoWriters { vm: name.into(), other: other.name, host: other.host });
            }
            self.record_raw(
                &lock_name,
                "vm start",
                "warning",
                &format!("{name} started with --force while {} runs", other.name),
            );
        }
        self.launch(&vm)?;
        self.record_raw(&lock_name, "vm start", "ok", &format!("{name} started"));
        self.view(vm)
    }

    /// Starts the VM's QEMU on its host.
    pub(crate) fn launch(&self, vm: &VmRecord) -> Result<()> {
        self.host(&vm.host)?.vm_start(&self.launch_of(vm)?)?;
        Ok(())
    }

    /// The VM as its host starts it: its configuration and its disks' chains.
    pub(crate) fn launch_of(&self, vm: &VmRecord) -> Result<VmLaunch> {
        Ok(VmLaunch { name: vm.name.clone(), config: vm.config.clone(), disks: self.launch_disks(vm)? })
    }

    /// The protected VM a VM belongs to: itself, or a replica VM's source.
    pub(crate) fn protected_name(&self, vm: &VmRecord) -> Result<String> {
        match vm.replica_id {
            Some(id) => Ok(self.store().replica(id)?.map(|r| r.vm).unwrap_or_else(|| vm.name.clone())),
            None => Ok(vm.name.clone()),
        }
    }

    /// The other running instance of the same protected VM, if any.
    fn running_counterpart(&self, vm: &VmRecord) -> Result<Option<VmRecord>> {
        let others: Vec<VmRecord> = match vm.replica_id {
            Some(id) => {
                let source = self.store().replica(id)?.map(|r| r.vm);
                source.and_then(|s| self.store().vm(&s).transpose()).transpose()?.into_iter().collect()
            }
            None => {
                let replicas = self.store().replicas_of_vm(&vm.name)?;
                let mut out = Vec::new();
                for r in replicas {
                    out.extend(self.store().replica_vm(r.id)?);
                }
                out
            }
        };
        for o in others {
            if self.vm_is_running(&o)? {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }

    /// Asks the guest to shut down (ACPI power button) and waits up to `timeout`; then
    /// powers it off. Returns true when the guest shut down by itself.
    pub fn vm_shutdown(&self, name: &str, timeout: Duration) -> Result<bool> {
        let vm = self.vm_record(name)?;
        let protected = self.protected_name(&vm)?;
        let _lock = VmLock::acquire(&self.data_dir, &protected, "vm shutdown")?;
        let r = self.shutdown_locked(&vm, timeout);
        self.record(&protected, "vm shutdown", &r, |by_itself| match by_itself {
            true => format!("{name}: guest shut down"),
            false => format!("{name}: guest did not shut down in {} s; powered off", timeout.as_secs()),
        });
        r
    }

    /// `vm_shutdown` for a caller that holds the VM's lock.
    pub(crate) fn shutdown_locked(&self, vm: &VmRecord, timeout: Duration) -> Result<bool> {
        let name = vm.name.as_str();
        let host = self.host(&vm.host)?;
        if !self.vm_is_running(vm)? {
            return Err(EngineError::VmState { vm: name.into(), state: "stopped", hint: "nothing to shut down" });
        }
        host.vm_powerdown(name)?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.vm_is_running(vm)? {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        power_off(host.as_ref(), name)?;
        Ok(false)
    }

    /// Powers the VM off at once. QEMU still exits cleanly, so persistent bitmaps stay valid.
    pub fn vm_stop(&self, name: &str) -> Result<()> {
        let vm = self.vm_record(name)?;
        let protected = self.protected_name(&vm)?;
        let _lock = VmLock::acquire(&self.data_dir, &protected, "vm stop")?;
        if !self.vm_is_running(&vm)? {
            return Err(EngineError::VmState { vm: name.into(), state: "stopped", hint: "nothing to stop" });
        }
        power_off(self.host(&vm.host)?.as_ref(), name)?;
        self.record_raw(&protected, "vm stop", "ok", &format!("{name} powered off"));
        Ok(())
    }

    pub fn vm_console(&self, name: &str, from: u64) -> Result<(Vec<u8>, u64)> {
        let vm = self.vm_record(name)?;
        Ok(self.host(&vm.host)?.vm_console(name, from)?)
    }
}

impl Engine {
    /// Changes a stopped VM's memory, CPUs, NICs or kernel; it takes effect at the next
    /// start. Refused while it runs: QEMU applies none of these to a running guest.
    pub fn vm_change(&self, name: &str, change: &VmChange) -> Result<VmView> {
        let vm = self.vm_record(name)?;
        let protected = self.protected_name(&vm)?;
        let _lock = VmLock::acquire(&self.data_dir, &protected, "vm change")?;
        if self.vm_is_running(&vm)? {
            return Err(EngineError::VmState {
                vm: name.into(),
                state: "running",
                hint: "QEMU cannot change memory, CPUs, NICs or the kernel of a running guest; shut it down first \
                       (standby vm shutdown), change it, start it again",
            });
        }
        let next = vm.config.changed(change).map_err(|(arg, why)| EngineError::BadArgument { arg, why })?;
        check_config(self.host(&vm.host)?.as_ref(), &next)?;
        let changes = vm.config.differences(&next);
        if changes.is_empty() {
            return Err(EngineError::NothingToChange {
                subject: name.into(),
                hint: format!(
                    "give --memory, --cpus, --nic, --no-nics, --kernel, --no-kernel, --initrd or --append with a value \
                     other than {name}'s current one (standby vm show {name})"
                ),
            });
        }
        self.store().update_vm_config(name, &next)?;
        self.record_raw(&protected, "vm change", "ok", &format!("{name}: {}", changes.join(", ")));
        self.vm_show(name)
    }

    /// Removes a VM's definition. Its disks stay where they are. Refused while it runs,
    /// while a job protects it, a plan names it or a failback writes to it.
    pub fn vm_delete(&self, name: &str) -> Result<Vec<String>> {
        let vm = self.vm_record(name)?;
        let protected = self.protected_name(&vm)?;
        let _lock = VmLock::acquire(&self.data_dir, &protected, "vm delete")?;
        let refuse = |why: String| {
            Err(EngineError::Refused { vm: name.into(), why: format!("VM {name} cannot be deleted: {why}") })
        };
        if vm.role == Role::Replica {
            return refuse(format!(
                "it is the replica VM of {protected} in failover; end the failover instead \
                 (standby failover undo {protected}, or standby failover permanent {protected})"
            ));
        }
        if self.vm_is_running(&vm)? {
            return refuse(format!("it is running; shut it down first (standby vm shutdown {name})"));
        }
        let replicas = self.store().replicas_of_vm(name)?;
        if let Some(r) = replicas.iter().find(|r| r.state != ReplicaState::Permanent) {
            return refuse(format!(
                "job {} protects it; remove it from the job first (standby replica delete {name} --job {} \
                 --delete-points, or --keep-files)",
                r.job, r.job
            ));
        }
        let plans = self.store().plans()?;
        if let Some(p) = plans.iter().find(|p| p.vms.iter().any(|v| v.vm == name)) {
            return refuse(format!(
                "plan {} fails it over; take it out of the plan first (standby plan change {} --vm ..., or \
                 standby plan delete {})",
                p.name, p.name, p.name
            ));
        }
        if let Some(why) = self.failback_holds(&vm)? {
            return refuse(why);
        }
        if let Some(p) = self.failback_targeting(name)? {
            return refuse(format!(
                "the failback of {p} goes to it; commit or undo that failback first (standby failback commit {p})"
            ));
        }
        self.store().remove_vm_definition(name)?;
        let disks: Vec<String> = vm.disks.iter().map(|d| d.path.clone()).collect();
        self.record_raw(name, "vm delete", "ok", &format!("definition removed; disks kept: {}", disks.join(" ")));
        Ok(disks)
    }
}

/// The settings every VM definition must satisfy, at creation and at every change: the
/// limits of any VM, then what its host's driver can run.
fn check_config(host: &dyn Host, config: &VmConfig) -> Result<()> {
    config.check().map_err(|(arg, why)| EngineError::BadArgument { arg, why })?;
    host.check_config(config).map_err(|e| match e {
        HostError::BadConfig { arg, why } => EngineError::BadArgument { arg, why },
        e => e.into(),
    })
}

/// `quit` lets QEMU flush and write its persistent bitmaps; SIGKILL only if it hangs.
/// A VM is off only when its process is gone: callers delete definitions and overlays
/// after this returns, so anything else is an error naming the process.
pub(crate) fn power_off(host: &dyn Host, name: &str) -> Result<()> {
    power_off_within(host, name, Duration::from_secs(30))
}

fn power_off_within(host: &dyn Host, name: &str, quit_wait: Duration) -> Result<()> {
    // A QEMU that no longer answers is killed below.
    let _ = host.vm_quit(name);
    let start = Instant::now();
    while start.elapsed() < quit_wait {
        if host.vm_runtime(name)? == VmRuntime::Stopped {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    host.vm_kill(name)?;
    match host.vm_runtime(name)? {
        VmRuntime::Stopped => Ok(()),
        VmRuntime::Running { pid } => Err(HostError::StillRunning { vm: name.into(), pid }.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use standby_host::*;

    use super::*;

    /// A host whose VM process outlives every signal, as a QEMU stuck in the kernel does;
    /// `vm_kill` answers Ok as the old `LocalHost` did. Nothing else is ever called.
    #[derive(Debug, Default)]
    struct Undying {
        kills: AtomicU32,
    }

    impl Host for Undying {
        fn name(&self) -> &str {
            "undying"
        }
    }

    impl Storage for Undying {
        fn ensure_dir(&self, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }

        fn canonical_dir(&self, _: &str) -> standby_host::Result<String> {
            unreachable!()
        }

        fn create_file_new(&self, _: &str, _: &str) -> standby_host::Result<bool> {
            unreachable!()
        }

        fn read_small_file(&self, _: &str) -> standby_host::Result<Option<String>> {
            unreachable!()
        }

        fn list_dir(&self, _: &str) -> standby_host::Result<Vec<String>> {
            unreachable!()
        }

        fn file_exists(&self, _: &str) -> standby_host::Result<bool> {
            unreachable!()
        }

        fn remove_file(&self, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }

        fn remove_empty_dir(&self, _: &str) -> standby_host::Result<bool> {
            unreachable!()
        }

        fn sync_file(&self, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_info(&self, _: &str, _: Format, _: bool) -> standby_host::Result<ImageInfo> {
            unreachable!()
        }

        fn image_probe(&self, _: &str) -> standby_host::Result<ImageInfo> {
            unreachable!()
        }

        fn image_create(&self, _: &str, _: u64, _: Option<(&str, Format)>) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_allocated(&self, _: &str) -> standby_host::Result<Vec<(u64, u64)>> {
            unreachable!()
        }

        fn image_bitmap(&self, _: &str, _: Format, _: &str, _: BitmapOp<'_>) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_commit(&self, _: &Chain) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_set_backing_name(&self, _: &str, _: Option<&str>) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_flatten(&self, _: &Chain) -> standby_host::Result<()> {
            unreachable!()
        }

        fn image_compare(&self, _: &Chain, _: &Chain) -> standby_host::Result<bool> {
            unreachable!()
        }

        fn image_copy(&self, _: &Chain, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }
    }

    impl VmDriver for Undying {
        fn vm_quit(&self, vm: &str) -> standby_host::Result<()> {
            Err(HostError::NotRunning(vm.into()))
        }

        fn vm_powerdown(&self, vm: &str) -> standby_host::Result<()> {
            Err(HostError::NotRunning(vm.into()))
        }

        fn vm_runtime(&self, _: &str) -> standby_host::Result<VmRuntime> {
            Ok(VmRuntime::Running { pid: 4242 })
        }

        fn vm_kill(&self, _: &str) -> standby_host::Result<()> {
            self.kills.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn check_config(&self, _: &VmConfig) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_start(&self, _: &VmLaunch) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_pause(&self, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_resume(&self, _: &str) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_paused(&self, _: &str) -> standby_host::Result<bool> {
            unreachable!()
        }

        fn vm_top_files(&self, _: &str, _: usize) -> standby_host::Result<Vec<String>> {
            unreachable!()
        }

        fn vm_protect(&self, _: &str, _: &[(String, u32)]) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_flatten(&self, _: &str, _: usize, _: Duration) -> standby_host::Result<()> {
            unreachable!()
        }

        fn vm_disks<'a>(&'a self, _: &str, _: bool) -> standby_host::Result<Box<dyn DiskAccess + 'a>> {
            unreachable!()
        }

        fn vm_console(&self, _: &str, _: u64) -> standby_host::Result<(Vec<u8>, u64)> {
            unreachable!()
        }

        fn vm_scratch_files(&self, _: &str, _: &str) -> standby_host::Result<Vec<String>> {
            unreachable!()
        }

        fn accel(&self) -> Accel {
            unreachable!()
        }

        fn probe_accel(&self, _: &str, _: &str) -> standby_host::Result<Accel> {
            unreachable!()
        }
    }

    impl Transport for Undying {
        fn nbd_serve(&self, _: &ServeSpec) -> standby_host::Result<NbdAddress> {
            unreachable!()
        }

        fn nbd_connect(&self, _: &NbdAddress, _: &str, _: &[&str]) -> standby_host::Result<Box<dyn BlockStream>> {
            unreachable!()
        }

        fn nbd_stop_all(&self, _: &str) -> standby_host::Result<usize> {
            unreachable!()
        }
    }

    /// Undo and rollback delete a replica's definition and overlays right after
    /// `power_off` returns: a process that lives on must make it fail, naming the PID.
    #[test]
    fn power_off_fails_naming_the_pid_while_the_process_lives() {
        let host = Undying::default();
        let e = power_off_within(&host, "web_replica", Duration::from_millis(20)).unwrap_err().to_string();
        assert_eq!(host.kills.load(Ordering::SeqCst), 1, "SIGKILL was tried");
        assert!(e.contains("web_replica") && e.contains("process 4242") && e.contains("nothing was deleted"), "{e}");
    }
}
