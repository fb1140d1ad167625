//! Failback's choices, as an operator writes them: where the replica's state goes
//! (`--to`) and when the production VM takes over (`--switch`).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::VmName;

/// Where a failback sends the replica's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum FailbackTarget {
    /// The source VM, on its own disks.
    Original,
    /// A VM registered with standby beforehand (say, restored from a backup).
    Existing { vm: String },
    /// A VM created from the replica's configuration, its disks in `dir` on `host`.
    New { host: String, dir: String },
}

impl FromStr for FailbackTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FORMS: &str = "use original, existing:VM or new:HOST:DIR";
        if s == "original" {
            return Ok(FailbackTarget::Original);
        }
        if let Some(vm) = s.strip_prefix("existing:") {
            let vm = VmName::new(vm).map_err(|e| format!("bad failback target {s:?}: {e}"))?;
            return Ok(FailbackTarget::Existing { vm: vm.as_str().to_owned() });
        }
        if let Some(rest) = s.strip_prefix("new:") {
            return match rest.split_once(':') {
                Some((host, dir)) if !host.is_empty() && dir.starts_with('/') => {
                    Ok(FailbackTarget::New { host: host.into(), dir: dir.trim_end_matches('/').to_owned() })
                }
                _ => Err(format!(
                    "bad failback target {s:?}: new: wants a host and an absolute directory, as in new:local:/srv/vms"
                )),
            };
        }
        Err(format!("unknown failback target {s:?}: {FORMS}"))
    }
}

impl fmt::Display for FailbackTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailbackTarget::Original => f.write_str("original"),
            FailbackTarget::Existing { vm } => write!(f, "existing:{vm}"),
            FailbackTarget::New { host, dir } => write!(f, "new:{host}:{dir}"),
        }
    }
}

/// When phase 2 (the switch) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchMode {
    /// Right after phase 1.
    Auto,
    /// When the operator runs `standby failback switch`.
    Manual,
    /// At this time, under `standby daemon`; a time missed while it was down runs at once.
    At(SystemTime),
}

impl FromStr for SwitchMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SwitchMode::Auto),
            "manual" => Ok(SwitchMode::Manual),
            _ => {
                let Some(t) = s.strip_prefix("at:") else {
                    return Err(format!("unknown switch mode {s:?}: use auto, manual or at:TIME (RFC 3339)"));
                };
                humantime::parse_rfc3339_weak(t).or_else(|_| humantime::parse_rfc3339(t)).map(SwitchMode::At).map_err(
                    |e| format!("bad switch time {t:?}: {e}; write it in RFC 3339, as in 2026-11-23T18:00:00Z"),
                )
            }
        }
    }
}

impl fmt::Display for SwitchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchMode::Auto => f.write_str("auto"),
            SwitchMode::Manual => f.write_str("manual"),
            SwitchMode::At(t) => write!(f, "at:{}", humantime::format_rfc3339_seconds(*t)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!("original".parse(), Ok(FailbackTarget::Original));
        assert_eq!("existing:web2".parse(), Ok(FailbackTarget::Existing { vm: "web2".into() }));
        assert_eq!(
            "new:local:/srv/vms/".parse(),
            Ok(FailbackTarget::New { host: "local".into(), dir: "/srv/vms".into() })
        );
        for bad in ["", "orig", "existing:", "existing:a b", "new:local", "new::/x", "new:local:rel/dir"] {
            assert!(bad.parse::<FailbackTarget>().is_err(), "{bad}");
        }
        for t in ["original", "existing:web2", "new:local:/srv"] {
            assert_eq!(t.parse::<FailbackTarget>().unwrap().to_string(), t);
        }
    }

    #[test]
    fn switch_modes() {
        assert_eq!("auto".parse(), Ok(SwitchMode::Auto));
        assert_eq!("manual".parse(), Ok(SwitchMode::Manual));
        let at: SwitchMode = "at:2026-11-23T18:00:00Z".parse().unwrap();
        assert_eq!(at.to_string(), "at:2026-11-23T18:00:00Z");
        for bad in ["", "later", "at:", "at:tomorrow", "at:2026-13-01T00:00:00Z"] {
            let e = bad.parse::<SwitchMode>().unwrap_err();
            assert!(e.contains("auto") || e.contains("RFC 3339") || e.contains("2026-11-23T18:00:00Z"), "{bad}: {e}");
        }
    }
}
