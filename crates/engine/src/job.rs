//! Replication jobs: which VMs go to which host and directory, how often, how many restore
//! points stay.

use std::time::Duration;

use serde::Serialize;
use standby_host::Host;
use standby_model::{parse_interval, VmName, DEFAULT_RETAIN};
use standby_store::NewJob;

use crate::replication::dr;
use crate::{Engine, EngineError, Result};

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub vms: Vec<String>,
    pub target_host: String,
    pub target_dir: String,
    pub retain: Option<u32>,
    pub every: Option<String>,
    /// Appended to a VM's name to name its replica VM in failover (default `_replica`).
    pub replica_suffix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub name: String,
    pub vms: Vec<String>,
    pub target_host: String,
    pub target_dir: String,
    pub retain: u32,
    /// Seconds between runs under `standby daemon`; null for on-demand only.
    pub every_secs: Option<u64>,
    pub replica_suffix: String,
    pub last_run_at: Option<String>,
    pub created_at: String,
}

impl Engine {
    pub fn job_create(&self, spec: &JobSpec) -> Result<JobView> {
        // Job names share the rules of VM names: they become file and lock names too.
        VmName::new(&spec.name)?;
        if self.store().job(&spec.name)?.is_some() {
            return Err(EngineError::JobExists(spec.name.clone()));
        }
        if spec.vms.is_empty() {
            return Err(EngineError::Invalid("a job needs at least one --vm".into()));
        }
        let retain = spec.retain.unwrap_or(DEFAULT_RETAIN);
        if retain == 0 {
            return Err(EngineError::Invalid("--retain must be at least 1".into()));
        }
        let suffix = spec.replica_suffix.clone().unwrap_or_else(|| "_replica".into());
        // The replica VM's name must itself be a valid VM name.
        VmName::new(&format!("x{suffix}")).map_err(|_| {
            EngineError::Invalid(format!("--replica-suffix {suffix:?} may only hold letters, digits, '-', '_' and '.'"))
        })?;
        if suffix.is_empty() {
            return Err(EngineError::Invalid(
                "--replica-suffix must not be empty: the replica VM needs a name of its own".into(),
            ));
        }
        let every = spec.every.as_deref().map(parse_interval).transpose()?.map(|d: Duration| d.as_secs());
        let host = self.host(&spec.target_host)?;
        let given = spec.target_dir.clone();
        let target_err =
            |reason: String| EngineError::TargetDir { host: spec.target_host.clone(), dir: given.clone(), reason };
        if !given.starts_with('/') {
            return Err(target_err("give an absolute path".into()));
        }
        let mut vm_ids = Vec::new();
        for vm_name in &spec.vms {
            let vm = self.store().vm(vm_name)?.ok_or_else(|| EngineError::UnknownVm(vm_name.clone()))?;
            if vm.role == "retired" {
                return Err(EngineError::Invalid(format!(
                    "VM {vm_name} is retired: a permanent failover replaced it; protect the VM that replaced it instead"
                )));
            }
            if vm.role == "replica" {
                return Err(EngineError::Invalid(format!(
                    "VM {vm_name} is a replica in failover; it can be protected after a permanent failover makes it an ordinary VM"
                )));
            }
            if vm_ids.contains(&vm.id) {
                return Err(EngineError::Invalid(format!("VM {vm_name} is named twice")));
            }
            vm_ids.push(vm.id);
        }
        // Once the VMs are known good, so that their refusals create nothing: prove the
        // target usable, then name it as the host resolves it. Two spellings of one
        // directory (a symlink, `//`, `..`, a trailing `/`) are one directory.
        host.ensure_dir(&given).map_err(|e| target_err(crate::vm::chain(&e)))?;
        let dir = host.canonical_dir(&given).map_err(|e| target_err(crate::vm::chain(&e)))?;
        let owned = self.store().replicas()?;
        let existing = self.store().jobs()?;
        let mut replicas = Vec::new();
        for (vm_name, &vm_id) in spec.vms.iter().zip(&vm_ids) {
            for other in &existing {
                if other.vms.contains(vm_name) && other.target_host == spec.target_host && other.target_dir == dir {
                    return Err(EngineError::AlreadyProtected {
                        vm: vm_name.clone(),
                        host: other.target_host.clone(),
                        dir: other.target_dir.clone(),
                        job: other.name.clone(),
                    });
                }
            }
            let rdir = format!("{dir}/{vm_name}");
            // Nested directories count too: one replica's cleanup lists its directory.
            let inside = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if let Some(o) = owned
                .iter()
                .find(|o| o.target_host == spec.target_host && (inside(&rdir, &o.dir) || inside(&o.dir, &rdir)))
            {
                return Err(EngineError::TargetDir {
                    host: spec.target_host.clone(),
                    dir: rdir,
                    reason: format!(
                        "replica {} of VM {} (job {}) keeps its restore points there; give this job another --target-dir",
                        o.dir, o.vm, o.job
                    ),
                });
            }
            replicas.push((vm_id, rdir));
        }
        for (_, rdir) in &replicas {
            if !host.list_dir(rdir)?.is_empty() {
                return Err(EngineError::TargetDir {
                    host: spec.target_host.clone(),
                    dir: rdir.clone(),
                    reason: "it already holds files; standby keeps each replica in a directory of its own".into(),
                });
            }
        }
        // Claim each directory before recording anything: the marker is created only if
        // absent, so of two jobs (or two standby installations) racing, one wins.
        let mut claimed = Vec::new();
        for (i, (_, rdir)) in replicas.iter().enumerate() {
            let owner = self.replica_owner(&spec.name, &spec.vms[i]);
            if let Err(e) = dr::claim(host.as_ref(), rdir, &owner) {
                release(host.as_ref(), &claimed);
                return Err(e);
            }
            claimed.push(rdir.clone());
        }
        let inserted = self.store().insert_job(
            &NewJob {
                name: spec.name.clone(),
                target_host: spec.target_host.clone(),
                target_dir: dir,
                retain,
                every_secs: every,
                replica_suffix: suffix,
            },
            &replicas,
        );
        if let Err(e) = inserted {
            release(host.as_ref(), &claimed);
            return Err(e.into());
        }
        self.job_show(&spec.name)
    }

    pub fn job_show(&self, name: &str) -> Result<JobView> {
        let j = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        Ok(view(j))
    }

    pub fn job_list(&self) -> Result<Vec<JobView>> {
        Ok(self.store().jobs()?.into_iter().map(view).collect())
    }
}

/// Undoes the claims of a job creation that failed: the markers it wrote go.
fn release(host: &dyn Host, dirs: &[String]) {
    for d in dirs {
        let _ = host.remove_file(&format!("{d}/{}", dr::OWNER_MARKER));
    }
}

fn view(j: standby_store::JobRecord) -> JobView {
    JobView {
        name: j.name,
        vms: j.vms,
        target_host: j.target_host,
        target_dir: j.target_dir,
        retain: j.retain,
        every_secs: j.every_secs,
        replica_suffix: j.replica_suffix,
        last_run_at: j.last_run_at,
        created_at: j.created_at,
    }
}
