//! Long operations as tasks: a row in the database with the current step and byte counts,
//! updated as the work goes, so `standby task show ID --follow` in another terminal sees
//! what the terminal that started it sees.

use std::collections::HashMap;
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

/// Reports to the caller's sink and to the task row. A job run's VMs report in parallel;
/// the row shows the last step and the byte counts summed over them.
pub(crate) struct TaskProgress<'a> {
    engine: &'a Engine,
    pub id: i64,
    outer: &'a dyn Progress,
    state: Mutex<Counters>,
}

struct Counters {
    last_flush: Instant,
    per_subject: HashMap<String, (u64, u64)>,
    /// (bytes of blocks, bytes on the wire) of each subject's transfer between hosts.
    wire: HashMap<String, (u64, u64)>,
}

impl<'a> TaskProgress<'a> {
    pub fn start(engine: &'a Engine, kind: &str, subject: &str, outer: &'a dyn Progress) -> Result<Self> {
        let id = engine.store().insert_task(kind, subject, std::process::id())?;
        let state =
            Mutex::new(Counters { last_flush: Instant::now(), per_subject: HashMap::new(), wire: HashMap::new() });
        Ok(TaskProgress { engine, id, outer, state })
    }

    pub fn finish(&self, result: &Result<String>) {
        let (status, msg) = match result {
            Ok(m) => ("ok", m.clone()),
            Err(e) => ("failed", crate::chain(e)),
        };
        self.flush_bytes(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = self.engine.store().finish_task(self.id, status, &msg);
    }

    fn flush_bytes(&self, c: &mut Counters) {
        let sum = |m: &HashMap<String, (u64, u64)>| m.values().fold((0, 0), |(a, b), (x, y)| (a + x, b + y));
        let ((done, total), wire) = (sum(&c.per_subject), sum(&c.wire));
        c.last_flush = Instant::now();
        let _ = self.engine.store().update_task_bytes(self.id, done, total, wire);
    }
}

impl Progress for TaskProgress<'_> {
    fn step(&self, subject: &str, step: &str) {
        self.outer.step(subject, step);
        let _ = self.engine.store().update_task_step(self.id, &format!("{subject}: {step}"));
    }

    fn bytes(&self, subject: &str, done: u64, total: u64) {
        self.outer.bytes(subject, done, total);
        let mut c = self.state.lock().unwrap_or_else(|e| e.into_inner());
        c.per_subject.insert(subject.to_owned(), (done, total));
        if c.last_flush.elapsed() >= FLUSH_EVERY {
            self.flush_bytes(&mut c);
        }
    }

    fn wire(&self, subject: &str, data: u64, wire: u64) {
        self.outer.wire(subject, data, wire);
        // Flushed with the byte counts, which follow it in every report.
        self.state.lock().unwrap_or_else(|e| e.into_inner()).wire.insert(subject.to_owned(), (data, wire));
    }
}

impl Engine {
    pub fn task_list(&self, limit: u32) -> Result<Vec<TaskView>> {
        Ok(self.store().tasks(limit)?.into_iter().map(task_view).collect())
    }

    pub fn task_show(&self, id: i64) -> Result<TaskView> {
        self.store().task(id)?.map(task_view).ok_or(EngineError::UnknownTask(id))
    }
}

fn task_view(record: TaskRecord) -> TaskView {
    let alive = std::path::Path::new(&format!("/proc/{}", record.pid)).exists();
    let interrupted = record.status == "running" && !alive;
    TaskView { record, interrupted }
}
