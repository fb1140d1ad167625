//! A libvirt domain's definition as standby reads and derives it: what `vm import`
//! registers (its disks, NICs, size), and the definition of a VM standby starts from it (a
//! replica: its own name and UUID, its disks on standby's chains given layer by layer, its
//! NICs on the mapped networks, its console in its own file).
//!
//! A derived definition is the source's text with exact pieces replaced (element and
//! attribute ranges from the parser), so everything standby does not touch (machine type,
//! CPU model, firmware, devices, MAC addresses) is carried over byte for byte.

use std::collections::BTreeMap;
use std::ops::Range;

use roxmltree::{Document, Node};
use standby_model::image::{DiskSource, Format};
use standby_model::Firmware;

/// Marks the domains standby defined itself, so that it never redefines or undefines one
/// it did not make (an operator's domain that happens to bear a replica's name).
pub const MARKER_NS: &str = "urn:standby:domain";

/// What standby replicates of a domain and what it must map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub uuid: Option<String>,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// The disks standby replicates, in the domain's order.
    pub disks: Vec<DomainDisk>,
    pub nics: Vec<DomainNic>,
    /// The file the first serial port writes to, when it writes to one.
    pub console_file: Option<String>,
    /// Defined by standby (carries its marker).
    pub standby_made: bool,
    /// Its UEFI firmware and variable store (`<os><loader>`, `<nvram>`); None for BIOS.
    pub firmware: Option<Firmware>,
    /// Its TPM, as its definition gives it.
    pub tpm: Option<DomainTpm>,
}

/// A domain's `<tpm>`: standby carries an emulated TPM 2.0's state (swtpm's, which libvirt
/// keeps under the domain's UUID); a host's own TPM (passthrough) cannot be replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainTpm {
    pub model: String,
    /// `emulator` or `passthrough`.
    pub backend: String,
    pub version: Option<String>,
    /// Its state is encrypted with a libvirt secret of the source host.
    pub encrypted: bool,
}

impl DomainTpm {
    /// Why standby cannot protect this TPM's state, if it cannot.
    pub fn unsupported(&self) -> Option<String> {
        if self.backend == "passthrough" {
            return Some(
                "its TPM is the host's own (passthrough), which no replica can have; give the domain an emulated \
                 TPM (<backend type='emulator' version='2.0'/>) or remove it"
                    .into(),
            );
        }
        if self.backend != "emulator" {
            return Some(format!(
                "its TPM's backend is {}; standby carries the state of a TPM libvirt emulates (<backend \
                 type='emulator' version='2.0'/>) only",
                if self.backend.is_empty() { "unstated" } else { &self.backend }
            ));
        }
        if self.version.as_deref() != Some("2.0") {
            return Some(format!(
                "its TPM is version {}; standby carries the state of TPM 2.0 only",
                self.version.as_deref().unwrap_or("unstated")
            ));
        }
        if self.encrypted {
            return Some(
                "its TPM's state is encrypted with a libvirt secret of this host, which a replica on another \
                 host could not open; remove the <encryption> from its TPM's backend"
                    .into(),
            );
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDisk {
    /// The guest's name for it (`vda`).
    pub target: String,
    pub path: String,
    pub format: Format,
    /// Its definition gives a backing chain (a replica's disks; a source's must not).
    pub chained: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainNic {
    /// `network` (a libvirt network) or `bridge`.
    pub kind: String,
    /// The network's or bridge's name.
    pub on: String,
    pub mac: Option<String>,
}

impl DomainNic {
    /// How `--network-map` names what the NIC is on: the name alone for a libvirt
    /// network, `bridge:NAME` for a bridge.
    pub fn key(&self) -> String {
        match self.kind.as_str() {
            "bridge" => format!("bridge:{}", self.on),
            _ => self.on.clone(),
        }
    }
}

fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn text_of(node: Option<Node<'_, '_>>) -> Option<String> {
    node.and_then(|n| n.text()).map(|t| t.trim().to_owned())
}

fn memory_mib(node: Node<'_, '_>) -> Result<u32, String> {
    let value: u64 =
        text_of(Some(node)).and_then(|t| t.parse().ok()).ok_or_else(|| "its <memory> is not a number".to_owned())?;
    let kib = match node.attribute("unit").unwrap_or("KiB") {
        "b" | "bytes" => value / 1024,
        "KiB" | "k" => value,
        "MiB" | "M" => value * 1024,
        "GiB" | "G" => value * 1024 * 1024,
        "KB" => value * 1000 / 1024,
        "MB" => value * 1_000_000 / 1024,
        "GB" => value * 1_000_000_000 / 1024,
        other => return Err(format!("its <memory> has a unit standby does not know ({other})")),
    };
    u32::try_from(kib / 1024).map_err(|_| "its <memory> is too large".to_owned())
}

/// Reads a domain's definition. A disk standby cannot replicate (a network or block
/// device, a format other than qcow2 and raw) is an error naming it and saying what to
/// do; CD-ROMs and floppies are not replicated and stay as they are.
pub fn parse(xml: &str) -> Result<Domain, String> {
    let doc = Document::parse(xml).map_err(|e| format!("its definition is not XML standby can read: {e}"))?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err("its definition is not a <domain>".into());
    }
    let name = text_of(child(root, "name")).ok_or("its definition has no <name>")?;
    let memory_mib = memory_mib(child(root, "memory").ok_or("its definition has no <memory>")?)?;
    let vcpus = text_of(child(root, "vcpu")).and_then(|t| t.parse().ok()).unwrap_or(1);
    let devices = child(root, "devices");
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    let mut console_file = None;
    for d in devices.into_iter().flat_map(|d| d.children()).filter(Node::is_element) {
        match d.tag_name().name() {
            "disk" => {
                if let Some(disk) = disk(d)? {
                    disks.push(disk);
                }
            }
            "interface" => {
                let kind = d.attribute("type").unwrap_or("");
                let source = child(d, "source");
                let on = match kind {
                    "network" => source.and_then(|s| s.attribute("network")),
                    "bridge" => source.and_then(|s| s.attribute("bridge")),
                    // User-mode networking reaches nothing the map could name.
                    "user" => None,
                    other => {
                        return Err(format!(
                            "it has a NIC of type {other}, which standby cannot map to the DR site (it maps \
                             libvirt networks and bridges); put the NIC on a network or a bridge first"
                        ))
                    }
                };
                if let Some(on) = on {
                    nics.push(DomainNic {
                        kind: kind.into(),
                        on: on.into(),
                        mac: child(d, "mac").and_then(|m| m.attribute("address")).map(str::to_owned),
                    });
                }
            }
            "serial" if console_file.is_none() && d.attribute("type") == Some("file") => {
                console_file = child(d, "source").and_then(|s| s.attribute("path")).map(str::to_owned);
            }
            _ => {}
        }
    }
    if disks.is_empty() {
        return Err("it has no disk standby can replicate".into());
    }
    let os = child(root, "os");
    // `<os firmware='efi'>` leaves the store to libvirt, which keeps it by the domain's
    // name in its own directory and does not write that in the definition.
    let auto = os.is_some_and(|os| os.attribute("firmware") == Some("efi"));
    let vars = os.and_then(|os| text_of(child(os, "nvram"))).or_else(|| auto.then(|| default_nvram(&name)));
    let firmware =
        vars.map(|vars| Firmware { loader: os.and_then(|os| text_of(child(os, "loader"))).unwrap_or_default(), vars });
    let tpm = devices.and_then(|d| child(d, "tpm")).map(|t| {
        let backend = child(t, "backend");
        DomainTpm {
            model: t.attribute("model").unwrap_or("tpm-tis").into(),
            backend: backend.and_then(|b| b.attribute("type")).unwrap_or("").into(),
            version: backend.and_then(|b| b.attribute("version")).map(str::to_owned),
            encrypted: backend.is_some_and(|b| child(b, "encryption").is_some()),
        }
    });
    let standby_made =
        child(root, "metadata").is_some_and(|m| m.children().any(|c| c.tag_name().namespace() == Some(MARKER_NS)));
    Ok(Domain {
        name,
        uuid: text_of(child(root, "uuid")),
        memory_mib,
        vcpus,
        disks,
        nics,
        console_file,
        standby_made,
        firmware,
        tpm,
    })
}

/// Where libvirt's QEMU driver keeps the variable store of a domain whose firmware it
/// chooses itself (`<os firmware='efi'>`).
fn default_nvram(domain: &str) -> String {
    format!("/var/lib/libvirt/qemu/nvram/{domain}_VARS.fd")
}

fn disk(d: Node<'_, '_>) -> Result<Option<DomainDisk>, String> {
    let target = child(d, "target").and_then(|t| t.attribute("dev")).unwrap_or("?").to_owned();
    let device = d.attribute("device").unwrap_or("disk");
    let readonly = child(d, "readonly").is_some();
    match device {
        "disk" => {}
        // Media, not the VM's data: left as they are, never replicated.
        "cdrom" => return Ok(None),
        "floppy" if readonly => return Ok(None),
        other => {
            return Err(format!(
                "its {other} {target} is a device standby cannot replicate (it replicates disks in image files); \
                 detach it from the domain before importing"
            ))
        }
    }
    let kind = d.attribute("type").unwrap_or("file");
    if kind != "file" {
        return Err(format!(
            "its disk {target} is a {kind} disk (type='{kind}'); standby replicates disks in image files only: \
             move it to a qcow2 or raw file, or detach it from the domain before importing"
        ));
    }
    let path = child(d, "source")
        .and_then(|s| s.attribute("file"))
        .ok_or_else(|| format!("its disk {target} has no source file (an empty drive); detach it first"))?;
    let driver = child(d, "driver").and_then(|x| x.attribute("type")).unwrap_or("raw");
    let format = Format::parse(driver).ok_or_else(|| {
        format!(
            "its disk {target} is in format {driver}; standby replicates qcow2 and raw: convert it (qemu-img convert)"
        )
    })?;
    let chained = child(d, "backingStore").is_some_and(|b| child(b, "source").is_some());
    Ok(Some(DomainDisk { target, path: path.into(), format, chained }))
}

/// Escapes text for an XML attribute value or element content.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// What a VM standby defines from a domain differs in.
#[derive(Debug, Clone)]
pub struct Derived<'a> {
    pub name: &'a str,
    /// Kept when standby redefines a domain it made; None lets libvirt give a new one.
    pub uuid: Option<&'a str>,
    /// The replicated disks, in the source's order.
    pub disks: &'a [DiskSource],
    /// `--network-map`: a NIC's key ([`DomainNic::key`]) to where it goes here.
    pub network_map: &'a BTreeMap<String, String>,
    pub console_file: Option<&'a str>,
    /// Its own UEFI variable store, for a domain with one.
    pub nvram: Option<&'a str>,
    /// Which VM it derives from, recorded in its marker.
    pub of: &'a str,
}

/// A replacement of one byte range of the source text.
struct Edits(Vec<(Range<usize>, String)>);

impl Edits {
    fn apply(mut self, text: &str) -> String {
        self.0.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
        let mut out = text.to_owned();
        for (range, with) in self.0 {
            out.replace_range(range, &with);
        }
        out
    }
}

fn chain_xml(layers: &[standby_model::image::Layer]) -> String {
    match layers.split_first() {
        None => "<backingStore/>".into(),
        Some((l, rest)) => format!(
            "<backingStore type='file'><format type='{}'/><source file='{}'/>{}</backingStore>",
            l.format.as_str(),
            esc(&l.path),
            chain_xml(rest)
        ),
    }
}

/// The definition of a VM standby starts from the source domain `xml`: every disk given
/// with its whole chain (libvirt opens no backing file by a name found in an image), each
/// NIC on its mapped network; a NIC the map does not name is an error.
pub fn derive(xml: &str, to: &Derived<'_>) -> Result<String, String> {
    let doc = Document::parse(xml).map_err(|e| format!("the stored definition is not XML: {e}"))?;
    let root = doc.root_element();
    let mut edits = Edits(Vec::new());
    let name = child(root, "name").ok_or("the stored definition has no <name>")?;
    edits.0.push((name.range(), format!("<name>{}</name>", esc(to.name))));
    let marker = format!("<standby:vm xmlns:standby='{MARKER_NS}' of='{}'/>", esc(to.of));
    match child(root, "metadata") {
        Some(m) => {
            let end = m.range().end;
            let close = xml[..end].rfind("</metadata>").unwrap_or(end);
            let keep: String = m
                .children()
                .filter(|c| c.is_element() && c.tag_name().namespace() != Some(MARKER_NS))
                .map(|c| &xml[c.range()])
                .collect();
            edits.0.push((m.range().start..end.max(close), format!("<metadata>{keep}{marker}</metadata>")));
        }
        None => edits.0.push((name.range().end..name.range().end, format!("<metadata>{marker}</metadata>"))),
    }
    match (child(root, "uuid"), to.uuid) {
        (Some(u), Some(keep)) => edits.0.push((u.range(), format!("<uuid>{}</uuid>", esc(keep)))),
        (Some(u), None) => edits.0.push((u.range(), String::new())),
        (None, Some(keep)) => edits.0.push((name.range().end..name.range().end, format!("<uuid>{}</uuid>", esc(keep)))),
        (None, None) => {}
    }
    // Its own variable store: never the source's (two writers of one file).
    let os = child(root, "os").ok_or("the stored definition has no <os>")?;
    if child(os, "nvram").is_some() || os.attribute("firmware") == Some("efi") {
        let path = to.nvram.ok_or("the stored definition has a UEFI variable store, and none was given for it")?;
        let element = format!("<nvram>{}</nvram>", esc(path));
        match child(os, "nvram") {
            Some(nvram) => edits.0.push((nvram.range(), element)),
            None => {
                let close = os.range().end - "</os>".len();
                edits.0.push((close..close, element));
            }
        }
    }
    let devices = child(root, "devices").ok_or("the stored definition has no <devices>")?;
    let mut disk_index = 0;
    for d in devices.children().filter(Node::is_element) {
        match d.tag_name().name() {
            "disk" if d.attribute("device").unwrap_or("disk") == "disk" => {
                let source = to
                    .disks
                    .get(disk_index)
                    .ok_or_else(|| format!("the stored definition has more disks than the {} given", to.disks.len()))?;
                disk_index += 1;
                edits.0.push((d.range(), disk_xml(xml, d, source)));
            }
            "interface" => {
                let kind = d.attribute("type").unwrap_or("");
                let Some(src) = child(d, "source") else { continue };
                let attr = match kind {
                    "network" => "network",
                    "bridge" => "bridge",
                    _ => continue,
                };
                let Some(on) = src.attributes().find(|a| a.name() == attr) else { continue };
                let nic = DomainNic { kind: kind.into(), on: on.value().into(), mac: None };
                let Some(dest) = to.network_map.get(&nic.key()) else {
                    return Err(format!(
                        "its NIC on {} is not in the network map; add --network-map {}=DEST to the job",
                        nic.key(),
                        nic.key()
                    ));
                };
                let (dest_kind, dest_on) = match dest.strip_prefix("bridge:") {
                    Some(b) => ("bridge", b),
                    None => ("network", dest.as_str()),
                };
                if dest_kind == kind {
                    edits.0.push((on.range_value(), esc(dest_on)));
                } else {
                    // Another kind of attachment: the type and the source element change.
                    let ty = d.attributes().find(|a| a.name() == "type").ok_or("an interface without type")?;
                    edits.0.push((ty.range_value(), dest_kind.into()));
                    edits.0.push((src.range(), format!("<source {dest_kind}='{}'/>", esc(dest_on))));
                }
            }
            "serial" | "console" if d.attribute("type") == Some("file") => {
                if let (Some(file), Some(path)) =
                    (to.console_file, child(d, "source").and_then(|s| s.attributes().find(|a| a.name() == "path")))
                {
                    edits.0.push((path.range_value(), esc(file)));
                }
            }
            _ => {}
        }
    }
    if disk_index != to.disks.len() {
        return Err(format!("the stored definition has {disk_index} disks, not {}", to.disks.len()));
    }
    Ok(edits.apply(xml))
}

/// A disk element on `source`, keeping the original's other children (target, address,
/// boot order, serial) and driver options as they were.
fn disk_xml(xml: &str, d: Node<'_, '_>, source: &DiskSource) -> String {
    let (top, format, below) = match source {
        DiskSource::Image { path, format } => (path.as_str(), *format, &[][..]),
        DiskSource::Chain(chain) => {
            let (top, below) = chain.layers.split_first().map_or((None, &[][..]), |(t, b)| (Some(t), b));
            let top = top.map_or(("", Format::Qcow2), |t| (t.path.as_str(), t.format));
            (top.0, top.1, below)
        }
    };
    let mut driver = String::from("<driver");
    let options = child(d, "driver").into_iter().flat_map(|x| x.attributes()).filter(|a| a.name() != "type");
    let mut named = false;
    for a in options {
        named |= a.name() == "name";
        driver.push_str(&format!(" {}='{}'", a.name(), esc(a.value())));
    }
    if !named {
        driver.push_str(" name='qemu'");
    }
    driver.push_str(&format!(" type='{}'/>", format.as_str()));
    let kept: String = d
        .children()
        .filter(|c| c.is_element() && !["driver", "source", "backingStore"].contains(&c.tag_name().name()))
        .map(|c| &xml[c.range()])
        .collect();
    format!("<disk type='file' device='disk'>{driver}<source file='{}'/>{}{kept}</disk>", esc(top), chain_xml(below))
}

#[cfg(test)]
mod tests {
    use super::*;
    use standby_model::image::{Chain, Layer};

    const XML: &str = "<domain type='qemu'>
  <name>web</name>
  <uuid>3ccc852d-bc4c-468e-b1e2-4b2e799a06ba</uuid>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/vm/web &amp; co.qcow2'/><target dev='vda' bus='virtio'/><address type='pci' slot='0x04'/></disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><mac address='52:54:00:aa:bb:cd'/><source bridge='br0'/></interface>
    <serial type='file'><source path='/var/log/web.log'/><target port='0'/></serial>
  </devices>
</domain>";

    #[test]
    fn a_domain_is_read_with_its_disks_nics_and_console() {
        let d = parse(XML).unwrap();
        assert_eq!((d.name.as_str(), d.memory_mib, d.vcpus), ("web", 256, 2));
        assert_eq!(
            d.disks,
            [DomainDisk {
                target: "vda".into(),
                path: "/vm/web & co.qcow2".into(),
                format: Format::Qcow2,
                chained: false
            }]
        );
        assert_eq!(d.nics.iter().map(DomainNic::key).collect::<Vec<_>>(), ["default", "bridge:br0"]);
        assert_eq!(d.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(d.console_file.as_deref(), Some("/var/log/web.log"));
        assert!(!d.standby_made);
    }

    #[test]
    fn an_emulated_tpm_2_is_carried_and_other_tpms_are_refused_saying_why() {
        assert_eq!(parse(XML).unwrap().tpm, None);
        let with = |tpm: &str| parse(&XML.replace("</devices>", &format!("{tpm}</devices>"))).unwrap().tpm.unwrap();
        let ok = with("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>");
        assert_eq!((ok.model.as_str(), ok.unsupported()), ("tpm-crb", None));
        let host = with("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>");
        assert!(host.unsupported().unwrap().contains("the host's own"), "{host:?}");
        let old = with("<tpm model='tpm-tis'><backend type='emulator' version='1.2'/></tpm>");
        assert!(old.unsupported().unwrap().contains("TPM 2.0 only"), "{old:?}");
        let sealed = with(
            "<tpm model='tpm-tis'><backend type='emulator' version='2.0'><encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/></backend></tpm>",
        );
        assert!(sealed.unsupported().unwrap().contains("encrypted"), "{sealed:?}");
    }

    #[test]
    fn disks_standby_cannot_replicate_are_refused_naming_them() {
        let net = XML.replace(
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='/vm/web &amp; co.qcow2'/>",
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='h'/></source>",
        );
        let e = parse(&net).unwrap_err();
        assert!(e.contains("disk vda is a network disk"), "{e}");
        let vmdk = XML.replace("type='qcow2' cache", "type='vmdk' cache");
        assert!(parse(&vmdk).unwrap_err().contains("format vmdk"));
        let chain = XML.replace(
            "<target dev='vda'",
            "<backingStore type='file'><source file='/b'/></backingStore><target dev='vda'",
        );
        assert!(parse(&chain).unwrap().disks[0].chained);
        let lun = XML.replace("device='cdrom'", "device='lun'");
        assert!(parse(&lun).unwrap_err().contains("its lun hdc"), "a LUN is refused, not skipped");
        let direct = XML.replace("<interface type='bridge'>", "<interface type='direct'>");
        assert!(parse(&direct).unwrap_err().contains("NIC of type direct"), "a NIC the map cannot move is refused");
        let uefi = XML.replace(
            "</type></os>",
            "</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>\
             <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>",
        );
        let mut to = Derived {
            name: "r",
            uuid: None,
            disks: &[DiskSource::Image { path: "/dr/o.qcow2".into(), format: Format::Qcow2 }],
            network_map: &BTreeMap::from([("default".to_owned(), "dr".to_owned()), ("bridge:br0".into(), "dr".into())]),
            console_file: None,
            nvram: None,
            of: "web",
        };
        assert!(derive(&uefi, &to).unwrap_err().contains("variable store"), "never the source's store");
        to.nvram = Some("/dr/failover-dvars.fd");
        let replica = parse(&derive(&uefi, &to).unwrap()).unwrap().firmware.unwrap();
        assert_eq!(replica.vars, "/dr/failover-dvars.fd");
        assert_eq!(replica.loader, "/usr/share/OVMF/OVMF_CODE_4M.fd", "the firmware itself is kept");
        // Firmware libvirt chooses: its store is libvirt's, by name; the replica's is given.
        let auto = XML.replace("<os>", "<os firmware='efi'>");
        assert_eq!(parse(&auto).unwrap().firmware.unwrap().vars, "/var/lib/libvirt/qemu/nvram/web_VARS.fd");
        let derived = derive(&auto, &to).unwrap();
        assert!(derived.contains("<nvram>/dr/failover-dvars.fd</nvram></os>"), "{derived}");
        let f = parse(&uefi).unwrap().firmware.unwrap();
        assert_eq!(
            (f.loader.as_str(), f.vars.as_str()),
            ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/var/lib/libvirt/qemu/nvram/web_VARS.fd")
        );
        assert!(parse(XML).unwrap().firmware.is_none());
    }

    #[test]
    fn a_replica_keeps_everything_but_name_uuid_disks_networks_and_console() {
        let chain = Chain {
            layers: vec![
                Layer { path: "/dr/failover-d0.qcow2".into(), format: Format::Qcow2 },
                Layer { path: "/dr/d0-2.qcow2".into(), format: Format::Qcow2 },
                Layer { path: "/dr/d0-1.qcow2".into(), format: Format::Qcow2 },
            ],
        };
        let map =
            BTreeMap::from([("default".to_owned(), "dr-net".to_owned()), ("bridge:br0".into(), "bridge:br-dr".into())]);
        let disks = [DiskSource::Chain(chain)];
        let to = Derived {
            name: "web_replica",
            uuid: None,
            disks: &disks,
            network_map: &map,
            console_file: Some("/dr/console.log"),
            nvram: None,
            of: "web",
        };
        let out = derive(XML, &to).unwrap();
        let d = parse(&out).unwrap();
        assert_eq!(d.name, "web_replica");
        assert_eq!(d.uuid, None);
        assert!(d.standby_made);
        assert_eq!(d.disks[0].path, "/dr/failover-d0.qcow2");
        assert_eq!(d.nics.iter().map(DomainNic::key).collect::<Vec<_>>(), ["dr-net", "bridge:br-dr"]);
        assert_eq!(
            d.nics.iter().map(|n| n.mac.as_deref().unwrap()).collect::<Vec<_>>(),
            ["52:54:00:aa:bb:cc", "52:54:00:aa:bb:cd"]
        );
        assert_eq!(d.console_file.as_deref(), Some("/dr/console.log"));
        for kept in [
            "machine='pc-i440fx-7.2'",
            "<model>qemu64</model>",
            "cache='none'",
            "<address type='pci' slot='0x04'/>",
            "/iso/x.iso",
        ] {
            assert!(out.contains(kept), "{kept} is kept: {out}");
        }
        assert!(out.contains(
            "<source file='/dr/failover-d0.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/dr/d0-2.qcow2'/>\
             <backingStore type='file'><format type='qcow2'/><source file='/dr/d0-1.qcow2'/><backingStore/></backingStore></backingStore>"
        ), "{out}");
        // Derived again from the replica's own definition, the marker is not doubled.
        let same = BTreeMap::from([
            ("dr-net".to_owned(), "dr-net".to_owned()),
            ("bridge:br-dr".into(), "bridge:br-dr".into()),
        ]);
        let again = derive(&out, &Derived { uuid: Some("u-1"), network_map: &same, ..to.clone() }).unwrap();
        assert_eq!(again.matches(MARKER_NS).count(), 1);
        assert_eq!(parse(&again).unwrap().uuid.as_deref(), Some("u-1"));
        // Switched between a network and a bridge.
        let map =
            BTreeMap::from([("default".to_owned(), "bridge:br9".to_owned()), ("bridge:br0".into(), "lan".into())]);
        let swapped = parse(&derive(XML, &Derived { network_map: &map, ..to.clone() }).unwrap()).unwrap();
        assert_eq!(swapped.nics.iter().map(DomainNic::key).collect::<Vec<_>>(), ["bridge:br9", "lan"]);
    }

    #[test]
    fn an_unmapped_nic_is_an_error_saying_what_to_add() {
        let map = BTreeMap::from([("default".to_owned(), "dr-net".to_owned())]);
        let disks = [DiskSource::Image { path: "/x".into(), format: Format::Raw }];
        let to = Derived {
            name: "r",
            uuid: None,
            disks: &disks,
            network_map: &map,
            console_file: None,
            nvram: None,
            of: "web",
        };
        let e = derive(XML, &to).unwrap_err();
        assert!(e.contains("--network-map bridge:br0=DEST"), "{e}");
    }
}
