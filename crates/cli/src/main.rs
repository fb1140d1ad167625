//! `standby`: the command operators and scripts use. Parses arguments, calls the engine,
//! prints results (tables for people, `--json` for scripts) and errors with their causes.

mod daemon;
mod output;
mod progress;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use standby_engine::{
    Engine, FailbackOptions, FailbackTarget, JobSpec, PlanSpec, PointChoice, SwitchMode, VmSpec, LOCAL_HOST,
};

#[derive(Parser, Debug)]
#[command(name = "standby", version, about = "Disaster recovery for QEMU/KVM virtual machines")]
struct Cli {
    /// Where standby keeps its database and run files.
    #[arg(long, global = true, env = "STANDBY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Define, run and inspect VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Replication jobs.
    #[command(subcommand)]
    Job(JobCmd),
    /// Replicas and their restore points.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Long operations, also from another terminal.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Hosts standby can use.
    #[command(subcommand)]
    Host(HostCmd),
    /// Fail over to replicas (several VMs run in parallel); `failover undo VM...` undoes.
    Failover(FailoverArgs),
    /// Fail back from replicas in failover to production, in two phases; then commit or undo.
    Failback(FailbackArgs),
    /// Failover plans: ordered VMs, delays, commands before and after.
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Every operation and state change, oldest first.
    History {
        vm: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Run jobs on their intervals until stopped.
    Daemon {
        /// Seconds between checks for due jobs.
        #[arg(long, default_value_t = 5)]
        tick: u64,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct FailoverArgs {
    #[command(subcommand)]
    action: Option<FailoverCmd>,
    /// The source VMs whose replicas take over.
    #[arg(required = true)]
    vms: Vec<String>,
    /// The restore point: an id from `standby replica points VM`, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Run the replica even though the source VM is running (two copies, e.g. for a test).
    #[arg(long)]
    force: bool,
    /// The job whose replica takes over, when a VM is in more than one.
    #[arg(long)]
    job: Option<String>,
    #[command(flatten)]
    json: Json,
}

#[derive(Subcommand, Debug)]
enum FailoverCmd {
    /// For maintenance: sync, shut the source down, sync again, verify, fail over. No data loss.
    Planned {
        #[arg(required = true)]
        vms: Vec<String>,
        /// Seconds the source's guest gets to shut down before it is powered off.
        #[arg(long, default_value_t = 300)]
        shutdown_timeout: u64,
        /// The job whose replica takes over, when a VM is in more than one.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// The replicas become ordinary VMs for good: standalone disks, restore points removed.
    Permanent {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Power the replicas off and discard everything written during failover.
    Undo {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct FailbackArgs {
    #[command(subcommand)]
    action: Option<FailbackCmd>,
    /// The protected VMs whose replicas are in failover.
    #[arg(required = true)]
    vms: Vec<String>,
    /// Where the replica's state goes: `original` (the source VM's own disks),
    /// `existing:VM` (a VM registered beforehand, e.g. restored from a backup) or
    /// `new:HOST:DIR` (a new VM, its disks created in DIR on HOST).
    #[arg(long, required = true)]
    to: Option<FailbackTarget>,
    /// When production takes over: `auto` (right after phase 1), `manual`
    /// (`standby failback switch`) or `at:TIME` (RFC 3339; `standby daemon` runs it).
    #[arg(long, default_value = "auto")]
    switch: SwitchMode,
    /// Power the production VM on after the switch.
    #[arg(long)]
    power_on: bool,
    /// Seconds the replica's guest gets to shut down at the switch before it is powered off.
    #[arg(long, default_value_t = 900)]
    shutdown_timeout: u64,
    /// The job whose replica fails back, when a VM is in more than one.
    #[arg(long)]
    job: Option<String>,
    #[command(flatten)]
    json: Json,
}

#[derive(Subcommand, Debug)]
enum FailbackCmd {
    /// Phase 2 now: shut the replicas down, send their last changes, state failback.
    Switch {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Production works: keep the replica's final state as a restore point, resume replication.
    Commit {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Production does not work: power it off, and run the replica again as it was.
    Undo {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Failbacks in progress: target, method, bytes moved, switch.
    List {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Args, Debug)]
struct Json {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum VmCmd {
    /// Define a VM from existing disk images.
    Create {
        name: String,
        /// A qcow2 or raw image; repeat for more disks.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The format of each --disk, in order: qcow2 or raw. Without it each disk's format
        /// is probed once from its contents, shown and stored.
        #[arg(long = "format")]
        formats: Vec<String>,
        #[arg(long, default_value_t = 256)]
        memory: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// A NIC with user-mode networking (virtio-net-pci or e1000); repeat for more.
        #[arg(long = "nic")]
        nics: Vec<String>,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        #[arg(long, default_value = LOCAL_HOST)]
        host: String,
        #[command(flatten)]
        json: Json,
    },
    Start {
        name: String,
        /// Start even though the VM's counterpart (source or replica) is running, or the VM
        /// was retired by a permanent failover; recorded in the history.
        #[arg(long)]
        force: bool,
    },
    /// Ask the guest to shut down; power off after the timeout.
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Power off at once.
    Stop { name: String },
    List {
        #[command(flatten)]
        json: Json,
    },
    Show {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// Print the VM's serial console log.
    Console {
        name: String,
        /// Keep printing as the guest writes.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PlanCmd {
    Create {
        name: String,
        /// VM[:DELAY_SECS], in start order; the delay is the wait after this VM starts.
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        /// A shell command run before the first failover; the plan stops if it fails.
        #[arg(long)]
        pre: Option<String>,
        /// A shell command run after the last failover.
        #[arg(long)]
        post: Option<String>,
        /// Go on with the next VMs when one fails over unsuccessfully (default: stop).
        #[arg(long)]
        continue_on_failure: bool,
        #[command(flatten)]
        json: Json,
    },
    List {
        #[command(flatten)]
        json: Json,
    },
    Show {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// Fail over every VM of the plan, in order, honouring the delays.
    Run {
        name: String,
        /// Run replicas even where the source VM still runs.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Undo the failover of every VM of the plan.
    Undo {
        name: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum JobCmd {
    Create {
        name: String,
        #[arg(long = "vm", required = true)]
        vms: Vec<String>,
        #[arg(long)]
        target_host: String,
        #[arg(long)]
        target_dir: String,
        /// Restore points to keep (default 7).
        #[arg(long)]
        retain: Option<u32>,
        /// Run under `standby daemon` at this interval (30s, 15m, 1h, 1d).
        #[arg(long)]
        every: Option<String>,
        /// Name a VM's replica VM in failover by this suffix (default `_replica`).
        #[arg(long, allow_hyphen_values = true)]
        replica_suffix: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Run a job now and wait; exit 0 only when every VM got a restore point.
    Run {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    List {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum ReplicaCmd {
    List {
        #[command(flatten)]
        json: Json,
    },
    /// Restore points of a VM's replica, oldest first.
    Points {
        vm: String,
        /// The job, when the VM is in more than one.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum TaskCmd {
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        json: Json,
    },
    Show {
        id: i64,
        /// Keep showing progress until the task ends.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
enum HostCmd {
    /// Hosts and the accelerator their VMs start with.
    List,
    /// Boot a test guest under KVM; VMs use KVM from then on only if it booted.
    Probe {
        #[arg(long, default_value = LOCAL_HOST)]
        host: String,
        /// A kernel whose initramfs prints `STANDBY-GUEST up` (standby's test guest).
        #[arg(long)]
        kernel: String,
        #[arg(long)]
        initrd: String,
    },
}

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
    let data_dir = cli.data_dir.unwrap_or_else(default_data_dir);
    let mut engine =
        Engine::open(&data_dir).with_context(|| format!("cannot open standby's data in {}", data_dir.display()))?;
    engine.set_command(std::env::args().collect::<Vec<_>>().join(" "));
    for note in engine.recover_interrupted().context("recovering interrupted operations")? {
        eprintln!("standby: {note}");
    }
    match cli.command {
        Command::Vm(c) => vm(&engine, c),
        Command::Job(c) => job(&engine, c),
        Command::Replica(c) => replica(&engine, c),
        Command::Task(c) => task(&engine, c),
        Command::Host(HostCmd::List) => {
            for (name, accel) in engine.host_list() {
                println!("{name}  accel={accel}");
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
        Command::History { vm, json } => {
            output::history(&engine.history(vm.as_deref())?, json.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon { tick } => daemon::run(&engine, Duration::from_secs(tick.max(1))),
    }
}

fn vm(engine: &Engine, cmd: VmCmd) -> Result<ExitCode> {
    match cmd {
        VmCmd::Create { name, disks, formats, memory, cpus, nics, kernel, initrd, append, host, json } => {
            let probed = formats.is_empty();
            let v = engine.vm_create(&VmSpec {
                name,
                host,
                disks,
                formats,
                memory_mib: memory,
                cpus,
                nics,
                kernel,
                initrd,
                append,
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
        VmCmd::Show { name, json } => output::vm(&engine.vm_show(&name)?, json.json)?,
        VmCmd::Console { name, follow } => {
            let mut pos = 0;
            let mut out = std::io::stdout();
            loop {
                let (bytes, next) = engine.vm_console(&name, pos)?;
                out.write_all(&bytes)?;
                out.flush()?;
                pos = next;
                if !follow {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn job(engine: &Engine, cmd: JobCmd) -> Result<ExitCode> {
    match cmd {
        JobCmd::Create { name, vms, target_host, target_dir, retain, every, replica_suffix, json } => {
            let j =
                engine.job_create(&JobSpec { name, vms, target_host, target_dir, retain, every, replica_suffix })?;
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
    }
    Ok(ExitCode::SUCCESS)
}

fn replica(engine: &Engine, cmd: ReplicaCmd) -> Result<ExitCode> {
    match cmd {
        ReplicaCmd::List { json } => output::replicas(&engine.replica_list()?, json.json)?,
        ReplicaCmd::Points { vm, job, json } => {
            output::points(&engine.replica_points(&vm, job.as_deref())?, json.json)?
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
            (engine.failover(&args.vms, args.job.as_deref(), point, args.force), args.json.json)
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
        PlanCmd::Create { name, vms, pre, post, continue_on_failure, json } => {
            let vms = vms.iter().map(|v| plan_vm(v)).collect::<Result<Vec<_>>>()?;
            let p = engine.plan_create(&PlanSpec {
                name,
                vms,
                pre_command: pre,
                post_command: post,
                continue_on_failure,
            })?;
            output::plans(std::slice::from_ref(&p), json.json)?;
        }
        PlanCmd::List { json } => output::plans(&engine.plan_list()?, json.json)?,
        PlanCmd::Show { name, json } => output::plans(std::slice::from_ref(&engine.plan_show(&name)?), json.json)?,
        PlanCmd::Run { name, force, json } => {
            let run = engine.plan_run(&name, force)?;
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
