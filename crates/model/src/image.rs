//! The words for disks and the machines that run them, whatever the driver: image
//! formats, chains of layers that standby describes itself, what an image's header says,
//! the bitmap operations, how a VM's disk is opened. The QEMU driver turns these into
//! its options (`standby_qemu::chain`); the engine reads and writes only these.

/// An image format standby opens. Anything else is refused where it is read, never
/// taken for one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" => Some(Format::Raw),
            _ => None,
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub path: String,
    pub format: Format,
}

/// Layers, top first. The last one is the base and is opened without any backing: a
/// replicated image may carry any backing-file name in its header, and standby never lets
/// a driver follow one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chain {
    pub layers: Vec<Layer>,
}

impl Chain {
    pub fn single(path: &str, format: Format) -> Chain {
        Chain { layers: vec![Layer { path: path.into(), format }] }
    }

    /// A new chain with `top` (a qcow2 layer) stacked on this one.
    pub fn with_top(&self, path: &str) -> Chain {
        let mut layers = vec![Layer { path: path.into(), format: Format::Qcow2 }];
        layers.extend(self.layers.iter().cloned());
        Chain { layers }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    /// Set on a closed image when its VM did not shut down cleanly: the bitmap cannot be trusted.
    pub in_use: bool,
    pub enabled: bool,
}

/// What an image's header says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    pub format: Format,
    pub virtual_size: u64,
    pub bitmaps: Vec<BitmapInfo>,
    pub backing_filename: Option<String>,
}

/// A change to one persistent bitmap of a closed image.
#[derive(Debug, Clone, Copy)]
pub enum BitmapOp<'a> {
    Add,
    Remove,
    Enable,
    Disable,
    /// Merge the named bitmap of the same image into the target bitmap.
    MergeFrom(&'a str),
}

/// How VMs run on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

/// How a VM's disk is opened.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DiskSource {
    /// One image file opened by its own header (a VM's own disk).
    Image { path: String, format: Format },
    /// A chain standby describes layer by layer (a replica's disk).
    Chain(Chain),
}
