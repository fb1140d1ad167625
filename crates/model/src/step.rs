//! The step an operation in progress has reached, recorded in the replica's row before
//! the step's side effect. Each operation has its own steps; a step is only ever read
//! together with the state it belongs to, so the same word in two operations (`stop`,
//! `identity`) is two different steps. The words are the database's: never rename one.

use std::fmt;

use crate::ReplicaState;

/// Declares one operation's steps with the words the database stores.
macro_rules! steps {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            fn parse(s: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }
    };
}

steps! {
    /// A planned failover before its failover: the syncs around the source's shutdown.
    PlannedStep {
        /// First sync while the source runs, its shutdown, the final sync and its check.
        Sync = "sync",
    }
}

steps! {
    /// Failover: the replica VM's overlays, its definition, its start.
    FailoverStep {
        Overlays = "overlays",
        Define = "define",
        Start = "start",
        /// A planned failover's failover was rolled back; its source is being restarted.
        RestartSource = "restart-source",
    }
}

steps! {
    UndoStep {
        Stop = "stop",
        Discard = "discard",
    }
}

steps! {
    PermanentStep {
        Flatten = "flatten",
        Verify = "verify",
        /// Verifying a running replica's standalone disks with its guest paused.
        VerifyPaused = "verify-paused",
        /// Published; the layer files of the removed restore points go.
        DeletePoints = "delete-points",
    }
}

steps! {
    /// Failback phase 1.
    FailbackStep {
        Start = "start",
        TargetOff = "target-off",
        Working = "working",
        Protect = "protect",
        Transfer = "transfer",
    }
}

steps! {
    /// Failback phase 2.
    SwitchStep {
        Shutdown = "shutdown",
        FinalTransfer = "final-transfer",
        Commit = "commit",
        Bitmap = "bitmap",
        Identity = "identity",
    }
}

steps! {
    CommitStep {
        Point = "point",
        Cleanup = "cleanup",
    }
}

steps! {
    UndoFailbackStep {
        Stop = "stop",
        Restore = "restore",
        Identity = "identity",
        StartReplica = "start-replica",
    }
}

/// Where an operation in progress stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A planned failover before its failover; `source_ran`: the source ran when it began,
    /// so a rollback starts it again.
    Planned {
        source_ran: bool,
        at: PlannedStep,
    },
    /// A failover; `planned` is `Some(source_ran)` for a planned failover's failover.
    Failover {
        planned: Option<bool>,
        at: FailoverStep,
    },
    Undo(UndoStep),
    Permanent(PermanentStep),
    Failback(FailbackStep),
    Switch(SwitchStep),
    Commit(CommitStep),
    UndoFailback(UndoFailbackStep),
}

const RAN: &str = "planned:source-was-running";
const STOPPED: &str = "planned:source-was-stopped";

impl Step {
    /// The word stored in the database.
    pub fn to_db(self) -> String {
        let marker = |ran: bool| if ran { RAN } else { STOPPED };
        match self {
            Step::Planned { source_ran, at } => format!("{}/{}", marker(source_ran), at.as_str()),
            Step::Failover { planned: Some(ran), at } => format!("{}/{}", marker(ran), at.as_str()),
            Step::Failover { planned: None, at } => at.as_str().into(),
            Step::Undo(s) => s.as_str().into(),
            Step::Permanent(s) => s.as_str().into(),
            Step::Failback(s) => s.as_str().into(),
            Step::Switch(s) => s.as_str().into(),
            Step::Commit(s) => s.as_str().into(),
            Step::UndoFailback(s) => s.as_str().into(),
        }
    }

    /// Reads a stored step as a step of `state`'s operation; anything else is an error
    /// (a step of another operation, a word no standby wrote).
    pub fn from_db(state: ReplicaState, s: &str) -> Result<Step, String> {
        let bad = || format!("step {s:?} is not a step of {state}");
        fn planned(rest: &str) -> Option<(bool, &str)> {
            let (marker, at) = rest.split_once('/').unwrap_or((rest, ""));
            match marker {
                RAN => Some((true, at)),
                STOPPED => Some((false, at)),
                _ => None,
            }
        }
        use ReplicaState as S;
        let step = match state {
            S::PreparingFailover => planned(s).and_then(|(source_ran, at)| {
                // Before steps were recorded within it, the marker stood alone.
                let at = if at.is_empty() { Some(PlannedStep::Sync) } else { PlannedStep::parse(at) };
                Some(Step::Planned { source_ran, at: at? })
            }),
            S::FailingOver => match planned(s) {
                Some((ran, at)) => FailoverStep::parse(at).map(|at| Step::Failover { planned: Some(ran), at }),
                None => FailoverStep::parse(s).map(|at| Step::Failover { planned: None, at }),
            },
            S::UndoingFailover => UndoStep::parse(s).map(Step::Undo),
            S::MakingPermanent => {
                PermanentStep::parse(s).filter(|p| *p != PermanentStep::DeletePoints).map(Step::Permanent)
            }
            S::Permanent => PermanentStep::parse(s).filter(|p| *p == PermanentStep::DeletePoints).map(Step::Permanent),
            S::FailingBack => FailbackStep::parse(s).map(Step::Failback),
            S::Switching => SwitchStep::parse(s).map(Step::Switch),
            S::CommittingFailback => CommitStep::parse(s).map(Step::Commit),
            S::UndoingFailback => UndoFailbackStep::parse(s).map(Step::UndoFailback),
            S::Ready | S::Replicating | S::Failover | S::ReadyToSwitch | S::Failback => None,
        };
        step.ok_or_else(bad)
    }

    /// Every step, for tests that go through them all.
    pub fn all() -> Vec<Step> {
        let mut v = Vec::new();
        for ran in [true, false] {
            v.extend(PlannedStep::ALL.iter().map(|&at| Step::Planned { source_ran: ran, at }));
            v.extend(FailoverStep::ALL.iter().map(|&at| Step::Failover { planned: Some(ran), at }));
        }
        v.extend(FailoverStep::ALL.iter().map(|&at| Step::Failover { planned: None, at }));
        v.extend(UndoStep::ALL.iter().map(|&s| Step::Undo(s)));
        v.extend(PermanentStep::ALL.iter().map(|&s| Step::Permanent(s)));
        v.extend(FailbackStep::ALL.iter().map(|&s| Step::Failback(s)));
        v.extend(SwitchStep::ALL.iter().map(|&s| Step::Switch(s)));
        v.extend(CommitStep::ALL.iter().map(|&s| Step::Commit(s)));
        v.extend(UndoFailbackStep::ALL.iter().map(|&s| Step::UndoFailback(s)));
        v
    }

    /// The state a replica is in while its operation is at this step.
    pub fn state(self) -> ReplicaState {
        match self {
            Step::Planned { .. } => ReplicaState::PreparingFailover,
            Step::Failover { .. } => ReplicaState::FailingOver,
            Step::Undo(_) => ReplicaState::UndoingFailover,
            Step::Permanent(PermanentStep::DeletePoints) => ReplicaState::Permanent,
            Step::Permanent(_) => ReplicaState::MakingPermanent,
            Step::Failback(_) => ReplicaState::FailingBack,
            Step::Switch(_) => ReplicaState::Switching,
            Step::Commit(_) => ReplicaState::CommittingFailback,
            Step::UndoFailback(_) => ReplicaState::UndoingFailback,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_is_stored_and_read_back_under_its_own_state_only() {
        for step in Step::all() {
            let word = step.to_db();
            assert_eq!(Step::from_db(step.state(), &word), Ok(step), "{word}");
            // Under another state the same word is that operation's step, or no step.
            for other in ReplicaState::ALL.into_iter().filter(|s| *s != step.state()) {
                if let Ok(read) = Step::from_db(other, &word) {
                    assert_eq!(read.state(), other, "{word} under {other}");
                    assert_ne!(read, step);
                }
            }
        }
    }

    #[test]
    fn the_words_standby_wrote_before_steps_were_typed_still_read() {
        use ReplicaState as S;
        let old = [
            (S::PreparingFailover, RAN, Step::Planned { source_ran: true, at: PlannedStep::Sync }),
            (
                S::FailingOver,
                "planned:source-was-stopped/define",
                Step::Failover { planned: Some(false), at: FailoverStep::Define },
            ),
            (S::FailingOver, "overlays", Step::Failover { planned: None, at: FailoverStep::Overlays }),
            (S::Switching, "final-transfer", Step::Switch(SwitchStep::FinalTransfer)),
            (S::UndoingFailback, "stop", Step::UndoFailback(UndoFailbackStep::Stop)),
            (S::UndoingFailover, "stop", Step::Undo(UndoStep::Stop)),
        ];
        for (state, word, step) in old {
            assert_eq!(Step::from_db(state, word), Ok(step));
        }
        assert!(Step::from_db(S::Switching, "sideways").unwrap_err().contains("not a step of switching"));
    }
}
