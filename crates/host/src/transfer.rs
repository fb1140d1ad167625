//! Moving a disk's blocks from a point-in-time view on the source into a new DR layer.
//! Three methods, one result: the layer, read through its chain, equals the source view.
//! - full: a fresh layer without backing; copy allocated, non-zero data only.
//! - cbt: a layer over the previous restore point; copy the blocks a trusted dirty bitmap
//!   names (zeroes where the source now reads zero).
//! - digest: a layer over the previous restore point; compare every block of both sides
//!   and send only the ones that differ.
//!
//! Each method first makes a plan (a list of items, from block status alone), then a few
//! workers, each with its own connection to both sides, carry it out. Several requests in
//! flight hide the latency of each one, which is what scattered small changes need.
//!
//! This is the transport: the engine plans (it reads extents only), and the host that
//! holds the destination carries the plan out ([`crate::Host::transfer`]), so that on a
//! host reached over the network the bytes go from source to destination directly.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use standby_nbd::{Extent, NbdError};

use crate::{BlockStream, HostError, Result};

type Stream = Box<dyn BlockStream>;

pub use standby_model::wire::{Compression, Wire};

/// `base:allocation` flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag.
pub const STATE_DIRTY: u32 = 1;

pub const BASE_ALLOCATION: &str = "base:allocation";

/// Connections per side that one disk's copy uses, twice that for a comparison (servers
/// are started to allow them).
pub const WORKERS: usize = 4;

pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// Largest item: bytes per read request.
const CHUNK: u64 = 4 << 20;
/// Granularity of zero detection and digest comparison.
const BLOCK: usize = 64 << 10;

/// How far a transfer is: bytes of the plan done out of its total, and the bytes that
/// crossed the link between hosts so far (0 on one machine) for `wire_data` bytes of
/// blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub done: u64,
    pub total: u64,
    pub wire: u64,
    pub wire_data: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Bytes read from the source view.
    pub read: u64,
    /// Data bytes written to the DR layer: what travels.
    pub written: u64,
    /// Bytes made zero on the DR layer without sending data.
    pub zeroed: u64,
    /// Verification only: bytes that differ between the two sides.
    pub differing: u64,
    /// Bytes that crossed the network between two hosts' agents (compressed frames);
    /// zero where the transfer ran on one machine.
    #[serde(default)]
    pub wire: u64,
    /// How often the link dropped and the transfer went on after it (per transfer, the
    /// most any one of its workers saw: a drop stops them all).
    #[serde(default)]
    pub resumed: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.read += o.read;
        self.written += o.written;
        self.zeroed += o.zeroed;
        self.differing += o.differing;
        self.wire += o.wire;
        self.resumed += o.resumed;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Action {
    /// Read the source, write its non-zero blocks; zero blocks are skipped when the layer
    /// is fresh (`fresh`) and written as zeroes otherwise.
    Copy { fresh: bool },
    /// The source reads zero here; make the layer read zero.
    Zero,
    /// Read both sides, write the blocks whose digests differ.
    Compare,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Item {
    offset: u64,
    length: u64,
    action: Action,
}

/// What a transfer will do, decided from block status only.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    items: Vec<Item>,
    /// Compare only: count differing bytes, write nothing.
    verify_only: bool,
}

impl Plan {
    fn push(&mut self, offset: u64, length: u64, action: Action) {
        let step = if action == Action::Zero { length } else { CHUNK };
        let mut pos = offset;
        while pos < offset + length {
            let n = (offset + length - pos).min(step);
            self.items.push(Item { offset: pos, length: n, action });
            pos += n;
        }
    }

    /// Bytes that will be read from the source.
    pub fn bytes_to_read(&self) -> u64 {
        self.items.iter().filter(|i| i.action != Action::Zero).map(|i| i.length).sum()
    }

    /// Verification: which bytes of two images differ. Regions where both read zero are
    /// skipped; everything else is read on both sides; nothing is written.
    pub fn verify(a: &mut Stream, b: &mut Stream) -> std::result::Result<Plan, NbdError> {
        let a_map = a.block_status(BASE_ALLOCATION, 0, a.size())?;
        let b_map = b.block_status(BASE_ALLOCATION, 0, b.size())?;
        Ok(Plan::verify_from(a.size(), b.size(), &a_map, &b_map))
    }

    /// First run: every allocated, non-zero block into a fresh layer.
    pub fn full(src: &mut Stream) -> std::result::Result<Plan, NbdError> {
        Ok(Plan::full_from(&src.block_status(BASE_ALLOCATION, 0, src.size())?))
    }

    /// Incremental run from a trusted bitmap: only dirty blocks, zeroes where the source
    /// now reads zero.
    pub fn cbt(src: &mut Stream, bitmap: &str) -> std::result::Result<Plan, NbdError> {
        let size = src.size();
        let dirty = src.block_status(&bitmap_context(bitmap), 0, size)?;
        let alloc = src.block_status(BASE_ALLOCATION, 0, size)?;
        Ok(Plan::cbt_from(size, &dirty, &alloc))
    }

    /// Copies exactly `ranges` (offset, length), known from metadata to hold every block
    /// that differs: zeroes where the source reads zero there, data elsewhere. Nothing else
    /// is read.
    pub fn ranges(src: &mut Stream, ranges: &[(u64, u64)]) -> std::result::Result<Plan, NbdError> {
        let size = src.size();
        let alloc = src.block_status(BASE_ALLOCATION, 0, size)?;
        Ok(Plan::cbt_from(size, &covering(ranges, size), &alloc))
    }

    /// Incremental run without a trusted bitmap: where both sides read zero nothing is
    /// read; where only the source does, the layer gets zeroes; the rest is compared.
    /// `dst` reads the new layer, which still shows the previous restore point.
    pub fn digest(src: &mut Stream, dst: &mut Stream) -> std::result::Result<Plan, NbdError> {
        let size = src.size();
        let src_map = src.block_status(BASE_ALLOCATION, 0, size)?;
        let dst_map = dst.block_status(BASE_ALLOCATION, 0, size.min(dst.size()))?;
        Ok(Plan::digest_from(size, &src_map, &dst_map))
    }

    // The decisions themselves, from extents alone (`plan_from_extents_table`).

    fn verify_from(a_size: u64, b_size: u64, a_map: &[Extent], b_map: &[Extent]) -> Plan {
        let mut plan = Plan { verify_only: true, ..Plan::default() };
        if a_size != b_size {
            // Different sizes differ: one item that can only count as a difference.
            plan.push(0, a_size.max(b_size), Action::Zero);
            return plan;
        }
        for r in overlay(a_map, b_map, a_size) {
            if r.a_flags & STATE_ZERO == 0 || r.b_flags & STATE_ZERO == 0 {
                plan.push(r.offset, r.length, Action::Compare);
            }
        }
        plan
    }

    fn full_from(alloc: &[Extent]) -> Plan {
        let mut plan = Plan::default();
        for e in alloc {
            if e.flags & (STATE_HOLE | STATE_ZERO) == 0 {
                plan.push(e.offset, e.length, Action::Copy { fresh: true });
            }
        }
        plan
    }

    /// `dirty` flags (`STATE_DIRTY`) what must be sent; `alloc` says where it reads zero.
    fn cbt_from(size: u64, dirty: &[Extent], alloc: &[Extent]) -> Plan {
        let mut plan = Plan::default();
        for r in overlay(dirty, alloc, size) {
            if r.a_flags & STATE_DIRTY != 0 {
                let action = if r.b_flags & STATE_ZERO != 0 { Action::Zero } else { Action::Copy { fresh: false } };
                plan.push(r.offset, r.length, action);
            }
        }
        plan
    }

    fn digest_from(size: u64, src_map: &[Extent], dst_map: &[Extent]) -> Plan {
        let mut plan = Plan::default();
        for r in overlay(src_map, dst_map, size) {
            match (r.a_flags & STATE_ZERO != 0, r.b_flags & STATE_ZERO != 0) {
                (true, true) => {}
                (true, false) => plan.push(r.offset, r.length, Action::Zero),
                _ => plan.push(r.offset, r.length, Action::Compare),
            }
        }
        plan
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Writes `buf` (the source's bytes at `offset`) to `dst` in runs of zero and non-zero
/// blocks: non-zero runs as data, zero runs as write-zeroes unless the layer already reads
/// zero there (`skip_zero`).
fn write_blocks(
    dst: &mut Stream,
    offset: u64,
    buf: &[u8],
    skip_zero: bool,
    st: &mut Stats,
) -> std::result::Result<(), NbdError> {
    let block_zero = |i: usize| is_zero(&buf[i..(i + BLOCK).min(buf.len())]);
    let mut i = 0;
    while i < buf.len() {
        let zero = block_zero(i);
        let mut j = i;
        while j < buf.len() && block_zero(j) == zero {
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

/// One worker's share of a plan: items taken in turn until none is left. An item that
/// fails is left in `pending` (its own counts not added to `total`), so that a worker
/// resuming on new connections does exactly that item again. Items are idempotent: each
/// writes the same bytes at the same place however often it runs.
fn work(
    src: &mut Stream,
    dst: &mut Stream,
    plan: &Plan,
    (next, pending): (&AtomicUsize, &mut Option<usize>),
    done: &AtomicU64,
    report: &(dyn Fn(u64) + Sync),
    (total, items): (&mut Stats, &mut u64),
) -> std::result::Result<(), NbdError> {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut theirs = vec![0u8; CHUNK as usize];
    loop {
        let i = pending.take().unwrap_or_else(|| next.fetch_add(1, Ordering::Relaxed));
        let Some(item) = plan.items.get(i) else {
            return Ok(());
        };
        let mut st = Stats::default();
        if let Err(e) = do_item(src, dst, plan, item, (&mut buf, &mut theirs), &mut st) {
            *pending = Some(i);
            return Err(e);
        }
        *total += st;
        *items += 1;
        report(done.fetch_add(item.length, Ordering::Relaxed) + item.length);
    }
}

fn do_item(
    src: &mut Stream,
    dst: &mut Stream,
    plan: &Plan,
    item: &Item,
    (buf, theirs): (&mut [u8], &mut [u8]),
    st: &mut Stats,
) -> std::result::Result<(), NbdError> {
    let n = item.length as usize;
    match item.action {
        Action::Zero if plan.verify_only => st.differing += item.length,
        Action::Zero => {
            dst.write_zeroes(item.offset, item.length)?;
            st.zeroed += item.length;
        }
        Action::Copy { fresh } => {
            src.read(item.offset, &mut buf[..n])?;
            st.read += item.length;
            write_blocks(dst, item.offset, &buf[..n], fresh, st)?;
        }
        Action::Compare => {
            if compare_digests(src, dst, plan, item, (&mut *buf, &mut *theirs), st)? {
                return Ok(());
            }
            src.read(item.offset, &mut buf[..n])?;
            dst.read(item.offset, &mut theirs[..n])?;
            st.read += item.length;
            // Both sides are read by this process, so their blocks are compared as they
            // are: the same decision as comparing their digests, with no collisions and
            // no hashing cost. A source on another host sends digests of its side
            // instead (`compare_digests`).
            for (k, (ours, old)) in buf[..n].chunks(BLOCK).zip(theirs[..n].chunks(BLOCK)).enumerate() {
                if ours == old {
                    continue;
                }
                if plan.verify_only {
                    st.differing += ours.len() as u64;
                } else {
                    write_blocks(dst, item.offset + (k * BLOCK) as u64, ours, false, st)?;
                }
            }
        }
    }
    Ok(())
}

/// The digest of a block as both sides compute it.
pub fn block_digest(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// Compares one item by digests when the source computes them where its data is (another
/// host): only the blocks that differ are then read. False, doing nothing, otherwise.
fn compare_digests(
    src: &mut Stream,
    dst: &mut Stream,
    plan: &Plan,
    item: &Item,
    (buf, theirs): (&mut [u8], &mut [u8]),
    st: &mut Stats,
) -> std::result::Result<bool, NbdError> {
    let Some(digests) = src.digests(item.offset, item.length, BLOCK as u64)? else {
        return Ok(false);
    };
    let n = item.length as usize;
    dst.read(item.offset, &mut theirs[..n])?;
    for (k, old) in theirs[..n].chunks(BLOCK).enumerate() {
        if digests.get(k).is_some_and(|d| *d == block_digest(old)) {
            continue;
        }
        if plan.verify_only {
            st.differing += old.len() as u64;
            continue;
        }
        let off = item.offset + (k * BLOCK) as u64;
        let ours = &mut buf[..old.len()];
        src.read(off, ours)?;
        st.read += ours.len() as u64;
        write_blocks(dst, off, ours, false, st)?;
    }
    Ok(true)
}

/// Carries out `plan` with up to [`WORKERS`] (2x for comparisons) pairs of connections
/// made by `connect` (source, destination). `report(done, total)` runs after each item,
/// one call at a time (the engine's progress and fail points hook in there).
pub fn execute(
    plan: &Plan,
    connect: &(dyn Fn() -> Result<(Stream, Stream)> + Sync),
    report: &(dyn Fn(u64, u64) + Sync),
) -> Result<Stats> {
    execute_resuming(plan, connect, report, Duration::ZERO)
}

/// Whether an error is the link's (reset, cut, timed out, nobody answering), after which
/// the same request on a new connection may succeed; never what a side answered.
pub fn is_link_error(e: &HostError) -> bool {
    use std::io::ErrorKind as K;
    match e {
        HostError::Unreachable { .. } => true,
        HostError::Nbd(NbdError::Io(io)) => matches!(
            io.kind(),
            K::ConnectionReset
                | K::ConnectionAborted
                | K::BrokenPipe
                | K::UnexpectedEof
                | K::TimedOut
                | K::WouldBlock
                | K::NotConnected
                | K::ConnectionRefused
                | K::HostUnreachable
                | K::NetworkUnreachable
        ),
        _ => false,
    }
}

/// The first pause before a worker connects again after a dropped link; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// [`execute`] across a link that may drop: a worker whose connection fails on the link
/// connects again, with backoff, and goes on from the item it was doing, for as long as
/// the link stays down less than `window`. Everything written before stays written; what
/// fails otherwise, or past the window, fails the transfer. `report` hears of the wait,
/// so a caller waiting on progress knows the transfer is alive.
pub fn execute_resuming(
    plan: &Plan,
    connect: &(dyn Fn() -> Result<(Stream, Stream)> + Sync),
    report: &(dyn Fn(u64, u64) + Sync),
    window: Duration,
) -> Result<Stats> {
    let total = plan.bytes_to_read();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let progress_lock = Mutex::new(());
    let report = |d: u64| {
        let _g = progress_lock.lock();
        report(d.min(total), total);
    };
    // A comparison reads every block of both sides: twice the requests in flight keep both
    // disks busy while the CPU compares (measured on the failback benchmark: 8 workers
    // 6.2 s, 4 workers 6.7 s for two 4 GiB disks). Copies of scattered changes gain nothing.
    let compares = plan.items.iter().any(|i| i.action == Action::Compare);
    let workers = if compares { 2 * WORKERS } else { WORKERS }.min(plan.items.len());
    let results: Vec<Result<Stats>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<Stats> {
                    let mut st = Stats::default();
                    let mut items = 0u64;
                    let mut pending = None;
                    // When the link went down, while it stays down.
                    let mut down: Option<Instant> = None;
                    let mut backoff = FIRST_BACKOFF;
                    loop {
                        let result = connect().and_then(|(mut src, mut dst)| {
                            let before = items;
                            let r = work(
                                &mut src,
                                &mut dst,
                                plan,
                                (&next, &mut pending),
                                &done,
                                &report,
                                (&mut st, &mut items),
                            );
                            if items > before {
                                // It went on: a later drop gets a whole window of its own.
                                if down.take().is_some() {
                                    st.resumed += 1;
                                }
                                backoff = FIRST_BACKOFF;
                            }
                            r?;
                            dst.flush()?;
                            let _ = dst.disconnect();
                            let _ = src.disconnect();
                            Ok(())
                        });
                        match result {
                            Ok(()) => return Ok(st),
                            Err(e) if is_link_error(&e) && !window.is_zero() => {
                                let since = *down.get_or_insert_with(Instant::now);
                                if since.elapsed() + backoff > window {
                                    return Err(HostError::LinkDown {
                                        secs: since.elapsed().as_secs(),
                                        detail: crate_chain(&e),
                                    });
                                }
                                report(done.load(Ordering::Relaxed));
                                std::thread::sleep(backoff);
                                backoff = (backoff * 2).min(MAX_BACKOFF);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(HostError::Invalid("a transfer worker panicked".into()))))
            .collect()
    });
    let mut total_stats = Stats::default();
    // One drop of the link stops every worker at once, and each goes on after it: the
    // drops the transfer lived through are the most any one worker saw, not their sum.
    let mut resumed = 0;
    for r in results {
        let st = r?;
        resumed = resumed.max(st.resumed);
        total_stats += st;
    }
    total_stats.resumed = resumed;
    Ok(total_stats)
}

/// An error with its causes, as one line.
fn crate_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Sorted, merged ranges from several lists, clipped to `size`.
pub fn union(lists: &[Vec<(u64, u64)>], size: u64) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = lists.iter().flatten().copied().filter(|r| r.1 > 0 && r.0 < size).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in all {
        let end = (off + len).min(size);
        match out.last_mut() {
            Some(last) if off <= last.0 + last.1 => last.1 = last.1.max(end - last.0),
            _ => out.push((off, end - off)),
        }
    }
    out
}

/// An extent map of the whole disk: `STATE_DIRTY` inside `ranges`, 0 between them.
fn covering(ranges: &[(u64, u64)], size: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (off, len) in union(&[ranges.to_vec()], size) {
        if off > pos {
            out.push(Extent { offset: pos, length: off - pos, flags: 0 });
        }
        out.push(Extent { offset: off, length: len, flags: STATE_DIRTY });
        pos = off + len;
    }
    if pos < size {
        out.push(Extent { offset: pos, length: size - pos, flags: 0 });
    }
    out
}

/// The ranges a block-status answer flags with `flag`.
pub fn flagged(extents: &[Extent], flag: u32) -> Vec<(u64, u64)> {
    extents.iter().filter(|e| e.flags & flag != 0).map(|e| (e.offset, e.length)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    offset: u64,
    length: u64,
    a_flags: u32,
    b_flags: u32,
}

/// Overlays two extent maps of one disk; where `b` ends early (a grown disk) its flags
/// read as zero (`STATE_ZERO | STATE_HOLE`).
fn overlay(a: &[Extent], b: &[Extent], size: u64) -> Vec<Region> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let mut pos = 0;
    while pos < size {
        while i < a.len() && a[i].offset + a[i].length <= pos {
            i += 1;
        }
        while j < b.len() && b[j].offset + b[j].length <= pos {
            j += 1;
        }
        let Some(x) = a.get(i) else { break };
        let mut end = x.offset + x.length;
        let b_flags = match b.get(j) {
            Some(y) if y.offset <= pos => {
                end = end.min(y.offset + y.length);
                y.flags
            }
            _ => STATE_ZERO | STATE_HOLE,
        };
        let end = end.min(size);
        out.push(Region { offset: pos, length: end - pos, a_flags: x.flags, b_flags });
        pos = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A disk in memory behind a connection that a test can cut: every read fails while
    /// `cut` is set, as a dropped link's would.
    #[derive(Debug)]
    struct Mem {
        data: Arc<Mutex<Vec<u8>>>,
        cut: Arc<std::sync::atomic::AtomicBool>,
        reads: Arc<AtomicU64>,
    }

    impl BlockStream for Mem {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), NbdError> {
            // The third read cuts the link for everyone, until a test's thread restores it.
            if self.reads.fetch_add(1, Ordering::SeqCst) == 2 {
                self.cut.store(true, Ordering::SeqCst);
            }
            if self.cut.load(Ordering::SeqCst) {
                return Err(NbdError::Io(std::io::ErrorKind::ConnectionReset.into()));
            }
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> std::result::Result<(), NbdError> {
            self.data.lock().unwrap()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> std::result::Result<(), NbdError> {
            self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn flush(&mut self) -> std::result::Result<(), NbdError> {
            Ok(())
        }
        fn block_status(&mut self, _: &str, offset: u64, len: u64) -> std::result::Result<Vec<Extent>, NbdError> {
            Ok(vec![Extent { offset, length: len, flags: 0 }])
        }
        fn disconnect(self: Box<Self>) -> std::result::Result<(), NbdError> {
            Ok(())
        }
    }

    fn cut_link_transfer(window: Duration, down: Duration) -> (Result<Stats>, Vec<u8>, Vec<u8>) {
        let size = 10 * CHUNK as usize;
        let src: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8 + 1).collect();
        let (src, dst) = (Arc::new(Mutex::new(src)), Arc::new(Mutex::new(vec![0u8; size])));
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let mem = |data: &Arc<Mutex<Vec<u8>>>| -> Stream {
            Box::new(Mem { data: data.clone(), cut: cut.clone(), reads: reads.clone() })
        };
        let plan = Plan::full(&mut mem(&src)).unwrap();
        let restore = {
            let cut = cut.clone();
            std::thread::spawn(move || {
                while !cut.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                std::thread::sleep(down);
                cut.store(false, Ordering::SeqCst);
            })
        };
        let r = execute_resuming(&plan, &|| Ok((mem(&src), mem(&dst))), &|_, _| {}, window);
        restore.join().unwrap();
        let (a, b) = (src.lock().unwrap().clone(), dst.lock().unwrap().clone());
        (r, a, b)
    }

    #[test]
    fn a_transfer_goes_on_after_a_dropped_link_within_its_window() {
        let (r, src, dst) = cut_link_transfer(Duration::from_secs(30), Duration::from_millis(1500));
        let st = r.unwrap();
        assert!(src == dst, "the copy equals the source");
        assert!(st.resumed >= 1, "{st:?}");
        assert_eq!(st.read, src.len() as u64, "each item counted once, the one redone too");
    }

    #[test]
    fn a_transfer_fails_once_the_link_stays_down_past_its_window() {
        let (r, _, _) = cut_link_transfer(Duration::from_secs(2), Duration::from_secs(4));
        let e = r.unwrap_err();
        assert!(matches!(e, HostError::LinkDown { .. }), "{e:?}");
        assert!(e.to_string().contains("retry window"), "{e}");
        // Without a window (one machine), the first drop is the error, as it was.
        let (r, _, _) = cut_link_transfer(Duration::ZERO, Duration::from_millis(10));
        assert!(matches!(r.unwrap_err(), HostError::Nbd(NbdError::Io(_))));
    }

    fn e(offset: u64, length: u64, flags: u32) -> Extent {
        Extent { offset, length, flags }
    }

    #[test]
    fn overlay_splits_at_every_boundary() {
        let a = [e(0, 100, 0), e(100, 100, STATE_ZERO | STATE_HOLE)];
        let b = [e(0, 50, STATE_ZERO), e(50, 100, 0)];
        let got: Vec<_> = overlay(&a, &b, 200).iter().map(|r| (r.offset, r.length, r.a_flags, r.b_flags)).collect();
        assert_eq!(
            got,
            vec![(0, 50, 0, STATE_ZERO), (50, 50, 0, 0), (100, 50, 3, 0), (150, 50, 3, STATE_ZERO | STATE_HOLE)]
        );
    }

    #[test]
    fn union_and_covering() {
        let u = union(&[vec![(0, 10), (30, 10)], vec![(5, 10), (100, 50)]], 120);
        assert_eq!(u, vec![(0, 15), (30, 10), (100, 20)]);
        let c: Vec<_> = covering(&u, 130).iter().map(|e| (e.offset, e.length, e.flags)).collect();
        assert_eq!(c, vec![(0, 15, 1), (15, 15, 0), (30, 10, 1), (40, 60, 0), (100, 20, 1), (120, 10, 0)]);
        assert_eq!(covering(&[], 10).len(), 1);
    }

    /// What each method sends, decided from extents alone. Flags: 0 data, 3 hole (reads
    /// zero), 1 on a bitmap dirty.
    #[test]
    fn plan_from_extents_table() {
        use Action::*;
        const Z: u32 = STATE_ZERO | STATE_HOLE;
        let items = |p: Plan| p.items.iter().map(|i| (i.offset, i.length, i.action)).collect::<Vec<_>>();
        let copy = Copy { fresh: false };
        // Full: allocated data only, into a fresh layer.
        assert_eq!(
            items(Plan::full_from(&[e(0, 10, 0), e(10, 20, Z), e(30, 5, 0)])),
            [(0, 10, Copy { fresh: true }), (30, 5, Copy { fresh: true })]
        );
        assert_eq!(items(Plan::full_from(&[e(0, 100, Z)])), []);
        // CBT: dirty ranges only; a dirty range that now reads zero becomes zeroes.
        let alloc = [e(0, 50, 0), e(50, 50, Z)];
        assert_eq!(
            items(Plan::cbt_from(100, &[e(0, 10, 0), e(10, 60, 1), e(70, 30, 0)], &alloc)),
            [(10, 40, copy), (50, 20, Zero)]
        );
        assert_eq!(items(Plan::cbt_from(100, &[e(0, 100, 0)], &alloc)), [], "a clean bitmap sends nothing");
        // Digest: both zero, skipped; zero at the source only, zeroes; else compared. A
        // destination shorter than the source (a grown disk) reads zero past its end; items
        // split where either map changes.
        let src = [e(0, 30, Z), e(30, 70, 0)];
        let dst = [e(0, 10, Z), e(10, 40, 0)];
        assert_eq!(items(Plan::digest_from(100, &src, &dst)), [(10, 20, Zero), (30, 20, Compare), (50, 50, Compare)]);
        // Verify: compare wherever either side holds data; different sizes always differ.
        let p = Plan::verify_from(100, 100, &[e(0, 50, Z), e(50, 50, 0)], &[e(0, 20, 0), e(20, 80, Z)]);
        assert!(p.verify_only);
        assert_eq!(items(p), [(0, 20, Compare), (50, 50, Compare)]);
        assert_eq!(items(Plan::verify_from(100, 200, &[], &[])), [(0, 200, Zero)]);
        // Ranges known from metadata are a bitmap of their own.
        assert_eq!(items(Plan::cbt_from(100, &covering(&[(40, 20)], 100), &alloc)), [(40, 10, copy), (50, 10, Zero)]);
    }

    #[test]
    fn plan_items_are_bounded() {
        let mut p = Plan::default();
        assert!(!p.verify_only);
        p.push(0, 10 << 20, Action::Copy { fresh: true });
        p.push(20 << 20, 10 << 20, Action::Zero);
        assert_eq!(p.items.len(), 4, "{:?}", p.items);
        assert!(p.items.iter().all(|i| i.action == Action::Zero || i.length <= CHUNK));
        assert_eq!(p.bytes_to_read(), 10 << 20);
    }
}
