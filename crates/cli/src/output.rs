//! How results look: aligned tables for people, JSON for scripts.

use anyhow::Result;
use serde::Serialize;
use standby_engine::{
    FailbackView, HistoryView, HostView, JobView, OpOutcome, PlanRun, PlanView, ReplicaDeleted, ReplicaView,
    RestorePointView, RunOutcome, TaskView, VmView,
};

fn json<T: Serialize + ?Sized>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows with columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn vms(list: &[VmView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.host.clone(),
                v.role.into(),
                v.state.into(),
                v.config.cpus.to_string(),
                format!("{} MiB", v.config.memory_mib),
                v.disks.len().to_string(),
                v.driver.into(),
            ]
        })
        .collect();
    table(&["NAME", "HOST", "ROLE", "STATE", "CPUS", "MEMORY", "DISKS", "DRIVER"], &rows);
    Ok(())
}

pub fn vm(v: &VmView, as_json: bool) -> Result<()> {
    if as_json {
        return json(v);
    }
    println!("name:    {}", v.name);
    println!("host:    {}", v.host);
    println!("state:   {}{}", v.state, v.pid.map(|p| format!(" (pid {p})")).unwrap_or_default());
    println!(
        "driver:  {}",
        if v.driver == "libvirt" { "libvirt (a domain libvirt manages)" } else { "qemu (standby's own)" }
    );
    println!("cpus:    {}", v.config.cpus);
    if let Some(c) = &v.config.driver.cpu_model {
        println!("cpu:     {c}");
    }
    if let Some(m) = &v.config.driver.machine {
        println!("machine: {m}");
    }
    if let Some(f) = &v.config.driver.firmware {
        println!("uefi:    {} (variables in {})", f.loader, f.vars);
    }
    if let Some(t) = &v.config.driver.tpm {
        match &t.state {
            Some(state) => println!("tpm:     {} 2.0 (state in {state})", t.model),
            None => println!("tpm:     {} 2.0 (state kept by libvirt)", t.model),
        }
    }
    println!("memory:  {} MiB", v.config.memory_mib);
    for (i, d) in v.disks.iter().enumerate() {
        println!("disk {i}:  {} ({})", d.path, d.format);
    }
    for n in &v.config.driver.nics {
        println!("nic:     {n}");
    }
    for (from, to) in &v.config.driver.network_map {
        println!("network: {from} -> {to}");
    }
    if let Some(k) = &v.config.driver.kernel {
        println!("kernel:  {k}");
    }
    Ok(())
}

pub fn jobs(list: &[JobView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|j| {
            vec![
                j.name.clone(),
                j.vms.join(","),
                format!("{}:{}", j.target_host, j.target_dir),
                j.retain.to_string(),
                j.every_secs
                    .map(|s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string())
                    .unwrap_or("-".into()),
                j.last_run_at.clone().unwrap_or("-".into()),
                if j.enabled { "enabled" } else { "disabled" }.into(),
                match j.bandwidth {
                    Some(b) => format!("{}, at most {}/s", j.compression, bytes(b)),
                    None => j.compression.clone(),
                },
                if j.quiesce.enabled { format!("within {} s", j.quiesce.timeout_secs) } else { "no".into() },
            ]
        })
        .collect();
    table(&["NAME", "VMS", "TARGET", "RETAIN", "EVERY", "LAST RUN", "STATUS", "BETWEEN HOSTS", "FREEZE"], &rows);
    Ok(())
}

pub fn outcomes(list: &[RunOutcome], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    for o in list {
        match (&o.restore_point, &o.error) {
            (Some(rp), _) => println!(
                "{}: restore point {} ({}, {} transferred, {:.1} s, {}-consistent)",
                o.vm,
                rp.id,
                rp.method,
                bytes(rp.bytes_transferred),
                rp.duration_ms as f64 / 1000.0,
                rp.consistency
            ),
            (None, Some(e)) => println!("{}: FAILED: {e}", o.vm),
            (None, None) => println!("{}: no restore point", o.vm),
        }
        for n in &o.notes {
            println!("  note: {n}");
        }
    }
    Ok(())
}

pub fn replicas(list: &[ReplicaView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            vec![
                r.vm.clone(),
                r.job.clone(),
                if r.needs_attention.is_some() { format!("{} (needs attention)", r.state) } else { r.state.clone() },
                r.restore_points.to_string(),
                r.latest.clone().unwrap_or("-".into()),
                format!("{}:{}", r.target_host, r.dir),
                r.last_operation.clone().unwrap_or("-".into()),
            ]
        })
        .collect();
    table(&["VM", "JOB", "STATE", "POINTS", "LATEST", "LOCATION", "LAST OPERATION"], &rows);
    for r in list {
        if let Some(fence) = &r.fence {
            println!("{} (job {}): {fence}", r.vm, r.job);
        }
    }
    Ok(())
}

pub fn points(list: &[RestorePointView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.id.to_string(),
                p.created_at.clone(),
                p.method.clone(),
                p.consistency.clone(),
                bytes(p.bytes_transferred),
                p.disks.iter().map(|d| d.path.as_str()).collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    table(&["ID", "CREATED", "METHOD", "CONSISTENCY", "TRANSFERRED", "DISKS"], &rows);
    Ok(())
}

pub fn task_line(t: &TaskView) -> String {
    let r = &t.record;
    let status = if t.interrupted { "interrupted" } else { r.status.as_str() };
    let pct = (r.done_bytes * 100).checked_div(r.total_bytes).map(|p| format!(" {p}%")).unwrap_or_default();
    let bytes_part =
        if r.total_bytes > 0 { format!(" {}/{}", bytes(r.done_bytes), bytes(r.total_bytes)) } else { String::new() };
    let wire = match r.wire_bytes {
        0 => String::new(),
        w => format!(" ({:.1}x on the wire)", r.wire_data_bytes as f64 / w as f64),
    };
    let msg = r.message.as_deref().map(|m| format!(" - {m}")).unwrap_or_default();
    format!("task {} {} {}: {} [{}]{}{}{}{}", r.id, r.kind, r.subject, status, r.step, pct, bytes_part, wire, msg)
}

pub fn tasks(list: &[TaskView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    for t in list {
        println!("{}", task_line(t));
    }
    Ok(())
}

pub fn op_outcomes(list: &[OpOutcome], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    for o in list {
        let status = if o.ok { "ok" } else { "FAILED" };
        println!("{}: {status}: {}", o.vm, o.message);
        for w in &o.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(())
}

pub fn history(list: &[HistoryView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|h| {
            vec![h.at.clone(), h.vm.clone(), h.operation.clone(), h.result.clone(), h.detail.clone(), h.command.clone()]
        })
        .collect();
    table(&["AT", "VM", "OPERATION", "RESULT", "DETAIL", "COMMAND"], &rows);
    Ok(())
}

pub fn plans(list: &[PlanView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.vms.iter().map(|v| format!("{}:{}", v.vm, v.delay_secs)).collect::<Vec<_>>().join(" "),
                p.on_failure.clone(),
                p.pre_command.clone().unwrap_or("-".into()),
                p.post_command.clone().unwrap_or("-".into()),
                format!("{} s", p.hook_timeout_secs),
            ]
        })
        .collect();
    table(&["NAME", "VMS (VM:DELAY)", "ON FAILURE", "PRE", "POST", "COMMAND LIMIT"], &rows);
    Ok(())
}

pub fn plan_run(run: &PlanRun, as_json: bool) -> Result<()> {
    if as_json {
        return json(run);
    }
    if let Some(p) = &run.pre_command {
        println!("{p}");
    }
    for s in &run.steps {
        let at = s.started_after_secs.map(|t| format!(" at +{t:.2} s")).unwrap_or_default();
        println!("{}: {}{at} (took {:.2} s): {}", s.vm, s.result, s.took_secs, s.message);
        for w in &s.warnings {
            println!("  warning: {w}");
        }
    }
    if let Some(p) = &run.post_command {
        println!("{p}");
    }
    println!("plan {}: {}", run.plan, if run.ok { "ok" } else { "FAILED" });
    Ok(())
}

pub fn failbacks(list: &[FailbackView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|f| {
            vec![
                f.vm.clone(),
                f.state.clone(),
                f.target.clone(),
                f.method.clone(),
                format!("{} / {}", bytes(f.phase1.read), bytes(f.phase1.written + f.phase1.zeroed)),
                format!("{} / {}", bytes(f.phase2.read), bytes(f.phase2.written + f.phase2.zeroed)),
                f.switch.clone(),
                f.switched_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &["VM", "STATE", "TARGET", "METHOD", "PHASE 1 READ/WROTE", "PHASE 2 READ/WROTE", "SWITCH", "SWITCHED"],
        &rows,
    );
    Ok(())
}

pub fn replicas_deleted(list: &[ReplicaDeleted], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    for r in list {
        if r.kept {
            println!(
                "{} (job {}): replica removed; its {} restore point(s) stay in {}, no longer managed by standby",
                r.vm, r.job, r.restore_points, r.dir
            );
        } else {
            println!(
                "{} (job {}): replica removed; {} restore point(s) deleted ({} file(s))",
                r.vm,
                r.job,
                r.restore_points,
                r.deleted_files.len()
            );
        }
    }
    Ok(())
}

/// The local host keeps its one-line form (`local  accel=tcg`); agents say where they are
/// and whether they answer.
pub fn hosts(list: &[HostView], as_json: bool) -> Result<()> {
    if as_json {
        return json(list);
    }
    for h in list {
        match (&h.address, h.accel) {
            (_, Some(accel)) => println!("{}  accel={accel}", h.name),
            (address, None) => println!(
                "{}  {}  {}  version {}  last seen {}{}{}",
                h.name,
                h.state,
                address.as_deref().unwrap_or("-"),
                h.version.as_deref().unwrap_or("-"),
                h.last_seen.as_deref().unwrap_or("never"),
                match (h.state, h.used_by.is_empty()) {
                    ("offline", false) => format!("  blocks {}", h.used_by.join(", ")),
                    _ => String::new(),
                },
                h.error.as_deref().map(|e| format!("  ({e})")).unwrap_or_default()
            ),
        }
        match (&h.silent_since, &h.lost_after, h.declared_lost) {
            (Some(since), Some(after), true) => {
                println!("  declared lost: silent since {since}, longer than its lost-after {after}")
            }
            (Some(since), Some(after), false) => println!("  silent since {since}; declared lost after {after}"),
            (Some(since), None, _) => {
                println!("  silent since {since}; declared lost only by failover --source-unreachable")
            }
            _ => {}
        }
        if !h.fences.is_empty() {
            println!("  to fence when it answers: {}", h.fences.join(", "));
        }
    }
    Ok(())
}
