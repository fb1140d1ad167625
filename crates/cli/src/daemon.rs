//! `standby daemon`: runs each job whose interval has passed since its last run, and each
//! failback switch whose time has come (one missed while no daemon ran runs at once).

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use standby_engine::{Engine, NoProgress};

use crate::output;

fn due(every_secs: Option<u64>, last_run_at: Option<&str>, now: SystemTime) -> bool {
    let Some(every) = every_secs else {
        return false;
    };
    let Some(last) = last_run_at.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
        return true;
    };
    now.duration_since(last).map(|d| d >= Duration::from_secs(every)).unwrap_or(false)
}

pub fn run(engine: &Engine, tick: Duration) -> Result<ExitCode> {
    eprintln!("standby daemon: checking jobs and scheduled failback switches every {} s", tick.as_secs());
    loop {
        match engine.failback_due(&NoProgress) {
            Ok(outcomes) if !outcomes.is_empty() => output::op_outcomes(&outcomes, false)?,
            Ok(_) => {}
            Err(e) => eprintln!("scheduled failback switches: {e}"),
        }
        for job in engine.job_list()? {
            if !due(job.every_secs, job.last_run_at.as_deref(), SystemTime::now()) {
                continue;
            }
            eprintln!("{} job {}: starting", humantime::format_rfc3339_seconds(SystemTime::now()), job.name);
            match engine.job_run(&job.name, &NoProgress) {
                Ok(outcomes) => output::outcomes(&outcomes, false)?,
                Err(e) => eprintln!("job {}: {e}", job.name),
            }
        }
        std::thread::sleep(tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_rules() {
        let now = humantime::parse_rfc3339("2026-01-01T00:10:00Z").unwrap();
        assert!(!due(None, None, now));
        assert!(due(Some(60), None, now));
        assert!(due(Some(60), Some("2026-01-01T00:09:00Z"), now));
        assert!(!due(Some(60), Some("2026-01-01T00:09:30Z"), now));
        // A clock that went backwards does not fire a run.
        assert!(!due(Some(60), Some("2026-01-01T00:20:00Z"), now));
    }
}
