//! The qemu-system command line for a VM standby runs.

use crate::chain::{chain_json, Chain};
pub use standby_model::image::{Accel, DiskSource};
use standby_model::VmConfig;

pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// UEFI firmware for VMs, from Debian's `ovmf`: the code every UEFI VM runs, and the
/// template a new VM's variable store starts from.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

#[derive(Debug, Clone)]
pub struct MachineDisk {
    pub source: DiskSource,
    /// The block node name QMP commands use for this disk.
    pub node: String,
}

/// One NIC as QEMU runs it: a device model with its MAC (QEMU's default when None), on
/// user-mode networking or on a tap device of that name.
#[derive(Debug, Clone)]
pub struct MachineNic {
    pub model: String,
    pub mac: Option<String>,
    pub tap: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub name: String,
    /// Its CPUs, memory and boot files; its NICs are `nics`.
    pub config: VmConfig,
    pub nics: Vec<MachineNic>,
    pub disks: Vec<MachineDisk>,
    pub accel: Accel,
    /// Monitor for long operations (replication runs).
    pub qmp_socket: String,
    /// Second monitor, so that status queries never wait behind a long operation.
    pub qmp_status_socket: String,
    /// The host end of the guest agent's virtio-serial port (`org.qemu.guest_agent.0`):
    /// a guest that runs qemu-guest-agent answers there.
    pub guest_agent_socket: String,
    pub console_log: String,
    pub pidfile: String,
    /// Its CPUs stay stopped until told to run (`cont`): what has to be in place before
    /// the guest runs (its NICs on their bridges) is done first.
    pub start_paused: bool,
    /// Its TPM: the device model, and the control socket of the swtpm emulating it.
    pub tpm: Option<(String, String)>,
}

impl Machine {
    /// Arguments for a daemonized QEMU: it outlives the standby command that starts it.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-name",
            &format!("guest={}", opt_value(&self.name)),
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
        ]);
        push(&["-accel", self.accel.as_str()]);
        let boot = &self.config.driver;
        if let Some(f) = &boot.firmware {
            // The code read-only, the VM's own variables writable: UEFI's two flash chips.
            let code = format!("if=pflash,format=raw,unit=0,readonly=on,file={}", opt_value(&f.loader));
            push(&["-drive", &code]);
            push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", opt_value(&f.vars))]);
        }
        if let Some(m) = &boot.machine {
            push(&["-machine", m]);
        }
        if let Some(c) = &boot.cpu_model {
            push(&["-cpu", c]);
        }
        push(&["-smp", &self.config.cpus.to_string(), "-m", &self.config.memory_mib.to_string()]);
        push(&["-chardev", &format!("file,id=console,path={},append=on", opt_value(&self.console_log))]);
        push(&["-serial", "chardev:console"]);
        for (id, socket) in [("qmp", &self.qmp_socket), ("qmp-status", &self.qmp_status_socket)] {
            push(&["-chardev", &format!("socket,id={id},path={},server=on,wait=off", opt_value(socket))]);
            push(&["-mon", &format!("chardev={id},mode=control")]);
        }
        push(&["-daemonize", "-pidfile", &self.pidfile]);
        for (i, d) in self.disks.iter().enumerate() {
            // JSON, so that no path is parsed as options, and with the backing stated: QEMU
            // never opens an image named in a disk's header, nor probes a format.
            let mut spec = match &d.source {
                DiskSource::Image { path, format } => chain_json(&Chain::single(path, *format)),
                DiskSource::Chain(chain) => chain_json(chain),
            };
            spec["node-name"] = serde_json::Value::String(d.node.clone());
            push(&["-blockdev", &spec.to_string()]);
            push(&["-device", &format!("virtio-blk-pci,drive={},id=vd{i}", d.node)]);
        }
        for (i, nic) in self.nics.iter().enumerate() {
            match &nic.tap {
                // A bridged NIC's tap QEMU creates (gone when it exits) and the host attaches;
                // an operator's tap QEMU opens as it is.
                Some(tap) => push(&["-netdev", &format!("tap,id=net{i},ifname={tap},script=no,downscript=no")]),
                None => push(&["-netdev", &format!("user,id=net{i}")]),
            }
            let mac = nic.mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default();
            push(&["-device", &format!("{},netdev=net{i}{mac}", nic.model)]);
        }
        // After the disks and NICs, so that their PCI slots stay where VMs defined before
        // the agent's port had them (a guest names its NICs by slot).
        push(&["-chardev", &format!("socket,id=qga,path={},server=on,wait=off", opt_value(&self.guest_agent_socket))]);
        push(&["-device", "virtio-serial-pci,id=qga-serial"]);
        push(&["-device", "virtserialport,bus=qga-serial.0,chardev=qga,name=org.qemu.guest_agent.0"]);
        // Not on PCI (TIS is an ISA device, CRB a memory region): no slot moves.
        if let Some((model, socket)) = &self.tpm {
            push(&["-chardev", &format!("socket,id=tpm,path={}", opt_value(socket))]);
            push(&["-tpmdev", "emulator,id=tpm0,chardev=tpm"]);
            push(&["-device", &format!("{},tpmdev=tpm0", opt_value(model))]);
        }
        if self.start_paused {
            push(&["-S"]);
        }
        if let Some(k) = &boot.kernel {
            push(&["-kernel", k]);
        }
        if let Some(i) = &boot.initrd {
            push(&["-initrd", i]);
        }
        if let Some(ap) = &boot.append {
            push(&["-append", ap]);
        }
        push(&["-no-reboot"]);
        a
    }
}

/// A value inside a QEMU option string (`key=value,...`), where a comma is written twice.
pub fn opt_value(v: &str) -> String {
    v.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Format;

    #[test]
    fn disks_get_named_nodes() {
        let m = Machine {
            name: "web".into(),
            config: VmConfig { cpus: 1, memory_mib: 128, driver: Default::default() },
            disks: vec![
                MachineDisk {
                    source: DiskSource::Image { path: "/d/a.qcow2".into(), format: Format::Qcow2 },
                    node: "disk0".into(),
                },
                MachineDisk {
                    source: DiskSource::Chain(Chain::single("/dr/1.qcow2", Format::Qcow2).with_top("/dr/f.qcow2")),
                    node: "disk1".into(),
                },
            ],
            accel: Accel::Tcg,
            nics: vec![
                MachineNic { model: "e1000".into(), mac: None, tap: None },
                MachineNic {
                    model: "virtio-net-pci".into(),
                    mac: Some("52:54:00:00:00:07".into()),
                    tap: Some("sbtap".into()),
                },
            ],
            qmp_socket: "/r/qmp.sock".into(),
            qmp_status_socket: "/r/qmp-status.sock".into(),
            guest_agent_socket: "/r/qga.sock".into(),
            console_log: "/r/console.log".into(),
            pidfile: "/r/qemu.pid".into(),
            start_paused: false,
            tpm: None,
        };
        let args = m.args().join(" ");
        assert!(args.contains(r#""node-name":"disk0""#), "{args}");
        assert!(args.contains("-daemonize -pidfile /r/qemu.pid"));
        assert!(args.contains(r#""node-name":"disk1""#), "{args}");
        assert_eq!(args.matches(r#""backing":null"#).count(), 2, "{args}");
        assert!(args.contains("-netdev user,id=net0 -device e1000,netdev=net0 "), "{args}");
        assert!(args.contains("-netdev tap,id=net1,ifname=sbtap,script=no,downscript=no"), "{args}");
        assert!(args.contains("-device virtio-net-pci,netdev=net1,mac=52:54:00:00:00:07"), "{args}");
    }

    /// A comma in a path would end the option value and start a new option.
    #[test]
    fn paths_with_commas_are_escaped_or_json() {
        let m = Machine {
            name: "web".into(),
            config: VmConfig { cpus: 1, memory_mib: 128, driver: Default::default() },
            disks: vec![MachineDisk {
                source: DiskSource::Image { path: "/d/a,file.locking=off.qcow2".into(), format: Format::Raw },
                node: "disk0".into(),
            }],
            accel: Accel::Tcg,
            nics: Vec::new(),
            qmp_socket: "/r,x/qmp.sock".into(),
            qmp_status_socket: "/r,x/qmp-status.sock".into(),
            guest_agent_socket: "/r,x/qga.sock".into(),
            console_log: "/r,x/console.log".into(),
            pidfile: "/r,x/qemu.pid".into(),
            start_paused: true,
            tpm: Some(("tpm-tis".into(), "/r,x/swtpm.sock".into())),
        };
        let args = m.args();
        assert!(args.contains(&"file,id=console,path=/r,,x/console.log,append=on".to_string()), "{args:?}");
        assert!(args.contains(&"socket,id=qmp,path=/r,,x/qmp.sock,server=on,wait=off".to_string()), "{args:?}");
        assert!(args.contains(&"socket,id=qga,path=/r,,x/qga.sock,server=on,wait=off".to_string()), "{args:?}");
        assert!(args.contains(&"-S".to_string()), "{args:?}");
        assert!(args.contains(&"socket,id=tpm,path=/r,,x/swtpm.sock".to_string()), "{args:?}");
        assert!(args.contains(&"tpm-tis,tpmdev=tpm0".to_string()), "{args:?}");
        let disk: serde_json::Value =
            serde_json::from_str(&args[args.iter().position(|a| a == "-blockdev").unwrap() + 1]).unwrap();
        assert_eq!(disk["file"]["filename"], "/d/a,file.locking=off.qcow2");
        assert_eq!(disk["driver"], "raw");
    }
}
