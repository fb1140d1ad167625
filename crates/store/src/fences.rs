//! Fences: what a failover made without its source's host owes that host when it answers
//! again (see migration 8).

use rusqlite::params;

use crate::*;

/// One replica's fence. Open while `fenced_at` is None.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceRecord {
    pub replica_id: ReplicaId,
    pub vm: String,
    pub host: String,
    /// The source's disks on `host` at the failover.
    pub disks: Vec<DiskRecord>,
    pub declared_at: String,
    /// How the host was declared unreachable, in the operator's words.
    pub declared_by: String,
    pub fenced_at: Option<String>,
    /// What fencing found and did to the source VM.
    pub found: Option<String>,
    /// The protective images on the source's host, one per disk.
    pub protective: Vec<String>,
}

impl FenceRecord {
    pub fn is_open(&self) -> bool {
        self.fenced_at.is_none()
    }
}

const COLUMNS: &str = "replica_id, vm, host, disks, declared_at, declared_by, fenced_at, found, protective";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FenceRecord> {
    let disks: String = r.get(3)?;
    let disks = serde_json::from_str(&disks)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?;
    let protective: Option<String> = r.get(8)?;
    Ok(FenceRecord {
        replica_id: r.get(0)?,
        vm: r.get(1)?,
        host: r.get(2)?,
        disks,
        declared_at: r.get(4)?,
        declared_by: r.get(5)?,
        fenced_at: r.get(6)?,
        found: r.get(7)?,
        protective: protective.map(|p| p.lines().map(str::to_owned).collect()).unwrap_or_default(),
    })
}

impl Store {
    /// Opens a replica's fence, replacing one an earlier failover left.
    pub fn open_fence(
        &mut self,
        replica_id: ReplicaId,
        vm: &str,
        host: &str,
        disks: &[DiskRecord],
        declared_by: &str,
    ) -> Result<()> {
        let disks = serde_json::to_string(disks).map_err(|e| StoreError::Corrupt(format!("fence disks: {e}")))?;
        self.conn.execute(
            "INSERT OR REPLACE INTO fences (replica_id, vm, host, disks, declared_at, declared_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![replica_id, vm, host, disks, now(), declared_by],
        )?;
        Ok(())
    }

    /// Closes a fence: the source was found as `found` and its disks copied to `protective`.
    pub fn close_fence(&mut self, replica_id: ReplicaId, found: &str, protective: &[String]) -> Result<()> {
        self.conn.execute(
            "UPDATE fences SET fenced_at = ?2, found = ?3, protective = ?4 WHERE replica_id = ?1",
            params![replica_id, now(), found, protective.join("\n")],
        )?;
        Ok(())
    }

    pub fn fence(&self, replica_id: ReplicaId) -> Result<Option<FenceRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM fences WHERE replica_id = ?1");
        Ok(self.conn.query_row(&sql, [replica_id], row).optional()?)
    }

    /// Every fence not carried out yet.
    pub fn open_fences(&self) -> Result<Vec<FenceRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM fences WHERE fenced_at IS NULL ORDER BY replica_id");
        let mut st = self.conn.prepare(&sql)?;
        let rows = st.query_map([], row)?.collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    pub fn delete_fence(&mut self, replica_id: ReplicaId) -> Result<()> {
        self.conn.execute("DELETE FROM fences WHERE replica_id = ?1", [replica_id])?;
        Ok(())
    }
}
