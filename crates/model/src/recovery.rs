//! What recovery does with a replica a killed operation left: one pure decision from its
//! state, its recorded step and what the engine sees running. The engine carries the
//! decision out; this table is the whole policy.

use crate::step::{FailoverStep, PermanentStep, Step, SwitchStep};
use crate::ReplicaState;

/// What recovery does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was interrupted.
    Nothing,
    /// A replication run: its leftovers go, no restore point comes of it.
    RollBackRun,
    /// A planned failover before its failover: its run's leftovers go, and the source
    /// starts again if it ran (never both VMs down).
    RollBackPlanned {
        restart_source: bool,
    },
    /// A failover whose replica VM runs: it is done.
    CompleteFailover,
    /// A failover whose replica never ran: its VM, definition and overlays go; a planned
    /// one's source starts again if it ran.
    RollBackFailover {
        restart_source: bool,
    },
    /// An undo failover: it finishes.
    FinishUndo,
    /// A permanent failover before its publishing transaction: back to failover, the
    /// guest resumed if standby paused it to verify.
    RollBackPermanent {
        resume_guest: bool,
    },
    /// A permanent failover after it: the removed points' files go.
    FinishPermanent,
    /// Failback phase 1: the working layers go, the replica runs on.
    RollBackFailback,
    /// A switch interrupted while the replica still ran: back to ready-to-switch.
    RollBackSwitch,
    /// A switch past the replica's shutdown: it finishes.
    FinishSwitch,
    FinishCommit,
    FinishUndoFailback,
}

/// What the engine sees of the world when it recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Seen {
    /// The replica VM's process runs.
    pub replica_runs: bool,
}

/// The decision for a replica in `state` at `step`, nobody holding its lock.
pub fn recovery(state: ReplicaState, step: Option<Step>, seen: Seen) -> Recovery {
    use ReplicaState as S;
    match (state, step) {
        (S::Permanent, Some(Step::Permanent(PermanentStep::DeletePoints))) => Recovery::FinishPermanent,
        (S::Ready | S::Failover | S::Permanent | S::ReadyToSwitch | S::Failback, _) => Recovery::Nothing,
        (S::Replicating, _) => Recovery::RollBackRun,
        (S::PreparingFailover, Some(Step::Planned { source_ran, .. })) => {
            Recovery::RollBackPlanned { restart_source: source_ran }
        }
        // No step recorded: nothing says the source ran; it is left as it is.
        (S::PreparingFailover, _) => Recovery::RollBackPlanned { restart_source: false },
        (S::FailingOver, step) => {
            let (planned, at) = match step {
                Some(Step::Failover { planned, at }) => (planned, Some(at)),
                _ => (None, None),
            };
            // Once a planned failover's rollback began, the replica is gone for good.
            if seen.replica_runs && at != Some(FailoverStep::RestartSource) {
                Recovery::CompleteFailover
            } else {
                Recovery::RollBackFailover { restart_source: planned == Some(true) }
            }
        }
        (S::UndoingFailover, _) => Recovery::FinishUndo,
        (S::MakingPermanent, step) => {
            Recovery::RollBackPermanent { resume_guest: step == Some(Step::Permanent(PermanentStep::VerifyPaused)) }
        }
        (S::FailingBack, _) => Recovery::RollBackFailback,
        (S::Switching, step) => {
            if seen.replica_runs && step == Some(Step::Switch(SwitchStep::Shutdown)) {
                Recovery::RollBackSwitch
            } else {
                Recovery::FinishSwitch
            }
        }
        (S::CommittingFailback, _) => Recovery::FinishCommit,
        (S::UndoingFailback, _) => Recovery::FinishUndoFailback,
    }
}

impl Recovery {
    /// The state the replica is in once the action is done (None: it stays as it is).
    pub fn leads_to(self) -> Option<ReplicaState> {
        use ReplicaState as S;
        match self {
            Recovery::Nothing => None,
            Recovery::RollBackRun | Recovery::RollBackPlanned { .. } | Recovery::RollBackFailover { .. } => {
                Some(S::Ready)
            }
            Recovery::FinishUndo | Recovery::FinishCommit => Some(S::Ready),
            Recovery::CompleteFailover | Recovery::RollBackPermanent { .. } | Recovery::RollBackFailback => {
                Some(S::Failover)
            }
            Recovery::FinishUndoFailback => Some(S::Failover),
            Recovery::FinishPermanent => Some(S::Permanent),
            Recovery::RollBackSwitch => Some(S::ReadyToSwitch),
            Recovery::FinishSwitch => Some(S::Failback),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::*;

    const RUNS: Seen = Seen { replica_runs: true };
    const OFF: Seen = Seen { replica_runs: false };

    /// The whole policy, row by row.
    #[test]
    fn recovery_table() {
        use ReplicaState as S;
        let planned = |ran, at| Some(Step::Failover { planned: Some(ran), at });
        let rows: Vec<(S, Option<Step>, Seen, Recovery)> = vec![
            (S::Ready, None, OFF, Recovery::Nothing),
            (S::Failover, None, RUNS, Recovery::Nothing),
            (S::Replicating, None, OFF, Recovery::RollBackRun),
            (
                S::PreparingFailover,
                Some(Step::Planned { source_ran: true, at: PlannedStep::Sync }),
                OFF,
                Recovery::RollBackPlanned { restart_source: true },
            ),
            (
                S::PreparingFailover,
                Some(Step::Planned { source_ran: false, at: PlannedStep::Sync }),
                OFF,
                Recovery::RollBackPlanned { restart_source: false },
            ),
            (
                S::FailingOver,
                Some(Step::Failover { planned: None, at: FailoverStep::Start }),
                RUNS,
                Recovery::CompleteFailover,
            ),
            (
                S::FailingOver,
                Some(Step::Failover { planned: None, at: FailoverStep::Define }),
                OFF,
                Recovery::RollBackFailover { restart_source: false },
            ),
            (S::FailingOver, planned(true, FailoverStep::Start), RUNS, Recovery::CompleteFailover),
            (
                S::FailingOver,
                planned(true, FailoverStep::Overlays),
                OFF,
                Recovery::RollBackFailover { restart_source: true },
            ),
            (
                S::FailingOver,
                planned(false, FailoverStep::Overlays),
                OFF,
                Recovery::RollBackFailover { restart_source: false },
            ),
            (
                S::FailingOver,
                planned(true, FailoverStep::RestartSource),
                RUNS,
                Recovery::RollBackFailover { restart_source: true },
            ),
            (S::UndoingFailover, Some(Step::Undo(UndoStep::Discard)), OFF, Recovery::FinishUndo),
            (
                S::MakingPermanent,
                Some(Step::Permanent(PermanentStep::Flatten)),
                RUNS,
                Recovery::RollBackPermanent { resume_guest: false },
            ),
            (
                S::MakingPermanent,
                Some(Step::Permanent(PermanentStep::VerifyPaused)),
                RUNS,
                Recovery::RollBackPermanent { resume_guest: true },
            ),
            (S::Permanent, Some(Step::Permanent(PermanentStep::DeletePoints)), RUNS, Recovery::FinishPermanent),
            (S::Permanent, None, RUNS, Recovery::Nothing),
            (S::FailingBack, Some(Step::Failback(FailbackStep::Transfer)), RUNS, Recovery::RollBackFailback),
            (S::Switching, Some(Step::Switch(SwitchStep::Shutdown)), RUNS, Recovery::RollBackSwitch),
            (S::Switching, Some(Step::Switch(SwitchStep::Shutdown)), OFF, Recovery::FinishSwitch),
            (S::Switching, Some(Step::Switch(SwitchStep::FinalTransfer)), RUNS, Recovery::FinishSwitch),
            (S::CommittingFailback, Some(Step::Commit(CommitStep::Cleanup)), OFF, Recovery::FinishCommit),
            (
                S::UndoingFailback,
                Some(Step::UndoFailback(UndoFailbackStep::Restore)),
                OFF,
                Recovery::FinishUndoFailback,
            ),
        ];
        for (state, step, seen, want) in rows {
            assert_eq!(recovery(state, step, seen), want, "{state} {step:?} {seen:?}");
        }
    }

    /// Whatever the step and whatever runs, recovery of a transitional state ends in an
    /// idle one that the state table reaches from it, and recovery of an idle state with
    /// no step does nothing.
    #[test]
    fn every_transitional_state_recovers_to_an_idle_one() {
        for state in ReplicaState::ALL {
            let mut steps: Vec<Option<Step>> =
                Step::all().into_iter().filter(|s| s.state() == state).map(Some).collect();
            steps.push(None);
            for step in steps {
                for seen in [RUNS, OFF] {
                    let r = recovery(state, step, seen);
                    match r.leads_to() {
                        None => assert!(state.is_idle() && step.is_none(), "{state} {step:?}: left as it is"),
                        Some(end) => {
                            assert!(end.is_idle(), "{state} {step:?}: ends in {end}");
                            assert!(reachable(state, end), "{state} {step:?}: {end} is no state the table reaches");
                        }
                    }
                }
            }
        }
    }

    fn reachable(from: ReplicaState, to: ReplicaState) -> bool {
        let mut seen = vec![from];
        let mut i = 0;
        while i < seen.len() {
            for t in crate::Transition::ALL {
                if let Ok(n) = seen[i].apply(t) {
                    if !seen.contains(&n) {
                        seen.push(n);
                    }
                }
            }
            i += 1;
        }
        seen.contains(&to)
    }
}
