use standby_host::HostError;
use standby_model::{NameError, TransitionError};
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
