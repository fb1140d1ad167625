//! Consistent points: a running guest's filesystems frozen through its qemu-guest-agent
//! just around a run's instant, so that the point holds what a clean stop would leave; and
//! a job's settings for it, as an operator gives them.
//!
//! Each run first asks the agent whether the guest is frozen: a guest without an agent (or
//! whose agent does not answer) is told apart at once and gets a crash-consistent point,
//! and a freeze some earlier run could not undo is undone now. The freeze is bounded: a
//! pre-freeze command or a freeze that takes longer than the job's timeout is given up on,
//! and the run takes a crash-consistent point instead. Whoever freezes thaws, whatever
//! happened in between: after the instant, after a failed instant, after a freeze that
//! timed out (an agent still busy with it thaws once it is done), and after a killed run
//! (`after_kill`, from recovery).

use std::time::{Duration, Instant};

use standby_host::Host;
use standby_model::{parse_interval, Consistency, Quiesce};

use crate::{EngineError, Result};

/// How a job freezes a running guest around each run's instant, as an operator gives it;
/// `None` keeps what the job has (or the default).
#[derive(Debug, Clone, Default)]
pub struct FreezeSpec {
    /// `Some(false)`: never ask the guest agent; points of running VMs are crash-consistent.
    pub enabled: Option<bool>,
    /// How long the pre-freeze command and the freeze may each take (`10s`).
    pub timeout: Option<String>,
    /// `Some(None)` removes the command.
    pub pre_freeze: Option<Option<String>>,
    pub post_freeze: Option<Option<String>>,
}

/// Longest freeze timeout: a guest frozen longer stalls its applications' writes.
const MAX_FREEZE_TIMEOUT_SECS: u64 = 300;

/// The job's freeze settings: `spec` over `base`.
pub(crate) fn quiesce_of(spec: &FreezeSpec, base: &Quiesce) -> Result<Quiesce> {
    let timeout_secs = match &spec.timeout {
        None => base.timeout_secs,
        Some(t) => {
            let secs = parse_interval(t)
                .map_err(|e| EngineError::BadArgument {
                    arg: "--freeze-timeout",
                    why: format!("--freeze-timeout {e}"),
                })?
                .as_secs();
            if !(1..=MAX_FREEZE_TIMEOUT_SECS).contains(&secs) {
                return Err(EngineError::BadArgument {
                    arg: "--freeze-timeout",
                    why: format!(
                        "--freeze-timeout {t} is out of range 1s..={MAX_FREEZE_TIMEOUT_SECS}s: the guest's writes \
                         wait while it is frozen"
                    ),
                });
            }
            secs
        }
    };
    let command = |given: &Option<Option<String>>, current: &Option<String>, arg: &'static str| match given {
        None => Ok(current.clone()),
        Some(None) => Ok(None),
        Some(Some(c)) if c.trim().is_empty() => Err(EngineError::BadArgument {
            arg,
            why: format!("{arg} needs a command for the guest's /bin/sh -c; give --no-{} to have none", &arg[2..]),
        }),
        Some(Some(c)) => Ok(Some(c.clone())),
    };
    Ok(Quiesce {
        enabled: spec.enabled.unwrap_or(base.enabled),
        timeout_secs,
        pre_freeze: command(&spec.pre_freeze, &base.pre_freeze, "--pre-freeze")?,
        post_freeze: command(&spec.post_freeze, &base.post_freeze, "--post-freeze")?,
    })
}

/// A job's freeze settings in a few words, for `job change`'s history.
pub(crate) fn show_quiesce(q: &Quiesce) -> String {
    if !q.enabled {
        return "no freeze".into();
    }
    let mut s = format!("freeze within {} s", q.timeout_secs);
    for (what, c) in [("pre-freeze", &q.pre_freeze), ("post-freeze", &q.post_freeze)] {
        if let Some(c) = c {
            s.push_str(&format!(", {what} {c:?}"));
        }
    }
    s
}

/// How long a run keeps asking for the thaw: long enough for an agent that was merely slow
/// to finish a freeze and answer.
const THAW_PATIENCE: Duration = Duration::from_secs(60);

/// One attempt at a thaw.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// What the guest was left in before the instant.
#[derive(Debug)]
pub(crate) struct Freeze {
    state: State,
    /// The agent answered, so the guest was asked to quiesce: the post-freeze command runs.
    asked: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not asked to freeze, or it could not be: the point is crash-consistent.
    Thawed,
    /// Frozen: this many filesystems.
    Frozen(u64),
    /// The freeze failed or timed out: the guest may freeze late, so it is thawed too.
    Unsure,
}

impl Freeze {
    /// Nothing asked of the guest: a VM that is not running.
    pub(crate) fn none() -> Freeze {
        Freeze { state: State::Thawed, asked: false }
    }

    pub(crate) fn is_frozen(&self) -> bool {
        matches!(self.state, State::Frozen(_))
    }
}

/// Before the instant: whether the agent answers (thawing what an earlier run left
/// frozen), the pre-freeze command, then the freeze, each within the job's timeout. What
/// goes wrong is a note, never a failed run.
pub(crate) fn before_instant(host: &dyn Host, vm: &str, q: &Quiesce, notes: &mut Vec<String>) -> Freeze {
    let not_asked = Freeze { state: State::Thawed, asked: false };
    if !q.enabled {
        return not_asked;
    }
    let timeout = Duration::from_secs(q.timeout_secs);
    match host.guest_frozen(vm, timeout) {
        Ok(Some(false)) => {}
        Ok(Some(true)) => {
            // Left by a run whose thaw was not answered: nothing else ever thaws it.
            if !thaw(host, vm, THAW_PATIENCE, notes) {
                return not_asked;
            }
            notes.push(format!("thawed VM {vm}'s guest, which an earlier run had left frozen"));
        }
        Ok(None) => {
            notes.push(format!("VM {vm} has no guest agent channel: crash-consistent point"));
            return not_asked;
        }
        Err(e) => {
            notes.push(format!(
                "VM {vm}'s guest agent does not answer ({}): crash-consistent point; install and start \
                 qemu-guest-agent in the guest, or give the job --no-freeze",
                crate::chain(&e)
            ));
            return not_asked;
        }
    }
    let asked = Freeze { state: State::Thawed, asked: true };
    if let Some(command) = &q.pre_freeze {
        match host.guest_exec(vm, command, timeout) {
            Ok(Some(exit)) if exit.code == 0 => {}
            Ok(Some(exit)) => {
                notes.push(format!(
                    "the pre-freeze command exited with {}{}, so the guest was not frozen: crash-consistent point",
                    exit.code,
                    output_note(&exit.output)
                ));
                return asked;
            }
            Ok(None) => return not_asked,
            Err(e) => {
                notes.push(format!(
                    "the pre-freeze command failed ({}), so the guest was not frozen: crash-consistent point",
                    crate::chain(&e)
                ));
                return asked;
            }
        }
    }
    match host.guest_freeze(vm, timeout) {
        Ok(Some(n)) if n > 0 => Freeze { state: State::Frozen(n), asked: true },
        Ok(Some(_)) => {
            notes.push(format!("VM {vm}'s guest has no filesystem its agent can freeze: crash-consistent point"));
            asked
        }
        Ok(None) => not_asked,
        Err(e) => {
            notes.push(format!("the guest was not frozen ({}): crash-consistent point", crate::chain(&e)));
            Freeze { state: State::Unsure, asked: true }
        }
    }
}

/// After the instant (taken or failed): the thaw, then the post-freeze command. What the
/// point can promise: `application` only when the freeze held until the thaw.
pub(crate) fn after_instant(
    host: &dyn Host,
    vm: &str,
    q: &Quiesce,
    freeze: Freeze,
    notes: &mut Vec<String>,
) -> Consistency {
    let mut held = false;
    match freeze.state {
        State::Thawed => {}
        State::Frozen(n) => match thaw_counted(host, vm, THAW_PATIENCE, notes) {
            Some(thawed) if thawed >= n => held = true,
            Some(thawed) => notes.push(format!(
                "VM {vm}'s guest froze {n} filesystem(s) but thawed {thawed}: something thawed them before the \
                 instant was over, so the point is crash-consistent"
            )),
            None => {}
        },
        State::Unsure => {
            thaw(host, vm, THAW_PATIENCE, notes);
        }
    }
    if let (true, Some(command)) = (freeze.asked, &q.post_freeze) {
        match host.guest_exec(vm, command, Duration::from_secs(q.timeout_secs)) {
            Ok(Some(exit)) if exit.code == 0 => {}
            Ok(Some(exit)) => {
                notes.push(format!("the post-freeze command exited with {}{}", exit.code, output_note(&exit.output)))
            }
            Ok(None) => {}
            Err(e) => notes.push(format!("the post-freeze command failed: {}", crate::chain(&e))),
        }
    }
    if held {
        Consistency::Application
    } else {
        Consistency::Crash
    }
}

/// A killed run may have left the guest frozen: recovery thaws it, and when it was frozen
/// (so the killed run got past its pre-freeze command) runs the post-freeze command, to
/// bring the application back. One attempt: an agent that does not answer is a note, and
/// the next run thaws first.
pub(crate) fn after_kill(host: &dyn Host, vm: &str, q: &Quiesce, notes: &mut Vec<String>) {
    if !q.enabled {
        return;
    }
    match host.guest_thaw(vm, THAW_TIMEOUT) {
        Ok(Some(n)) if n > 0 => {
            notes.push(format!("thawed {n} filesystem(s) of VM {vm}'s guest, frozen by the interrupted run"));
            if q.post_freeze.is_some() {
                let _ = after_instant(host, vm, q, Freeze { state: State::Thawed, asked: true }, notes);
            }
        }
        Ok(_) => {}
        Err(e) => notes.push(format!(
            "could not make sure VM {vm}'s guest is thawed ({}); the job's next run thaws it before anything else",
            crate::chain(&e)
        )),
    }
}

/// Asks for the thaw until it is answered, for `patience` at most; whether it was.
fn thaw(host: &dyn Host, vm: &str, patience: Duration, notes: &mut Vec<String>) -> bool {
    thaw_counted(host, vm, patience, notes).is_some()
}

/// The same, with how many filesystems the agent thawed.
fn thaw_counted(host: &dyn Host, vm: &str, patience: Duration, notes: &mut Vec<String>) -> Option<u64> {
    let until = Instant::now() + patience;
    loop {
        match host.guest_thaw(vm, THAW_TIMEOUT) {
            Ok(n) => return Some(n.unwrap_or(0)),
            Err(e) if Instant::now() >= until => {
                notes.push(format!(
                    "VM {vm}'s guest may still be frozen: the thaw was not answered within {} s ({}); the job's \
                     next run thaws it before anything else, and `standby vm console {vm}` shows the guest",
                    patience.as_secs(),
                    crate::chain(&e)
                ));
                return None;
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
