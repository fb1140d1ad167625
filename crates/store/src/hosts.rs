//! Hosts: `local`, and those reached through an agent (where, and what each last said).

use rusqlite::params;

use crate::*;

impl Store {
    pub fn host_exists(&self, name: &str) -> Result<bool> {
        Ok(self.conn.query_row("SELECT 1 FROM hosts WHERE name = ?1", [name], |_| Ok(())).optional()?.is_some())
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>> {
        let mut st = self.conn.prepare(
            "SELECT name, kind, address, version, last_seen, lost_after_secs, silent_since, libvirt_uri FROM hosts
             ORDER BY name",
        )?;
        let rows = st
            .query_map([], |r| {
                Ok(HostRecord {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    address: r.get(2)?,
                    version: r.get(3)?,
                    last_seen: r.get(4)?,
                    lost_after_secs: r.get::<_, Option<i64>>(5)?.map(|s| s.unsigned_abs()),
                    silent_since: r.get(6)?,
                    libvirt_uri: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Records an enrolled agent's host, with its certificate's serial.
    pub fn insert_agent_host(&mut self, name: &str, address: &str, version: &str, serial: &str) -> Result<()> {
        let at = now();
        self.conn.execute(
            "INSERT INTO hosts (name, kind, created_at, address, version, last_seen, cert_serial)
             VALUES (?1, 'agent', ?2, ?3, ?4, ?2, ?5)",
            params![name, at, address, version, serial],
        )?;
        Ok(())
    }

    /// Records a host whose VMs are the domains of the libvirt daemon at `uri`.
    pub fn insert_libvirt_host(&mut self, name: &str, uri: &str, version: &str) -> Result<()> {
        let at = now();
        self.conn.execute(
            "INSERT INTO hosts (name, kind, created_at, version, last_seen, libvirt_uri)
             VALUES (?1, 'libvirt', ?2, ?3, ?2, ?4)",
            params![name, at, version, uri],
        )?;
        Ok(())
    }

    /// The serial of host `name`'s certificate, when standby recorded it.
    pub fn host_serial(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT cert_serial FROM hosts WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn host(&self, name: &str) -> Result<Option<HostRecord>> {
        Ok(self.hosts()?.into_iter().find(|h| h.name == name))
    }

    /// The host's agent answered (as `version`): its silence, if any, is over.
    pub fn host_seen(&mut self, name: &str, version: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE hosts SET version = ?2, last_seen = ?3, silent_since = NULL WHERE name = ?1",
            params![name, version, now()],
        )?;
        Ok(())
    }

    /// The host answered a request now: its silence, if any, is over.
    pub fn host_answered(&mut self, name: &str) -> Result<()> {
        self.host_answered_at(name, &now())
    }

    /// The host answered a request at `at` (RFC 3339, UTC, as `now()` writes it, so that
    /// stamps compare as text): a silence that began before then is over.
    pub fn host_answered_at(&mut self, name: &str, at: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE hosts SET last_seen = MAX(COALESCE(last_seen, ''), ?2),
                 silent_since = CASE WHEN silent_since <= ?2 THEN NULL ELSE silent_since END
             WHERE name = ?1",
            params![name, at],
        )?;
        Ok(())
    }

    /// The host did not answer: its silence began now unless it had already. When it
    /// began.
    pub fn host_silent(&mut self, name: &str) -> Result<Option<String>> {
        self.conn.execute(
            "UPDATE hosts SET silent_since = COALESCE(silent_since, ?2) WHERE name = ?1",
            params![name, now()],
        )?;
        Ok(self
            .conn
            .query_row("SELECT silent_since FROM hosts WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn set_host_lost_after(&mut self, name: &str, secs: Option<u64>) -> Result<()> {
        self.conn.execute(
            "UPDATE hosts SET lost_after_secs = ?2 WHERE name = ?1",
            params![name, secs.map(|s| i64::try_from(s).unwrap_or(i64::MAX))],
        )?;
        Ok(())
    }

    /// What uses a host: VMs on it and replicas targeting it.
    pub fn host_users(&self, name: &str) -> Result<Vec<String>> {
        let mut st = self.conn.prepare(
            "SELECT 'VM ' || name FROM vms WHERE host = ?1
             UNION ALL SELECT 'job ' || name FROM jobs WHERE target_host = ?1",
        )?;
        let rows = st.query_map([name], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn delete_host(&mut self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM hosts WHERE name = ?1 AND kind = 'agent'", [name])?;
        Ok(())
    }
}
