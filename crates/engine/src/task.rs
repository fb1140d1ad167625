//! Long operations as tasks: a row in the database with the current step and byte counts,
//! updated as the work goes, so `standby task show ID --follow` in another terminal sees
//! what the terminal that started it sees.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use standby_store::TaskRecord;

use crate::{Engine, EngineError, Progress, Result};

/// How often byte counts reach the database: often enough to follow, rarely enough to cost
/// nothing next to the transfer.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Serialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub record: TaskRecord,
    /// `running` tasks whose process is gone were interrupted.
    pub interrupted: bool,
}

/// Reports to the caller's sink and to the task row.
pub(crate) struct TaskProgress<'a> {
    engine: &'a Engine,
    pub id: i64,
    outer: &'a dyn Progress,
    last: Mutex<(Instant, String)>,
}

impl<'a> TaskProgress<'a> {
    pub fn start(
        engine: &'a Engine,
        kind: &str,
        subject: &str,
        outer: &'a dyn Progress,
    ) -> Result<Self> {
        let id = engine
            .store()
            .insert_task(kind, subject, std::process::id())?;
        Ok(TaskProgress {
            engine,
            id,
            outer,
            last: Mutex::new((Instant::now(), "start".into())),
        })
    }

    pub fn finish(&self, result: &Result<String>) {
        let (status, msg) = match result {
            Ok(m) => ("ok", m.clone()),
            Err(e) => ("failed", crate::vm::chain(e)),
        };
        let _ = self.engine.store().finish_task(self.id, status, &msg);
    }
}

impl Progress for TaskProgress<'_> {
    fn step(&self, subject: &str, step: &str) {
        self.outer.step(subject, step);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.1 = step.to_owned();
        let _ = self.engine.store().update_task(self.id, step, 0, 0);
    }

    fn bytes(&self, subject: &str, done: u64, total: u64) {
        self.outer.bytes(subject, done, total);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.0.elapsed() >= FLUSH_EVERY || done == total {
            last.0 = Instant::now();
            let _ = self
                .engine
                .store()
                .update_task(self.id, &last.1, done, total);
        }
    }
}

impl Engine {
    pub fn task_list(&self, limit: u32) -> Result<Vec<TaskView>> {
        Ok(self
            .store()
            .tasks(limit)?
            .into_iter()
            .map(task_view)
            .collect())
    }

    pub fn task_show(&self, id: i64) -> Result<TaskView> {
        self.store()
            .task(id)?
            .map(task_view)
            .ok_or(EngineError::UnknownTask(id))
    }
}

fn task_view(record: TaskRecord) -> TaskView {
    let alive = std::path::Path::new(&format!("/proc/{}", record.pid)).exists();
    let interrupted = record.status == "running" && !alive;
    TaskView {
        record,
        interrupted,
    }
}
