//! The engine's side of a transfer: it plans from extents (`standby_host::transfer`, the
//! transport) and hands the plan to the host that holds the destination, with its progress
//! and fail points.

pub use standby_host::transfer::*;
use standby_host::{Endpoint, Host, HostError};

use crate::{EngineError, Progress, Result};

/// A byte count as operators read it.
pub(crate) fn human(bytes: u64) -> String {
    const MIB: f64 = (1 << 20) as f64;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

/// What a transfer of disk `idx` cost on the link between two hosts' agents, against
/// what it read: the compression's gain. None for a transfer on one machine.
pub(crate) fn wire_note(idx: usize, st: &Stats) -> Option<String> {
    (st.wire > 0).then(|| {
        let ratio = st.read.max(1) as f64 / st.wire as f64;
        let mut note = format!(
            "disk {idx}: read {} at the source, {} on the wire between hosts ({ratio:.1}x)",
            human(st.read),
            human(st.wire)
        );
        if st.resumed > 0 {
            note.push_str(&format!("; the link dropped and the transfer went on {} time(s)", st.resumed));
        }
        note
    })
}

/// Runs `plan` from `src` into `dst` on `dst_host`, the host that holds `dst`, its blocks
/// travelling between hosts as `wire` says; progress goes to `progress` under `subject`,
/// and `on_chunk` runs after each item.
pub fn run(
    dst_host: &dyn Host,
    plan: &Plan,
    (src, dst): (&Endpoint, &Endpoint),
    wire: &Wire,
    progress: &dyn Progress,
    subject: &str,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<Stats> {
    let report = |m: Moved| {
        if m.wire > 0 {
            progress.wire(subject, m.wire_data, m.wire);
        }
        progress.bytes(subject, m.done, m.total);
        on_chunk();
    };
    dst_host.transfer(plan, src, dst, wire, &report).map_err(|e| match e {
        HostError::Nbd(source) => EngineError::Transfer { source },
        e => e.into(),
    })
}
