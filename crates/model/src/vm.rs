//! A VM's configuration, apart from its disks: one type carried whole from the operator's
//! command through the database to the driver that starts it. Its `driver` part is the
//! driver's own (for QEMU: NIC device models and a kernel booted directly); the engine
//! passes it on, asks the host to check it, and never reads its fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// Flattened: `--json` and the failback records keep one flat object.
    #[serde(flatten)]
    pub driver: DriverConfig,
}

/// The part of a VM's configuration only its driver reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverConfig {
    pub nics: Vec<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    /// A libvirt domain's definition as `vm import` read it (`virsh dumpxml --inactive`):
    /// the driver defines a replica from it, and the VM is libvirt's to start and stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_xml: Option<String>,
    /// Where this VM's NICs go on the host it runs on: source network (or bridge) to the
    /// one it is put on here. Set on a replica VM from its job's `--network-map`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_map: BTreeMap<String, String>,
    /// QEMU's machine type (`pc`, `q35`, a versioned one); None for QEMU's default. A
    /// replica keeps it: a guest's devices, and some guests' licences, depend on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// QEMU's CPU model (`qemu64`, `Skylake-Server`, ...); None for QEMU's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// UEFI firmware and this VM's variable store; None for BIOS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// An emulated TPM (swtpm); None without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Tpm>,
}

/// A UEFI VM's firmware: the code (read-only, shared by every VM) and the VM's own variable
/// store (boot entries, Secure Boot keys), which is state of the VM like its disks: it is
/// captured with every restore point, and a replica and a failback take it along.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Firmware {
    pub loader: String,
    pub vars: String,
}

/// A VM's emulated TPM 2.0. Its persistent state (seeds, keys, NV indices, counters: what
/// BitLocker or LUKS seal their keys to) is state of the VM like its disks: captured with
/// every restore point, and a replica and a failback take it along. swtpm keeps it in one
/// file, which each driver places its own way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tpm {
    /// QEMU's device: `tpm-tis` or `tpm-crb`.
    pub model: String,
    /// Where standby's own driver keeps the state file; None on libvirt, which keeps it
    /// under the domain's UUID itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// What `standby vm change` asks for; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct VmChange {
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub nics: Option<Vec<String>>,
    /// `Some(None)` removes the kernel, and with it the initrd and kernel options.
    pub kernel: Option<Option<String>>,
    pub initrd: Option<Option<String>>,
    pub append: Option<Option<String>>,
    /// `Some(None)` goes back to QEMU's default.
    pub machine: Option<Option<String>>,
    pub cpu_model: Option<Option<String>>,
}

impl VmConfig {
    /// The limits every VM satisfies, whatever its driver.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=64).contains(&self.cpus) {
            return Err(("--cpus", format!("--cpus {} is out of range 1..=64", self.cpus)));
        }
        if !(16..=1 << 20).contains(&self.memory_mib) {
            return Err(("--memory", format!("--memory {} MiB is out of range 16..=1048576", self.memory_mib)));
        }
        Ok(())
    }

    /// This configuration with `change` applied; the error names the argument at fault.
    pub fn changed(&self, change: &VmChange) -> Result<VmConfig, (&'static str, String)> {
        let d = &self.driver;
        let mut driver = DriverConfig {
            nics: change.nics.clone().unwrap_or_else(|| d.nics.clone()),
            kernel: change.kernel.clone().unwrap_or_else(|| d.kernel.clone()),
            initrd: change.initrd.clone().unwrap_or_else(|| d.initrd.clone()),
            append: change.append.clone().unwrap_or_else(|| d.append.clone()),
            domain_xml: d.domain_xml.clone(),
            network_map: d.network_map.clone(),
            machine: change.machine.clone().unwrap_or_else(|| d.machine.clone()),
            cpu_model: change.cpu_model.clone().unwrap_or_else(|| d.cpu_model.clone()),
            firmware: d.firmware.clone(),
            tpm: d.tpm.clone(),
        };
        if change.kernel == Some(None) {
            if matches!(change.initrd, Some(Some(_))) || matches!(change.append, Some(Some(_))) {
                return Err(("--no-kernel", "--initrd and --append need a kernel; drop --no-kernel".into()));
            }
            driver.initrd = None;
            driver.append = None;
        }
        Ok(VmConfig {
            cpus: change.cpus.unwrap_or(self.cpus),
            memory_mib: change.memory_mib.unwrap_or(self.memory_mib),
            driver,
        })
    }

    /// What differs from `self` in `next`, one phrase per setting, for the history.
    pub fn differences(&self, next: &VmConfig) -> Vec<String> {
        let mut changes = Vec::new();
        if next.cpus != self.cpus {
            changes.push(format!("cpus {} -> {}", self.cpus, next.cpus));
        }
        if next.memory_mib != self.memory_mib {
            changes.push(format!("memory {} -> {} MiB", self.memory_mib, next.memory_mib));
        }
        let (a, b) = (&self.driver, &next.driver);
        if a.nics != b.nics {
            changes.push(format!("nics [{}] -> [{}]", a.nics.join(" "), b.nics.join(" ")));
        }
        for (what, old, new) in [
            ("kernel", &a.kernel, &b.kernel),
            ("initrd", &a.initrd, &b.initrd),
            ("append", &a.append, &b.append),
            ("machine", &a.machine, &b.machine),
            ("cpu model", &a.cpu_model, &b.cpu_model),
        ] {
            if old != new {
                changes.push(format!(
                    "{what} {:?} -> {:?}",
                    old.as_deref().unwrap_or("none"),
                    new.as_deref().unwrap_or("none")
                ));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            cpus: 1,
            memory_mib: 256,
            driver: DriverConfig {
                nics: vec!["e1000".into()],
                kernel: Some("/k".into()),
                initrd: Some("/i".into()),
                append: None,
                ..DriverConfig::default()
            },
        }
    }

    #[test]
    fn a_change_applies_whole_and_says_what_it_changed() {
        let c = config();
        let next = c.changed(&VmChange { cpus: Some(2), kernel: Some(None), ..VmChange::default() }).unwrap();
        assert_eq!((next.cpus, next.memory_mib), (2, 256));
        assert_eq!((&next.driver.kernel, &next.driver.initrd), (&None, &None), "no kernel, no initrd");
        assert_eq!(c.differences(&next), ["cpus 1 -> 2", "kernel \"/k\" -> \"none\"", "initrd \"/i\" -> \"none\""]);
        assert!(c.differences(&c).is_empty());
        let bad = VmChange { kernel: Some(None), append: Some(Some("x".into())), ..VmChange::default() };
        assert_eq!(c.changed(&bad).unwrap_err().0, "--no-kernel");
        assert_eq!(VmConfig { cpus: 0, ..c.clone() }.check().unwrap_err().0, "--cpus");
        assert_eq!(VmConfig { memory_mib: 8, ..c }.check().unwrap_err().0, "--memory");
    }

    #[test]
    fn it_serializes_as_one_flat_object() {
        let v = serde_json::to_value(config()).unwrap();
        assert_eq!(v["cpus"], 1);
        assert_eq!(v["nics"][0], "e1000");
        assert!(v.get("driver").is_none());
    }
}
