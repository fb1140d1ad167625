//! A libvirt domain's guest agent. libvirtd itself holds the agent's socket, so standby
//! speaks to the agent through it (`virsh qemu-agent-command`, with its own timeout); the
//! DR verbs over it are the qemu crate's, the same as over the socket of standby's own
//! driver.

use std::time::Duration;

use serde_json::{json, Value};
use standby_qemu::guest_agent::{AgentChannel, AgentError, Result};

use super::virsh::Virsh;
use crate::HostError;

#[derive(Debug)]
pub(crate) struct VirshAgent<'a> {
    pub(crate) virsh: &'a Virsh,
    pub(crate) domain: &'a str,
}

impl AgentChannel for VirshAgent<'_> {
    fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let secs = timeout.as_secs().max(1);
        let what = format!("asking the guest agent of {} for {command}", self.domain);
        let out = self
            .virsh
            .run(&what, &["qemu-agent-command", self.domain, "--timeout", &secs.to_string(), &msg.to_string()])
            .map_err(|e| match e {
                HostError::Libvirt { detail, .. } => agent_error(command, secs, detail),
                other => AgentError::Channel { command: command.into(), detail: other.to_string() },
            })?;
        let answer: Value = serde_json::from_str(out.trim()).map_err(|e| AgentError::Channel {
            command: command.into(),
            detail: format!("unreadable answer {out:?}: {e}"),
        })?;
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// libvirt's words for what went wrong, as the agent's own errors.
fn agent_error(command: &str, secs: u64, detail: String) -> AgentError {
    if detail.contains("guest agent is not configured") {
        AgentError::NotConfigured
    } else if detail.contains("not connected") {
        // No agent runs in the guest: nothing was sent to it.
        AgentError::Channel { command: command.into(), detail }
    } else if detail.contains("Guest agent is not responding") || detail.contains("not available for now") {
        AgentError::Timeout { command: command.into(), secs }
    } else if let Some(rest) = detail.split("internal error: unable to execute QEMU agent command").nth(1) {
        // `'guest-exec': Command guest-exec has been disabled ...`: the agent's own words.
        let desc = rest.split_once("': ").map_or(rest, |(_, d)| d).trim();
        AgentError::Refused { command: command.into(), desc: desc.into() }
    } else {
        AgentError::Channel { command: command.into(), detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_agent_errors_read_as_the_agents_own() {
        let e =
            agent_error("guest-fsfreeze-freeze", 3, "argument unsupported: QEMU guest agent is not configured".into());
        assert!(matches!(e, AgentError::NotConfigured), "{e}");
        let e = agent_error(
            "guest-fsfreeze-freeze",
            3,
            "Guest agent is not responding: Guest agent not available for now".into(),
        );
        assert!(matches!(e, AgentError::Timeout { secs: 3, .. }), "{e}");
        let e = agent_error(
            "guest-exec",
            3,
            "internal error: unable to execute QEMU agent command 'guest-exec': Command guest-exec has been disabled"
                .into(),
        );
        assert!(
            matches!(&e, AgentError::Refused { desc, .. } if desc == "Command guest-exec has been disabled"),
            "{e}"
        );
    }
}
