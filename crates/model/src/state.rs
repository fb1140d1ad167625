use std::fmt;
use std::str::FromStr;

/// Where a replica stands. Issue-by-issue, more states join; every change of state goes
/// through [`ReplicaState::apply`], so the table below is the whole lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Restore points exist (or will after the first run); replication runs.
    Ready,
    /// A replication run is writing a new restore point.
    Replicating,
}

/// What happens to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    RunStarted,
    RunFinished,
    RunFailed,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a replica in state {from} cannot {transition}")]
pub struct TransitionError {
    pub from: ReplicaState,
    pub transition: &'static str,
}

impl ReplicaState {
    pub fn apply(self, t: Transition) -> Result<ReplicaState, TransitionError> {
        use ReplicaState::*;
        use Transition::*;
        match (self, t) {
            // Ready ---- job run starts ----> Replicating
            (Ready, RunStarted) => Ok(Replicating),
            // Replicating ---- restore point committed, or run abandoned ----> Ready
            (Replicating, RunFinished | RunFailed) => Ok(Ready),
            (from, t) => Err(TransitionError { from, transition: t.verb() }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Ready => "ready",
            ReplicaState::Replicating => "replicating",
        }
    }
}

impl Transition {
    fn verb(self) -> &'static str {
        match self {
            Transition::RunStarted => "start a replication run",
            Transition::RunFinished => "finish a replication run",
            Transition::RunFailed => "abandon a replication run",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReplicaState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(ReplicaState::Ready),
            "replicating" => Ok(ReplicaState::Replicating),
            other => Err(format!("unknown replica state {other:?}")),
        }
    }
}

/// How a disk's data reached a restore point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// First run: every allocated, non-zero block.
    Full,
    /// Changed-block tracking: the blocks a trusted dirty bitmap names.
    Cbt,
    /// Block digests on both sides; only differing blocks travel.
    Digest,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Cbt => "cbt",
            Method::Digest => "digest",
        }
    }

    /// The method that describes a whole restore point: its weakest disk's.
    pub fn overall(methods: impl IntoIterator<Item = Method>) -> Method {
        methods.into_iter().fold(Method::Cbt, |acc, m| match (acc, m) {
            (Method::Full, _) | (_, Method::Full) => Method::Full,
            (Method::Digest, _) | (_, Method::Digest) => Method::Digest,
            _ => Method::Cbt,
        })
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Method::Full),
            "cbt" => Ok(Method::Cbt),
            "digest" => Ok(Method::Digest),
            other => Err(format!("unknown transfer method {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_transition_table() {
        use ReplicaState::*;
        use Transition::*;
        let states = [Ready, Replicating];
        let transitions = [RunStarted, RunFinished, RunFailed];
        for s in states {
            for t in transitions {
                let want = match (s, t) {
                    (Ready, RunStarted) => Some(Replicating),
                    (Replicating, RunFinished | RunFailed) => Some(Ready),
                    _ => None,
                };
                assert_eq!(s.apply(t).ok(), want, "{s} {t:?}");
            }
            assert_eq!(s.as_str().parse::<ReplicaState>(), Ok(s));
        }
    }

    #[test]
    fn overall_method() {
        use Method::*;
        assert_eq!(Method::overall([Cbt, Cbt]), Cbt);
        assert_eq!(Method::overall([Cbt, Digest]), Digest);
        assert_eq!(Method::overall([Digest, Full, Cbt]), Full);
    }
}
