//! Consistent points: what a job asks of a running guest around a run's instant (its
//! filesystems frozen through qemu-guest-agent, commands before and after), and what the
//! point it made can promise.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How long a freeze (or a pre- or post-freeze command) may take before the run gives up
/// on it, thaws, and takes a crash-consistent point instead.
pub const DEFAULT_FREEZE_TIMEOUT_SECS: u64 = 10;

/// A job's settings for freezing the guest's filesystems just around each run's instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quiesce {
    /// Off: the agent is never asked and points of running VMs are crash-consistent.
    pub enabled: bool,
    pub timeout_secs: u64,
    /// Run in the guest (`/bin/sh -c`) before the freeze, to bring an application's
    /// files to a state it can start from (a database's checkpoint); when it fails, the
    /// guest is not frozen and the point is crash-consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_freeze: Option<String>,
    /// Run in the guest after the thaw, whenever the pre-freeze command ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_freeze: Option<String>,
}

impl Default for Quiesce {
    fn default() -> Quiesce {
        Quiesce { enabled: true, timeout_secs: DEFAULT_FREEZE_TIMEOUT_SECS, pre_freeze: None, post_freeze: None }
    }
}

/// What a restore point holds, as the guest's applications would see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Taken with the guest's filesystems frozen by its agent: what a clean stop leaves.
    Application,
    /// Taken from a running guest without a freeze: what a power cut leaves, which
    /// journaling filesystems and databases recover from at boot.
    Crash,
    /// Taken from the closed images of a VM that was not running: whatever its last stop
    /// left (clean after a shutdown, a crash's state after a power-off).
    Offline,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Application => "application",
            Consistency::Crash => "crash",
            Consistency::Offline => "offline",
        }
    }
}

impl FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "application" => Ok(Consistency::Application),
            "crash" => Ok(Consistency::Crash),
            "offline" => Ok(Consistency::Offline),
            other => Err(format!("unknown consistency {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_reads_back_what_it_writes_and_refuses_the_rest() {
        for c in [Consistency::Application, Consistency::Crash, Consistency::Offline] {
            assert_eq!(c.as_str().parse::<Consistency>(), Ok(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert!("consistent".parse::<Consistency>().is_err());
    }

    #[test]
    fn quiesce_defaults_to_a_ten_second_freeze_and_omits_absent_commands() {
        let q = Quiesce::default();
        assert!(q.enabled && q.timeout_secs == 10);
        assert_eq!(serde_json::to_string(&q).unwrap(), r#"{"enabled":true,"timeout_secs":10}"#);
        let back: Quiesce = serde_json::from_str(r#"{"enabled":false,"timeout_secs":3,"pre_freeze":"sync"}"#).unwrap();
        assert_eq!(back.pre_freeze.as_deref(), Some("sync"));
        assert!(!back.enabled);
    }
}
