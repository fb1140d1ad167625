//! Restore points: published in one transaction, read in chain order, dropped by
//! retention with their layers handed to the next point.

use rusqlite::params;

use crate::*;

impl Store {
    /// Makes a run's layers a restore point: the one atomic step that publishes it.
    pub fn insert_restore_point(&mut self, rp: &NewRestorePoint) -> Result<PointId> {
        let tx = self.tx()?;
        tx.execute(
            "INSERT INTO restore_points (replica_id, seq, created_at, method, bytes_transferred, bytes_read, duration_ms,
                                         consistency, nvram, tpm_state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                rp.replica_id,
                rp.seq,
                rp.created_at,
                rp.method.as_str(),
                rp.bytes_transferred as i64,
                rp.bytes_read as i64,
                rp.duration_ms as i64,
                rp.consistency.as_str(),
                rp.nvram,
                rp.tpm_state
            ],
        )?;
        let id = PointId(tx.last_insert_rowid());
        for d in &rp.disks {
            insert_rp_disk(&tx, id, d)?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// A replica's restore points in chain order, oldest first, with their disks.
    /// `pruning` points (half-removed by retention) are included only when asked.
    pub fn restore_points(&self, replica_id: ReplicaId, include_pruning: bool) -> Result<Vec<RestorePointRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, seq, created_at, method, bytes_transferred, bytes_read, duration_ms, pruning, consistency, nvram,
                    tpm_state
             FROM restore_points WHERE replica_id = ?1 AND (pruning = 0 OR ?2) ORDER BY seq",
        )?;
        let mut rps: Vec<RestorePointRecord> = st
            .query_map(params![replica_id, include_pruning], |r| {
                Ok(RestorePointRecord {
                    id: r.get(0)?,
                    replica_id,
                    seq: r.get(1)?,
                    created_at: r.get(2)?,
                    method: method_cell("restore_points", r.get(0)?, 3, r.get(3)?)?,
                    bytes_transferred: r.get::<_, i64>(4)? as u64,
                    bytes_read: r.get::<_, i64>(5)? as u64,
                    duration_ms: r.get::<_, i64>(6)? as u64,
                    pruning: r.get(7)?,
                    consistency: {
                        let (id, c): (i64, String) = (r.get(0)?, r.get(8)?);
                        c.parse::<Consistency>().map_err(|e| bad_cell("restore_points", id, 8, e))?
                    },
                    nvram: r.get(9)?,
                    tpm_state: r.get(10)?,
                    disks: Vec::new(),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut st = self.conn.prepare(
            "SELECT idx, layer, parent, size, method, bitmap, bytes_transferred FROM rp_disks WHERE rp_id = ?1 ORDER BY idx",
        )?;
        for rp in &mut rps {
            rp.disks = st
                .query_map([rp.id], |r| {
                    Ok(RpDiskRecord {
                        idx: r.get(0)?,
                        layer: r.get(1)?,
                        parent: r.get(2)?,
                        size: r.get::<_, i64>(3)? as u64,
                        method: method_cell("rp_disks", rp.id.0, 4, r.get(4)?)?,
                        bitmap: r.get(5)?,
                        bytes_transferred: r.get::<_, i64>(6)? as u64,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
        }
        Ok(rps)
    }

    pub fn mark_pruning(&mut self, rp_id: PointId) -> Result<()> {
        self.conn.execute("UPDATE restore_points SET pruning = 1 WHERE id = ?1", [rp_id])?;
        Ok(())
    }

    /// Retention's publishing step: drops `rp_id` and repoints layers in one transaction.
    /// `moves` are (old layer path, new layer path): every disk row whose layer or parent
    /// named the old path names the new one afterwards.
    pub fn drop_restore_point(
        &mut self,
        rp_id: PointId,
        moves: &[(String, String)],
        new_bases: &[String],
    ) -> Result<()> {
        let tx = self.tx()?;
        tx.execute("DELETE FROM rp_disks WHERE rp_id = ?1", [rp_id])?;
        tx.execute("DELETE FROM restore_points WHERE id = ?1", [rp_id])?;
        for (old, new) in moves {
            tx.execute("UPDATE rp_disks SET layer = ?2 WHERE layer = ?1", params![old, new])?;
            tx.execute("UPDATE rp_disks SET parent = ?2 WHERE parent = ?1", params![old, new])?;
        }
        for base in new_bases {
            tx.execute("UPDATE rp_disks SET parent = NULL WHERE layer = ?1", [base])?;
        }
        tx.commit()?;
        Ok(())
    }
}
