//! Named crash points for tests. When `STANDBY_FAILPOINT` names the point being passed,
//! the process kills itself with SIGKILL right there: no destructor, no cleanup, exactly
//! what a power loss or `kill -9` would leave behind.

/// Every fail point standby has; crash tests iterate over this list.
pub const ALL: &[&str] = &[
    "replicate.after-checkpoint",
    "replicate.mid-transfer",
    "replicate.before-commit",
    "replicate.after-commit",
    "retention.after-commit-layer",
    "retention.after-drop",
    "failover.after-overlays",
    "failover.after-define",
    "failover.after-start",
    "undo.after-stop",
    "undo.after-discard",
    "planned.after-first-sync",
    "planned.after-shutdown",
    "planned.after-final-sync",
    "permanent.after-flatten",
    "permanent.after-verify",
    "permanent.after-publish",
    "failback.after-target-off",
    "failback.after-working",
    "failback.after-protect",
    "failback.mid-transfer",
    "switch.after-shutdown",
    "switch.after-final-transfer",
    "switch.mid-commit",
    "switch.after-identity",
    "commit.after-point",
    "undo-failback.after-stop",
    "undo-failback.after-restore",
];

pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "fail point {name} is not listed in failpoint::ALL");
    if std::env::var("STANDBY_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("standby: fail point {name} reached, killing myself");
        // SIGKILL to ourselves: std::process::abort would run no destructors either,
        // but SIGKILL is what the tests model.
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::process::abort();
    }
}
