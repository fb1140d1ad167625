//! The NICs of standby's own QEMU driver, as an operator writes them:
//! `MODEL[,bridge=NAME|,tap=NAME][,mac=MAC]`. Without either a NIC has user-mode networking
//! (the guest reaches out, nothing reaches it). On a bridge it is a tap device that QEMU
//! creates and standby attaches to the bridge; on a tap it is a tap device the operator
//! made (and wired up as the site does), which QEMU opens. Either way the guest sits on
//! that network with its own MAC, as production VMs do. A replica keeps the MAC and goes
//! where its job's network map says (`bridge:NAME` or `tap:NAME`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use standby_qemu::machine::MachineNic;

use crate::{HostError, Result, VmLaunch};

/// The device models a NIC may have.
pub(crate) const NIC_MODELS: &[&str] = &["virtio-net-pci", "e1000"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Nic {
    pub(crate) model: String,
    pub(crate) on: Option<Net>,
    pub(crate) mac: Option<String>,
}

/// Where a NIC is, apart from user-mode networking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Net {
    /// A bridge, through a tap QEMU makes for the VM.
    Bridge(String),
    /// A tap device of the operator's.
    Tap(String),
}

impl Net {
    /// How `--network-map` names it.
    pub(crate) fn key(&self) -> String {
        match self {
            Net::Bridge(b) => format!("bridge:{b}"),
            Net::Tap(t) => format!("tap:{t}"),
        }
    }

    /// A `--network-map` destination, when it is one standby's own driver can put a NIC on.
    pub(crate) fn parse(key: &str) -> Option<Net> {
        match key.split_once(':') {
            Some(("bridge", b)) if valid_ifname(b) => Some(Net::Bridge(b.into())),
            Some(("tap", t)) if valid_ifname(t) => Some(Net::Tap(t.into())),
            _ => None,
        }
    }

    /// Whether it is there on this machine: a bridge, or a tap device.
    pub(crate) fn exists(&self) -> bool {
        match self {
            Net::Bridge(b) => bridge_exists(b),
            // A tap, not a tun device (IFF_TAP in its flags): QEMU opens only taps.
            Net::Tap(t) => std::fs::read_to_string(Path::new("/sys/class/net").join(t).join("tun_flags"))
                .ok()
                .and_then(|f| u32::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
                .is_some_and(|flags| flags & 0x2 != 0),
        }
    }
}

impl Nic {
    pub(crate) fn parse(spec: &str) -> std::result::Result<Nic, String> {
        let mut parts = spec.split(',');
        let model = parts.next().unwrap_or_default().to_owned();
        if !NIC_MODELS.contains(&model.as_str()) {
            return Err(format!("NIC model {model:?} is not one of {}", NIC_MODELS.join(", ")));
        }
        let mut nic = Nic { model, on: None, mac: None };
        let form = "write MODEL[,bridge=NAME|,tap=NAME][,mac=MAC]";
        for part in parts {
            match part.split_once('=') {
                Some((kind @ ("bridge" | "tap"), name)) => {
                    if nic.on.is_some() {
                        return Err(format!("NIC {spec:?} is on two networks: {form}"));
                    }
                    nic.on = Some(Net::parse(&format!("{kind}:{name}")).ok_or_else(|| {
                        format!("{kind} {name:?} is not an interface name (1 to 15 letters, digits, '-', '_', '.')")
                    })?);
                }
                Some(("mac", m)) if valid_mac(m) => nic.mac = Some(m.to_ascii_lowercase()),
                Some(("mac", m)) => {
                    return Err(format!("mac {m:?} is not a unicast MAC address such as 52:54:00:12:34:56"))
                }
                _ => return Err(format!("{part:?} in NIC {spec:?}: {form}")),
            }
        }
        if nic.on.is_some() && nic.mac.is_none() {
            return Err(format!(
                "NIC {spec:?} is on a network without its MAC: add mac=52:54:00:XX:XX:XX, one of its own on that \
                 network; its replica keeps it"
            ));
        }
        Ok(nic)
    }

    /// The network the job's map names it by (`bridge:NAME`, `tap:NAME`); none for
    /// user-mode networking.
    pub(crate) fn network(&self) -> Option<String> {
        self.on.as_ref().map(Net::key)
    }

    /// Where it goes here: its own network, or the one `map` puts it on.
    pub(crate) fn net_here(&self, map: &BTreeMap<String, String>) -> std::result::Result<Option<Net>, String> {
        let Some(own) = &self.on else { return Ok(None) };
        match map.get(&own.key()) {
            None => Ok(Some(own.clone())),
            Some(to) => Net::parse(to).map(Some).ok_or_else(|| {
                format!(
                    "the network map puts {} on {to}, but standby's own driver puts NICs on bridges and taps only: \
                     map it to bridge:NAME or tap:NAME",
                    own.key()
                )
            }),
        }
    }
}

fn valid_ifname(n: &str) -> bool {
    (1..=15).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn valid_mac(m: &str) -> bool {
    let octets: Vec<&str> = m.split(':').collect();
    octets.len() == 6
        && octets.iter().all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0)
}

/// The tap device of NIC `idx` of VM `vm` on the host whose files are under `root`: unique
/// per host and VM, within the kernel's 15 characters.
pub(crate) fn tap_name(root: &Path, vm: &str, idx: usize) -> String {
    let hash = blake3::hash(format!("{}\0{vm}", root.display()).as_bytes()).to_hex();
    format!("sb{}n{idx}", &hash[..8])
}

/// Whether `name` is a bridge on this machine.
pub(crate) fn bridge_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").is_dir()
}

/// Taps QEMU will make that standby must put on bridges: (tap, bridge).
pub(crate) type Attachments = Vec<(String, String)>;

/// A VM's NICs as QEMU runs them on this host (a replica's moved by its job's network
/// map), and the taps standby attaches once QEMU made them. Every bridge and tap must
/// exist before QEMU starts.
pub(crate) fn place(vm: &VmLaunch, root: &Path, host: &str) -> Result<(Vec<MachineNic>, Attachments)> {
    let mut nics = Vec::new();
    let mut bridges = Vec::new();
    for (i, spec) in vm.config.driver.nics.iter().enumerate() {
        let bad = |why| HostError::BadConfig { arg: "--nic", why };
        let nic = Nic::parse(spec).map_err(bad)?;
        let net = nic.net_here(&vm.config.driver.network_map).map_err(bad)?;
        if let Some(net) = net.as_ref().filter(|n| !n.exists()) {
            return Err(HostError::StartFailed {
                vm: vm.name.clone(),
                detail: format!(
                    "its NIC {i} goes on {}, which host {host} does not have; create it, or protect the VM with a \
                     job whose --network-map puts the NIC on a bridge or tap this host has",
                    net.key()
                ),
            });
        }
        let tap = match net {
            Some(Net::Bridge(b)) => {
                let tap = tap_name(root, &vm.name, i);
                bridges.push((tap.clone(), b));
                Some(tap)
            }
            Some(Net::Tap(t)) => Some(t),
            None => None,
        };
        nics.push(MachineNic { model: nic.model, mac: nic.mac, tap });
    }
    Ok((nics, bridges))
}

/// Puts the tap QEMU made on `bridge` and brings it up.
pub(crate) fn attach(tap: &str, bridge: &str) -> Result<()> {
    ip(&["link", "set", "dev", tap, "master", bridge])?;
    ip(&["link", "set", "dev", tap, "up"])
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| HostError::Invalid(format!("cannot run ip ({e}); install iproute2 to put NICs on bridges")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(HostError::Invalid(format!("ip {}: {}", args.join(" "), err.trim())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_read_as_written_and_bad_ones_say_what_to_write() {
        assert_eq!(Nic::parse("e1000").unwrap(), Nic { model: "e1000".into(), on: None, mac: None });
        let n = Nic::parse("virtio-net-pci,bridge=br0,mac=52:54:00:AB:cd:01").unwrap();
        assert_eq!((n.on, n.mac.as_deref()), (Some(Net::Bridge("br0".into())), Some("52:54:00:ab:cd:01")));
        let n = Nic::parse("e1000,tap=vnet7,mac=52:54:00:00:00:02").unwrap();
        assert_eq!(n.network().as_deref(), Some("tap:vnet7"));
        for (bad, says) in [
            ("rtl8139", "is not one of"),
            ("e1000,bridge=br0", "add mac="),
            ("e1000,bridge=br0,mac=53:54:00:00:00:01", "unicast"),
            ("e1000,bridge=a-very-long-bridge-name,mac=52:54:00:00:00:01", "interface name"),
            ("e1000,vlan=3", "MODEL[,bridge=NAME|,tap=NAME][,mac=MAC]"),
            ("e1000,tap=t0,bridge=br0,mac=52:54:00:00:00:01", "two networks"),
        ] {
            let e = Nic::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_map_moves_a_nic_to_another_bridge_or_tap_only() {
        let n = Nic::parse("e1000,bridge=br0,mac=52:54:00:00:00:01").unwrap();
        let map = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert_eq!(n.net_here(&BTreeMap::new()).unwrap(), Some(Net::Bridge("br0".into())));
        assert_eq!(n.net_here(&map("bridge:br0", "bridge:dr0")).unwrap(), Some(Net::Bridge("dr0".into())));
        assert_eq!(n.net_here(&map("bridge:br0", "tap:drtap")).unwrap(), Some(Net::Tap("drtap".into())));
        assert!(n.net_here(&map("bridge:br0", "default")).unwrap_err().contains("bridges and taps only"));
        assert_eq!(Nic::parse("e1000").unwrap().net_here(&map("bridge:br0", "bridge:x")).unwrap(), None);
    }

    #[test]
    fn tap_names_fit_the_kernel_and_differ_per_host_and_vm() {
        let a = tap_name(Path::new("/data/a"), "web", 0);
        assert!(a.len() <= 15, "{a}");
        assert_ne!(a, tap_name(Path::new("/data/b"), "web", 0));
        assert_ne!(a, tap_name(Path::new("/data/a"), "web_replica", 0));
        assert_ne!(a, tap_name(Path::new("/data/a"), "web", 1));
    }
}
