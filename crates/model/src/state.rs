use std::fmt;
use std::str::FromStr;

/// Where a replica stands. Every change of state goes through [`ReplicaState::apply`], so
/// the table in `apply` is the whole lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Restore points exist (or will after the first run); replication runs.
    Ready,
    /// A replication run is writing a new restore point.
    Replicating,
    /// Failover in progress: the replica is being brought to a restore point and started.
    FailingOver,
    /// The replica runs from a restore point; its writes go to a separate layer.
    /// Replication of the VM is paused.
    Failover,
    /// Undo failover in progress: the replica is being stopped and its writes discarded.
    UndoingFailover,
    /// Permanent failover in progress: the replica's disks are being made standalone.
    MakingPermanent,
    /// The replica became an ordinary VM; its restore points are gone, it left its job.
    Permanent,
}

/// What happens to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    RunStarted,
    RunFinished,
    RunFailed,
    FailoverStarted,
    FailoverDone,
    FailoverRolledBack,
    UndoStarted,
    UndoDone,
    PermanentStarted,
    PermanentDone,
    PermanentRolledBack,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a replica in state {from} cannot {transition}{hint}")]
pub struct TransitionError {
    pub from: ReplicaState,
    pub transition: &'static str,
    pub hint: &'static str,
}

impl ReplicaState {
    pub const ALL: [ReplicaState; 7] = [
        ReplicaState::Ready,
        ReplicaState::Replicating,
        ReplicaState::FailingOver,
        ReplicaState::Failover,
        ReplicaState::UndoingFailover,
        ReplicaState::MakingPermanent,
        ReplicaState::Permanent,
    ];

    pub fn apply(self, t: Transition) -> Result<ReplicaState, TransitionError> {
        use ReplicaState::*;
        use Transition::*;
        match (self, t) {
            // Ready ---- job run starts ----> Replicating
            (Ready, RunStarted) => Ok(Replicating),
            // Replicating ---- restore point committed, or run abandoned ----> Ready
            (Replicating, RunFinished | RunFailed) => Ok(Ready),
            // Ready ---- failover ----> FailingOver ---- replica started ----> Failover
            (Ready, FailoverStarted) => Ok(FailingOver),
            (FailingOver, FailoverDone) => Ok(Failover),
            // FailingOver ---- failed or interrupted before the replica ran ----> Ready
            (FailingOver, FailoverRolledBack) => Ok(Ready),
            // Failover ---- undo ----> UndoingFailover ---- writes discarded ----> Ready
            (Failover, UndoStarted) => Ok(UndoingFailover),
            (UndoingFailover, UndoDone) => Ok(Ready),
            // Failover ---- permanent ----> MakingPermanent ---- points removed ----> Permanent
            (Failover, PermanentStarted) => Ok(MakingPermanent),
            (MakingPermanent, PermanentDone) => Ok(Permanent),
            // MakingPermanent ---- failed before publishing ----> Failover (the replica runs on)
            (MakingPermanent, PermanentRolledBack) => Ok(Failover),
            (from, t) => Err(TransitionError { from, transition: t.verb(), hint: from.hint() }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Ready => "ready",
            ReplicaState::Replicating => "replicating",
            ReplicaState::FailingOver => "failing_over",
            ReplicaState::Failover => "failover",
            ReplicaState::UndoingFailover => "undoing_failover",
            ReplicaState::MakingPermanent => "making_permanent",
            ReplicaState::Permanent => "permanent",
        }
    }

    /// What the operator can do about a refused transition from here.
    fn hint(self) -> &'static str {
        match self {
            ReplicaState::Ready => "; it is not in failover",
            ReplicaState::Failover => "; it is in failover: undo it first (standby failover undo VM)",
            ReplicaState::Permanent => "; its failover was made permanent: the replica is an ordinary VM now",
            ReplicaState::Replicating
            | ReplicaState::FailingOver
            | ReplicaState::UndoingFailover
            | ReplicaState::MakingPermanent => {
                "; another operation is in progress: wait for it, or run any standby command to recover it if it was killed"
            }
        }
    }

    /// No operation is in progress in this state.
    pub fn is_idle(self) -> bool {
        matches!(self, ReplicaState::Ready | ReplicaState::Failover | ReplicaState::Permanent)
    }

    /// Replication runs only in Ready; in other states a job run skips the VM.
    pub fn replicates(self) -> bool {
        matches!(self, ReplicaState::Ready | ReplicaState::Replicating)
    }
}

impl Transition {
    fn verb(self) -> &'static str {
        match self {
            Transition::RunStarted => "start a replication run",
            Transition::RunFinished => "finish a replication run",
            Transition::RunFailed => "abandon a replication run",
            Transition::FailoverStarted => "fail over",
            Transition::FailoverDone => "finish a failover",
            Transition::FailoverRolledBack => "roll back a failover",
            Transition::UndoStarted => "undo failover",
            Transition::UndoDone => "finish undoing a failover",
            Transition::PermanentStarted => "make a failover permanent",
            Transition::PermanentDone => "finish a permanent failover",
            Transition::PermanentRolledBack => "roll back a permanent failover",
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
        ReplicaState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| format!("unknown replica state {s:?}"))
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
        let transitions = [
            RunStarted,
            RunFinished,
            RunFailed,
            FailoverStarted,
            FailoverDone,
            FailoverRolledBack,
            UndoStarted,
            UndoDone,
            PermanentStarted,
            PermanentDone,
            PermanentRolledBack,
        ];
        for s in ReplicaState::ALL {
            for t in transitions {
                let want = match (s, t) {
                    (Ready, RunStarted) => Some(Replicating),
                    (Replicating, RunFinished | RunFailed) => Some(Ready),
                    (Ready, FailoverStarted) => Some(FailingOver),
                    (FailingOver, FailoverDone) => Some(Failover),
                    (FailingOver, FailoverRolledBack) => Some(Ready),
                    (Failover, UndoStarted) => Some(UndoingFailover),
                    (UndoingFailover, UndoDone) => Some(Ready),
                    (Failover, PermanentStarted) => Some(MakingPermanent),
                    (MakingPermanent, PermanentDone) => Some(Permanent),
                    (MakingPermanent, PermanentRolledBack) => Some(Failover),
                    _ => None,
                };
                assert_eq!(s.apply(t).ok(), want, "{s} {t:?}");
            }
            assert_eq!(s.as_str().parse::<ReplicaState>(), Ok(s));
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let e = ReplicaState::Failover.apply(Transition::FailoverStarted).unwrap_err();
        assert!(e.to_string().contains("standby failover undo"), "{e}");
        let e = ReplicaState::Ready.apply(Transition::UndoStarted).unwrap_err();
        assert!(e.to_string().contains("not in failover"), "{e}");
    }

    #[test]
    fn overall_method() {
        use Method::*;
        assert_eq!(Method::overall([Cbt, Cbt]), Cbt);
        assert_eq!(Method::overall([Cbt, Digest]), Digest);
        assert_eq!(Method::overall([Digest, Full, Cbt]), Full);
    }
}
