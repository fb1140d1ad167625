//! The TPMs of standby's own driver: one swtpm process per running VM, started before its
//! QEMU and ending with it (`--terminate`: once QEMU's connection is gone), keeping the
//! TPM's state in the one file the VM's configuration names.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::state_file::read_state_file;
use crate::{HostError, Result, VmLaunch};

pub const SWTPM: &str = "swtpm";
/// Its control socket, QEMU's way to the TPM, in the VM's run directory.
pub const SOCKET: &str = "swtpm.sock";

/// How long swtpm has to listen on its control socket once it daemonized.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `state` cannot hold a TPM's state, if it cannot: swtpm reads it from an option
/// string (no commas), and a path must be one file in a directory that exists.
pub fn check_state_path(state: &str) -> Option<String> {
    let p = Path::new(state);
    if !p.is_absolute() || !p.parent().is_some_and(Path::is_dir) || p.is_dir() {
        return Some(format!("--tpm {state}: give an absolute file path in a directory that exists"));
    }
    if state.chars().any(|c| c == ',' || c.is_control()) {
        return Some(format!("--tpm {state}: swtpm cannot take a path with a comma or a control character"));
    }
    // swtpm formats a file it does not recognise: only its own state (or nothing) is taken.
    let mut head = [0u8; 8];
    let read = fs::File::open(p).and_then(|mut f| std::io::Read::read(&mut f, &mut head));
    match read {
        Ok(0) => None,
        Ok(n) if n == head.len() && head == STATE_MAGIC => None,
        Ok(_) => Some(format!(
            "--tpm {state}: the file exists and is not a TPM's state as swtpm keeps it; give a path that does not \
             exist (a new TPM), or the VM's own state file"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("--tpm {state}: cannot read it ({e})")),
    }
}

/// How swtpm's one-file state begins ("swtpmlin", written as a little-endian number).
const STATE_MAGIC: [u8; 8] = *b"nilmptws";

/// Starts the swtpm of a VM whose run files are in `dir`, listening on `dir/SOCKET`,
/// its state in `state` (made at the TPM's first start). A leftover of a killed VM goes
/// first.
///
/// Not `--daemon`: a daemonized swtpm moves to `/` (where its relative names would then
/// point) and names itself only by a pid file. Started here in `dir`, in a process group
/// of its own (a terminal's Ctrl-C meant for standby does not reach it), it outlives
/// this process as QEMU does, and its working directory tells it apart from any other
/// VM's swtpm. swtpm splits its options at commas with no escape: its run files are named
/// relative to `dir` (standby's data directory may hold a comma); the state path is checked.
pub fn start(vm: &str, dir: &Path, state: &str) -> Result<()> {
    stop(dir, Duration::ZERO);
    let socket = dir.join(SOCKET);
    let _ = fs::remove_file(&socket);
    let log = dir.join("swtpm.log");
    let failed = |detail: String| HostError::StartFailed { vm: vm.into(), detail: format!("its TPM: {detail}") };
    let mut child = Command::new(SWTPM)
        .current_dir(dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .args(["socket", "--tpm2", "--terminate"])
        .arg("--tpmstate")
        .arg(format!("backend-uri=file://{state}"))
        .args(["--ctrl", &format!("type=unixio,path={SOCKET},mode=0600")])
        .args(["--log", "file=swtpm.log"])
        .spawn()
        .map_err(|e| failed(format!("cannot run {SWTPM} ({e}); install swtpm (make deps does)")))?;
    let since = Instant::now();
    while !socket.exists() {
        let ended = child.try_wait().ok().flatten();
        if ended.is_some() || since.elapsed() > LISTEN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(&log).unwrap_or_default();
            return Err(failed(match ended {
                Some(status) => format!("{SWTPM} ended ({status}): {}", log.trim()),
                None => format!("{SWTPM} did not listen on {} within {LISTEN_TIMEOUT:?}", socket.display()),
            }));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Reaped when it ends, should this process (a daemon) outlive it.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// Ends the swtpm of the VM whose run files are in `dir`, if one runs: a QEMU that never
/// connected to it, or a killed start's leftover. It has `grace` to end by itself first
/// (with `--terminate` it ends once its QEMU is gone, after writing what it was writing:
/// it writes its state in place); then SIGTERM, then SIGKILL.
pub fn stop(dir: &Path, grace: Duration) {
    let Some(pid) = running_in(dir) else { return };
    let gone = |within: Duration| {
        let since = Instant::now();
        while since.elapsed() < within {
            if running_in(dir) != Some(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        running_in(dir) != Some(pid)
    };
    if gone(grace) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if !gone(Duration::from_secs(2)) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The swtpm process working in `dir`, the one this VM's start made.
fn running_in(dir: &Path) -> Option<i32> {
    let dir = fs::canonicalize(dir).ok()?;
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let comm = fs::read_to_string(e.path().join("comm")).ok()?;
        let zombie = fs::read_to_string(e.path().join("stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
            .unwrap_or(true);
        (comm.trim() == SWTPM && !zombie && fs::read_link(e.path().join("cwd")).ok()? == dir).then_some(pid)
    })
}

/// The TPM's state as swtpm keeps it in `state`. swtpm writes that file in place, so a
/// copy is taken only when two reads agree (the VM's CPUs are stopped meanwhile: at most a
/// command already sent is still being written).
pub fn read_state(state: &str) -> Result<Option<Vec<u8>>> {
    let mut last = read_state_file(state, "TPM state")?;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        let again = read_state_file(state, "TPM state")?;
        if again == last {
            return Ok(last);
        }
        last = again;
    }
    Err(HostError::Invalid(format!("the TPM state in {state} kept changing while its VM was paused")))
}

/// Where standby's own driver keeps a VM's TPM state: the file its configuration names.
pub fn tpm_file(vm: &VmLaunch) -> Result<String> {
    vm.config
        .driver
        .tpm
        .as_ref()
        .and_then(|t| t.state.clone())
        .ok_or_else(|| HostError::BadConfig { arg: "--tpm", why: format!("VM {} has no TPM state file", vm.name) })
}
