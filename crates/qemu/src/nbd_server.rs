//! `qemu-nbd` command lines: how standby serves images that no running VM holds.

use crate::chain::Chain;

pub const QEMU_NBD: &str = "qemu-nbd";

#[derive(Debug, Clone)]
pub struct NbdServe<'a> {
    pub chain: &'a Chain,
    pub socket: &'a str,
    pub pidfile: &'a str,
    pub export_name: &'a str,
    pub writable: bool,
    /// A disabled dirty bitmap of the top layer to publish as `qemu:dirty-bitmap:NAME`.
    pub bitmap: Option<&'a str>,
    /// Bypass the page cache (O_DIRECT, native AIO): a whole-disk comparison then costs
    /// the kernel one copy less per byte, which is what makes it CPU-bound. Linux writes
    /// back any dirty cached pages of a range before a direct read of it, so a file last
    /// written through the cache still reads current. Not every filesystem allows it.
    pub direct: bool,
}

impl NbdServe<'_> {
    /// `--fork` returns only once the socket listens; without `--persistent` the server
    /// exits after its one client disconnects, so a finished transfer leaves nothing behind.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--fork".to_string(),
            format!("--socket={}", self.socket),
            format!("--pid-file={}", self.pidfile),
            format!("--export-name={}", self.export_name),
            if self.direct { "--cache=none".into() } else { "--cache=writeback".into() },
            "--discard=unmap".into(),
            // Transfers use several connections at once (see engine::transfer::WORKERS).
            "--shared=16".into(),
            // `qemu:allocation-depth`: which layer of the chain holds each block, so the
            // top layers' changes are known from the server already serving the chain.
            "--allocation-depth".into(),
        ];
        if !self.writable {
            a.push("--read-only".into());
        }
        if self.direct {
            a.push("--aio=native".into());
        }
        if let Some(b) = self.bitmap {
            a.push(format!("--bitmap={b}"));
        }
        // Always the explicit description, a source disk too: the server never opens an
        // image named in another image's header, nor probes a format.
        a.push(crate::chain::chain_filename(self.chain));
        a
    }
}
