//! standby's operations. The engine owns the decisions and their order; it reaches hosts
//! only through [`standby_host::Host`] and keeps its state in [`standby_store::Store`].
//! It never prints: progress goes to a [`Progress`] sink and results are returned.

mod batch;
mod error;
mod failback;
mod failover;
pub mod failpoint;
mod fence;
mod firmware;
mod hosts;
mod job;
mod layout;
mod lock;
mod permanent;
mod plan;
mod progress;
mod quiesce;
mod replica_dir;
mod replica_vm;
mod replication;
mod retention;
mod task;
mod tpm;
mod transfer;
mod verify;
mod vm;

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use standby_host::{Host, LocalHost};
use standby_store::Store;

pub use batch::OpOutcome;
pub(crate) use error::chain;
pub use error::{EngineError, Result};
pub use failback::{FailbackOptions, FailbackView, Moved};
pub use failover::{Despite, PointChoice};
pub use hosts::HostView;
pub use job::{JobChange, JobSpec, JobView, Points, ReplicaDeleted};
pub use plan::{PlanChange, PlanRun, PlanSpec, PlanStep, PlanView, PlanVmView, DEFAULT_HOOK_TIMEOUT_SECS};
pub use progress::{NoProgress, Progress};
pub use quiesce::FreezeSpec;
pub use replication::{Recovery, ReplicaView, RestorePointView, RpDiskView, RunOutcome};
pub use standby_host::{OVMF_CODE, OVMF_VARS};
pub use standby_model::{DriverConfig, FailbackTarget, Firmware, SwitchMode, Tpm, VmChange, VmConfig};
pub use task::TaskView;
pub use vm::{VmSpec, VmView};

/// The name of the host that exists from the first run: this machine.
pub const LOCAL_HOST: &str = "local";

/// One history entry as `standby history --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryView {
    pub id: i64,
    pub at: String,
    pub vm: String,
    pub operation: String,
    pub command: String,
    /// `ok`, `failed`, `rolled back`, `completed` (by recovery) or `warning`.
    pub result: String,
    pub detail: String,
}

impl From<standby_store::HistoryRecord> for HistoryView {
    fn from(h: standby_store::HistoryRecord) -> HistoryView {
        HistoryView {
            id: h.id,
            at: h.at,
            vm: h.vm,
            operation: h.operation,
            command: h.command,
            result: h.result,
            detail: h.detail,
        }
    }
}

#[derive(Debug)]
pub struct Engine {
    data_dir: PathBuf,
    store: Mutex<Store>,
    hosts: BTreeMap<String, Arc<dyn Host>>,
    /// Hosts reached through their agents, made on first use.
    remote: Mutex<BTreeMap<String, Arc<dyn Host>>>,
    /// The command line that drives this engine, for the history.
    command: String,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The hosts that answered this command are not silent: a later outage is counted
        // from its own first missed answer, never from one this command saw end.
        let _ = self.note_answers();
    }
}

impl Engine {
    /// Opens (creating if needed) the data directory: the database and the local host's
    /// run files.
    pub fn open(data_dir: &Path) -> Result<Engine> {
        let local = |data_dir: &Path| -> Result<Arc<dyn Host>> {
            Ok(Arc::new(LocalHost::new(LOCAL_HOST, &data_dir.join("hosts").join(LOCAL_HOST))?))
        };
        Engine::open_on(data_dir, local)
    }

    /// [`Engine::open`] with the local host that `local` makes from the data directory:
    /// a fake one, for tests of the engine alone.
    pub fn open_on(data_dir: &Path, local: impl FnOnce(&Path) -> Result<Arc<dyn Host>>) -> Result<Engine> {
        standby_host::restrict_new_file_modes();
        let io = |source| EngineError::DataDir { path: data_dir.display().to_string(), source };
        // The database's plan hooks run as root and the run files control VMs: a data
        // directory that others may write is refused, not quietly used or changed.
        match std::fs::metadata(data_dir) {
            Ok(m) if m.permissions().mode() & 0o022 != 0 => {
                return Err(EngineError::DataDirUnsafe {
                    path: data_dir.display().to_string(),
                    mode: m.permissions().mode() & 0o7777,
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(io)?;
            }
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir_all(data_dir.join("locks")).map_err(io)?;
        // One spelling of the data directory: it names this installation in the
        // ownership markers of replica directories.
        let data_dir = &data_dir.canonicalize().map_err(io)?;
        let store = Store::open(&data_dir.join("standby.db"))?;
        for file in ["standby.db", "standby.db-wal", "standby.db-shm"] {
            let path = data_dir.join(file);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            }
        }
        let local = local(data_dir)?;
        let mut hosts = BTreeMap::new();
        hosts.insert(LOCAL_HOST.to_owned(), local);
        Ok(Engine {
            data_dir: data_dir.into(),
            store: Mutex::new(store),
            hosts,
            remote: Mutex::new(BTreeMap::new()),
            command: "standby".into(),
        })
    }

    /// Names the command line in every history entry this engine records.
    pub fn set_command(&mut self, command: String) {
        self.command = command;
    }

    /// Records an operation's outcome in the history. A history that cannot be written
    /// must not turn a done operation into a failed one, so errors are dropped here.
    pub(crate) fn record<T>(&self, vm: &str, operation: &str, result: &Result<T>, ok: impl FnOnce(&T) -> String) {
        match result {
            Ok(v) => self.record_raw(vm, operation, "ok", &ok(v)),
            Err(e) => self.record_raw(vm, operation, "failed", &crate::chain(e)),
        }
    }

    pub(crate) fn record_raw(&self, vm: &str, operation: &str, result: &str, detail: &str) {
        let _ = self.store().record_history(vm, operation, &self.command, result, detail);
    }

    /// The newest `limit` recorded operations, oldest first; only `vm`'s when given (its
    /// replica VM's operations are recorded under the source VM's name; a plan's under
    /// `plan:NAME`, a job's under `job:NAME`).
    pub fn history(&self, vm: Option<&str>, limit: u32) -> Result<Vec<HistoryView>> {
        if let Some(v) = vm {
            let named = v.starts_with("plan:") || v.starts_with("job:");
            // A deleted VM's history stays readable.
            if !named && self.store().vm(v)?.is_none() && self.store().last_history(v)?.is_none() {
                return Err(EngineError::UnknownVm(v.into()));
            }
        }
        Ok(self.store().history(vm, limit)?.into_iter().map(HistoryView::from).collect())
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The database, for one statement. Never hold the guard across another call to
    /// `store()` (bind results with `let` first, not in an `if let`/`match` scrutinee):
    /// the mutex is not reentrant.
    pub(crate) fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back),
        // so a poisoned lock is safe to take over.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Who owns the directory of `vm`'s replica by `job`: this installation's.
    pub(crate) fn replica_owner(&self, job: &str, vm: &str) -> replica_dir::Owner {
        replica_dir::Owner { data_dir: self.data_dir.display().to_string(), job: job.into(), vm: vm.into() }
    }

    /// Refuses to touch a replica directory whose marker does not name this replica.
    pub(crate) fn check_replica_dir(&self, host: &dyn Host, replica: &standby_store::ReplicaRecord) -> Result<()> {
        replica_dir::check_owner(host, &replica.dir, &self.replica_owner(&replica.job, &replica.vm))
    }

    pub(crate) fn host(&self, name: &str) -> Result<Arc<dyn Host>> {
        if let Some(h) = self.hosts.get(name) {
            return Ok(h.clone());
        }
        if let Some(h) = self.remote.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(h.clone());
        }
        let record = self.store().hosts()?.into_iter().find(|h| h.name == name);
        let host: Arc<dyn Host> = match record {
            Some(standby_store::HostRecord { libvirt_uri: Some(uri), .. }) => {
                Arc::new(standby_host::LibvirtHost::new(name, &uri, &self.data_dir.join("hosts").join(name))?)
            }
            Some(standby_store::HostRecord { address: Some(address), .. }) => {
                Arc::new(standby_agent::RemoteHost::new(name, &address, self.controller_tls()?))
            }
            _ => return Err(EngineError::UnknownHost(name.to_owned())),
        };
        self.remote.lock().unwrap_or_else(|e| e.into_inner()).insert(name.into(), host.clone());
        Ok(host)
    }

    /// Finds out whether VMs on `host` can use KVM by booting a real guest under it.
    pub fn host_probe(&self, host: &str, kernel: &str, initrd: &str) -> Result<&'static str> {
        for (what, p) in [("kernel", kernel), ("initrd", initrd)] {
            if !std::path::Path::new(p).is_absolute() || !self.host(host)?.file_exists(p)? {
                return Err(EngineError::BadArgument {
                    arg: what,
                    why: format!("{what} {p} does not exist (give an absolute path)"),
                });
            }
        }
        Ok(self.host(host)?.probe_accel(kernel, initrd)?.as_str())
    }
}
