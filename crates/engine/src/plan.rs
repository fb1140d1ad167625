//! Failover plans: an ordered list of VMs with a delay after each one's start, optional
//! commands before and after, run (fail over all, in order) and undone (undo all).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use standby_model::{ReplicaState, VmName};
use standby_store::{PlanRecord, PlanVm};

use crate::batch::OpOutcome;
use crate::failover::{Despite, PointChoice};
use crate::{Engine, EngineError, Result};

/// What `standby plan create` asks for.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub name: String,
    pub vms: Vec<(String, u64)>,
    pub pre_command: Option<String>,
    pub post_command: Option<String>,
    pub continue_on_failure: bool,
    /// Seconds each command may run before it is killed (default 5 minutes).
    pub hook_timeout_secs: Option<u64>,
}

/// What `standby plan change` asks for; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct PlanChange {
    pub vms: Option<Vec<(String, u64)>>,
    pub pre_command: Option<Option<String>>,
    pub post_command: Option<Option<String>>,
    pub continue_on_failure: Option<bool>,
    pub hook_timeout_secs: Option<u64>,
}

/// How long a plan's command may run by default: long enough for a DNS or load-balancer
/// change, short enough that a hung command does not hold a disaster failover for long.
pub const DEFAULT_HOOK_TIMEOUT_SECS: u64 = 300;

/// A failover plan as `standby plan list/show --json` prints it (its fields are the
/// scripts' interface; the table behind them may change).
#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    pub name: String,
    pub vms: Vec<PlanVmView>,
    pub pre_command: Option<String>,
    pub post_command: Option<String>,
    /// `stop` or `continue` when a VM fails over unsuccessfully (or a command fails).
    pub on_failure: String,
    /// Seconds a pre- or post-command may run before it is killed.
    pub hook_timeout_secs: u64,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanVmView {
    pub vm: String,
    /// Seconds to wait after this VM started before starting the next.
    pub delay_secs: u64,
}

impl From<PlanRecord> for PlanView {
    fn from(p: PlanRecord) -> PlanView {
        PlanView {
            name: p.name,
            vms: p.vms.into_iter().map(|v| PlanVmView { vm: v.vm, delay_secs: v.delay_secs }).collect(),
            pre_command: p.pre_command,
            post_command: p.post_command,
            on_failure: p.on_failure,
            hook_timeout_secs: p.hook_timeout_secs,
            created_at: p.created_at,
        }
    }
}

/// One VM's part of a plan run.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStep {
    pub vm: String,
    /// `ok`, `failed` or `not started`.
    pub result: &'static str,
    pub message: String,
    pub warnings: Vec<String>,
    /// Seconds from the start of the plan (after its pre-command) to this VM's replica running.
    pub started_after_secs: Option<f64>,
    pub took_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanRun {
    pub plan: String,
    pub ok: bool,
    pub pre_command: Option<String>,
    pub post_command: Option<String>,
    pub steps: Vec<PlanStep>,
}

/// Runs an operator's command through the shell, killed with everything it started when
/// `timeout` passes; Err holds what to show when it fails.
fn run_command(what: &str, plan: &str, cmd: &str, timeout: Duration) -> std::result::Result<String, String> {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .env("STANDBY_PLAN", plan)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills the shell and whatever it started.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{what} {cmd:?} could not run: {e}"))?;
    // Readers on threads, so that a command filling its pipes cannot stall the wait, and a
    // descendant that escaped the group and keeps a pipe open cannot stall standby.
    let (tx, rx) = mpsc::channel();
    for mut pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("{what} {cmd:?}: cannot wait for it: {e}")),
        }
    };
    let Some(status) = status else {
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        return Err(format!(
            "{what} {cmd:?} did not finish within {} s and was killed (change the limit with \
             standby plan change {plan} --hook-timeout SECS)",
            timeout.as_secs()
        ));
    };
    let mut text = String::new();
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(buf) => text.push_str(&String::from_utf8_lossy(&buf)),
            Err(_) => break,
        }
    }
    if status.success() {
        Ok(format!("{what} ok"))
    } else {
        Err(format!("{what} {cmd:?} failed ({status}): {}", text.trim()))
    }
}

impl Engine {
    pub fn plan_create(&self, spec: &PlanSpec) -> Result<PlanView> {
        VmName::new(&spec.name)?;
        if self.store().plans()?.iter().any(|p| p.name == spec.name) {
            return Err(EngineError::PlanExists(spec.name.clone()));
        }
        self.check_plan_vms(&spec.vms)?;
        let plan = PlanRecord {
            name: spec.name.clone(),
            vms: spec.vms.iter().map(|(vm, d)| PlanVm { vm: vm.clone(), delay_secs: *d }).collect(),
            pre_command: spec.pre_command.clone(),
            post_command: spec.post_command.clone(),
            on_failure: if spec.continue_on_failure { "continue" } else { "stop" }.into(),
            hook_timeout_secs: check_hook_timeout(spec.hook_timeout_secs.unwrap_or(DEFAULT_HOOK_TIMEOUT_SECS))?,
            created_at: standby_store::now(),
        };
        self.store().insert_plan(&plan)?;
        self.record_raw(&format!("plan:{}", plan.name), "plan create", "ok", &plan_summary(&plan));
        Ok(PlanView::from(plan))
    }

    /// Changes a plan. Refused while it runs; its VMs must each have a replica.
    pub fn plan_change(&self, name: &str, change: &PlanChange) -> Result<PlanView> {
        self.plan_record(name)?;
        let _lock = PlanLock::acquire(self, name, "plan change")?;
        let mut plan = self.plan_record(name)?;
        if let Some(vms) = &change.vms {
            self.check_plan_vms(vms)?;
            plan.vms = vms.iter().map(|(vm, d)| PlanVm { vm: vm.clone(), delay_secs: *d }).collect();
        }
        if let Some(pre) = &change.pre_command {
            plan.pre_command = pre.clone();
        }
        if let Some(post) = &change.post_command {
            plan.post_command = post.clone();
        }
        if let Some(c) = change.continue_on_failure {
            plan.on_failure = if c { "continue" } else { "stop" }.into();
        }
        if let Some(t) = change.hook_timeout_secs {
            plan.hook_timeout_secs = check_hook_timeout(t)?;
        }
        self.store().update_plan(&plan)?;
        self.record_raw(&format!("plan:{name}"), "plan change", "ok", &plan_summary(&plan));
        Ok(PlanView::from(plan))
    }

    /// Deletes a plan's definition; its VMs and replicas are not touched. Refused while it runs.
    pub fn plan_delete(&self, name: &str) -> Result<()> {
        self.plan_record(name)?;
        let _lock = PlanLock::acquire(self, name, "plan delete")?;
        let plan = self.plan_record(name)?;
        self.store().delete_plan(name)?;
        self.record_raw(&format!("plan:{name}"), "plan delete", "ok", &plan_summary(&plan));
        Ok(())
    }

    fn check_plan_vms(&self, vms: &[(String, u64)]) -> Result<()> {
        if vms.is_empty() {
            return Err(EngineError::BadArgument { arg: "--vm", why: "a plan needs at least one --vm".into() });
        }
        for (i, (vm, _)) in vms.iter().enumerate() {
            if vms[..i].iter().any(|(v, _)| v == vm) {
                return Err(EngineError::BadArgument {
                    arg: "--vm",
                    why: format!("VM {vm} is named twice in the plan"),
                });
            }
            self.replica_of(vm, None)?;
        }
        Ok(())
    }

    pub fn plan_list(&self) -> Result<Vec<PlanView>> {
        Ok(self.store().plans()?.into_iter().map(PlanView::from).collect())
    }

    pub fn plan_show(&self, name: &str) -> Result<PlanView> {
        self.plan_record(name).map(PlanView::from)
    }

    fn plan_record(&self, name: &str) -> Result<PlanRecord> {
        self.store().plans()?.into_iter().find(|p| p.name == name).ok_or_else(|| EngineError::UnknownPlan(name.into()))
    }

    /// Fails over every VM of the plan in order, waiting each VM's delay after it runs.
    pub fn plan_run(&self, name: &str, despite: Despite) -> Result<PlanRun> {
        self.plan_record(name)?;
        let _lock = PlanLock::acquire(self, name, "plan run")?;
        let plan = self.plan_record(name)?;
        let timeout = Duration::from_secs(plan.hook_timeout_secs);
        let mut run = PlanRun { plan: name.into(), ok: true, pre_command: None, post_command: None, steps: Vec::new() };
        if let Some(cmd) = &plan.pre_command {
            match run_command("pre-failover command", name, cmd, timeout) {
                Ok(m) => run.pre_command = Some(m),
                // The plan's failure policy decides: stop before any VM, or fail over anyway
                // (a disaster failover must not wait on a broken or hung command).
                Err(m) if plan.on_failure == "continue" => {
                    run.ok = false;
                    run.pre_command = Some(format!("{m}; continuing, as the plan says"));
                }
                Err(m) => {
                    self.record_raw(&format!("plan:{name}"), "plan run", "failed", &m);
                    return Err(EngineError::PartlyDone {
                        vm: format!("plan:{name}"),
                        done: m,
                        failed: "no VM was failed over".into(),
                    });
                }
            }
        }
        let start = Instant::now();
        let mut stopped_by: Option<String> = None;
        for (i, pv) in plan.vms.iter().enumerate() {
            if let Some(failed) = &stopped_by {
                run.steps.push(PlanStep {
                    vm: pv.vm.clone(),
                    result: "not started",
                    message: format!("the plan stopped after {failed} failed"),
                    warnings: Vec::new(),
                    started_after_secs: None,
                    took_secs: 0.0,
                });
                continue;
            }
            let t0 = Instant::now();
            let OpOutcome { ok, message, warnings, .. } =
                self.failover(std::slice::from_ref(&pv.vm), None, PointChoice::Latest, despite).remove(0);
            let started = start.elapsed().as_secs_f64();
            run.ok &= ok;
            run.steps.push(PlanStep {
                vm: pv.vm.clone(),
                result: if ok { "ok" } else { "failed" },
                message,
                warnings,
                started_after_secs: ok.then_some(started),
                took_secs: t0.elapsed().as_secs_f64(),
            });
            if !ok && plan.on_failure == "stop" {
                stopped_by = Some(pv.vm.clone());
            }
            if ok && i + 1 < plan.vms.len() {
                std::thread::sleep(Duration::from_secs(pv.delay_secs));
            }
        }
        if let Some(cmd) = &plan.post_command {
            let r = run_command("post-failover command", name, cmd, timeout);
            run.ok &= r.is_ok();
            run.post_command = Some(r.unwrap_or_else(|e| e));
        }
        let summary =
            format!("{} of {} VMs failed over", run.steps.iter().filter(|s| s.result == "ok").count(), run.steps.len());
        self.record_raw(&format!("plan:{name}"), "plan run", if run.ok { "ok" } else { "failed" }, &summary);
        Ok(run)
    }

    /// Undoes the failover of every VM of the plan that is in failover, in parallel.
    pub fn plan_undo(&self, name: &str) -> Result<Vec<OpOutcome>> {
        self.plan_record(name)?;
        let _lock = PlanLock::acquire(self, name, "plan undo")?;
        let plan = self.plan_record(name)?;
        let mut in_failover = Vec::new();
        let mut others = Vec::new();
        for pv in &plan.vms {
            let state = self.replica_of(&pv.vm, None)?.state;
            if state == ReplicaState::Failover {
                in_failover.push(pv.vm.clone());
            } else {
                others.push(OpOutcome {
                    vm: pv.vm.clone(),
                    ok: true,
                    message: format!("nothing to undo: its replica is {state}"),
                    warnings: Vec::new(),
                });
            }
        }
        let mut outcomes = self.failover_undo(&in_failover, None);
        outcomes.extend(others);
        let ok = outcomes.iter().all(|o| o.ok);
        self.record_raw(
            &format!("plan:{name}"),
            "plan undo",
            if ok { "ok" } else { "failed" },
            &format!("{} VM(s) undone", in_failover.len()),
        );
        Ok(outcomes)
    }
}

fn check_hook_timeout(secs: u64) -> Result<u64> {
    if !(1..=86_400).contains(&secs) {
        return Err(EngineError::BadArgument {
            arg: "--hook-timeout",
            why: format!("--hook-timeout {secs} is out of range 1..=86400 seconds"),
        });
    }
    Ok(secs)
}

fn plan_summary(p: &PlanRecord) -> String {
    let vms: Vec<String> = p.vms.iter().map(|v| format!("{}:{}", v.vm, v.delay_secs)).collect();
    format!(
        "VMs {}; pre {:?}; post {:?}; on failure {}; command limit {} s",
        vms.join(" "),
        p.pre_command.as_deref().unwrap_or("none"),
        p.post_command.as_deref().unwrap_or("none"),
        p.on_failure,
        p.hook_timeout_secs
    )
}

/// A running plan holds its lock, so that it is not changed or deleted under the run.
struct PlanLock(#[allow(dead_code)] crate::lock::VmLock);

impl PlanLock {
    fn acquire(engine: &Engine, plan: &str, purpose: &str) -> Result<PlanLock> {
        crate::lock::VmLock::acquire_named(engine.data_dir(), &format!("plan-{plan}"), &format!("plan {plan}"), purpose)
            .map(PlanLock)
    }
}
