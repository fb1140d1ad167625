//! Verification: do two images, possibly on two hosts, read the same? Both are served
//! read-only over NBD and compared block by block; the answer is the number of bytes that
//! differ. Planned failover uses it to prove zero loss before the replica starts, and
//! permanent failover to prove a flattened disk before anything is deleted.

use standby_host::{Chain, Endpoint, Host, NbdAddress, ServeSpec};

use crate::transfer::{self, Plan, BASE_ALLOCATION};
use crate::{EngineError, NoProgress, Result};

/// One side of a comparison.
pub(crate) struct Side<'a> {
    pub host: &'a dyn Host,
    pub chain: Chain,
}

/// Bytes in which `a` and `b` differ (0: identical). `id` names the NBD servers, so that
/// leftovers of a killed comparison are found by prefix.
pub(crate) fn differing_bytes(id: &str, a: Side<'_>, b: Side<'_>) -> Result<u64> {
    let serve = |side: &Side<'_>, name: String| {
        side.host.nbd_serve(&ServeSpec {
            id: name,
            chain: side.chain.clone(),
            writable: false,
            bitmap: None,
            direct: true,
        })
    };
    let (a_id, b_id) = (format!("{id}-a"), format!("{id}-b"));
    let result = (|| -> Result<u64> {
        let a_addr = serve(&a, a_id.clone())?;
        let b_addr = serve(&b, b_id.clone())?;
        let connect_a = || a.host.nbd_connect(&a_addr, &a_id, &[BASE_ALLOCATION]);
        let connect_b = || b.host.nbd_connect(&b_addr, &b_id, &[BASE_ALLOCATION]);
        // Held until the workers are done: qemu-nbd exits when its last client leaves.
        let mut plan_a = connect_a()?;
        let mut plan_b = connect_b()?;
        let plan = Plan::verify(&mut plan_a, &mut plan_b).map_err(|source| EngineError::Transfer { source })?;
        let end = |address: &NbdAddress, export: &str| Endpoint {
            address: address.clone(),
            export: export.into(),
            contexts: vec![BASE_ALLOCATION.into()],
        };
        let ends = (&end(&a_addr, &a_id), &end(&b_addr, &b_id));
        // Default wire (zstd, no limit): a comparison runs while the operator waits on it
        // (a planned failover, its source down), so no job's limit slows it.
        let stats = transfer::run(b.host, &plan, ends, &transfer::Wire::default(), &NoProgress, id, &|| {})?;
        Ok(stats.differing)
    })();
    a.host.nbd_stop_all(&a_id)?;
    b.host.nbd_stop_all(&b_id)?;
    result
}
