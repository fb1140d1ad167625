//! Consistent points: a running guest's filesystems frozen through its qemu-guest-agent
//! just around a run's instant, so that the point holds what a clean stop would leave.
//!
//! The freeze is bounded: a pre-freeze command or a freeze that takes longer than the
//! job's timeout is given up on, and the run takes a crash-consistent point instead.
//! Whoever freezes thaws, whatever happened in between: after the instant, after a
//! failed instant, after a freeze that timed out (an agent still busy with it thaws once
//! it is done), and after a killed run (`after_kill`, from recovery).

use std::time::{Duration, Instant};

use standby_host::Host;
use standby_model::{Consistency, Quiesce};

/// How long a run keeps asking for the thaw after a freeze that timed out: long enough
/// for an agent that was merely slow to finish its freeze and answer.
const THAW_PATIENCE: Duration = Duration::from_secs(60);

/// One attempt at a thaw.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// What the guest was left in before the instant.
#[derive(Debug)]
pub(crate) struct Freeze {
    state: State,
    /// The pre-freeze command ran (or may have): the post-freeze one runs too.
    pre_ran: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not asked to freeze, or it could not be: the point is crash-consistent.
    Thawed,
    Frozen,
    /// The freeze failed or timed out: the guest may freeze late, so it is thawed too.
    Unsure,
}

impl Freeze {
    /// Nothing asked of the guest: a VM that is not running.
    pub(crate) fn none() -> Freeze {
        Freeze { state: State::Thawed, pre_ran: false }
    }

    pub(crate) fn is_frozen(&self) -> bool {
        self.state == State::Frozen
    }
}

/// Before the instant: the pre-freeze command, then the freeze, each within the job's
/// timeout. What goes wrong is a note, never a failed run.
pub(crate) fn before_instant(host: &dyn Host, vm: &str, q: &Quiesce, notes: &mut Vec<String>) -> Freeze {
    let not_frozen = |pre_ran| Freeze { state: State::Thawed, pre_ran };
    if !q.enabled {
        return not_frozen(false);
    }
    let timeout = Duration::from_secs(q.timeout_secs);
    let mut pre_ran = false;
    if let Some(command) = &q.pre_freeze {
        match host.guest_exec(vm, command, timeout) {
            Ok(Some(exit)) if exit.code == 0 => pre_ran = true,
            Ok(Some(exit)) => {
                notes.push(format!(
                    "the pre-freeze command exited with {}{}, so the guest was not frozen: crash-consistent point",
                    exit.code,
                    output_note(&exit.output)
                ));
                return not_frozen(true);
            }
            Ok(None) => {
                notes.push(format!(
                    "VM {vm} has no guest agent channel, so neither the pre-freeze command nor a freeze could run: \
                     crash-consistent point"
                ));
                return not_frozen(false);
            }
            Err(e) => {
                notes.push(format!(
                    "the pre-freeze command failed ({}), so the guest was not frozen: crash-consistent point",
                    crate::chain(&e)
                ));
                return not_frozen(true);
            }
        }
    }
    match host.guest_freeze(vm, timeout) {
        Ok(Some(_)) => Freeze { state: State::Frozen, pre_ran },
        Ok(None) => {
            notes.push(format!("VM {vm} has no guest agent channel: crash-consistent point"));
            not_frozen(pre_ran)
        }
        Err(e) => {
            notes.push(format!("the guest was not frozen ({}): crash-consistent point", crate::chain(&e)));
            Freeze { state: State::Unsure, pre_ran }
        }
    }
}

/// After the instant (taken or failed): the thaw, then the post-freeze command. What the
/// point can promise.
pub(crate) fn after_instant(
    host: &dyn Host,
    vm: &str,
    q: &Quiesce,
    freeze: Freeze,
    notes: &mut Vec<String>,
) -> Consistency {
    if freeze.state != State::Thawed {
        let patience = if freeze.state == State::Unsure { THAW_PATIENCE } else { Duration::ZERO };
        thaw(host, vm, patience, notes);
    }
    if let (true, Some(command)) = (freeze.pre_ran, &q.post_freeze) {
        match host.guest_exec(vm, command, Duration::from_secs(q.timeout_secs)) {
            Ok(Some(exit)) if exit.code == 0 => {}
            Ok(Some(exit)) => {
                notes.push(format!("the post-freeze command exited with {}{}", exit.code, output_note(&exit.output)))
            }
            Ok(None) => {}
            Err(e) => notes.push(format!("the post-freeze command failed: {}", crate::chain(&e))),
        }
    }
    if freeze.state == State::Frozen {
        Consistency::Application
    } else {
        Consistency::Crash
    }
}

/// A killed run may have left the guest frozen, and its application in whatever state the
/// pre-freeze command put it: recovery thaws (a guest with nothing frozen thaws nothing)
/// and runs the post-freeze command. One attempt each: an agent that does not answer is a
/// note.
pub(crate) fn after_kill(host: &dyn Host, vm: &str, q: &Quiesce, notes: &mut Vec<String>) {
    if !q.enabled {
        return;
    }
    match host.guest_thaw(vm, THAW_TIMEOUT) {
        Ok(Some(n)) if n > 0 => {
            notes.push(format!("thawed {n} filesystem(s) of VM {vm}'s guest, frozen by the interrupted run"))
        }
        Ok(_) => {}
        Err(e) => notes.push(format!(
            "could not make sure VM {vm}'s guest is thawed ({}); if its applications hang on writes, run \
             `standby recover` again once its guest agent answers",
            crate::chain(&e)
        )),
    }
    if q.post_freeze.is_some() {
        let _ = after_instant(host, vm, q, Freeze { state: State::Thawed, pre_ran: true }, notes);
    }
}

/// Asks for the thaw until it is answered, for `patience` at most (one attempt when zero).
fn thaw(host: &dyn Host, vm: &str, patience: Duration, notes: &mut Vec<String>) {
    let until = Instant::now() + patience;
    loop {
        match host.guest_thaw(vm, THAW_TIMEOUT) {
            Ok(_) => return,
            Err(e) if Instant::now() >= until => {
                notes.push(format!(
                    "VM {vm}'s guest may still be frozen: the thaw was not answered ({}); `standby recover` asks \
                     again, and `standby vm console {vm}` shows the guest",
                    crate::chain(&e)
                ));
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

fn output_note(output: &str) -> String {
    let output = output.trim();
    if output.is_empty() {
        String::new()
    } else {
        let short: String = output.chars().take(200).collect();
        format!(" ({short})")
    }
}
