//! `standby daemon`: runs each enabled job whose interval has passed since its last run,
//! and each failback switch whose time has come (one missed while no daemon ran runs at
//! once). It asks every agent whether it answers at each check, so a host's silence is
//! measured from its first missed answer (`host add/change --lost-after`), and says when
//! a host goes silent, is declared lost, and answers again.
//!
//! It stays up: an error (a busy or damaged database, a failed run) is logged and the
//! check retried with a growing pause. Intervals are measured on the monotonic clock from
//! the last run this daemon saw, so a wall clock stepped back or forward neither
//! suspends a job nor runs it twice; the stored time only places the first run.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Result;
use standby_engine::{Engine, HostView, JobView, NoProgress};

use crate::output;

/// The longest pause between checks after repeated errors.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// When one job runs next, on the monotonic clock.
#[derive(Debug)]
struct Slot {
    /// The stored last run this slot was computed from: a run by another command moves it.
    seen: Option<String>,
    next: Instant,
}

/// When a job with this interval and stored last run is due, seen at `now` (wall) and
/// `mono` (monotonic). A last run in the future (the clock went back) counts as just now.
fn first_due(every: Duration, last_run_at: Option<&str>, now: SystemTime, mono: Instant) -> Instant {
    let Some(last) = last_run_at.and_then(|t| humantime::parse_rfc3339(t).ok()) else {
        return mono;
    };
    let since = now.duration_since(last).unwrap_or(Duration::ZERO);
    mono + every.saturating_sub(since)
}

#[derive(Debug, Default)]
struct Schedule {
    slots: BTreeMap<String, Slot>,
    /// What each agent's host was at the last check: silent, declared lost.
    hosts: BTreeMap<String, (bool, bool)>,
}

impl Schedule {
    /// Whether `job` is due now; forgets nothing about jobs it is not asked about.
    fn due(&mut self, job: &JobView, mono: Instant) -> bool {
        let Some(every) = job.every_secs.filter(|_| job.enabled).map(Duration::from_secs) else {
            self.slots.remove(&job.name);
            return false;
        };
        let slot = self.slots.entry(job.name.clone()).or_insert_with(|| Slot {
            seen: job.last_run_at.clone(),
            next: first_due(every, job.last_run_at.as_deref(), SystemTime::now(), mono),
        });
        if slot.seen != job.last_run_at {
            // Someone ran it (`standby job run`): the interval counts from that run.
            slot.seen = job.last_run_at.clone();
            slot.next = mono + every;
        }
        mono >= slot.next
    }

    /// What changed about the hosts since the last check, a line each.
    fn hosts_changed(&mut self, hosts: &[HostView]) -> Vec<String> {
        let mut lines = Vec::new();
        for h in hosts.iter().filter(|h| h.address.is_some()) {
            let now = (h.state == "offline", h.declared_lost);
            let was = self.hosts.insert(h.name.clone(), now).unwrap_or((false, false));
            match (was, now) {
                ((false, _), (true, _)) => lines.push(format!(
                    "host {}: no answer ({}); silent since {}",
                    h.name,
                    h.error.as_deref().unwrap_or("offline"),
                    h.silent_since.as_deref().unwrap_or("now")
                )),
                ((true, _), (false, _)) => lines.push(format!("host {}: answers again", h.name)),
                _ => {}
            }
            if now.1 && !was.1 {
                lines.push(format!(
                    "host {}: declared lost, silent longer than its lost-after {}: failover of its VMs goes ahead \
                     without --source-unreachable",
                    h.name,
                    h.lost_after.as_deref().unwrap_or("?")
                ));
            }
        }
        lines
    }

    /// A run of `job` started at `mono` (its stored last run is now `seen`).
    fn ran(&mut self, job: &str, every: Duration, mono: Instant, seen: Option<String>) {
        self.slots.insert(job.into(), Slot { seen, next: mono + every });
    }
}

fn stamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// One pass: due failback switches, then due jobs. Err only for what stops the pass.
fn check(engine: &Engine, schedule: &mut Schedule) -> Result<()> {
    // First: a source that runs again after a site loss must stop before anything else.
    let (fenced, attention) = engine.fence_returning()?;
    for note in fenced.iter().chain(&attention) {
        eprintln!("{} {note}", stamp());
    }
    match engine.host_list() {
        Ok(hosts) => {
            for line in schedule.hosts_changed(&hosts) {
                eprintln!("{} {line}", stamp());
            }
        }
        Err(e) => eprintln!("{} hosts: {e}", stamp()),
    }
    match engine.failback_due(&NoProgress) {
        Ok(outcomes) if !outcomes.is_empty() => {
            let _ = output::op_outcomes(&outcomes, false);
        }
        Ok(_) => {}
        Err(e) => eprintln!("{} scheduled failback switches: {e}", stamp()),
    }
    for job in engine.job_rows()? {
        // A damaged row stops only its own job; the others keep their schedule.
        let job = match job {
            Ok(j) => j,
            Err(why) => {
                eprintln!("{} {why}; its job does not run until it is repaired", stamp());
                continue;
            }
        };
        let mono = Instant::now();
        if !schedule.due(&job, mono) {
            continue;
        }
        eprintln!("{} job {}: starting", stamp(), job.name);
        let result = engine.job_run(&job.name, &NoProgress);
        // Whatever the run did, the next one waits a whole interval from this start.
        let seen = engine.job_show(&job.name).ok().and_then(|j| j.last_run_at);
        schedule.ran(&job.name, Duration::from_secs(job.every_secs.unwrap_or(0)), mono, seen);
        match result {
            Ok(outcomes) => {
                let _ = output::outcomes(&outcomes, false);
            }
            Err(e) => eprintln!("{} job {}: {e}", stamp(), job.name),
        }
    }
    Ok(())
}

pub fn run(engine: &Engine, tick: Duration) -> Result<ExitCode> {
    eprintln!("standby daemon: checking jobs and scheduled failback switches every {} s", tick.as_secs());
    let mut schedule = Schedule::default();
    let mut failures = 0u32;
    loop {
        let pause = match check(engine, &mut schedule) {
            Ok(()) => {
                failures = 0;
                tick
            }
            Err(e) => {
                failures += 1;
                let pause = tick.saturating_mul(1 << failures.min(16)).min(MAX_BACKOFF);
                let mut msg = format!("{e}");
                for cause in e.chain().skip(1) {
                    msg.push_str(&format!(": {cause}"));
                }
                eprintln!("{} check failed ({failures} in a row): {msg}; retrying in {} s", stamp(), pause.as_secs());
                pause
            }
        };
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(every: Option<u64>, last: Option<&str>, enabled: bool) -> JobView {
        JobView {
            name: "j".into(),
            vms: vec![],
            target_host: "local".into(),
            target_dir: "/dr".into(),
            retain: 1,
            every_secs: every,
            replica_suffix: "_replica".into(),
            compression: "zstd".into(),
            bandwidth: None,
            retry_window_secs: 300,
            network_map: Default::default(),
            quiesce: Default::default(),
            last_run_at: last.map(Into::into),
            created_at: String::new(),
            enabled,
        }
    }

    #[test]
    fn first_run_is_placed_by_the_stored_time() {
        let now = humantime::parse_rfc3339("2026-01-01T00:10:00Z").unwrap();
        let mono = Instant::now();
        let every = Duration::from_secs(60);
        assert_eq!(first_due(every, None, now, mono), mono);
        assert_eq!(first_due(every, Some("2026-01-01T00:09:00Z"), now, mono), mono);
        assert_eq!(first_due(every, Some("2026-01-01T00:09:30Z"), now, mono), mono + Duration::from_secs(30));
        // A last run in the future (the clock stepped back): due one interval from now,
        // not suspended until the clock catches up.
        assert_eq!(first_due(every, Some("2026-01-01T05:00:00Z"), now, mono), mono + every);
    }

    #[test]
    fn intervals_count_on_the_monotonic_clock() {
        let mut s = Schedule::default();
        let t0 = Instant::now();
        let j = job(Some(60), Some("2999-01-01T00:00:00Z"), true);
        assert!(!s.due(&j, t0));
        assert!(s.due(&j, t0 + Duration::from_secs(60)), "a future stored time must not suspend the job");
        s.ran("j", Duration::from_secs(60), t0 + Duration::from_secs(60), j.last_run_at.clone());
        assert!(!s.due(&j, t0 + Duration::from_secs(119)));
        assert!(s.due(&j, t0 + Duration::from_secs(120)));
        // A run by `standby job run` elsewhere restarts the interval.
        let moved = job(Some(60), Some("2999-01-01T00:05:00Z"), true);
        assert!(!s.due(&moved, t0 + Duration::from_secs(130)));
        assert!(s.due(&moved, t0 + Duration::from_secs(190)));
    }

    #[test]
    fn disabled_and_unscheduled_jobs_never_run() {
        let mut s = Schedule::default();
        let t = Instant::now() + Duration::from_secs(3600);
        assert!(!s.due(&job(None, None, true), t));
        assert!(!s.due(&job(Some(1), None, false), t));
    }
}

#[cfg(test)]
mod host_tests {
    use super::*;

    fn host(state: &'static str, declared_lost: bool) -> HostView {
        HostView {
            name: "prod1".into(),
            kind: "agent".into(),
            address: Some("10.0.0.1:7400".into()),
            state,
            last_seen: None,
            version: None,
            accel: None,
            error: (state == "offline").then(|| "no answer".into()),
            used_by: vec![],
            fences: vec![],
            lost_after: Some("10m".into()),
            silent_since: (state == "offline").then(|| "2026-12-03T06:00:00Z".into()),
            declared_lost,
        }
    }

    #[test]
    fn each_change_of_a_host_is_said_once() {
        let mut s = Schedule::default();
        assert!(s.hosts_changed(&[host("online", false)]).is_empty());
        let silent = s.hosts_changed(&[host("offline", false)]);
        assert_eq!(silent.len(), 1, "{silent:?}");
        assert!(silent[0].contains("silent since 2026-12-03T06:00:00Z"), "{silent:?}");
        assert!(s.hosts_changed(&[host("offline", false)]).is_empty(), "said once");
        let lost = s.hosts_changed(&[host("offline", true)]);
        assert!(lost.len() == 1 && lost[0].contains("declared lost") && lost[0].contains("10m"), "{lost:?}");
        assert!(s.hosts_changed(&[host("offline", true)]).is_empty(), "said once");
        let back = s.hosts_changed(&[host("online", false)]);
        assert_eq!(back, vec!["host prod1: answers again".to_owned()]);
    }
}
