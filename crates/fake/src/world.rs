//! The fake host's state: images as cluster maps with their backing file and bitmaps,
//! small text files, directories, running VMs and exports; and how a chain reads and
//! takes writes.

use std::collections::{BTreeMap, BTreeSet};

use standby_host::{Chain, Format, HostError, Result};

use crate::CLUSTER;

#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmap {
    pub(crate) enabled: bool,
    /// Left by a VM that was killed while the bitmap recorded: it may miss writes.
    pub(crate) inconsistent: bool,
    pub(crate) dirty: BTreeSet<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub(crate) format: Format,
    pub(crate) size: u64,
    pub(crate) backing: Option<String>,
    pub(crate) clusters: BTreeMap<u64, Vec<u8>>,
    pub(crate) bitmaps: BTreeMap<String, Bitmap>,
}

impl Image {
    pub(crate) fn new(format: Format, size: u64) -> Image {
        Image { format, size, backing: None, clusters: BTreeMap::new(), bitmaps: BTreeMap::new() }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Text(String),
    Image(Image),
}

#[derive(Debug, Clone)]
pub(crate) struct Vm {
    pub(crate) pid: u32,
    pub(crate) paused: bool,
    /// Its guest's filesystems frozen by its agent.
    pub(crate) frozen: bool,
    pub(crate) disks: Vec<Chain>,
}

#[derive(Debug, Clone)]
pub(crate) struct Export {
    pub(crate) chain: Chain,
    pub(crate) writable: bool,
    pub(crate) bitmap: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct World {
    pub(crate) files: BTreeMap<String, Entry>,
    pub(crate) dirs: BTreeSet<String>,
    pub(crate) vms: BTreeMap<String, Vm>,
    pub(crate) exports: BTreeMap<String, Export>,
    pub(crate) next_pid: u32,
    /// Every host call by name, for tests that prove something was (not) done.
    pub(crate) calls: Vec<String>,
}

pub(crate) fn invalid(what: impl Into<String>) -> HostError {
    HostError::Invalid(what.into())
}

pub(crate) fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| if d.is_empty() { "/" } else { d })
}

impl World {
    pub(crate) fn image(&self, path: &str) -> Result<&Image> {
        match self.files.get(path) {
            Some(Entry::Image(i)) => Ok(i),
            Some(Entry::Text(_)) => Err(invalid(format!("{path} is not an image"))),
            None => Err(invalid(format!("no image {path}"))),
        }
    }

    pub(crate) fn image_mut(&mut self, path: &str) -> Result<&mut Image> {
        match self.files.get_mut(path) {
            Some(Entry::Image(i)) => Ok(i),
            _ => Err(invalid(format!("no image {path}"))),
        }
    }

    /// The chain an image's own header names (what QEMU opens for `DiskSource::Image`).
    pub(crate) fn chain_of(&self, path: &str) -> Result<Chain> {
        let mut layers = Vec::new();
        let mut next = Some(path.to_owned());
        while let Some(p) = next {
            let img = self.image(&p)?;
            layers.push(standby_host::Layer { path: p.clone(), format: img.format });
            next = img.backing.clone();
            if layers.len() > 64 {
                return Err(invalid(format!("{path}: backing loop")));
            }
        }
        Ok(Chain { layers })
    }

    /// Cluster `c` as the chain reads it, and the depth of the layer that holds it (1 is
    /// the top, 0 none: zeros).
    pub(crate) fn read_cluster(&self, chain: &Chain, c: u64) -> Result<(Vec<u8>, u32)> {
        for (depth, layer) in chain.layers.iter().enumerate() {
            let img = self.image(&layer.path)?;
            if c * CLUSTER >= img.size {
                break;
            }
            if let Some(data) = img.clusters.get(&c) {
                return Ok((data.clone(), depth as u32 + 1));
            }
            if img.format == Format::Raw {
                return Ok((vec![0; CLUSTER as usize], depth as u32 + 1));
            }
        }
        Ok((vec![0; CLUSTER as usize], 0))
    }

    pub(crate) fn read(&self, chain: &Chain, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (data, _) = self.read_cluster(chain, at / CLUSTER)?;
            let within = (at % CLUSTER) as usize;
            let n = (CLUSTER as usize - within).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&data[within..within + n]);
            pos += n;
        }
        Ok(())
    }

    /// Writes into the chain's top layer, copying partial clusters up from below, and marks
    /// the top's recording bitmaps.
    pub(crate) fn write(&mut self, chain: &Chain, offset: u64, data: &[u8]) -> Result<()> {
        let top = chain.layers[0].path.clone();
        let size = self.image(&top)?.size;
        if offset + data.len() as u64 > size {
            return Err(invalid(format!("write past the end of {top}")));
        }
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let c = at / CLUSTER;
            let (mut cluster, _) = self.read_cluster(chain, c)?;
            let within = (at % CLUSTER) as usize;
            let n = (CLUSTER as usize - within).min(data.len() - pos);
            cluster[within..within + n].copy_from_slice(&data[pos..pos + n]);
            let img = self.image_mut(&top)?;
            img.clusters.insert(c, cluster);
            for b in img.bitmaps.values_mut().filter(|b| b.enabled) {
                b.dirty.insert(c);
            }
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn size(&self, chain: &Chain) -> Result<u64> {
        Ok(self.image(&chain.layers[0].path)?.size)
    }

    /// Everything a chain reads, cluster by cluster.
    pub(crate) fn contents(&self, chain: &Chain) -> Result<Vec<u8>> {
        let mut buf = vec![0; self.size(chain)? as usize];
        self.read(chain, 0, &mut buf)?;
        Ok(buf)
    }

    pub(crate) fn vm(&self, name: &str) -> Result<&Vm> {
        self.vms.get(name).ok_or_else(|| HostError::NotRunning(name.into()))
    }
}
