//! `standby`: the command operators and scripts use. Parses arguments, calls the engine,
//! prints results (tables for people, `--json` for scripts) and errors with their causes.

mod args;
mod daemon;
mod output;
mod progress;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use args::{
    Cli, Command, FailbackArgs, FailbackCmd, FailoverArgs, FailoverCmd, HostCmd, JobCmd, PlanCmd, ReplicaCmd, TaskCmd,
    VmCmd,
};
use clap::Parser;
use standby_engine::{
    Despite, DriverConfig, Engine, FailbackOptions, Firmware, JobChange, JobSpec, PlanChange, PlanSpec, PointChoice,
    Tpm, VmChange, VmConfig, VmSpec,
};

fn default_data_dir() -> PathBuf {
    if nix_is_root() {
        return PathBuf::from("/var/lib/standby");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/standby"),
        None => PathBuf::from("/var/lib/standby"),
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    // An agent is not a controller: it opens no database.
    if let Command::Agent { listen, libvirt } = &cli.command {
        let dir = cli.data_dir.clone().unwrap_or_else(|| PathBuf::from("/var/lib/standby-agent"));
        standby_agent::run(listen, &dir, libvirt.as_deref(), &mut std::io::stdout())
            .with_context(|| format!("the agent on {listen} with data in {}", dir.display()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    let mut engine =
        Engine::open(&data_dir).with_context(|| format!("cannot open standby's data in {}", data_dir.display()))?;
    engine.set_command(std::env::args().collect::<Vec<_>>().join(" "));
    // Commands that only read report what waits for recovery and change nothing; the
    // others first finish what interrupted operations left.
    if reads_only(&cli.command) {
        for note in engine.recovery_needed().context("reading the replicas' state")? {
            eprintln!("standby: {note}");
        }
    } else {
        let mut done = engine.recover_interrupted().context("recovering interrupted operations")?;
        if matches!(cli.command, Command::Recover) {
            // Hosts that answer again get their fences carried out now, not at a failback.
            let (fenced, attention) = engine.fence_returning().context("fencing sources whose hosts answer again")?;
            done.notes.extend(fenced);
            done.attention.extend(attention);
            if done.notes.is_empty() && done.attention.is_empty() {
                println!("nothing to recover");
            }
            for note in done.notes.iter().chain(&done.attention) {
                println!("{note}");
            }
            return Ok(if done.attention.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        for note in done.notes.iter().chain(&done.attention) {
            eprintln!("standby: {note}");
        }
    }
    match cli.command {
        Command::Vm(c) => vm(&engine, c),
        Command::Job(c) => job(&engine, c),
        Command::Replica(c) => replica(&engine, c),
        Command::Task(c) => task(&engine, c),
        Command::Host(HostCmd::List { json }) => {
            output::hosts(&engine.host_list()?, json.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCmd::Change { name, lost_after, json }) => {
            output::hosts(std::slice::from_ref(&engine.host_change(&name, &lost_after)?), json.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCmd::Add { name, address, token, libvirt: Some(uri), lost_after }) => {
            if address.is_some() || token.is_some() || lost_after.is_some() {
                anyhow::bail!("--libvirt adds this machine's daemon: --address, --token and --lost-after do not apply");
            }
            let h = engine.host_add_libvirt(&name, &uri)?;
            println!("host {} added: {} at {uri}", h.name, h.version.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCmd::Add { name, address, token, libvirt: None, lost_after }) => {
            let (address, token) = (address.unwrap_or_default(), token.unwrap_or_default());
            let h = engine.host_add(&name, &address, &token, lost_after.as_deref())?;
            println!("host {} enrolled: agent {} at {address}", h.name, h.version.unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCmd::Remove { name }) => {
            let notes = engine.host_remove(&name)?;
            println!("host {name} removed");
            for note in notes {
                println!("{note}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCmd::Probe { host, kernel, initrd }) => {
            match engine.host_probe(&host, &kernel, &initrd)? {
                "kvm" => println!("{host}: a guest booted under KVM; VMs start with KVM"),
                _ => println!("{host}: no guest boot under KVM here; VMs start with TCG"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Failover(args) => failover(&engine, args),
        Command::Failback(args) => failback(&engine, args),
        Command::Plan(c) => plan(&engine, c),
        Command::History { vm, limit, json } => {
            output::history(&engine.history(vm.as_deref(), limit)?, json.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Recover => Ok(ExitCode::SUCCESS),
        Command::Agent { .. } => unreachable!("the agent runs before any engine is opened"),
        Command::Daemon { tick } => daemon::run(&engine, Duration::from_secs(tick.max(1))),
    }
}

/// Whether a command only reads state (and so must not change it, not even by recovery).
fn reads_only(cmd: &Command) -> bool {
    match cmd {
        Command::Vm(c) => matches!(c, VmCmd::List { .. } | VmCmd::Show { .. } | VmCmd::Console { .. }),
        Command::Job(c) => matches!(c, JobCmd::List { .. }),
        Command::Replica(c) => matches!(c, ReplicaCmd::List { .. } | ReplicaCmd::Points { .. }),
        Command::Task(_) | Command::History { .. } => true,
        Command::Host(c) => matches!(c, HostCmd::List { .. }),
        Command::Plan(c) => matches!(c, PlanCmd::List { .. } | PlanCmd::Show { .. }),
        Command::Failback(a) => matches!(a.action, Some(FailbackCmd::List { .. })),
        Command::Failover(_) | Command::Recover | Command::Daemon { .. } | Command::Agent { .. } => false,
    }
}

fn vm(engine: &Engine, cmd: VmCmd) -> Result<ExitCode> {
    match cmd {
        VmCmd::Import { domain, host, json } => {
            let v = engine.vm_import(&domain, &host)?;
            output::vm(&v, json.json)?;
        }
        VmCmd::Create {
            name,
            disks,
            formats,
            memory,
            cpus,
            nics,
            kernel,
            initrd,
            append,
            machine,
            cpu_model,
            uefi,
            nvram,
            tpm,
            host,
            json,
        } => {
            let firmware =
                nvram.filter(|_| uefi).map(|vars| Firmware { loader: standby_engine::OVMF_CODE.into(), vars });
            let probed = formats.is_empty();
            let v = engine.vm_create(&VmSpec {
                name,
                host,
                disks,
                formats,
                config: VmConfig {
                    cpus,
                    memory_mib: memory,
                    driver: DriverConfig {
                        nics,
                        kernel,
                        initrd,
                        append,
                        machine,
                        cpu_model,
                        firmware,
                        tpm: tpm.map(|state| Tpm { model: "tpm-tis".into(), state: Some(state) }),
                        ..DriverConfig::default()
                    },
                },
            })?;
            output::vm(&v, json.json)?;
            if probed && !json.json {
                println!("(disk formats probed from their contents; state them with --format to be sure)");
            }
        }
        VmCmd::Start { name, force } => {
            let v = engine.vm_start(&name, force)?;
            println!("{}: running (pid {})", v.name, v.pid.unwrap_or_default());
        }
        VmCmd::Shutdown { name, timeout } => {
            if engine.vm_shutdown(&name, Duration::from_secs(timeout))? {
                println!("{name}: guest shut down");
            } else {
                println!("{name}: guest did not shut down within {timeout} s; powered off");
            }
        }
        VmCmd::Stop { name } => {
            engine.vm_stop(&name)?;
            println!("{name}: powered off");
        }
        VmCmd::List { json } => output::vms(&engine.vm_list()?, json.json)?,
        VmCmd::Change {
            name,
            memory,
            cpus,
            nics,
            no_nics,
            kernel,
            no_kernel,
            initrd,
            append,
            machine,
            cpu_model,
            json,
        } => {
            let or_default = |v: Option<String>| v.map(|v| (v != "default").then_some(v));
            let change = VmChange {
                memory_mib: memory,
                cpus,
                nics: if no_nics { Some(Vec::new()) } else { (!nics.is_empty()).then_some(nics) },
                kernel: if no_kernel { Some(None) } else { kernel.map(Some) },
                initrd: initrd.map(Some),
                append: append.map(Some),
                machine: or_default(machine),
                cpu_model: or_default(cpu_model),
            };
            output::vm(&engine.vm_change(&name, &change)?, json.json)?;
        }
        VmCmd::Delete { name } => {
            let disks = engine.vm_delete(&name)?;
            println!("{name}: definition deleted; its disks were not touched: {}", disks.join(" "));
        }
        VmCmd::Show { name, json } => output::vm(&engine.vm_show(&name)?, json.json)?,
        VmCmd::Console { name, follow } => {
            let mut pos = 0;
            let mut out = std::io::stdout();
            loop {
                // Piece by piece: the whole log is never in memory at once.
                let (bytes, next) = engine.vm_console(&name, pos)?;
                out.write_all(&bytes)?;
                out.flush()?;
                pos = next;
                if bytes.is_empty() {
                    if !follow {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn job(engine: &Engine, cmd: JobCmd) -> Result<ExitCode> {
    match cmd {
        JobCmd::Create {
            name,
            vms,
            target_host,
            target_dir,
            retain,
            every,
            replica_suffix,
            compression,
            bandwidth,
            retry_window,
            network_map,
            freeze,
            json,
        } => {
            let spec = JobSpec {
                name,
                vms,
                target_host,
                target_dir,
                retain,
                every,
                replica_suffix,
                compression,
                bandwidth,
                retry_window,
                network_map,
                freeze: freeze.spec(),
            };
            let j = engine.job_create(&spec)?;
            output::jobs(std::slice::from_ref(&j), json.json)?;
        }
        JobCmd::Run { name, json } => {
            let bars = progress::Terminal::new();
            let outcomes = engine.job_run(&name, &bars)?;
            bars.finish();
            output::outcomes(&outcomes, json.json)?;
            if outcomes.iter().any(|o| o.error.is_some()) {
                return Ok(ExitCode::FAILURE);
            }
        }
        JobCmd::List { json } => output::jobs(&engine.job_list()?, json.json)?,
        JobCmd::Change {
            name,
            retain,
            every,
            no_schedule,
            add_vms,
            remove_vms,
            compression,
            bandwidth,
            retry_window,
            freeze,
            json,
        } => {
            let change = JobChange {
                retain,
                every: if no_schedule { Some(None) } else { every.map(Some) },
                add_vms,
                remove_vms,
                compression,
                bandwidth: bandwidth.map(|b| (b != "none").then_some(b)),
                retry_window,
                freeze: freeze.spec(),
            };
            output::jobs(std::slice::from_ref(&engine.job_change(&name, &change)?), json.json)?;
        }
        JobCmd::Enable { name } => {
            engine.job_set_enabled(&name, true)?;
            println!("job {name}: enabled");
        }
        JobCmd::Disable { name } => {
            engine.job_set_enabled(&name, false)?;
            println!("job {name}: disabled; its replicas and restore points stay (standby job enable {name})");
        }
        JobCmd::Delete { name, points, json } => {
            let points = points.decide(&format!("every replica of job {name}"))?;
            output::replicas_deleted(&engine.job_delete(&name, points)?, json.json)?;
            if !json.json {
                println!("job {name}: deleted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn replica(engine: &Engine, cmd: ReplicaCmd) -> Result<ExitCode> {
    match cmd {
        ReplicaCmd::List { json } => output::replicas(&engine.replica_list()?, json.json)?,
        ReplicaCmd::Points { vm, job, json } => {
            output::points(&engine.replica_points(&vm, job.as_deref())?, json.json)?
        }
        ReplicaCmd::Delete { vm, job, points, json } => {
            let points = points.decide(&format!("the replica of VM {vm}"))?;
            let done = engine.replica_delete(&vm, job.as_deref(), points)?;
            output::replicas_deleted(std::slice::from_ref(&done), json.json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn task(engine: &Engine, cmd: TaskCmd) -> Result<ExitCode> {
    match cmd {
        TaskCmd::List { limit, json } => output::tasks(&engine.task_list(limit)?, json.json)?,
        TaskCmd::Show { id, follow, json } => {
            if !follow {
                output::tasks(std::slice::from_ref(&engine.task_show(id)?), json.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut last = String::new();
            loop {
                let t = engine.task_show(id)?;
                let line = output::task_line(&t);
                if line != last {
                    println!("{line}");
                    last = line;
                }
                if t.record.status != "running" || t.interrupted {
                    return Ok(if t.record.status == "ok" { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn failover(engine: &Engine, args: FailoverArgs) -> Result<ExitCode> {
    let (outcomes, json) = match args.action {
        Some(FailoverCmd::Undo { vms, job, json }) => (engine.failover_undo(&vms, job.as_deref()), json.json),
        Some(FailoverCmd::Permanent { vms, job, json }) => (engine.failover_permanent(&vms, job.as_deref()), json.json),
        Some(FailoverCmd::Planned { vms, shutdown_timeout, job, json }) => {
            (engine.failover_planned(&vms, job.as_deref(), Duration::from_secs(shutdown_timeout)), json.json)
        }
        None => {
            let point = match args.point.as_str() {
                "latest" => PointChoice::Latest,
                id => PointChoice::Id(id.parse().with_context(|| {
                    format!("--point {id:?} is neither `latest` nor a restore point id (see standby replica points VM)")
                })?),
            };
            let despite = Despite { source_running: args.force, source_unreachable: args.source_unreachable };
            (engine.failover(&args.vms, args.job.as_deref(), point, despite), args.json.json)
        }
    };
    output::op_outcomes(&outcomes, json)?;
    Ok(if outcomes.iter().all(|o| o.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn failback(engine: &Engine, args: FailbackArgs) -> Result<ExitCode> {
    let bars = progress::Terminal::new();
    let (outcomes, json) = match args.action {
        Some(FailbackCmd::List { json }) => {
            output::failbacks(&engine.failback_list()?, json.json)?;
            return Ok(ExitCode::SUCCESS);
        }
        Some(FailbackCmd::Switch { vms, job, json }) => {
            (engine.failback_switch(&vms, job.as_deref(), &bars), json.json)
        }
        Some(FailbackCmd::Commit { vms, job, json }) => {
            (engine.failback_commit(&vms, job.as_deref(), &bars), json.json)
        }
        Some(FailbackCmd::Undo { vms, job, json }) => (engine.failback_undo(&vms, job.as_deref(), &bars), json.json),
        None => {
            let target = args.to.context("--to is required: original, existing:VM or new:HOST:DIR")?;
            let opts = FailbackOptions {
                target,
                switch: args.switch,
                power_on: args.power_on,
                shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            };
            (engine.failback(&args.vms, args.job.as_deref(), &opts, &bars), args.json.json)
        }
    };
    bars.finish();
    output::op_outcomes(&outcomes, json)?;
    Ok(if outcomes.iter().all(|o| o.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `VM[:DELAY_SECS]`.
fn plan_vm(arg: &str) -> Result<(String, u64)> {
    match arg.rsplit_once(':') {
        None => Ok((arg.to_owned(), 0)),
        Some((vm, delay)) => {
            let secs = delay.parse::<u64>().with_context(|| {
                format!("--vm {arg:?}: the delay {delay:?} is not a whole number of seconds (0 or more)")
            })?;
            Ok((vm.to_owned(), secs))
        }
    }
}

fn plan(engine: &Engine, cmd: PlanCmd) -> Result<ExitCode> {
    match cmd {
        PlanCmd::Create { name, vms, pre, post, continue_on_failure, hook_timeout, json } => {
            let vms = vms.iter().map(|v| plan_vm(v)).collect::<Result<Vec<_>>>()?;
            let p = engine.plan_create(&PlanSpec {
                name,
                vms,
                pre_command: pre,
                post_command: post,
                continue_on_failure,
                hook_timeout_secs: Some(hook_timeout),
            })?;
            output::plans(std::slice::from_ref(&p), json.json)?;
        }
        PlanCmd::Change {
            name,
            vms,
            pre,
            no_pre,
            post,
            no_post,
            continue_on_failure,
            stop_on_failure,
            hook_timeout,
            json,
        } => {
            let vms = vms.iter().map(|v| plan_vm(v)).collect::<Result<Vec<_>>>()?;
            let change = PlanChange {
                vms: (!vms.is_empty()).then_some(vms),
                pre_command: if no_pre { Some(None) } else { pre.map(Some) },
                post_command: if no_post { Some(None) } else { post.map(Some) },
                continue_on_failure: if continue_on_failure {
                    Some(true)
                } else if stop_on_failure {
                    Some(false)
                } else {
                    None
                },
                hook_timeout_secs: hook_timeout,
            };
            output::plans(std::slice::from_ref(&engine.plan_change(&name, &change)?), json.json)?;
        }
        PlanCmd::Delete { name } => {
            engine.plan_delete(&name)?;
            println!("plan {name}: deleted; its VMs and replicas are untouched");
        }
        PlanCmd::List { json } => output::plans(&engine.plan_list()?, json.json)?,
        PlanCmd::Show { name, json } => output::plans(std::slice::from_ref(&engine.plan_show(&name)?), json.json)?,
        PlanCmd::Run { name, force, source_unreachable, json } => {
            let run = engine.plan_run(&name, Despite { source_running: force, source_unreachable })?;
            output::plan_run(&run, json.json)?;
            if !run.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        PlanCmd::Undo { name, json } => {
            let outcomes = engine.plan_undo(&name)?;
            output::op_outcomes(&outcomes, json.json)?;
            if !outcomes.iter().all(|o| o.ok) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
