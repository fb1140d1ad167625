//! The engine's side of a transfer: it plans from extents (`standby_host::transfer`, the
//! transport) and hands the plan to the host that holds the destination, with its progress
//! and fail points.

pub use standby_host::transfer::*;
use standby_host::{Endpoint, Host, HostError};

use crate::{EngineError, Progress, Result};

/// Runs `plan` from `src` into `dst` on `dst_host`, the host that holds `dst`; progress goes
/// to `progress` under `subject`, and `on_chunk` runs after each item.
pub fn run(
    dst_host: &dyn Host,
    plan: &Plan,
    (src, dst): (&Endpoint, &Endpoint),
    progress: &dyn Progress,
    subject: &str,
    on_chunk: &(dyn Fn() + Sync),
) -> Result<Stats> {
    let report = |done, total| {
        progress.bytes(subject, done, total);
        on_chunk();
    };
    dst_host.transfer(plan, src, dst, &report).map_err(|e| match e {
        HostError::Nbd(source) => EngineError::Transfer { source },
        e => e.into(),
    })
}
