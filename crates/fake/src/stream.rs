//! A connection to a fake export: reads and writes the world as they happen, and answers
//! block status from the chain's clusters and bitmaps.

use std::sync::{Arc, Mutex, MutexGuard};

use standby_host::{BlockStream, HostError};
use standby_nbd::{Extent, NbdError};

use crate::world::{Export, World};
use crate::CLUSTER;

fn merge_extents(flags: impl Iterator<Item = (u64, u32)>, offset: u64, end: u64) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (c, f) in flags {
        let start = (c * CLUSTER).max(offset);
        let stop = ((c + 1) * CLUSTER).min(end);
        match out.last_mut() {
            Some(e) if e.flags == f && e.offset + e.length == start => e.length += stop - start,
            _ => out.push(Extent { offset: start, length: stop - start, flags: f }),
        }
    }
    out
}

/// A connection to an export: reads and writes the world as they happen.
#[derive(Debug)]
pub(crate) struct FakeStream {
    pub(crate) world: Arc<Mutex<World>>,
    pub(crate) export: Export,
    pub(crate) contexts: Vec<String>,
    pub(crate) size: u64,
}

impl FakeStream {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(e: HostError) -> NbdError {
        NbdError::Protocol(e.to_string())
    }
}

impl BlockStream for FakeStream {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
        self.world().read(&self.export.chain, offset, buf).map_err(Self::fail)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError> {
        if !self.export.writable {
            return Err(NbdError::ReadOnly);
        }
        self.world().write(&self.export.chain, offset, data).map_err(Self::fail)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
        self.write(offset, &vec![0; len as usize])
    }

    fn flush(&mut self) -> std::result::Result<(), NbdError> {
        Ok(())
    }

    fn block_status(&mut self, context: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError> {
        if !self.contexts.iter().any(|c| c == context) {
            return Err(NbdError::NoContext(context.into()));
        }
        let end = (offset + len).min(self.size);
        let clusters = offset / CLUSTER..end.div_ceil(CLUSTER);
        let w = self.world();
        let chain = &self.export.chain;
        let flags: Vec<(u64, u32)> = if let Some(name) = context.strip_prefix("qemu:dirty-bitmap:") {
            if self.export.bitmap.as_deref() != Some(name) {
                return Err(NbdError::NoContext(context.into()));
            }
            let img = w.image(&chain.layers[0].path).map_err(Self::fail)?;
            let b = img.bitmaps.get(name).ok_or_else(|| NbdError::NoContext(context.into()))?;
            clusters.map(|c| (c, u32::from(b.dirty.contains(&c)))).collect()
        } else {
            let depth = |c| w.read_cluster(chain, c).map(|(_, d)| d).map_err(Self::fail);
            match context {
                "base:allocation" => clusters
                    .map(|c| Ok((c, if depth(c)? == 0 { 3 } else { 0 })))
                    .collect::<std::result::Result<_, NbdError>>()?,
                "qemu:allocation-depth" => {
                    clusters.map(|c| Ok((c, depth(c)?))).collect::<std::result::Result<_, NbdError>>()?
                }
                _ => return Err(NbdError::NoContext(context.into())),
            }
        };
        Ok(merge_extents(flags.into_iter(), offset, end))
    }

    fn disconnect(self: Box<Self>) -> std::result::Result<(), NbdError> {
        Ok(())
    }
}
