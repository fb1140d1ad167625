//! The state database. One SQLite file in the data directory, opened in WAL mode with a
//! busy timeout so that concurrent standby commands wait for each other instead of failing
//! or corrupting anything. Every write that must be atomic is one transaction here.

mod fences;
mod history;
mod hosts;
mod migrations;
mod plans;
mod points;
mod records;
mod state;
mod tasks;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use standby_model::image::Format;
use standby_model::wire::Wire;
use standby_model::{
    Consistency, DriverConfig, Method, PointId, Quiesce, ReplicaId, ReplicaState, Role, Seq, Step, Transition, VmConfig,
};

pub use fences::FenceRecord;
pub use history::{HISTORY_KEEP, HISTORY_SLACK};
pub use records::*;
pub use state::FailoverPoint;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Transition(#[from] standby_model::TransitionError),
    #[error(
        "the replica of VM {vm} is {found} now, no longer {expected}: another standby command changed it meanwhile; \
         look again (standby replica list)"
    )]
    StateMoved { vm: String, expected: ReplicaState, found: String },
    #[error("state database error")]
    Sql(#[from] rusqlite::Error),
    #[error("the state database has schema version {found}, newer than this standby knows ({known}); upgrade standby")]
    TooNew { found: u32, known: u32 },
    #[error("{0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

/// The time format every timestamp column uses (RFC 3339, UTC, seconds).
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn insert_disks(tx: &Transaction<'_>, vm_id: i64, disks: &[DiskRecord]) -> Result<()> {
    for (i, d) in disks.iter().enumerate() {
        tx.execute(
            "INSERT INTO vm_disks (vm_id, idx, path, format) VALUES (?1, ?2, ?3, ?4)",
            params![vm_id, i as i64, d.path, d.format.as_str()],
        )?;
    }
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<()> {
        let known = migrations::MIGRATIONS.len() as u32;
        // IMMEDIATE takes the write lock first, so two commands that start together run
        // the migrations once.
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > known {
            return Err(StoreError::TooNew { found: version, known });
        }
        for sql in &migrations::MIGRATIONS[version as usize..] {
            tx.execute_batch(sql)?;
        }
        tx.pragma_update(None, "user_version", known)?;
        tx.commit()?;
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u32> {
        Ok(self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    fn tx(&mut self) -> Result<Transaction<'_>> {
        Ok(self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?)
    }

    // ---- VMs ----

    pub fn insert_vm(&mut self, vm: &NewVm) -> Result<i64> {
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO vms (name, host, cpus, memory_mib, nics, kernel, initrd, append, created_at, role, replica_id,
                              domain_xml, network_map, machine, cpu_model, firmware, tpm)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                vm.name,
                vm.host,
                vm.config.cpus,
                vm.config.memory_mib,
                serde_json::to_string(&vm.config.driver.nics).unwrap_or_default(),
                vm.config.driver.kernel,
                vm.config.driver.initrd,
                vm.config.driver.append,
                now(),
                vm.role.as_str(),
                vm.replica_id,
                vm.config.driver.domain_xml,
                serde_json::to_string(&vm.config.driver.network_map).unwrap_or_default(),
                vm.config.driver.machine,
                vm.config.driver.cpu_model,
                json_cell(&vm.config.driver.firmware),
                json_cell(&vm.config.driver.tpm)
            ],
        )?;
        let id = tx.last_insert_rowid();
        insert_disks(&tx, id, &vm.disks)?;
        tx.commit()?;
        Ok(id)
    }

    fn vm_from_row(&self, r: &rusqlite::Row<'_>) -> rusqlite::Result<VmRecord> {
        let id: i64 = r.get(0)?;
        let nics: String = r.get(5)?;
        let role: String = r.get(10)?;
        let map: String = r.get(13)?;
        Ok(VmRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            host: r.get(2)?,
            config: VmConfig {
                cpus: r.get(3)?,
                memory_mib: r.get(4)?,
                driver: DriverConfig {
                    nics: serde_json::from_str(&nics)
                        .map_err(|e| bad_cell("vms", id, 5, format!("nics {nics:?}: {e}")))?,
                    kernel: r.get(6)?,
                    initrd: r.get(7)?,
                    append: r.get(8)?,
                    domain_xml: r.get(12)?,
                    network_map: serde_json::from_str(&map)
                        .map_err(|e| bad_cell("vms", id, 13, format!("network_map {map:?}: {e}")))?,
                    machine: r.get(14)?,
                    cpu_model: r.get(15)?,
                    firmware: from_json_cell(r, id, 16, "firmware")?,
                    tpm: from_json_cell(r, id, 17, "tpm")?,
                },
            },
            created_at: r.get(9)?,
            role: role.parse().map_err(|e| bad_cell("vms", id, 10, e))?,
            replica_id: r.get(11)?,
            disks: Vec::new(),
        })
    }

    fn vm_disks(&self, vm_id: i64) -> Result<Vec<DiskRecord>> {
        let mut st = self.conn.prepare("SELECT path, format FROM vm_disks WHERE vm_id = ?1 ORDER BY idx")?;
        let rows = st
            .query_map([vm_id], |r| {
                let format: String = r.get(1)?;
                let format = Format::parse(&format)
                    .ok_or_else(|| bad_cell("vm_disks", vm_id, 1, format!("unknown image format {format:?}")))?;
                Ok(DiskRecord { path: r.get(0)?, format })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    const VM_COLS: &'static str =
        "id, name, host, cpus, memory_mib, nics, kernel, initrd, append, created_at, role, replica_id, domain_xml, network_map, \
         machine, cpu_model, firmware, tpm";

    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>> {
        let sql = format!("SELECT {} FROM vms WHERE name = ?1", Self::VM_COLS);
        let vm = self.conn.query_row(&sql, [name], |r| self.vm_from_row(r)).optional()?;
        match vm {
            Some(mut vm) => {
                vm.disks = self.vm_disks(vm.id)?;
                Ok(Some(vm))
            }
            None => Ok(None),
        }
    }

    pub fn vms(&self) -> Result<Vec<VmRecord>> {
        let sql = format!("SELECT {} FROM vms ORDER BY name", Self::VM_COLS);
        let mut st = self.conn.prepare(&sql)?;
        let mut vms: Vec<VmRecord> = st.query_map([], |r| self.vm_from_row(r))?.collect::<rusqlite::Result<_>>()?;
        for vm in &mut vms {
            vm.disks = self.vm_disks(vm.id)?;
        }
        Ok(vms)
    }

    pub fn delete_vm(&mut self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM vms WHERE name = ?1", [name])?;
        Ok(())
    }

    /// Removes an operator's VM definition, with the records of permanent failovers that
    /// name it (a retired VM's), in one transaction. Its disks are not touched.
    pub fn remove_vm_definition(&mut self, name: &str) -> Result<()> {
        let tx = self.tx()?;
        let id: i64 = tx.query_row("SELECT id FROM vms WHERE name = ?1", [name], |r| r.get(0))?;
        let live = live_replicas(&tx, "vm_id = ?1", id)?;
        if live > 0 {
            return Err(StoreError::Corrupt(format!("VM {name} still has {live} replica(s)")));
        }
        delete_replica_rows(&tx, "vm_id = ?1", id)?;
        tx.execute("DELETE FROM vms WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Changes a VM's configuration (not its name, host or disks).
    pub fn update_vm_config(&mut self, name: &str, config: &VmConfig) -> Result<()> {
        let d = &config.driver;
        let n = self.conn.execute(
            "UPDATE vms SET cpus = ?2, memory_mib = ?3, nics = ?4, kernel = ?5, initrd = ?6, append = ?7,
                            domain_xml = ?8, network_map = ?9, machine = ?10, cpu_model = ?11, firmware = ?12,
                            tpm = ?13
             WHERE name = ?1",
            params![
                name,
                config.cpus,
                config.memory_mib,
                serde_json::to_string(&d.nics).unwrap_or_default(),
                d.kernel,
                d.initrd,
                d.append,
                d.domain_xml,
                serde_json::to_string(&d.network_map).unwrap_or_default(),
                d.machine,
                d.cpu_model,
                json_cell(&d.firmware),
                json_cell(&d.tpm)
            ],
        )?;
        if n != 1 {
            return Err(StoreError::Corrupt(format!("VM {name} is not defined")));
        }
        Ok(())
    }

    /// Redefines a VM under the same name (a failback moves a protected VM's identity to
    /// the VM it failed back to): host, configuration and disks, in one transaction.
    pub fn redefine_vm(&mut self, vm: &NewVm) -> Result<()> {
        let tx = self.tx()?;
        let id: i64 = tx.query_row("SELECT id FROM vms WHERE name = ?1", [&vm.name], |r| r.get(0))?;
        tx.execute(
            "UPDATE vms SET host = ?2, cpus = ?3, memory_mib = ?4, nics = ?5, kernel = ?6, initrd = ?7, append = ?8,
                            domain_xml = ?9, network_map = ?10, machine = ?11, cpu_model = ?12, firmware = ?13,
                            tpm = ?14
             WHERE id = ?1",
            params![
                id,
                vm.host,
                vm.config.cpus,
                vm.config.memory_mib,
                serde_json::to_string(&vm.config.driver.nics).unwrap_or_default(),
                vm.config.driver.kernel,
                vm.config.driver.initrd,
                vm.config.driver.append,
                vm.config.driver.domain_xml,
                serde_json::to_string(&vm.config.driver.network_map).unwrap_or_default(),
                vm.config.driver.machine,
                vm.config.driver.cpu_model,
                json_cell(&vm.config.driver.firmware),
                json_cell(&vm.config.driver.tpm)
            ],
        )?;
        tx.execute("DELETE FROM vm_disks WHERE vm_id = ?1", [id])?;
        insert_disks(&tx, id, &vm.disks)?;
        tx.commit()?;
        Ok(())
    }

    /// Points a VM's disk `idx` at another image (a replica VM's new top layer).
    pub fn set_vm_disk(&mut self, name: &str, idx: usize, disk: &DiskRecord) -> Result<()> {
        self.conn.execute(
            "UPDATE vm_disks SET path = ?3, format = ?4 WHERE vm_id = (SELECT id FROM vms WHERE name = ?1) AND idx = ?2",
            params![name, idx as i64, disk.path, disk.format.as_str()],
        )?;
        Ok(())
    }

    /// The replica VM running replica `replica_id`, if one is defined.
    /// Records whether a failover switched off the autostart of the replica's source.
    pub fn set_source_autostart_off(&mut self, replica: ReplicaId, off: bool) -> Result<()> {
        self.conn.execute("UPDATE replicas SET source_autostart_off = ?2 WHERE id = ?1", params![replica, off])?;
        Ok(())
    }

    pub fn source_autostart_off(&self, replica: ReplicaId) -> Result<bool> {
        Ok(self
            .conn
            .query_row("SELECT source_autostart_off FROM replicas WHERE id = ?1", [replica], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    pub fn replica_vm(&self, replica_id: ReplicaId) -> Result<Option<VmRecord>> {
        let name: Option<String> =
            self.conn.query_row("SELECT name FROM vms WHERE replica_id = ?1", [replica_id], |r| r.get(0)).optional()?;
        match name {
            Some(n) => self.vm(&n),
            None => Ok(None),
        }
    }

    /// Every VM that uses this disk image path.
    pub fn vms_using_disk(&self, path: &str) -> Result<Vec<String>> {
        let mut st =
            self.conn.prepare("SELECT v.name FROM vm_disks d JOIN vms v ON v.id = d.vm_id WHERE d.path = ?1")?;
        let rows = st.query_map([path], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    // ---- jobs and replicas ----

    /// Creates the job and one replica per VM in one transaction.
    pub fn insert_job(&mut self, job: &NewJob, replica_dirs: &[(i64, String)]) -> Result<i64> {
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO jobs (name, target_host, target_dir, retain, every_secs, created_at, replica_suffix,
                               compression, bandwidth, retry_window_secs, network_map, quiesce)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                job.name,
                job.target_host,
                job.target_dir,
                job.retain,
                job.every_secs.map(|s| s as i64),
                now(),
                job.replica_suffix,
                job.wire.compression.as_str(),
                job.wire.bandwidth.map(|b| b as i64),
                job.wire.retry_window_secs as i64,
                serde_json::to_string(&job.network_map).unwrap_or_default(),
                serde_json::to_string(&job.quiesce).unwrap_or_default()
            ],
        )?;
        let job_id = tx.last_insert_rowid();
        for (vm_id, dir) in replica_dirs {
            tx.execute(
                "INSERT INTO replicas (job_id, vm_id, state, dir) VALUES (?1, ?2, 'ready', ?3)",
                params![job_id, vm_id, dir],
            )?;
        }
        tx.commit()?;
        Ok(job_id)
    }

    const JOB_COLS: &'static str =
        "id, name, target_host, target_dir, retain, every_secs, last_run_at, created_at, replica_suffix, enabled, \
         compression, bandwidth, retry_window_secs, network_map, quiesce";

    fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
        let id: i64 = r.get(0)?;
        let compression: String = r.get(10)?;
        let wire = Wire {
            compression: compression.parse().map_err(|e| bad_cell("jobs", id, 10, e))?,
            bandwidth: r.get::<_, Option<i64>>(11)?.map(|b| b as u64),
            retry_window_secs: r.get::<_, i64>(12)? as u64,
        };
        let map: String = r.get(13)?;
        let quiesce: String = r.get(14)?;
        Ok(JobRecord {
            id,
            wire,
            quiesce: serde_json::from_str(&quiesce)
                .map_err(|e| bad_cell("jobs", id, 14, format!("quiesce {quiesce:?}: {e}")))?,
            network_map: serde_json::from_str(&map)
                .map_err(|e| bad_cell("jobs", id, 13, format!("network_map {map:?}: {e}")))?,
            name: r.get(1)?,
            target_host: r.get(2)?,
            target_dir: r.get(3)?,
            retain: r.get(4)?,
            every_secs: r.get::<_, Option<i64>>(5)?.map(|s| s as u64),
            replica_suffix: r.get(8)?,
            last_run_at: r.get(6)?,
            created_at: r.get(7)?,
            vms: Vec::new(),
            enabled: r.get(9)?,
        })
    }

    fn job_vms(&self, job_id: i64) -> Result<Vec<String>> {
        let mut st = self
            .conn
            // A permanent failover took its VM out of the job.
            .prepare(
                "SELECT v.name FROM replicas r JOIN vms v ON v.id = r.vm_id
                 WHERE r.job_id = ?1 AND r.state != 'permanent' ORDER BY r.id",
            )?;
        let rows = st.query_map([job_id], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn job(&self, name: &str) -> Result<Option<JobRecord>> {
        let sql = format!("SELECT {} FROM jobs WHERE name = ?1", Self::JOB_COLS);
        match self.conn.query_row(&sql, [name], Self::job_from_row).optional()? {
            Some(mut j) => {
                j.vms = self.job_vms(j.id)?;
                Ok(Some(j))
            }
            None => Ok(None),
        }
    }

    pub fn jobs(&self) -> Result<Vec<JobRecord>> {
        let sql = format!("SELECT {} FROM jobs ORDER BY name", Self::JOB_COLS);
        let mut st = self.conn.prepare(&sql)?;
        let mut jobs: Vec<JobRecord> = st.query_map([], Self::job_from_row)?.collect::<rusqlite::Result<_>>()?;
        for j in &mut jobs {
            j.vms = self.job_vms(j.id)?;
        }
        Ok(jobs)
    }

    /// Every job row on its own: one that cannot be read is an error for that row only.
    pub fn job_rows(&self) -> Result<Vec<(i64, Result<JobRecord>)>> {
        let mut st = self.conn.prepare("SELECT id, name FROM jobs ORDER BY name")?;
        let rows: Vec<(i64, String)> =
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows
            .into_iter()
            .map(|(id, name)| {
                let row = self
                    .job(&name)
                    .and_then(|j| j.ok_or_else(|| StoreError::Corrupt(format!("jobs row {id} vanished"))));
                (id, row)
            })
            .collect())
    }

    pub fn set_job_last_run(&mut self, job_id: i64, at: &str) -> Result<()> {
        self.conn.execute("UPDATE jobs SET last_run_at = ?1 WHERE id = ?2", params![at, job_id])?;
        Ok(())
    }

    /// Changes what a job keeps, when it runs, how its data travels and how it freezes
    /// the guest.
    pub fn update_job(
        &mut self,
        job_id: i64,
        retain: u32,
        every_secs: Option<u64>,
        enabled: bool,
        wire: Wire,
        quiesce: &Quiesce,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET retain = ?2, every_secs = ?3, enabled = ?4, compression = ?5, bandwidth = ?6,
                             retry_window_secs = ?7, quiesce = ?8
             WHERE id = ?1",
            params![
                job_id,
                retain,
                every_secs.map(|s| s as i64),
                enabled,
                wire.compression.as_str(),
                wire.bandwidth.map(|b| b as i64),
                wire.retry_window_secs as i64,
                serde_json::to_string(quiesce).unwrap_or_default()
            ],
        )?;
        Ok(())
    }

    /// Adds a VM to a job: a new replica in `dir`, ready for its first run.
    pub fn insert_replica(&mut self, job_id: i64, vm_id: i64, dir: &str) -> Result<ReplicaId> {
        self.conn.execute(
            "INSERT INTO replicas (job_id, vm_id, state, dir) VALUES (?1, ?2, 'ready', ?3)",
            params![job_id, vm_id, dir],
        )?;
        Ok(ReplicaId(self.conn.last_insert_rowid()))
    }

    /// Forgets a replica and its restore points in one transaction (its files are the
    /// caller's business).
    pub fn delete_replica(&mut self, replica_id: ReplicaId) -> Result<()> {
        let tx = self.tx()?;
        delete_replica_rows(&tx, "id = ?1", replica_id.0)?;
        tx.commit()?;
        Ok(())
    }

    /// Deletes a job whose every remaining replica is the record of a permanent failover.
    pub fn delete_job(&mut self, job_id: i64) -> Result<()> {
        let tx = self.tx()?;
        let live = live_replicas(&tx, "job_id = ?1", job_id)?;
        if live > 0 {
            return Err(StoreError::Corrupt(format!("job {job_id} still has {live} replica(s)")));
        }
        delete_replica_rows(&tx, "job_id = ?1", job_id)?;
        tx.execute("DELETE FROM jobs WHERE id = ?1", [job_id])?;
        tx.commit()?;
        Ok(())
    }

    const REPLICA_COLS: &'static str =
        "r.id, r.job_id, j.name, r.vm_id, v.name, r.state, r.dir, r.next_seq, j.target_host, j.replica_suffix, \
         r.failover_point, r.op_step";

    fn replica_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRecord> {
        let id: ReplicaId = r.get(0)?;
        // Read through their types: an unknown value is an error naming the row.
        let bad = |col: usize, why: String| {
            rusqlite::Error::FromSqlConversionFailure(
                col,
                rusqlite::types::Type::Text,
                format!("replicas row {id}: {why}").into(),
            )
        };
        let state: String = r.get(5)?;
        let step: Option<String> = r.get(11)?;
        let state: ReplicaState = state.parse().map_err(|e| bad(5, e))?;
        let step = step.map(|s| Step::from_db(state, &s)).transpose().map_err(|e| bad(11, e))?;
        Ok(ReplicaRecord {
            id,
            job_id: r.get(1)?,
            job: r.get(2)?,
            vm_id: r.get(3)?,
            vm: r.get(4)?,
            state,
            dir: r.get(6)?,
            next_seq: r.get(7)?,
            target_host: r.get(8)?,
            replica_suffix: r.get(9)?,
            failover_point: r.get(10)?,
            step,
        })
    }

    fn replicas_where(&self, cond: &str, arg: &dyn rusqlite::ToSql) -> Result<Vec<ReplicaRecord>> {
        let sql = format!(
            "SELECT {} FROM replicas r JOIN jobs j ON j.id = r.job_id JOIN vms v ON v.id = r.vm_id WHERE {cond} ORDER BY v.name, j.name",
            Self::REPLICA_COLS
        );
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([arg], Self::replica_from_row)?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>> {
        self.replicas_where("1 = ?1", &1)
    }

    /// Every replica row on its own: a row that cannot be read is an error for that row
    /// only, so that one damaged replica does not hide (or stop) all the others.
    pub fn replica_rows(&self) -> Result<Vec<(ReplicaId, Result<ReplicaRecord>)>> {
        self.replica_rows_where("1 = ?1", 1)
    }

    /// The rows of the replicas a job replicates, each on its own (see [`Store::replica_rows`]).
    pub fn replica_rows_of_job(&self, job_id: i64) -> Result<Vec<(ReplicaId, Result<ReplicaRecord>)>> {
        // `state` is compared as text, so a damaged row is still found here.
        self.replica_rows_where("job_id = ?1 AND state IS NOT 'permanent'", job_id)
    }

    /// The VM and job of a replica row, read without the rest of it (for naming a row
    /// that cannot be read whole).
    pub fn replica_names(&self, id: ReplicaId) -> Result<Option<(String, String)>> {
        Ok(self
            .conn
            .query_row(
                "SELECT v.name, j.name FROM replicas r JOIN vms v ON v.id = r.vm_id JOIN jobs j ON j.id = r.job_id
                 WHERE r.id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    fn replica_rows_where(&self, cond: &str, arg: i64) -> Result<Vec<(ReplicaId, Result<ReplicaRecord>)>> {
        let mut st = self.conn.prepare(&format!("SELECT id FROM replicas WHERE {cond} ORDER BY id"))?;
        let ids: Vec<ReplicaId> = st.query_map([arg], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(ids
            .into_iter()
            .map(|id| {
                let row = self.replica(id).and_then(|r| {
                    r.ok_or_else(|| StoreError::Corrupt(format!("replicas row {id} names a job or VM that is gone")))
                });
                (id, row)
            })
            .collect())
    }

    /// The replicas a job replicates (a permanent failover took its VM out of the job).
    pub fn replicas_of_job(&self, job_id: i64) -> Result<Vec<ReplicaRecord>> {
        self.replicas_where("r.job_id = ?1 AND r.state != 'permanent'", &job_id)
    }

    pub fn replicas_of_vm(&self, vm: &str) -> Result<Vec<ReplicaRecord>> {
        self.replicas_where("v.name = ?1", &vm)
    }

    pub fn replica(&self, id: ReplicaId) -> Result<Option<ReplicaRecord>> {
        Ok(self.replicas_where("r.id = ?1", &id)?.into_iter().next())
    }

    // ---- failbacks ----

    /// Writes the record of a replica's failback in progress.
    pub fn put_failback(&mut self, replica_id: ReplicaId, record: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO failbacks (replica_id, record, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (replica_id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
            params![replica_id, record, now()],
        )?;
        Ok(())
    }

    pub fn failback(&self, replica_id: ReplicaId) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT record FROM failbacks WHERE replica_id = ?1", [replica_id], |r| r.get(0))
            .optional()?)
    }

    /// Every failback in progress: (replica id, record).
    pub fn failbacks(&self) -> Result<Vec<(ReplicaId, String)>> {
        let mut st = self.conn.prepare("SELECT replica_id, record FROM failbacks ORDER BY replica_id")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn delete_failback(&mut self, replica_id: ReplicaId) -> Result<()> {
        self.conn.execute("DELETE FROM failbacks WHERE replica_id = ?1", [replica_id])?;
        Ok(())
    }

    /// Reserves the sequence number of the next run: durable before any file is named after it.
    pub fn take_seq(&mut self, replica_id: ReplicaId) -> Result<Seq> {
        let tx = self.tx()?;
        let seq: Seq = tx.query_row("SELECT next_seq FROM replicas WHERE id = ?1", [replica_id], |r| r.get(0))?;
        tx.execute("UPDATE replicas SET next_seq = next_seq + 1 WHERE id = ?1", [replica_id])?;
        tx.commit()?;
        Ok(seq)
    }
}

/// A VM's firmware as stored: JSON, or NULL for BIOS.
/// A part of a VM's configuration kept as JSON (its firmware, its TPM); NULL for none.
fn json_cell<T: serde::Serialize>(v: &Option<T>) -> Option<String> {
    v.as_ref().map(|v| serde_json::to_string(v).unwrap_or_default())
}

fn from_json_cell<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    id: i64,
    col: usize,
    what: &str,
) -> rusqlite::Result<Option<T>> {
    match r.get::<_, Option<String>>(col)? {
        None => Ok(None),
        Some(v) => {
            serde_json::from_str(&v).map(Some).map_err(|e| bad_cell("vms", id, col, format!("{what} {v:?}: {e}")))
        }
    }
}

/// A cell no standby wrote: an error naming the table's row.
fn bad_cell(table: &str, id: i64, col: usize, why: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("{table} row {id}: {why}").into(),
    )
}

/// A transfer method as stored.
fn method_cell(table: &str, id: i64, col: usize, v: String) -> rusqlite::Result<Method> {
    v.parse().map_err(|e| bad_cell(table, id, col, e))
}

/// How many replicas matching `cond` are more than the record of a permanent failover.
fn live_replicas(tx: &Transaction<'_>, cond: &str, arg: i64) -> Result<i64> {
    let sql = format!("SELECT COUNT(*) FROM replicas WHERE {cond} AND state != 'permanent'");
    Ok(tx.query_row(&sql, [arg], |r| r.get(0))?)
}

/// Deletes the replicas matching `cond` (on `replicas` columns, one parameter) with their
/// restore points, inside the caller's transaction.
fn delete_replica_rows(tx: &Transaction<'_>, cond: &str, arg: i64) -> Result<()> {
    let ids = format!("SELECT id FROM replicas WHERE {cond}");
    tx.execute(
        &format!("DELETE FROM rp_disks WHERE rp_id IN (SELECT id FROM restore_points WHERE replica_id IN ({ids}))"),
        [arg],
    )?;
    tx.execute(&format!("DELETE FROM restore_points WHERE replica_id IN ({ids})"), [arg])?;
    tx.execute(&format!("DELETE FROM failbacks WHERE replica_id IN ({ids})"), [arg])?;
    tx.execute(&format!("DELETE FROM fences WHERE replica_id IN ({ids})"), [arg])?;
    tx.execute(&format!("UPDATE vms SET replica_id = NULL WHERE replica_id IN ({ids})"), [arg])?;
    tx.execute(&format!("DELETE FROM replicas WHERE {cond}"), [arg])?;
    Ok(())
}

fn insert_rp_disk(tx: &Transaction<'_>, rp_id: PointId, d: &RpDiskRecord) -> Result<()> {
    tx.execute(
        "INSERT INTO rp_disks (rp_id, idx, layer, parent, size, method, bitmap, bytes_transferred)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            rp_id,
            d.idx,
            d.layer,
            d.parent,
            d.size as i64,
            d.method.as_str(),
            d.bitmap,
            d.bytes_transferred as i64
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
