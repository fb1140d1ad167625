//! Operations on several VMs at once: each VM on its own thread, one VM's failure (or
//! a panic) never stopping the others, one outcome per VM.

use serde::Serialize;

use crate::{Engine, Result};

/// One VM's result in a batch.
#[derive(Debug, Clone, Serialize)]
pub struct OpOutcome {
    pub vm: String,
    pub ok: bool,
    /// What happened, or why it failed.
    pub message: String,
    pub warnings: Vec<String>,
}

impl Engine {
    /// Runs `op` for every VM in parallel; one VM's failure does not stop the others.
    pub(crate) fn batch(
        &self,
        vms: &[String],
        op: impl Fn(&str, &mut Vec<String>) -> Result<String> + Sync,
    ) -> Vec<OpOutcome> {
        std::thread::scope(|s| {
            let handles: Vec<_> = vms
                .iter()
                .map(|vm| {
                    let op = &op;
                    s.spawn(move || {
                        let mut warnings = Vec::new();
                        let r = op(vm, &mut warnings);
                        OpOutcome {
                            vm: vm.clone(),
                            ok: r.is_ok(),
                            message: r.unwrap_or_else(|e| crate::chain(&e)),
                            warnings,
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .zip(vms)
                .map(|(h, vm)| {
                    h.join().unwrap_or_else(|_| OpOutcome {
                        vm: vm.clone(),
                        ok: false,
                        message: "the operation panicked; this is a bug".into(),
                        warnings: Vec::new(),
                    })
                })
                .collect()
        })
    }
}
