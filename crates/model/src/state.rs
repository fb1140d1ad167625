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
    /// Planned failover before its failover: the replica is synced, the source shut down
    /// and synced again, the last restore point verified equal to it.
    PreparingFailover,
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
    /// Failback phase 1: the replica runs on while the target is brought to its state.
    FailingBack,
    /// Phase 1 is done: the target holds the replica's state, in a working layer not yet
    /// published. The replica still runs and serves.
    ReadyToSwitch,
    /// Failback phase 2: the replica is shut down and its last changes sent.
    Switching,
    /// The production VM holds the replica's final state; the replica is off and kept
    /// until the failback is committed or undone.
    Failback,
    /// Commit failback in progress: the replica's final state becomes a restore point.
    CommittingFailback,
    /// Undo failback in progress: back to the replica as it was at the switch.
    UndoingFailback,
}

/// What happens to a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    PlannedStarted,
    PlannedRolledBack,
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
    FailbackStarted,
    FailbackSynced,
    FailbackRolledBack,
    SwitchStarted,
    SwitchDone,
    SwitchRolledBack,
    CommitStarted,
    CommitDone,
    UndoFailbackStarted,
    UndoFailbackDone,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a replica in state {from} cannot {transition}{hint}")]
pub struct TransitionError {
    pub from: ReplicaState,
    pub transition: &'static str,
    pub hint: &'static str,
}

impl ReplicaState {
    pub const ALL: [ReplicaState; 14] = [
        ReplicaState::Ready,
        ReplicaState::Replicating,
        ReplicaState::PreparingFailover,
        ReplicaState::FailingOver,
        ReplicaState::Failover,
        ReplicaState::UndoingFailover,
        ReplicaState::MakingPermanent,
        ReplicaState::Permanent,
        ReplicaState::FailingBack,
        ReplicaState::ReadyToSwitch,
        ReplicaState::Switching,
        ReplicaState::Failback,
        ReplicaState::CommittingFailback,
        ReplicaState::UndoingFailback,
    ];

    pub fn apply(self, t: Transition) -> Result<ReplicaState, TransitionError> {
        use ReplicaState::*;
        use Transition::*;
        match (self, t) {
            // Ready ---- job run starts ----> Replicating
            (Ready, RunStarted) => Ok(Replicating),
            // Replicating ---- restore point committed, or run abandoned ----> Ready
            (Replicating, RunFinished | RunFailed) => Ok(Ready),
            // Ready ---- planned failover ----> PreparingFailover ---- synced, source off ----> FailingOver
            (Ready, PlannedStarted) => Ok(PreparingFailover),
            (PreparingFailover, FailoverStarted) => Ok(FailingOver),
            // PreparingFailover ---- failed or interrupted (source started again if it ran) ----> Ready
            (PreparingFailover, PlannedRolledBack) => Ok(Ready),
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
            // Failover ---- failback phase 1 ----> FailingBack ---- target synced ----> ReadyToSwitch
            (Failover, FailbackStarted) => Ok(FailingBack),
            (FailingBack, FailbackSynced) => Ok(ReadyToSwitch),
            // FailingBack ---- failed or interrupted ----> Failover (the replica ran on)
            (FailingBack, FailbackRolledBack) => Ok(Failover),
            // ReadyToSwitch ---- phase 2 ----> Switching ---- replica off, target complete ----> Failback
            (ReadyToSwitch, SwitchStarted) => Ok(Switching),
            (Switching, SwitchDone) => Ok(Failback),
            // Switching ---- failed before the target was touched ----> ReadyToSwitch (replica back on)
            (Switching, SwitchRolledBack) => Ok(ReadyToSwitch),
            // Failback ---- commit ----> CommittingFailback ---- point kept ----> Ready
            (Failback, CommitStarted) => Ok(CommittingFailback),
            (CommittingFailback, CommitDone) => Ok(Ready),
            // ReadyToSwitch | Failback ---- undo ----> UndoingFailback ---- replica back ----> Failover
            (ReadyToSwitch | Failback, UndoFailbackStarted) => Ok(UndoingFailback),
            (UndoingFailback, UndoFailbackDone) => Ok(Failover),
            (from, t) => Err(TransitionError { from, transition: t.verb(), hint: from.hint() }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Ready => "ready",
            ReplicaState::Replicating => "replicating",
            ReplicaState::PreparingFailover => "preparing_failover",
            ReplicaState::FailingOver => "failing_over",
            ReplicaState::Failover => "failover",
            ReplicaState::UndoingFailover => "undoing_failover",
            ReplicaState::MakingPermanent => "making_permanent",
            ReplicaState::Permanent => "permanent",
            ReplicaState::FailingBack => "failing_back",
            ReplicaState::ReadyToSwitch => "ready_to_switch",
            ReplicaState::Switching => "switching",
            ReplicaState::Failback => "failback",
            ReplicaState::CommittingFailback => "committing_failback",
            ReplicaState::UndoingFailback => "undoing_failback",
        }
    }

    /// What the operator can do about a refused transition from here.
    fn hint(self) -> &'static str {
        match self {
            ReplicaState::Ready => "; it is not in failover",
            ReplicaState::Failover => {
                "; it is in failover: undo it (standby failover undo VM) or fail back (standby failback VM --to ...)"
            }
            ReplicaState::ReadyToSwitch => {
                "; its failback is ready to switch: switch (standby failback switch VM) or undo it (standby failback undo VM)"
            }
            ReplicaState::Failback => {
                "; it is in failback: commit it (standby failback commit VM) or undo it (standby failback undo VM)"
            }
            ReplicaState::Permanent => "; its failover was made permanent: the replica is an ordinary VM now",
            ReplicaState::Replicating
            | ReplicaState::PreparingFailover
            | ReplicaState::FailingOver
            | ReplicaState::UndoingFailover
            | ReplicaState::MakingPermanent
            | ReplicaState::FailingBack
            | ReplicaState::Switching
            | ReplicaState::CommittingFailback
            | ReplicaState::UndoingFailback => {
                "; another operation is in progress: wait for it, or run standby recover if it was killed"
            }
        }
    }

    /// No operation is in progress in this state.
    pub fn is_idle(self) -> bool {
        matches!(
            self,
            ReplicaState::Ready
                | ReplicaState::Failover
                | ReplicaState::Permanent
                | ReplicaState::ReadyToSwitch
                | ReplicaState::Failback
        )
    }

    /// Replication runs only in Ready; in other states a job run skips the VM.
    pub fn replicates(self) -> bool {
        matches!(self, ReplicaState::Ready | ReplicaState::Replicating)
    }
}

impl Transition {
    pub const ALL: [Transition; 23] = [
        Transition::PlannedStarted,
        Transition::PlannedRolledBack,
        Transition::RunStarted,
        Transition::RunFinished,
        Transition::RunFailed,
        Transition::FailoverStarted,
        Transition::FailoverDone,
        Transition::FailoverRolledBack,
        Transition::UndoStarted,
        Transition::UndoDone,
        Transition::PermanentStarted,
        Transition::PermanentDone,
        Transition::PermanentRolledBack,
        Transition::FailbackStarted,
        Transition::FailbackSynced,
        Transition::FailbackRolledBack,
        Transition::SwitchStarted,
        Transition::SwitchDone,
        Transition::SwitchRolledBack,
        Transition::CommitStarted,
        Transition::CommitDone,
        Transition::UndoFailbackStarted,
        Transition::UndoFailbackDone,
    ];

    fn verb(self) -> &'static str {
        match self {
            Transition::PlannedStarted => "start a planned failover",
            Transition::PlannedRolledBack => "roll back a planned failover",
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
            Transition::FailbackStarted => "fail back",
            Transition::FailbackSynced => "finish failback phase 1",
            Transition::FailbackRolledBack => "roll back a failback",
            Transition::SwitchStarted => "switch to the production VM",
            Transition::SwitchDone => "finish a failback switch",
            Transition::SwitchRolledBack => "roll back a failback switch",
            Transition::CommitStarted => "commit failback",
            Transition::CommitDone => "finish committing a failback",
            Transition::UndoFailbackStarted => "undo failback",
            Transition::UndoFailbackDone => "finish undoing a failback",
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

/// What a VM is to standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A VM standby protects or manages.
    Source,
    /// A replica running (or stopped) in failover.
    Replica,
    /// A source a permanent failover replaced: it must not run beside its replacement.
    Retired,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Replica => "replica",
            Role::Retired => "retired",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Role::Source, Role::Replica, Role::Retired]
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown VM role {s:?}"))
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
        for s in ReplicaState::ALL {
            for t in Transition::ALL {
                let want = match (s, t) {
                    (Ready, RunStarted) => Some(Replicating),
                    (Replicating, RunFinished | RunFailed) => Some(Ready),
                    (Ready, FailoverStarted) => Some(FailingOver),
                    (Ready, PlannedStarted) => Some(PreparingFailover),
                    (PreparingFailover, FailoverStarted) => Some(FailingOver),
                    (PreparingFailover, PlannedRolledBack) => Some(Ready),
                    (FailingOver, FailoverDone) => Some(Failover),
                    (FailingOver, FailoverRolledBack) => Some(Ready),
                    (Failover, UndoStarted) => Some(UndoingFailover),
                    (UndoingFailover, UndoDone) => Some(Ready),
                    (Failover, PermanentStarted) => Some(MakingPermanent),
                    (MakingPermanent, PermanentDone) => Some(Permanent),
                    (MakingPermanent, PermanentRolledBack) => Some(Failover),
                    (Failover, FailbackStarted) => Some(FailingBack),
                    (FailingBack, FailbackSynced) => Some(ReadyToSwitch),
                    (FailingBack, FailbackRolledBack) => Some(Failover),
                    (ReadyToSwitch, SwitchStarted) => Some(Switching),
                    (Switching, SwitchDone) => Some(Failback),
                    (Switching, SwitchRolledBack) => Some(ReadyToSwitch),
                    (Failback, CommitStarted) => Some(CommittingFailback),
                    (CommittingFailback, CommitDone) => Some(Ready),
                    (ReadyToSwitch | Failback, UndoFailbackStarted) => Some(UndoingFailback),
                    (UndoingFailback, UndoFailbackDone) => Some(Failover),
                    _ => None,
                };
                assert_eq!(s.apply(t).ok(), want, "{s} {t:?}");
            }
            assert_eq!(s.as_str().parse::<ReplicaState>(), Ok(s));
        }
    }

    /// Every state is reachable from `Ready`, every transition is used by the table, and
    /// from every transitional state some path leads back to an idle one.
    #[test]
    fn no_state_is_unreachable_and_every_transitional_state_leads_back_to_idle() {
        let mut seen = vec![ReplicaState::Ready];
        let mut used = Vec::new();
        let mut i = 0;
        while i < seen.len() {
            for t in Transition::ALL {
                if let Ok(next) = seen[i].apply(t) {
                    used.push(t);
                    if !seen.contains(&next) {
                        seen.push(next);
                    }
                }
            }
            i += 1;
        }
        for s in ReplicaState::ALL {
            assert!(seen.contains(&s), "{s} is unreachable");
        }
        for t in Transition::ALL {
            assert!(used.contains(&t), "{t:?} is never applied by the table");
        }
        for s in ReplicaState::ALL.into_iter().filter(|s| !s.is_idle()) {
            let leads = Transition::ALL.iter().filter_map(|t| s.apply(*t).ok()).any(|n| n.is_idle());
            assert!(leads, "{s} has no transition to an idle state");
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
