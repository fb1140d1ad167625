//! A real libvirt daemon for the tests (Debian's `libvirt-daemon-system`, installed by
//! `scripts/install-deps.sh`), started once for the whole suite when it does not run, and
//! domains of the test guest defined in it, undefined when the test ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const URI: &str = "qemu:///system";

/// `virsh -c qemu:///system ARGS`: its output, or a panic naming the command.
pub fn virsh(args: &[&str]) -> String {
    let o = Command::new("virsh").arg("-c").arg(URI).args(args).output().expect("virsh (libvirt-clients)");
    assert!(o.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `virsh` that may fail: (succeeded, stdout + stderr).
pub fn try_virsh(args: &[&str]) -> (bool, String) {
    let o = Command::new("virsh").arg("-c").arg(URI).args(args).output().expect("virsh (libvirt-clients)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success(), text)
}

fn answers() -> bool {
    Command::new("virsh").args(["-c", URI, "uri"]).output().is_ok_and(|o| o.status.success())
}

/// Makes sure libvirtd (and virtlogd) run on this machine: no systemd here, so they are
/// started by hand, once, under a lock shared by the suite's test processes.
pub fn ensure_daemon() {
    let lock = std::fs::File::create("/tmp/standby-test-libvirt.lock").expect("lock file");
    let _held = nix_lock(&lock);
    // What Debian's udev rule does on a machine that runs udev: /dev/kvm for group kvm,
    // which libvirt's QEMU user is in. Left root-only, libvirtd finds KVM unusable and
    // probes QEMU's capabilities again at every call (35 s for a `virsh define`).
    if let Ok(meta) = std::fs::metadata("/dev/kvm") {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o060 != 0o060 {
            let _ = Command::new("chgrp").args(["kvm", "/dev/kvm"]).output();
            let _ = std::fs::set_permissions("/dev/kvm", std::fs::Permissions::from_mode(0o660));
        }
    }
    if answers() {
        return;
    }
    for d in ["/var/log/libvirt", "/var/run/libvirt"] {
        std::fs::create_dir_all(d).expect("libvirt directories");
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let o = Command::new(daemon).arg("-d").output().unwrap_or_else(|e| panic!("{daemon}: {e}; run make deps"));
        assert!(o.status.success(), "{daemon} -d: {}", String::from_utf8_lossy(&o.stderr));
    }
    let start = Instant::now();
    while !answers() {
        assert!(start.elapsed() < Duration::from_secs(30), "libvirtd did not answer within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn nix_lock(file: &std::fs::File) -> impl Drop + '_ {
    struct Held<'a>(&'a std::fs::File);
    impl Drop for Held<'_> {
        fn drop(&mut self) {
            let _ = self.0.unlock();
        }
    }
    file.lock().expect("lock the libvirt start");
    Held(file)
}

/// A domain this test defined; destroyed and undefined (with its checkpoints' metadata)
/// when dropped, whether the test passed or not.
#[derive(Debug)]
pub struct Domain {
    pub name: String,
}

impl Domain {
    /// Defines domain `name` of the test guest (TCG) on `disk` (qcow2 unless `.raw`),
    /// booting with kernel command line `append`, its serial console in `console`, a
    /// guest agent channel (the guest runs qemu-ga on it), and one NIC per
    /// `(kind, on, mac)`: kind `network` or `bridge`.
    pub fn define(name: &str, disk: &str, append: &str, console: &str, nics: &[(&str, &str, &str)]) -> Domain {
        Domain::define_booting(name, disk, append, console, nics, None, false)
    }

    /// The same, booting UEFI (Debian's OVMF) with its variable store in `uefi_vars`
    /// (made by libvirt from OVMF's template at the first start) when given, and with an
    /// emulated TPM 2.0 (swtpm, its state kept by libvirt) when `tpm`.
    pub fn define_booting(
        name: &str,
        disk: &str,
        append: &str,
        console: &str,
        nics: &[(&str, &str, &str)],
        uefi_vars: Option<&str>,
        tpm: bool,
    ) -> Domain {
        ensure_daemon();
        let (kernel, initrd) = crate::guest();
        // Only what this test defines goes: a leftover of an earlier run of it first.
        let _ = try_virsh(&["destroy", name]);
        let _ = try_virsh(&["undefine", name, "--checkpoints-metadata", "--nvram", "--tpm"]);
        let format = if disk.ends_with(".raw") { "raw" } else { "qcow2" };
        let mut interfaces = String::new();
        for (kind, on, mac) in nics {
            let attr = if *kind == "bridge" { "bridge" } else { "network" };
            interfaces.push_str(&format!(
                "<interface type='{kind}'><mac address='{mac}'/><source {attr}='{on}'/><model type='e1000'/></interface>"
            ));
        }
        let firmware = uefi_vars.map_or_else(String::new, |vars| {
            format!(
                "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
                 <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{vars}</nvram>"
            )
        });
        let tpm = if tpm { "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm>" } else { "" };
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type>{firmware}<kernel>{kernel}</kernel><initrd>{initrd}</initrd>\
             <cmdline>{append}</cmdline></os><features><acpi/></features><on_poweroff>destroy</on_poweroff><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{disk}'/>\
             <target dev='vda' bus='virtio'/></disk>{interfaces}{tpm}\
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>\
             <serial type='file'><source path='{console}'/><target port='0'/></serial></devices></domain>"
        );
        let file = format!("{console}.domain.xml");
        std::fs::write(&file, xml).expect("write the domain XML");
        virsh(&["define", &file]);
        Domain { name: name.into() }
    }

    pub fn start(&self) {
        virsh(&["start", &self.name]);
    }

    pub fn state(&self) -> String {
        try_virsh(&["domstate", &self.name]).1.trim().to_owned()
    }

    /// What its guest agent says of its filesystems (`frozen` or `thawed`), asked through
    /// libvirt.
    pub fn freeze_status(&self) -> String {
        let out =
            virsh(&["qemu-agent-command", &self.name, "--timeout", "30", r#"{"execute":"guest-fsfreeze-status"}"#]);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out:?}: {e}"));
        v["return"].as_str().unwrap_or_else(|| panic!("no status in {out:?}")).to_owned()
    }

    /// Whether libvirt starts it when the host boots.
    pub fn autostart(&self) -> bool {
        virsh(&["dominfo", &self.name]).lines().any(|l| l.starts_with("Autostart:") && l.trim_end().ends_with("enable"))
    }

    pub fn checkpoints(&self) -> Vec<String> {
        checkpoints(&self.name)
    }
}

/// The checkpoint names of a domain, oldest first.
/// Where libvirt keeps the state of domain `domain`'s TPM 2.0 (under its UUID).
pub fn tpm_state_file(domain: &str) -> String {
    format!("/var/lib/libvirt/swtpm/{}/tpm2/tpm2-00.permall", virsh(&["domuuid", domain]).trim())
}

pub fn checkpoints(domain: &str) -> Vec<String> {
    let mut names: Vec<String> = virsh(&["checkpoint-list", domain, "--name", "--topological"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    names.sort_by_key(|n| n.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0));
    names
}

/// Every domain libvirt knows whose name starts with `prefix` (`virsh list --all`).
pub fn domains(prefix: &str) -> Vec<String> {
    let mut all: Vec<String> = virsh(&["list", "--all", "--name"])
        .lines()
        .map(str::trim)
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect();
    all.sort();
    all
}

/// Lets libvirt's QEMU user pass through a test's directory to the images in it.
pub fn open_for_qemu(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod the test directory");
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Its replica too, when a failed test left one standby defined.
        for d in [format!("{}_replica", self.name), self.name.clone()] {
            let _ = try_virsh(&["destroy", &d]);
            let _ = try_virsh(&["undefine", &d, "--checkpoints-metadata", "--nvram", "--tpm"]);
            let _ = std::fs::remove_dir_all(Path::new("/var/lib/libvirt/standby/kvm").join(&d));
        }
    }
}
