//! Hosts: `local`, and those reached through an agent (where, and what each last said).

use rusqlite::params;

use crate::*;

impl Store {
    pub fn host_exists(&self, name: &str) -> Result<bool> {
        Ok(self.conn.query_row("SELECT 1 FROM hosts WHERE name = ?1", [name], |_| Ok(())).optional()?.is_some())
    }

    pub fn hosts(&self) -> Result<Vec<HostRecord>> {
        let mut st = self.conn.prepare("SELECT name, kind, address, version, last_seen FROM hosts ORDER BY name")?;
        let rows = st
            .query_map([], |r| {
                Ok(HostRecord {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    address: r.get(2)?,
                    version: r.get(3)?,
                    last_seen: r.get(4)?,
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

    /// The serial of host `name`'s certificate, when standby recorded it.
    pub fn host_serial(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT cert_serial FROM hosts WHERE name = ?1", [name], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn host_seen(&mut self, name: &str, version: &str) -> Result<()> {
        self.conn
            .execute("UPDATE hosts SET version = ?2, last_seen = ?3 WHERE name = ?1", params![name, version, now()])?;
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
