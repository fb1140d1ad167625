//! The history: every operation and state change, bounded per VM.

use rusqlite::{params, OptionalExtension};

use crate::*;

/// History entries kept per VM (and per plan or job): older ones are pruned.
pub const HISTORY_KEEP: usize = 10_000;
/// How far past [`HISTORY_KEEP`] a VM's history may grow before it is pruned back.
pub const HISTORY_SLACK: usize = 100;

impl Store {
    pub fn record_history(
        &mut self,
        vm: &str,
        operation: &str,
        command: &str,
        result: &str,
        detail: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO history (at, vm, operation, command, result, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now(), vm, operation, command, result, detail],
        )?;
        // Counting one VM's entries walks its index range; pruning, rarer, walks it again.
        let n: i64 = self.conn.query_row("SELECT COUNT(*) FROM history WHERE vm = ?1", [vm], |r| r.get(0))?;
        if n as usize > HISTORY_KEEP + HISTORY_SLACK {
            self.prune_history(vm)?;
        }
        Ok(())
    }

    /// Keeps the newest [`HISTORY_KEEP`] entries of `vm`; older ones go.
    pub fn prune_history(&mut self, vm: &str) -> Result<usize> {
        Ok(self.conn.execute(
            "DELETE FROM history WHERE vm = ?1 AND id <= (
                 SELECT id FROM history WHERE vm = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![vm, HISTORY_KEEP as i64],
        )?)
    }

    /// The newest `limit` history entries, oldest first; only `vm`'s when given.
    pub fn history(&self, vm: Option<&str>, limit: u32) -> Result<Vec<HistoryRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, at, vm, operation, command, result, detail FROM history
             WHERE ?1 IS NULL OR vm = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let mut rows = st.query_map(params![vm, limit], history_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }

    /// The newest history entry of `vm`: one index lookup, however long the history.
    pub fn last_history(&self, vm: &str) -> Result<Option<HistoryRecord>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, at, vm, operation, command, result, detail FROM history WHERE vm = ?1 ORDER BY id DESC LIMIT 1",
                [vm],
                history_from_row,
            )
            .optional()?)
    }
}

fn history_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryRecord> {
    Ok(HistoryRecord {
        id: r.get(0)?,
        at: r.get(1)?,
        vm: r.get(2)?,
        operation: r.get(3)?,
        command: r.get(4)?,
        result: r.get(5)?,
        detail: r.get(6)?,
    })
}
