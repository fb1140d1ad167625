//! Named crash points for tests. When `STANDBY_FAILPOINT` names the point being passed,
//! the process kills itself with SIGKILL right there: no destructor, no cleanup, exactly
//! what a power loss or `kill -9` would leave behind.
//!
//! `STANDBY_FAILPOINT_KILL=POINT=PATTERN` kills other processes instead: at `POINT`, every
//! process whose command line contains `PATTERN` (a QEMU, a `qemu-nbd` server) gets
//! SIGKILL, and standby goes on, to meet the failure as it would in production.
//! `STANDBY_FAILPOINT_PAUSE=POINT=FILE` stops there instead: standby creates `FILE` and
//! waits (two minutes at most) until the test removes it, so that a test can change the
//! world at an exact moment of an operation (end a VM's block job) and watch standby meet it.
//! `STANDBY_FAILPOINT_LOG=FILE` appends each point reached with either to `FILE`, so that
//! the suite can prove every point was reached, not merely named.

/// Every fail point standby has; crash tests iterate over this list.
pub const ALL: &[&str] = &[
    "replicate.while-frozen",
    "replicate.while-paused",
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

type Hook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;
static HOOK: std::sync::Mutex<Option<Hook>> = std::sync::Mutex::new(None);

/// Runs `hook` at every fail point this process passes: how a test of the engine alone
/// (on a fake host, in one process) stops an operation at an exact step, by panicking
/// there. Process-wide: such tests arm one point at a time.
pub fn set_hook(hook: Option<Hook>) {
    *HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "fail point {name} is not listed in failpoint::ALL");
    let hook = HOOK.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(hook) = hook {
        hook(name);
    }
    if let Ok(spec) = std::env::var("STANDBY_FAILPOINT_KILL") {
        if let Some(pattern) = spec.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            let killed = kill_matching(pattern);
            log(&format!("{name} kill={pattern}"));
            eprintln!("standby: fail point {name} reached, killed {killed} process(es) matching {pattern:?}");
        }
    }
    if let Ok(spec) = std::env::var("STANDBY_FAILPOINT_PAUSE") {
        if let Some(file) = spec.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            log(&format!("{name} pause"));
            pause(name, std::path::Path::new(file));
        }
    }
    if std::env::var("STANDBY_FAILPOINT").is_ok_and(|v| v == name) {
        log(name);
        eprintln!("standby: fail point {name} reached, killing myself");
        // SIGKILL to ourselves: std::process::abort would run no destructors either,
        // but SIGKILL is what the tests model.
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        std::process::abort();
    }
}

fn pause(name: &str, file: &std::path::Path) {
    let start = std::time::Instant::now();
    if std::fs::write(file, name).is_err() {
        return;
    }
    eprintln!("standby: fail point {name} reached, paused until {} is removed", file.display());
    while file.exists() && start.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn log(line: &str) {
    use std::io::Write;
    if let Some(path) = std::env::var_os("STANDBY_FAILPOINT_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// SIGKILLs every other process whose command line contains `pattern` and waits (up to
/// 10 s) until each is gone; how many there were.
fn kill_matching(pattern: &str) -> usize {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let me = std::process::id();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        if pid != me && String::from_utf8_lossy(&cmd).replace('\0', " ").contains(pattern) {
            pids.push(pid);
        }
    }
    for &pid in &pids {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    // Gone, or a zombie its parent has not reaped: either way it serves nothing.
    let alive = |pid: &u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
    while pids.iter().any(alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    pids.len()
}
