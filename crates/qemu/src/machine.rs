//! The qemu-system command line for a VM standby runs.

use crate::chain::{Chain, Format};

pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How a disk's image is opened.
#[derive(Debug, Clone)]
pub enum DiskSource {
    /// One image file opened by its own header (a VM's own disk).
    Image { path: String, format: Format },
    /// A chain standby describes layer by layer (a replica's disk).
    Chain(Chain),
}

#[derive(Debug, Clone)]
pub struct MachineDisk {
    pub source: DiskSource,
    /// The block node name QMP commands use for this disk.
    pub node: String,
}

#[derive(Debug, Clone)]
pub struct Machine {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<MachineDisk>,
    /// NIC models with user-mode networking; empty for none.
    pub nics: Vec<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub append: Option<String>,
    pub accel: Accel,
    /// Monitor for long operations (replication runs).
    pub qmp_socket: String,
    /// Second monitor, so that status queries never wait behind a long operation.
    pub qmp_status_socket: String,
    pub console_log: String,
    pub pidfile: String,
}

impl Machine {
    /// Arguments for a daemonized QEMU: it outlives the standby command that starts it.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&["-name", &self.name, "-nodefaults", "-display", "none", "-no-user-config"]);
        push(&["-accel", self.accel.as_str()]);
        push(&["-smp", &self.cpus.to_string(), "-m", &self.memory_mib.to_string()]);
        push(&["-chardev", &format!("file,id=console,path={},append=on", self.console_log)]);
        push(&["-serial", "chardev:console"]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", self.qmp_socket)]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", self.qmp_status_socket)]);
        push(&["-daemonize", "-pidfile", &self.pidfile]);
        for (i, d) in self.disks.iter().enumerate() {
            match &d.source {
                DiskSource::Image { path, format } => {
                    let file_node = format!("{}-file", d.node);
                    push(&[
                        "-blockdev",
                        &format!("driver=file,filename={path},node-name={file_node},cache.direct=off"),
                    ]);
                    push(&["-blockdev", &format!("driver={},file={file_node},node-name={}", format.as_str(), d.node)]);
                }
                DiskSource::Chain(chain) => {
                    let mut spec = chain.to_json();
                    spec["node-name"] = serde_json::Value::String(d.node.clone());
                    push(&["-blockdev", &spec.to_string()]);
                }
            }
            push(&["-device", &format!("virtio-blk-pci,drive={},id=vd{i}", d.node)]);
        }
        for (i, model) in self.nics.iter().enumerate() {
            push(&["-netdev", &format!("user,id=net{i}")]);
            push(&["-device", &format!("{model},netdev=net{i}")]);
        }
        if let Some(k) = &self.kernel {
            push(&["-kernel", k]);
        }
        if let Some(i) = &self.initrd {
            push(&["-initrd", i]);
        }
        if let Some(ap) = &self.append {
            push(&["-append", ap]);
        }
        push(&["-no-reboot"]);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_get_named_nodes() {
        let m = Machine {
            name: "web".into(),
            cpus: 1,
            memory_mib: 128,
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
            nics: vec![],
            kernel: None,
            initrd: None,
            append: None,
            accel: Accel::Tcg,
            qmp_socket: "/r/qmp.sock".into(),
            qmp_status_socket: "/r/qmp-status.sock".into(),
            console_log: "/r/console.log".into(),
            pidfile: "/r/qemu.pid".into(),
        };
        let args = m.args().join(" ");
        assert!(args.contains("driver=qcow2,file=disk0-file,node-name=disk0"));
        assert!(args.contains("-daemonize -pidfile /r/qemu.pid"));
        assert!(args.contains(r#""node-name":"disk1""#), "{args}");
        assert!(args.contains(r#""backing":null"#), "{args}");
    }
}
