//! Failover plans: an ordered list of VMs with a delay after each one's start, optional
//! commands before and after, run (fail over all, in order) and undone (undo all).

use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use standby_model::{ReplicaState, VmName};
use standby_store::{PlanRecord, PlanVm};

use crate::failover::{OpOutcome, PointChoice};
use crate::{Engine, EngineError, Result};

/// What `standby plan create` asks for.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    pub name: String,
    pub vms: Vec<(String, u64)>,
    pub pre_command: Option<String>,
    pub post_command: Option<String>,
    pub continue_on_failure: bool,
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

/// Runs an operator's command through the shell; Err holds what to show when it fails.
fn run_command(what: &str, plan: &str, cmd: &str) -> std::result::Result<String, String> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .env("STANDBY_PLAN", plan)
        .output()
        .map_err(|e| format!("{what} {cmd:?} could not run: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(format!("{what} ok"))
    } else {
        Err(format!("{what} {cmd:?} failed ({}): {}", out.status, text.trim()))
    }
}

impl Engine {
    pub fn plan_create(&self, spec: &PlanSpec) -> Result<PlanRecord> {
        VmName::new(&spec.name)?;
        if self.store().plans()?.iter().any(|p| p.name == spec.name) {
            return Err(EngineError::Invalid(format!("a plan named {:?} already exists", spec.name)));
        }
        if spec.vms.is_empty() {
            return Err(EngineError::Invalid("a plan needs at least one --vm".into()));
        }
        for (i, (vm, _)) in spec.vms.iter().enumerate() {
            if spec.vms[..i].iter().any(|(v, _)| v == vm) {
                return Err(EngineError::Invalid(format!("VM {vm} is named twice in the plan")));
            }
            self.replica_of(vm, None)?;
        }
        let plan = PlanRecord {
            name: spec.name.clone(),
            vms: spec.vms.iter().map(|(vm, d)| PlanVm { vm: vm.clone(), delay_secs: *d }).collect(),
            pre_command: spec.pre_command.clone(),
            post_command: spec.post_command.clone(),
            on_failure: if spec.continue_on_failure { "continue" } else { "stop" }.into(),
            created_at: standby_store::now(),
        };
        self.store().insert_plan(&plan)?;
        Ok(plan)
    }

    pub fn plan_list(&self) -> Result<Vec<PlanRecord>> {
        Ok(self.store().plans()?)
    }

    pub fn plan_show(&self, name: &str) -> Result<PlanRecord> {
        self.store()
            .plans()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| EngineError::Invalid(format!("unknown plan {name:?}; see `standby plan list`")))
    }

    /// Fails over every VM of the plan in order, waiting each VM's delay after it runs.
    pub fn plan_run(&self, name: &str, force: bool) -> Result<PlanRun> {
        let plan = self.plan_show(name)?;
        let mut run = PlanRun { plan: name.into(), ok: true, pre_command: None, post_command: None, steps: Vec::new() };
        if let Some(cmd) = &plan.pre_command {
            match run_command("pre-failover command", name, cmd) {
                Ok(m) => run.pre_command = Some(m),
                Err(m) => {
                    self.record_raw(&format!("plan:{name}"), "plan run", "failed", &m);
                    return Err(EngineError::Invalid(format!("{m}; no VM was failed over")));
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
                self.failover(std::slice::from_ref(&pv.vm), None, PointChoice::Latest, force).remove(0);
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
            let r = run_command("post-failover command", name, cmd);
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
        let plan = self.plan_show(name)?;
        let mut in_failover = Vec::new();
        let mut others = Vec::new();
        for pv in &plan.vms {
            let state = self.replica_of(&pv.vm, None)?.state;
            if state == ReplicaState::Failover.as_str() {
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
