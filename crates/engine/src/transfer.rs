//! Moving a disk's blocks from a point-in-time view on the source into a new DR layer.
//! Three methods, one result: the layer, read through its chain, equals the source view.
//! - full: a fresh layer without backing; copy allocated, non-zero data only.
//! - cbt: a layer over the previous restore point; copy the blocks a trusted dirty bitmap
//!   names (zeroes where the source now reads zero).
//! - digest: a layer over the previous restore point; hash every block on both sides and
//!   send only the ones that differ.

use std::sync::mpsc;

use standby_host::NbdClient;
use standby_nbd::{Extent, NbdError};

use crate::Progress;

/// `base:allocation` flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
const STATE_DIRTY: u32 = 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Bytes per read request.
const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection and digest comparison.
const BLOCK: usize = 64 << 10;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes read from the source view.
    pub read: u64,
    /// Data bytes written to the DR layer: what travels.
    pub written: u64,
    /// Bytes made zero on the DR layer without sending data.
    pub zeroed: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.read += o.read;
        self.written += o.written;
        self.zeroed += o.zeroed;
    }
}

/// Reports transferred bytes against a total, for one subject.
pub struct Meter<'a> {
    pub progress: &'a dyn Progress,
    pub subject: &'a str,
    pub done: u64,
    pub total: u64,
}

impl Meter<'_> {
    fn add(&mut self, n: u64) {
        self.done += n;
        self.progress
            .bytes(self.subject, self.done.min(self.total), self.total);
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Writes `buf` (the source's bytes at `offset`) to `dst`, skipping or zeroing all-zero
/// blocks: `skip_zero` when the destination already reads zero there (a fresh layer).
fn write_nonzero(
    dst: &mut NbdClient,
    offset: u64,
    buf: &[u8],
    skip_zero: bool,
    st: &mut Stats,
) -> Result<(), NbdError> {
    let mut i = 0;
    while i < buf.len() {
        let zero = is_zero(&buf[i..(i + BLOCK).min(buf.len())]);
        let mut j = i;
        while j < buf.len() && is_zero(&buf[j..(j + BLOCK).min(buf.len())]) == zero {
            j = (j + BLOCK).min(buf.len());
        }
        let off = offset + i as u64;
        if !zero {
            dst.write(off, &buf[i..j])?;
            st.written += (j - i) as u64;
        } else if !skip_zero {
            dst.write_zeroes(off, (j - i) as u64)?;
            st.zeroed += (j - i) as u64;
        }
        i = j;
    }
    Ok(())
}

fn copy_range(
    src: &mut NbdClient,
    dst: &mut NbdClient,
    ext: Extent,
    skip_zero: bool,
    st: &mut Stats,
    meter: &mut Meter<'_>,
    on_chunk: &mut dyn FnMut(),
) -> Result<(), NbdError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = ext.offset;
    let end = ext.offset + ext.length;
    while pos < end {
        let n = (end - pos).min(CHUNK) as usize;
        src.read(pos, &mut buf[..n])?;
        st.read += n as u64;
        write_nonzero(dst, pos, &buf[..n], skip_zero, st)?;
        meter.add(n as u64);
        on_chunk();
        pos += n as u64;
    }
    Ok(())
}

/// Sum of extent lengths.
fn total(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.length).sum()
}

/// First run: every allocated, non-zero block into a fresh layer.
pub fn full(
    src: &mut NbdClient,
    dst: &mut NbdClient,
    meter: &mut Meter<'_>,
    on_chunk: &mut dyn FnMut(),
) -> Result<Stats, NbdError> {
    let size = src.size();
    let data: Vec<Extent> = src
        .block_status(BASE_ALLOCATION, 0, size)?
        .into_iter()
        .filter(|e| e.flags & (STATE_HOLE | STATE_ZERO) == 0)
        .collect();
    meter.total += total(&data);
    let mut st = Stats::default();
    for ext in data {
        copy_range(src, dst, ext, true, &mut st, meter, on_chunk)?;
    }
    Ok(st)
}

/// The extents of `[e.offset, e.offset+e.length)` split by the source's allocation.
fn split_by_allocation(src: &mut NbdClient, e: Extent) -> Result<Vec<Extent>, NbdError> {
    src.block_status(BASE_ALLOCATION, e.offset, e.length)
}

/// Incremental run from a trusted bitmap: only dirty blocks travel.
pub fn cbt(
    src: &mut NbdClient,
    dst: &mut NbdClient,
    bitmap: &str,
    meter: &mut Meter<'_>,
    on_chunk: &mut dyn FnMut(),
) -> Result<Stats, NbdError> {
    let size = src.size();
    let dirty: Vec<Extent> = src
        .block_status(&bitmap_context(bitmap), 0, size)?
        .into_iter()
        .filter(|e| e.flags & STATE_DIRTY != 0)
        .collect();
    meter.total += total(&dirty);
    let mut st = Stats::default();
    for d in dirty {
        for a in split_by_allocation(src, d)? {
            if a.flags & STATE_ZERO != 0 {
                dst.write_zeroes(a.offset, a.length)?;
                st.zeroed += a.length;
                meter.add(a.length);
            } else {
                copy_range(src, dst, a, false, &mut st, meter, on_chunk)?;
            }
        }
    }
    Ok(st)
}

/// A chunk read by one side of a digest comparison: offset, bytes, and one hash per block.
type Hashed = (u64, Vec<u8>, Vec<blake3::Hash>);

/// Reads `ranges` in chunks and hashes each block, on its own thread.
fn hash_side(
    mut client: NbdClient,
    ranges: Vec<Extent>,
    tx: mpsc::SyncSender<Result<Hashed, NbdError>>,
) {
    for r in ranges {
        let mut pos = r.offset;
        let end = r.offset + r.length;
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            let mut buf = vec![0u8; n];
            let res = client.read(pos, &mut buf).map(|()| {
                let hashes = buf.chunks(BLOCK).map(blake3::hash).collect();
                (pos, buf, hashes)
            });
            let failed = res.is_err();
            if tx.send(res).is_err() || failed {
                return;
            }
            pos += n as u64;
        }
    }
}

/// Incremental run without a trusted bitmap: compare block digests of the source view and
/// the previous restore point (read through the new layer, which still shows it) and write
/// only the blocks that differ. `dst_reader` is a second connection to the new layer; both
/// readers run on threads of their own, so the two sides are read at the same time.
pub fn digest(
    mut src: NbdClient,
    dst: &mut NbdClient,
    mut dst_reader: NbdClient,
    meter: &mut Meter<'_>,
    on_chunk: &mut dyn FnMut(),
) -> Result<Stats, NbdError> {
    let size = src.size();
    let src_map = src.block_status(BASE_ALLOCATION, 0, size)?;
    let dst_map = dst_reader.block_status(BASE_ALLOCATION, 0, size.min(dst_reader.size()))?;
    let mut st = Stats::default();
    // Where both sides read zero nothing needs reading; where only the source does, the
    // layer just gets zeroes. Everything else is compared block by block.
    let mut compare = Vec::new();
    for r in intersect(&src_map, &dst_map, size) {
        match (r.src_zero, r.dst_zero) {
            (true, true) => {}
            (true, false) => {
                dst.write_zeroes(r.offset, r.length)?;
                st.zeroed += r.length;
            }
            _ => compare.push(Extent {
                offset: r.offset,
                length: r.length,
                flags: 0,
            }),
        }
    }
    meter.total += total(&compare);

    let (stx, srx) = mpsc::sync_channel::<Result<Hashed, NbdError>>(4);
    let (dtx, drx) = mpsc::sync_channel::<Result<Hashed, NbdError>>(4);
    let src_ranges = compare.clone();
    std::thread::scope(|s| {
        s.spawn(move || hash_side(src, src_ranges, stx));
        s.spawn(move || hash_side(dst_reader, compare, dtx));
        // Owned here, the receivers drop when this closure returns, even early on an
        // error; a reader blocked on a full channel then stops instead of hanging the join.
        let (srx, drx) = (srx, drx);
        for (a, b) in srx.iter().zip(drx.iter()) {
            let ((off, data, src_hashes), (_, _, dst_hashes)) = (a?, b?);
            st.read += data.len() as u64;
            for (i, (x, y)) in src_hashes.iter().zip(&dst_hashes).enumerate() {
                if x != y {
                    let start = i * BLOCK;
                    let end = (start + BLOCK).min(data.len());
                    write_nonzero(dst, off + start as u64, &data[start..end], false, &mut st)?;
                }
            }
            meter.add(data.len() as u64);
            on_chunk();
        }
        Ok(st)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    offset: u64,
    length: u64,
    src_zero: bool,
    dst_zero: bool,
}

/// Overlays two allocation maps; beyond the end of `dst` (a grown disk) it reads as zero.
fn intersect(src: &[Extent], dst: &[Extent], size: u64) -> Vec<Region> {
    let zero = |e: &Extent| e.flags & STATE_ZERO != 0;
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let mut pos = 0;
    while pos < size {
        while i < src.len() && src[i].offset + src[i].length <= pos {
            i += 1;
        }
        while j < dst.len() && dst[j].offset + dst[j].length <= pos {
            j += 1;
        }
        let Some(s) = src.get(i) else { break };
        let mut end = s.offset + s.length;
        let dst_zero = match dst.get(j) {
            Some(d) if d.offset <= pos => {
                end = end.min(d.offset + d.length);
                zero(d)
            }
            _ => true,
        };
        let end = end.min(size);
        out.push(Region {
            offset: pos,
            length: end - pos,
            src_zero: zero(s),
            dst_zero,
        });
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn intersect_splits_at_every_boundary() {
        let src = [e(0, 100, 0), e(100, 100, STATE_ZERO | STATE_HOLE)];
        let dst = [e(0, 50, STATE_ZERO), e(50, 100, 0)];
        let r = intersect(&src, &dst, 200);
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.offset, r.length, r.src_zero, r.dst_zero))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 50, false, true),
                (50, 50, false, false),
                (100, 50, true, false),
                (150, 50, true, true)
            ]
        );
    }
}
