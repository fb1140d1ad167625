//! Replication jobs: which VMs go to which host and directory, how often, how many restore
//! points stay.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use standby_host::Host;
use standby_model::wire::{parse_bandwidth, Wire};
use standby_model::{parse_interval, Quiesce, ReplicaState, Role, VmName, DEFAULT_RETAIN};

use crate::quiesce::{quiesce_of, show_quiesce, FreezeSpec};
use standby_store::{NewJob, ReplicaRecord};

use crate::lock::VmLock;
use crate::replica_dir;
use crate::{Engine, EngineError, Result};

/// What `standby job change` asks for; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct JobChange {
    pub retain: Option<u32>,
    /// `Some(None)`: run on demand only.
    pub every: Option<Option<String>>,
    pub add_vms: Vec<String>,
    pub remove_vms: Vec<String>,
    pub compression: Option<String>,
    /// `Some(None)`: no limit.
    pub bandwidth: Option<Option<String>>,
    pub retry_window: Option<String>,
    pub freeze: FreezeSpec,
}

/// `--network-map SRC=DST`, each source named once.
fn parse_network_map(given: &[String]) -> Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for m in given {
        let bad =
            |why: &str| EngineError::BadArgument { arg: "--network-map", why: format!("--network-map {m:?}: {why}") };
        let (src, dst) = m.split_once('=').ok_or_else(|| bad("write SRC=DST (a network, or bridge:NAME)"))?;
        let ok = |n: &str| {
            let n = n.strip_prefix("bridge:").or_else(|| n.strip_prefix("tap:")).unwrap_or(n);
            !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if !ok(src) || !ok(dst) {
            return Err(bad(
                "names hold letters, digits, '-', '_' and '.', a bridge written bridge:NAME and a tap tap:NAME",
            ));
        }
        if map.insert(src.to_owned(), dst.to_owned()).is_some() {
            return Err(bad("that source is mapped twice"));
        }
    }
    Ok(map)
}

/// How a job's data travels, from what an operator gave: the compression's name and a
/// bandwidth (`100M`, `800Mbit`).
fn wire_of(compression: Option<&str>, bandwidth: Option<&str>, retry: Option<&str>, base: Wire) -> Result<Wire> {
    let compression = match compression {
        None => base.compression,
        Some(c) => c
            .parse()
            .map_err(|e| EngineError::BadArgument { arg: "--compression", why: format!("--compression {e}") })?,
    };
    let bandwidth = match bandwidth {
        None => base.bandwidth,
        Some(b) => Some(
            parse_bandwidth(b)
                .map_err(|e| EngineError::BadArgument { arg: "--bandwidth", why: format!("--bandwidth {e}") })?,
        ),
    };
    let retry_window_secs = match retry {
        None => base.retry_window_secs,
        // `0` is a window too: fail at the first drop.
        Some("0") => 0,
        Some(r) => parse_interval(r)
            .map_err(|e| EngineError::BadArgument { arg: "--retry-window", why: format!("--retry-window {e}") })?
            .as_secs(),
    };
    Ok(Wire { compression, bandwidth, retry_window_secs })
}

/// A bandwidth as `job show` prints it.
pub(crate) fn show_bandwidth(b: Option<u64>) -> String {
    b.map_or_else(|| "no limit".to_owned(), |b| format!("{}/s", crate::transfer::human(b)))
}

/// A replica removal, decided and checked before anything changes.
#[derive(Debug)]
struct Removal {
    r: ReplicaRecord,
    restore_points: usize,
    /// The layer files go (deleting, or nothing to keep).
    delete_files: bool,
    /// The directory's marker names this replica: the marker (and an empty directory) go.
    owned: bool,
}

/// Replica directories placed and claimed: (VM id, directory) each, and the claims made.
type Placed = (Vec<(i64, String)>, Vec<String>);

/// What becomes of a removed replica's restore point files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Points {
    /// Deleted from the DR host.
    Delete,
    /// Left on the DR host, no longer managed.
    Keep,
}

fn disposal_word(p: Option<Points>) -> &'static str {
    match p {
        Some(Points::Delete) => "deleted",
        Some(Points::Keep) => "kept on the DR host",
        None => "(none held)",
    }
}

/// What a removed replica left.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaDeleted {
    pub vm: String,
    pub job: String,
    pub dir: String,
    pub restore_points: usize,
    pub deleted_files: Vec<String>,
    /// The restore point files stay in `dir`, no longer managed by standby.
    pub kept: bool,
}

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
    /// `none`, `lz4` or `zstd` (the default) between hosts.
    pub compression: Option<String>,
    /// At most this on the wire between hosts: `100M` (bytes/s) or `800Mbit`.
    pub bandwidth: Option<String>,
    /// How long a dropped link between hosts may stay down before a run fails (`5m`).
    pub retry_window: Option<String>,
    /// `SRC=DST`: the network (or `bridge:NAME`) a replica's NIC goes on at failover, for
    /// each one its source's NICs are on.
    pub network_map: Vec<String>,
    pub freeze: FreezeSpec,
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
    /// How its blocks are compressed between hosts.
    pub compression: String,
    /// Bytes per second on the wire between hosts at most; null for no limit.
    pub bandwidth: Option<u64>,
    /// How long a dropped link between hosts may stay down before a run fails.
    pub retry_window_secs: u64,
    /// Source network (or `bridge:NAME`) to the one a replica's NIC goes on.
    pub network_map: std::collections::BTreeMap<String, String>,
    /// How a running guest is frozen around each run's instant.
    pub quiesce: Quiesce,
    pub last_run_at: Option<String>,
    pub created_at: String,
    /// A disabled job does not run (`standby job enable` turns it back on).
    pub enabled: bool,
}

impl Engine {
    pub fn job_create(&self, spec: &JobSpec) -> Result<JobView> {
        // Job names share the rules of VM names: they become file and lock names too.
        VmName::new(&spec.name)?;
        if self.store().job(&spec.name)?.is_some() {
            return Err(EngineError::JobExists(spec.name.clone()));
        }
        if spec.vms.is_empty() {
            return Err(EngineError::BadArgument { arg: "--vm", why: "a job needs at least one --vm".into() });
        }
        let retain = spec.retain.unwrap_or(DEFAULT_RETAIN);
        if retain == 0 {
            return Err(EngineError::BadArgument { arg: "--retain", why: "--retain must be at least 1".into() });
        }
        let suffix = spec.replica_suffix.clone().unwrap_or_else(|| "_replica".into());
        // The replica VM's name must itself be a valid VM name.
        VmName::new(&format!("x{suffix}")).map_err(|_| EngineError::BadArgument {
            arg: "--replica-suffix",
            why: format!("--replica-suffix {suffix:?} may only hold letters, digits, '-', '_' and '.'"),
        })?;
        if suffix.is_empty() {
            return Err(EngineError::BadArgument {
                arg: "--replica-suffix",
                why: "--replica-suffix must not be empty: the replica VM needs a name of its own".into(),
            });
        }
        let every = spec.every.as_deref().map(parse_interval).transpose()?.map(|d: Duration| d.as_secs());
        let wire = wire_of(
            spec.compression.as_deref(),
            spec.bandwidth.as_deref(),
            spec.retry_window.as_deref(),
            Wire::default(),
        )?;
        let quiesce = quiesce_of(&spec.freeze, &Quiesce::default())?;
        let host = self.host(&spec.target_host)?;
        let given = spec.target_dir.clone();
        let target_err =
            |reason: String| EngineError::TargetDir { host: spec.target_host.clone(), dir: given.clone(), reason };
        if !given.starts_with('/') {
            return Err(target_err("give an absolute path".into()));
        }
        let vm_ids = self.vms_to_protect(&spec.vms, &[])?;
        let network_map = parse_network_map(&spec.network_map)?;
        self.check_replicable(host.as_ref(), &spec.vms, &network_map)?;
        // Once the VMs are known good, so that their refusals create nothing: prove the
        // target usable, then name it as the host resolves it. Two spellings of one
        // directory (a symlink, `//`, `..`, a trailing `/`) are one directory.
        host.ensure_dir(&given).map_err(|e| target_err(crate::chain(&e)))?;
        let dir = host.canonical_dir(&given).map_err(|e| target_err(crate::chain(&e)))?;
        let (replicas, claimed) =
            self.place_replicas(host.as_ref(), &spec.target_host, &dir, &spec.name, &spec.vms, &vm_ids)?;
        let inserted = self.store().insert_job(
            &NewJob {
                name: spec.name.clone(),
                target_host: spec.target_host.clone(),
                target_dir: dir.clone(),
                retain,
                every_secs: every,
                replica_suffix: suffix,
                wire,
                network_map,
                quiesce,
            },
            &replicas,
        );
        if let Err(e) = inserted {
            release(host.as_ref(), &claimed);
            return Err(e.into());
        }
        self.record_raw(
            &format!("job:{}", spec.name),
            "job create",
            "ok",
            &format!("VMs {} to {}:{dir}", spec.vms.join(" "), spec.target_host),
        );
        self.job_show(&spec.name)
    }

    /// Checks VMs an operator asks a job to protect; their ids, in order.
    fn vms_to_protect(&self, vms: &[String], in_job: &[String]) -> Result<Vec<i64>> {
        let mut vm_ids = Vec::new();
        for vm_name in vms {
            let vm = self.store().vm(vm_name)?.ok_or_else(|| EngineError::UnknownVm(vm_name.clone()))?;
            if vm.role == Role::Retired {
                return Err(EngineError::Refused {
                    vm: vm_name.clone(),
                    why: format!(
                    "VM {vm_name} is retired: a permanent failover replaced it; protect the VM that replaced it instead"
                ),
                });
            }
            if vm.role == Role::Replica {
                return Err(EngineError::Refused { vm: vm_name.clone(), why: format!(
                    "VM {vm_name} is a replica in failover; it can be protected after a permanent failover makes it an ordinary VM"
                ) });
            }
            if vm_ids.contains(&vm.id) {
                return Err(EngineError::BadArgument { arg: "--vm", why: format!("VM {vm_name} is named twice") });
            }
            if in_job.contains(vm_name) {
                return Err(EngineError::Refused {
                    vm: vm_name.clone(),
                    why: format!("VM {vm_name} is in the job already"),
                });
            }
            vm_ids.push(vm.id);
        }
        Ok(vm_ids)
    }

    /// Refuses, before anything is created, a VM whose replica the target host could not
    /// start (a libvirt domain needs a libvirt DR host), or one with a NIC on a network the
    /// job's map does not name: found now, not at failover.
    fn check_replicable(&self, target: &dyn Host, vms: &[String], map: &BTreeMap<String, String>) -> Result<()> {
        // A tap takes one NIC: a map that puts two on one would fail at the failover.
        let mut taps = BTreeMap::new();
        for name in vms {
            let vm = self.store().vm(name)?.ok_or_else(|| EngineError::UnknownVm(name.clone()))?;
            target.can_run(&vm.config).map_err(|e| EngineError::Refused {
                vm: name.clone(),
                why: format!("its replica could not run on host {}: {}", target.name(), crate::chain(&e)),
            })?;
            for net in self.host(&vm.host)?.config_networks(&vm.config)? {
                let Some(dest) = map.get(&net) else {
                    return Err(EngineError::BadArgument {
                        arg: "--network-map",
                        why: format!(
                            "VM {name} has a NIC on {net}, which the network map does not name; add \
                             --network-map {net}=DEST (a libvirt network on host {}, bridge:NAME or tap:NAME)",
                            target.name()
                        ),
                    });
                };
                // Where it goes must be there: found now, not at the failover.
                target.check_network(dest).map_err(|e| EngineError::BadArgument {
                    arg: "--network-map",
                    why: format!("--network-map {net}={dest} for VM {name}: {}", crate::chain(&e)),
                })?;
                if dest.starts_with("tap:") {
                    if let Some(first) = taps.insert(dest.clone(), name.clone()) {
                        return Err(EngineError::BadArgument {
                            arg: "--network-map",
                            why: format!(
                                "--network-map puts a NIC of VM {first} and one of VM {name} on {dest}, and a tap \
                                 takes one NIC; map them to a bridge, or to a tap each"
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Gives each VM its replica directory under `dir` and claims it. On error nothing
    /// stays claimed; on success the caller releases the claims if it cannot record them.
    fn place_replicas(
        &self,
        host: &dyn Host,
        target_host: &str,
        dir: &str,
        job: &str,
        vms: &[String],
        vm_ids: &[i64],
    ) -> Result<Placed> {
        let owned = self.store().replicas()?;
        let existing = self.store().jobs()?;
        let mut replicas = Vec::new();
        for (vm_name, &vm_id) in vms.iter().zip(vm_ids) {
            for other in &existing {
                if other.vms.contains(vm_name) && other.target_host == target_host && other.target_dir == dir {
                    return Err(EngineError::AlreadyProtected {
                        vm: vm_name.clone(),
                        host: other.target_host.clone(),
                        dir: other.target_dir.clone(),
                        job: other.name.clone(),
                    });
                }
            }
            let rdir = format!("{dir}/{vm_name}");
            // swtpm reads where a replica's TPM keeps its state from an option string.
            let own_tpm = |v: &standby_store::VmRecord| v.config.driver.tpm.as_ref().is_some_and(|t| t.state.is_some());
            if rdir.contains(',') && self.store().vm(vm_name)?.is_some_and(|v| own_tpm(&v)) {
                return Err(EngineError::TargetDir {
                    host: target_host.into(),
                    dir: dir.into(),
                    reason: format!(
                        "VM {vm_name} has a TPM, and swtpm cannot keep its replica's state in a path with a comma; \
                         choose a directory without one"
                    ),
                });
            }
            // Nested directories count too: one replica's cleanup lists its directory.
            let inside = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if let Some(o) =
                owned.iter().find(|o| o.target_host == target_host && (inside(&rdir, &o.dir) || inside(&o.dir, &rdir)))
            {
                return Err(EngineError::TargetDir {
                    host: target_host.into(),
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
                    host: target_host.into(),
                    dir: rdir.clone(),
                    reason: "it already holds files; standby keeps each replica in a directory of its own".into(),
                });
            }
        }
        // Claim each directory before recording anything: the marker is created only if
        // absent, so of two jobs (or two standby installations) racing, one wins.
        let mut claimed = Vec::new();
        for (i, (_, rdir)) in replicas.iter().enumerate() {
            let owner = self.replica_owner(job, &vms[i]);
            if let Err(e) = replica_dir::claim(host, rdir, &owner) {
                release(host, &claimed);
                return Err(e);
            }
            claimed.push(rdir.clone());
        }
        Ok((replicas, claimed))
    }

    /// Changes a job: what it keeps, when it runs, which VMs it protects. A lower
    /// `retain` prunes at the job's next run. A VM leaves only while its replica holds no
    /// restore points (`standby replica delete` removes them, or forgets them).
    pub fn job_change(&self, name: &str, change: &JobChange) -> Result<JobView> {
        let job = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        let retain = change.retain.unwrap_or(job.retain);
        if retain == 0 {
            return Err(EngineError::BadArgument { arg: "--retain", why: "--retain must be at least 1".into() });
        }
        let every = match &change.every {
            None => job.every_secs,
            Some(None) => None,
            Some(Some(e)) => Some(parse_interval(e)?.as_secs()),
        };
        let bandwidth = match &change.bandwidth {
            Some(None) => Some(None),
            Some(Some(b)) => Some(Some(b.as_str())),
            None => None,
        };
        let mut wire =
            wire_of(change.compression.as_deref(), bandwidth.flatten(), change.retry_window.as_deref(), job.wire)?;
        if bandwidth == Some(None) {
            wire.bandwidth = None;
        }
        let quiesce = quiesce_of(&change.freeze, &job.quiesce)?;
        let mut changes = Vec::new();
        if quiesce != job.quiesce {
            changes.push(format!("{} -> {}", show_quiesce(&job.quiesce), show_quiesce(&quiesce)));
        }
        if wire.compression != job.wire.compression {
            changes.push(format!("compression {} -> {}", job.wire.compression, wire.compression));
        }
        if wire.retry_window_secs != job.wire.retry_window_secs {
            changes.push(format!("retry window {} s -> {} s", job.wire.retry_window_secs, wire.retry_window_secs));
        }
        if wire.bandwidth != job.wire.bandwidth {
            changes.push(format!(
                "bandwidth {} -> {}",
                show_bandwidth(job.wire.bandwidth),
                show_bandwidth(wire.bandwidth)
            ));
        }
        if retain != job.retain {
            changes.push(format!("retain {} -> {retain}", job.retain));
        }
        if every != job.every_secs {
            let show = |e: Option<u64>| e.map_or_else(|| "on demand".to_owned(), |s| format!("every {s} s"));
            changes.push(format!("{} -> {}", show(job.every_secs), show(every)));
        }
        // Leaving VMs: each under its lock, held until the change is recorded.
        let mut leaving = Vec::new();
        let mut locks = Vec::new();
        for vm in &change.remove_vms {
            if !job.vms.contains(vm) {
                return Err(EngineError::Refused {
                    vm: vm.clone(),
                    why: format!("VM {vm} is not in job {name} (standby job list)"),
                });
            }
            locks.push(VmLock::acquire(&self.data_dir, vm, "job change")?);
            let r = self.replica_of(vm, Some(name))?;
            // What is in progress first: that is what the operator must deal with first.
            self.check_removable(&r)?;
            let points = self.store().restore_points(r.id, true)?;
            if !points.is_empty() {
                return Err(EngineError::Refused {
                    vm: vm.clone(),
                    why: format!(
                        "the replica of VM {vm} holds {} restore point(s) in {}; remove it with \
                     standby replica delete {vm} --job {name} --delete-points (or --keep-files to keep them on disk)",
                        points.len(),
                        r.dir
                    ),
                });
            }
            leaving.push(self.plan_removal(&r, None, "")?);
        }
        if !leaving.is_empty() && leaving.len() == job.vms.len() && change.add_vms.is_empty() {
            return Err(EngineError::JobRefused {
                job: name.into(),
                why: format!("job {name} would protect no VM; delete it instead (standby job delete {name})"),
            });
        }
        let joining_ids = self.vms_to_protect(&change.add_vms, &job.vms)?;
        let host = self.host(&job.target_host)?;
        self.check_replicable(host.as_ref(), &change.add_vms, &job.network_map)?;
        let (joining, claimed) =
            self.place_replicas(host.as_ref(), &job.target_host, &job.target_dir, name, &change.add_vms, &joining_ids)?;
        if changes.is_empty() && joining.is_empty() && leaving.is_empty() {
            return Err(EngineError::NothingToChange {
                subject: format!("job {name}"),
                hint: format!(
                    "give --retain, --every, --no-schedule, --compression, --bandwidth, --add-vm, --remove-vm or a \
                     freeze option with a value other than job {name}'s current one (standby job list)"
                ),
            });
        }
        let recorded = (|| -> Result<()> {
            self.store().update_job(job.id, retain, every, job.enabled, wire, &quiesce)?;
            for (vm_id, dir) in &joining {
                self.store().insert_replica(job.id, *vm_id, dir)?;
            }
            Ok(())
        })();
        if let Err(e) = recorded {
            release(host.as_ref(), &claimed);
            return Err(e);
        }
        for vm in &change.add_vms {
            changes.push(format!("VM {vm} added"));
            self.record_raw(vm, "job change", "ok", &format!("now protected by job {name}"));
        }
        for m in &leaving {
            self.forget_source_bitmaps_of(m)?;
        }
        for m in leaving {
            let vm = m.r.vm.clone();
            self.remove_replica(m)?;
            changes.push(format!("VM {vm} removed"));
        }
        self.record_raw(&format!("job:{name}"), "job change", "ok", &changes.join(", "));
        drop(locks);
        self.job_show(name)
    }

    /// How the data of job `name` travels between hosts.
    pub(crate) fn job_wire(&self, name: &str) -> Result<Wire> {
        Ok(self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?.wire)
    }

    /// Enables or disables a job. A disabled job keeps its replicas and restore points;
    /// `standby daemon` skips it and `standby job run` refuses it.
    pub fn job_set_enabled(&self, name: &str, enabled: bool) -> Result<JobView> {
        let job = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        let word = if enabled { "enabled" } else { "disabled" };
        if job.enabled == enabled {
            return Err(EngineError::JobRefused { job: name.into(), why: format!("job {name} is {word} already") });
        }
        self.store().update_job(job.id, job.retain, job.every_secs, enabled, job.wire, &job.quiesce)?;
        self.record_raw(&format!("job:{name}"), if enabled { "job enable" } else { "job disable" }, "ok", word);
        self.job_show(name)
    }

    /// Deletes a job with all its replicas. Replicas holding restore points need a
    /// decision: `Delete` their files, or `Keep` them on the DR host, forgotten.
    pub fn job_delete(&self, name: &str, points: Option<Points>) -> Result<Vec<ReplicaDeleted>> {
        let job = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        let replicas = self.store().replicas_of_job(job.id)?;
        // Check every replica, as it stands under its lock, before changing anything: a
        // refusal deletes nothing. Then the bitmaps (harmless to lose: a run compares by
        // digest), then records and files.
        let mut locks = Vec::new();
        let mut removals = Vec::new();
        for r in &replicas {
            locks.push(VmLock::acquire(&self.data_dir, &r.vm, "job delete")?);
            let r = self.store().replica(r.id)?.ok_or_else(|| EngineError::NoReplica { vm: r.vm.clone() })?;
            removals.push(self.plan_removal(&r, points, &format!("standby job delete {name}"))?);
        }
        for m in &removals {
            self.forget_source_bitmaps_of(m)?;
        }
        let mut done = Vec::new();
        for m in removals {
            done.push(self.remove_replica(m)?);
        }
        self.store().delete_job(job.id)?;
        self.record_raw(
            &format!("job:{name}"),
            "job delete",
            "ok",
            &format!("{} replica(s) removed, restore points {}", done.len(), disposal_word(points)),
        );
        drop(locks);
        Ok(done)
    }

    /// Removes one VM's replica from its job: its records always, its restore point files
    /// only with `Points::Delete`. Refused while a failover or failback is in progress.
    pub fn replica_delete(&self, vm: &str, job: Option<&str>, points: Option<Points>) -> Result<ReplicaDeleted> {
        let r = self.replica_of(vm, job)?;
        let _lock = VmLock::acquire(&self.data_dir, vm, "replica delete")?;
        let r = self.store().replica(r.id)?.ok_or_else(|| EngineError::NoReplica { vm: vm.into() })?;
        let m = self.plan_removal(&r, points, &format!("standby replica delete {vm} --job {}", r.job))?;
        self.forget_source_bitmaps_of(&m)?;
        let job = m.r.job.clone();
        let done = self.remove_replica(m)?;
        let left = self.store().job(&job)?.map(|j| j.vms.len());
        if left == Some(0) {
            self.record_raw(&format!("job:{job}"), "replica delete", "warning", "the job protects no VM now");
        }
        Ok(done)
    }

    /// What would break if this replica went: an operation in progress, a replica VM, a
    /// plan that fails its VM over with it.
    fn check_removable(&self, r: &ReplicaRecord) -> Result<()> {
        let refuse = |why: String| {
            Err(EngineError::Refused {
                vm: r.vm.clone(),
                why: format!("the replica of VM {} (job {}) cannot be removed: {why}", r.vm, r.job),
            })
        };
        let state = r.state;
        match state {
            ReplicaState::Ready if r.step.is_none() => {}
            ReplicaState::Permanent => {}
            ReplicaState::Failover => {
                return refuse(format!(
                    "it is in failover; end the failover first (standby failover undo {}, or standby failover \
                     permanent {})",
                    r.vm, r.vm
                ))
            }
            ReplicaState::ReadyToSwitch | ReplicaState::Failback => {
                return refuse(format!(
                    "a failback is in progress ({state}); finish it first (standby failback commit {}, or standby \
                     failback undo {})",
                    r.vm, r.vm
                ))
            }
            _ => {
                return refuse(format!(
                    "an operation is in progress or was interrupted ({state}); let it finish, or run any standby \
                     command to recover it, and see standby history {}",
                    r.vm
                ))
            }
        }
        if let Some(v) = self.store().replica_vm(r.id)? {
            return refuse(format!("its replica VM {} is defined; end the failover first", v.name));
        }
        let others = self.store().replicas_of_vm(&r.vm)?;
        let has_other = others.iter().any(|o| o.id != r.id && o.state != ReplicaState::Permanent);
        if !has_other && r.state != ReplicaState::Permanent {
            let plans = self.store().plans()?;
            if let Some(p) = plans.iter().find(|p| p.vms.iter().any(|v| v.vm == r.vm)) {
                return refuse(format!(
                    "plan {} fails VM {} over with it; take the VM out of the plan first (standby plan change {} \
                     --vm ...), or delete the plan",
                    p.name, r.vm, p.name
                ));
            }
        }
        Ok(())
    }

    /// A replica holding restore points (or files) goes only with a decision about them.
    fn check_disposal(&self, r: &ReplicaRecord, points: Option<Points>, command: &str) -> Result<()> {
        let n = self.store().restore_points(r.id, true)?.len();
        if n > 0 && points.is_none() {
            return Err(EngineError::Refused {
                vm: r.vm.clone(),
                why: format!(
                    "the replica of VM {} (job {}) holds {n} restore point(s) in {}; say what becomes of them: \
                 {command} --delete-points (deletes the files), or --keep-files (keeps them on the DR host, \
                 no longer managed by standby)",
                    r.vm, r.job, r.dir
                ),
            });
        }
        Ok(())
    }

    /// Decides and checks one replica's removal (the caller holds its VM's lock and read
    /// it under the lock); changes nothing.
    fn plan_removal(&self, r: &ReplicaRecord, points: Option<Points>, command: &str) -> Result<Removal> {
        self.check_removable(r)?;
        self.check_disposal(r, points, command)?;
        let restore_points = self.store().restore_points(r.id, true)?.len();
        let live = r.state != ReplicaState::Permanent;
        // A replica without restore points has nothing to keep: its directory goes.
        let delete_files = live && (points == Some(Points::Delete) || (restore_points == 0 && points.is_none()));
        let dr_host = self.host(&r.target_host)?;
        let owned = live && self.check_replica_dir(dr_host.as_ref(), r).is_ok();
        if delete_files && !owned {
            // A directory that is not provably ours keeps its files; say why.
            self.check_replica_dir(dr_host.as_ref(), r)?;
        }
        Ok(Removal { r: r.clone(), restore_points, delete_files, owned })
    }

    fn forget_source_bitmaps_of(&self, m: &Removal) -> Result<()> {
        if m.r.state == ReplicaState::Permanent {
            return Ok(());
        }
        let vm = self.store().vm(&m.r.vm)?.ok_or_else(|| EngineError::UnknownVm(m.r.vm.clone()))?;
        self.forget_source_bitmaps(&m.r, &vm)
    }

    /// Carries out a checked removal: the records, then the files this replica's
    /// sequence numbers name (when deleting), then its marker (only if provably its own).
    fn remove_replica(&self, m: Removal) -> Result<ReplicaDeleted> {
        let r = &m.r;
        let dr_host = self.host(&r.target_host)?;
        let mut out = ReplicaDeleted {
            vm: r.vm.clone(),
            job: r.job.clone(),
            dir: r.dir.clone(),
            restore_points: m.restore_points,
            deleted_files: Vec::new(),
            kept: false,
        };
        self.store().delete_replica(r.id)?;
        if r.state == ReplicaState::Permanent {
            // Only the record of a permanent failover: its files went with it.
            return Ok(out);
        }
        if m.delete_files {
            out.deleted_files = replica_dir::remove_orphans(dr_host.as_ref(), &r.dir, &[], r.next_seq)?;
        }
        if m.owned {
            self.release_replica_dir(dr_host.as_ref(), r)?;
        }
        out.kept = !m.delete_files && m.restore_points > 0;
        let what = if m.delete_files {
            "deleted"
        } else if out.kept {
            "kept, no longer managed,"
        } else {
            "were"
        };
        self.record_raw(
            &r.vm,
            "replica delete",
            "ok",
            &format!("replica of job {} removed; {} restore point(s) {what} in {}", r.job, m.restore_points, r.dir),
        );
        Ok(out)
    }

    /// A replica directory standby gave up (proven its own): its marker goes, then the
    /// directory if empty.
    fn release_replica_dir(&self, host: &dyn Host, r: &ReplicaRecord) -> Result<()> {
        host.remove_file(&format!("{}/{}", r.dir, crate::layout::OWNER_MARKER))?;
        host.remove_empty_dir(&r.dir)?;
        Ok(())
    }

    pub fn job_show(&self, name: &str) -> Result<JobView> {
        let j = self.store().job(name)?.ok_or_else(|| EngineError::UnknownJob(name.into()))?;
        Ok(view(j))
    }

    pub fn job_list(&self) -> Result<Vec<JobView>> {
        Ok(self.store().jobs()?.into_iter().map(view).collect())
    }

    /// Every job, each on its own: a row that cannot be read is an error naming it, and
    /// the others are listed (the daemon schedules them).
    pub fn job_rows(&self) -> Result<Vec<std::result::Result<JobView, String>>> {
        let rows = self.store().job_rows()?;
        Ok(rows
            .into_iter()
            .map(|(id, row)| row.map(view).map_err(|e| format!("jobs row {id} cannot be read ({})", crate::chain(&e))))
            .collect())
    }
}

/// Undoes the claims of a job creation that failed: the markers it wrote go, and the
/// directories the claims made, if nothing else came into them.
fn release(host: &dyn Host, dirs: &[String]) {
    for d in dirs {
        let _ = host.remove_file(&format!("{d}/{}", crate::layout::OWNER_MARKER));
        let _ = host.remove_empty_dir(d);
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
        compression: j.wire.compression.to_string(),
        bandwidth: j.wire.bandwidth,
        retry_window_secs: j.wire.retry_window_secs,
        network_map: j.network_map,
        quiesce: j.quiesce,
        last_run_at: j.last_run_at,
        created_at: j.created_at,
        enabled: j.enabled,
    }
}
