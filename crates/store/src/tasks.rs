//! Tasks: long operations as rows another terminal follows (step, bytes, the wire).

use rusqlite::params;

use crate::*;

impl Store {
    pub fn insert_task(&mut self, kind: &str, subject: &str, pid: u32) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO tasks (kind, subject, status, step, pid, started_at) VALUES (?1, ?2, 'running', 'start', ?3, ?4)",
            params![kind, subject, pid, now()],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    pub fn update_task_step(&mut self, id: i64, step: &str) -> Result<()> {
        self.conn.execute("UPDATE tasks SET step = ?2 WHERE id = ?1", params![id, step])?;
        Ok(())
    }

    /// The task's byte counts, and `wire`: (bytes of blocks, bytes on the wire) of its
    /// transfers between hosts.
    pub fn update_task_bytes(&mut self, id: i64, done: u64, total: u64, wire: (u64, u64)) -> Result<()> {
        self.conn.execute(
            "UPDATE tasks SET done_bytes = ?2, total_bytes = ?3, wire_data_bytes = ?4, wire_bytes = ?5 WHERE id = ?1",
            params![id, done as i64, total as i64, wire.0 as i64, wire.1 as i64],
        )?;
        Ok(())
    }

    pub fn finish_task(&mut self, id: i64, status: &str, message: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE tasks SET status = ?2, message = ?3, finished_at = ?4 WHERE id = ?1",
            params![id, status, message, now()],
        )?;
        Ok(())
    }

    pub fn tasks(&self, limit: u32) -> Result<Vec<TaskRecord>> {
        self.tasks_where("1 = ?1 ORDER BY id DESC LIMIT ?2", params![1, limit])
    }

    pub fn task(&self, id: i64) -> Result<Option<TaskRecord>> {
        Ok(self.tasks_where("id = ?1", params![id])?.into_iter().next())
    }

    fn tasks_where(&self, cond: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<TaskRecord>> {
        let sql = format!(
            "SELECT id, kind, subject, status, step, pid, started_at, finished_at, done_bytes, total_bytes, message, \
             wire_data_bytes, wire_bytes FROM tasks WHERE {cond}"
        );
        let mut st = self.conn.prepare(&sql)?;
        let rows = st
            .query_map(args, |r| {
                Ok(TaskRecord {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    subject: r.get(2)?,
                    status: r.get(3)?,
                    step: r.get(4)?,
                    pid: r.get(5)?,
                    started_at: r.get(6)?,
                    finished_at: r.get(7)?,
                    done_bytes: r.get::<_, i64>(8)? as u64,
                    total_bytes: r.get::<_, i64>(9)? as u64,
                    message: r.get(10)?,
                    wire_data_bytes: r.get::<_, i64>(11)? as u64,
                    wire_bytes: r.get::<_, i64>(12)? as u64,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }
}
