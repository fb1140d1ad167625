use standby_host::HostError;
use standby_model::{NameError, PointId, TransitionError};
use standby_store::StoreError;

/// Everything an operation can fail with. Messages say what is wrong and, where the
/// operator can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(
        "data directory {path} may be written by others (mode {mode:04o}); standby refuses it, since its database \
         decides what runs as root. Fix: chmod 700 {path}"
    )]
    DataDirUnsafe { path: String, mode: u32 },
    #[error("cannot use data directory {path}")]
    DataDir { path: String, source: std::io::Error },
    #[error("unknown host {0:?}; the hosts standby knows are listed by `standby host list`")]
    UnknownHost(String),
    #[error("a host named {0:?} already exists (standby host list)")]
    HostExists(String),
    #[error(transparent)]
    Agent(#[from] standby_agent::AgentError),
    #[error(transparent)]
    Trust(#[from] standby_trust::TrustError),
    #[error("unknown VM {0:?}; see `standby vm list`")]
    UnknownVm(String),
    #[error("unknown job {0:?}; see `standby job list`")]
    UnknownJob(String),
    #[error("unknown task {0}; see `standby task list`")]
    UnknownTask(i64),
    #[error("a VM named {0:?} already exists")]
    VmExists(String),
    #[error("a job named {0:?} already exists")]
    JobExists(String),
    #[error("VM {vm} has no replica; add it to a replication job with `standby job create`")]
    NoReplica { vm: String },
    #[error("disk {path}: {reason}")]
    BadDisk { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// An argument of the request is wrong; `why` says how, and what would do.
    #[error("{why}")]
    BadArgument { arg: &'static str, why: String },
    /// A change request that changes nothing.
    #[error("nothing to change: {hint}")]
    NothingToChange { subject: String, hint: String },
    /// Refused because of where the VM (or its replica) stands; `why` says what to do.
    #[error("{why}")]
    Refused { vm: String, why: String },
    /// Refused because of where the job stands.
    #[error("{why}")]
    JobRefused { job: String, why: String },
    #[error("unknown plan {0:?}; see `standby plan list`")]
    UnknownPlan(String),
    #[error("a plan named {0:?} already exists")]
    PlanExists(String),
    #[error("VM {vm} has no restore point yet; run its job first")]
    NoRestorePoint { vm: String },
    #[error("VM {vm} has no restore point {point}; its restore points are {known} (standby replica points {vm})")]
    UnknownPoint { vm: String, point: PointId, known: String },
    /// A check that guards data found a difference; what it guarded was left as it was.
    #[error("{what}")]
    Mismatch { vm: String, what: String },
    /// The records of a VM contradict each other or its files.
    #[error(
        "the records of VM {vm} disagree: {what}; run `standby recover`, and if this stays, see `standby history {vm}`"
    )]
    Damaged { vm: String, what: String },
    /// Part of an operation was done when a later step failed.
    #[error("{done}; {failed}")]
    PartlyDone { vm: String, done: String, failed: String },
    /// What standby's own logic says cannot happen.
    #[error("standby hit a bug: {0}; please report it with the output of `standby history`")]
    Bug(String),
    #[error("VM {vm} is {state}; {hint}")]
    VmState { vm: String, state: &'static str, hint: &'static str },
    #[error("{what} is busy: {holder}; wait for it to finish and try again")]
    Busy { what: String, holder: String },
    #[error("target directory {dir} on host {host} is not usable: {reason}")]
    TargetDir { host: String, dir: String, reason: String },
    #[error(
        "replica directory {dir} is not provably this replica's ({reason}); standby writes and deletes nothing in it. \
         If the DR storage is not mounted, mount it; if another job or standby installation uses the directory, give \
         this job a directory of its own"
    )]
    NotOwner { dir: String, reason: String },
    #[error("VM {vm} is already replicated to {host}:{dir} by job {job}")]
    AlreadyProtected { vm: String, host: String, dir: String, job: String },
    #[error("replication of VM {vm} failed during {step}")]
    Run { vm: String, step: &'static str, source: Box<EngineError> },
    #[error("data transfer failed")]
    Transfer { source: standby_nbd::NbdError },
    #[error(
        "refusing to run {vm}: its counterpart {other} is running and writable on host {host}; shut {other} down first \
         (standby vm shutdown {other}), or pass --force to run both"
    )]
    TwoWriters { vm: String, other: String, host: String },
    #[error(
        "the chain of {point} is broken: {problem}; standby will not read it (it would read zeros where data was); \
         see `standby replica points` and restore the missing layer's record or file"
    )]
    BrokenChain { point: String, problem: String },
    #[error(
        "VM {vm} is retired: a permanent failover made {replacement} the VM that carries its identity, and two \
         writers of one identity split its data. Keep {vm} stopped; if you must start it (the history records it), \
         pass --force"
    )]
    Retired { vm: String, replacement: String },
    #[error("{failed} of {total} VMs of job {job} got no new restore point")]
    JobFailed { job: String, failed: usize, total: usize },
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// An error and its causes on one line, for messages that embed another error.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
