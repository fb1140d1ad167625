//! The NICs of standby's own QEMU driver, as an operator writes them:
//! `MODEL[,bridge=NAME][,mac=MAC]`. Without a bridge a NIC has user-mode networking (the
//! guest reaches out, nothing reaches it); on a bridge it is a tap device that QEMU creates
//! and standby attaches to the bridge, so that the guest sits on that network with its own
//! MAC, as production VMs do. A replica keeps the MAC and goes on the bridge its job's
//! network map names.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::{HostError, Result};

/// The device models a NIC may have.
pub(crate) const NIC_MODELS: &[&str] = &["virtio-net-pci", "e1000"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Nic {
    pub(crate) model: String,
    pub(crate) bridge: Option<String>,
    pub(crate) mac: Option<String>,
}

impl Nic {
    pub(crate) fn parse(spec: &str) -> std::result::Result<Nic, String> {
        let mut parts = spec.split(',');
        let model = parts.next().unwrap_or_default().to_owned();
        if !NIC_MODELS.contains(&model.as_str()) {
            return Err(format!("NIC model {model:?} is not one of {}", NIC_MODELS.join(", ")));
        }
        let mut nic = Nic { model, bridge: None, mac: None };
        for part in parts {
            match part.split_once('=') {
                Some(("bridge", b)) if valid_ifname(b) => nic.bridge = Some(b.to_owned()),
                Some(("bridge", b)) => {
                    return Err(format!(
                        "bridge {b:?} is not an interface name (1 to 15 letters, digits, '-', '_', '.')"
                    ))
                }
                Some(("mac", m)) if valid_mac(m) => nic.mac = Some(m.to_ascii_lowercase()),
                Some(("mac", m)) => {
                    return Err(format!("mac {m:?} is not a unicast MAC address such as 52:54:00:12:34:56"))
                }
                _ => return Err(format!("{part:?} in NIC {spec:?}: write MODEL[,bridge=NAME][,mac=MAC]")),
            }
        }
        if nic.bridge.is_some() && nic.mac.is_none() {
            return Err(format!(
                "NIC {spec:?} is on a bridge without its MAC: add mac=52:54:00:XX:XX:XX, one of its own on that \
                 network; its replica keeps it"
            ));
        }
        Ok(nic)
    }

    /// The network the job's map names it by: `bridge:NAME`, none for user-mode networking.
    pub(crate) fn network(&self) -> Option<String> {
        self.bridge.as_ref().map(|b| format!("bridge:{b}"))
    }

    /// The bridge it goes on here: its own, or the one `map` puts it on.
    pub(crate) fn bridge_here(&self, map: &BTreeMap<String, String>) -> std::result::Result<Option<String>, String> {
        let (Some(network), Some(own)) = (self.network(), &self.bridge) else { return Ok(None) };
        match map.get(&network) {
            None => Ok(Some(own.clone())),
            Some(to) => match to.strip_prefix("bridge:") {
                Some(b) if valid_ifname(b) => Ok(Some(b.to_owned())),
                _ => Err(format!(
                    "the network map puts {network} on {to}, but standby's own driver puts NICs on bridges only: \
                     map it to bridge:NAME"
                )),
            },
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
        assert_eq!(Nic::parse("e1000").unwrap(), Nic { model: "e1000".into(), bridge: None, mac: None });
        let n = Nic::parse("virtio-net-pci,bridge=br0,mac=52:54:00:AB:cd:01").unwrap();
        assert_eq!((n.bridge.as_deref(), n.mac.as_deref()), (Some("br0"), Some("52:54:00:ab:cd:01")));
        assert_eq!(n.network().as_deref(), Some("bridge:br0"));
        for (bad, says) in [
            ("rtl8139", "is not one of"),
            ("e1000,bridge=br0", "add mac="),
            ("e1000,bridge=br0,mac=53:54:00:00:00:01", "unicast"),
            ("e1000,bridge=a-very-long-bridge-name,mac=52:54:00:00:00:01", "interface name"),
            ("e1000,vlan=3", "MODEL[,bridge=NAME][,mac=MAC]"),
        ] {
            let e = Nic::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_map_moves_a_bridged_nic_to_another_bridge_only() {
        let n = Nic::parse("e1000,bridge=br0,mac=52:54:00:00:00:01").unwrap();
        let map = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert_eq!(n.bridge_here(&BTreeMap::new()).unwrap().as_deref(), Some("br0"));
        assert_eq!(n.bridge_here(&map("bridge:br0", "bridge:dr0")).unwrap().as_deref(), Some("dr0"));
        assert!(n.bridge_here(&map("bridge:br0", "default")).unwrap_err().contains("bridges only"));
        assert_eq!(Nic::parse("e1000").unwrap().bridge_here(&map("bridge:br0", "bridge:x")).unwrap(), None);
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
