//! Moving a replica's state onto a failback target: what differs, and the copy.
//!
//! Three ways to know what differs, one result (the target reads as the replica):
//! - ranges known from metadata (quick rollback): the replica's own layers and the
//!   source's dirty bitmaps name every block that can differ; only those are read;
//! - digest: both sides read and compared, only differing blocks written;
//! - full: a new, empty target gets every allocated block.

use standby_host::{Chain, Endpoint, Format, Host, ServeSpec};

use crate::transfer::{self, Plan, Stats, Wire, BASE_ALLOCATION};
use crate::{EngineError, Progress, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Difference {
    /// The ranges named, and every range the top `top_layers` layers of the source chain
    /// hold (from the serving qemu-nbd's `qemu:allocation-depth`).
    Ranges {
        known: Vec<(u64, u64)>,
        top_layers: u32,
    },
    Digest,
    Full,
}

/// `qemu:allocation-depth`: 0 unallocated, 1 the top layer, 2 the one below, ...
const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// One side of a copy: a chain on a host.
pub(crate) struct End<'a> {
    pub host: &'a dyn Host,
    pub chain: Chain,
}

/// Makes `dst` read exactly as `src` does, copying what `diff` says may differ. `id`
/// names the NBD servers so that a killed copy's leftovers are found by prefix.
#[allow(clippy::too_many_arguments)]
pub(crate) fn copy(
    id: &str,
    src: End<'_>,
    dst: End<'_>,
    diff: &Difference,
    wire: &Wire,
    progress: &dyn Progress,
    subject: &str,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<Stats> {
    let (src_id, dst_id) = (format!("{id}-src"), format!("{id}-dst"));
    let result = (|| -> Result<Stats> {
        let src_addr = src.host.nbd_serve(&ServeSpec {
            id: src_id.clone(),
            chain: src.chain.clone(),
            writable: false,
            bitmap: None,
            direct: *diff == Difference::Digest,
        })?;
        let dst_addr = dst.host.nbd_serve(&ServeSpec {
            id: dst_id.clone(),
            chain: dst.chain.clone(),
            writable: true,
            bitmap: None,
            direct: *diff == Difference::Digest,
        })?;
        let connect_src = || src.host.nbd_connect(&src_addr, &src_id, &[BASE_ALLOCATION, ALLOCATION_DEPTH]);
        let connect_dst = || dst.host.nbd_connect(&dst_addr, &dst_id, &[BASE_ALLOCATION]);
        let err = |source| EngineError::Transfer { source };
        // Held until the workers are done: qemu-nbd exits when its last client leaves.
        let mut plan_src = connect_src()?;
        let mut plan_dst = connect_dst()?;
        if plan_src.size() != plan_dst.size() {
            return Err(EngineError::BadArgument {
                arg: "--to",
                why: format!(
                    "the replica's disk is {} bytes and the target's {}; they must be the same size",
                    plan_src.size(),
                    plan_dst.size()
                ),
            });
        }
        let plan = match diff {
            Difference::Ranges { known, top_layers } => {
                let mut ranges = known.clone();
                if *top_layers > 0 {
                    let size = plan_src.size();
                    let depths = plan_src.block_status(ALLOCATION_DEPTH, 0, size).map_err(err)?;
                    ranges.extend(
                        depths.iter().filter(|e| (1..=*top_layers).contains(&e.flags)).map(|e| (e.offset, e.length)),
                    );
                }
                Plan::ranges(&mut plan_src, &ranges)
            }
            Difference::Digest => Plan::digest(&mut plan_src, &mut plan_dst),
            Difference::Full => Plan::full(&mut plan_src),
        }
        .map_err(err)?;
        let ends = (
            &Endpoint {
                address: src_addr.clone(),
                export: src_id.clone(),
                contexts: vec![BASE_ALLOCATION.into(), ALLOCATION_DEPTH.into()],
            },
            &Endpoint { address: dst_addr.clone(), export: dst_id.clone(), contexts: vec![BASE_ALLOCATION.into()] },
        );
        let stats = transfer::run(dst.host, &plan, ends, wire, progress, subject, on_chunk)?;
        plan_dst.flush().map_err(err)?;
        let _ = plan_dst.disconnect();
        let _ = plan_src.disconnect();
        Ok(stats)
    })();
    src.host.nbd_stop_all(&src_id)?;
    dst.host.nbd_stop_all(&dst_id)?;
    result
}

/// The ranges a dirty bitmap of a stopped VM's disk marks, read from block status alone.
pub(crate) fn bitmap_ranges(id: &str, host: &dyn Host, path: &str, bitmap: &str) -> Result<Vec<(u64, u64)>> {
    let result = (|| -> Result<Vec<(u64, u64)>> {
        let addr = host.nbd_serve(&ServeSpec {
            id: id.into(),
            chain: Chain::single(path, Format::Qcow2),
            writable: false,
            bitmap: Some(bitmap.into()),
            direct: false,
        })?;
        let ctx = transfer::bitmap_context(bitmap);
        let mut c = host.nbd_connect(&addr, id, &[&ctx])?;
        let size = c.size();
        let extents = c.block_status(&ctx, 0, size).map_err(|source| EngineError::Transfer { source })?;
        let _ = c.disconnect();
        Ok(transfer::flagged(&extents, transfer::STATE_DIRTY))
    })();
    host.nbd_stop_all(id)?;
    result
}
