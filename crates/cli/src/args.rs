//! The command line: every command, its options, its one-line help and an example.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use standby_engine::{FailbackTarget, Points, SwitchMode, LOCAL_HOST};

#[derive(Parser, Debug)]
#[command(name = "standby", version, about = "Disaster recovery for QEMU/KVM virtual machines")]
pub(crate) struct Cli {
    /// Where standby keeps its database and run files.
    #[arg(long, global = true, env = "STANDBY_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Define, run and inspect VMs.
    #[command(subcommand, after_help = "Example: standby vm list")]
    Vm(VmCmd),
    /// Replication jobs.
    #[command(subcommand, after_help = "Example: standby job list")]
    Job(JobCmd),
    /// Replicas and their restore points.
    #[command(subcommand, after_help = "Example: standby replica list")]
    Replica(ReplicaCmd),
    /// Long operations, also from another terminal.
    #[command(subcommand, after_help = "Example: standby task list")]
    Task(TaskCmd),
    /// Hosts standby can use.
    #[command(subcommand, after_help = "Example: standby host list")]
    Host(HostCmd),
    /// Fail over to replicas (several VMs run in parallel); `failover undo VM...` undoes.
    Failover(FailoverArgs),
    /// Fail back from replicas in failover to production, in two phases; then commit or undo.
    Failback(FailbackArgs),
    /// Failover plans: ordered VMs, delays, commands before and after.
    #[command(subcommand, after_help = "Example: standby plan list")]
    Plan(PlanCmd),
    /// Every operation and state change, oldest first.
    #[command(after_help = "Example: standby history web --limit 20")]
    History {
        /// A VM, `plan:NAME` or `job:NAME`.
        vm: Option<String>,
        /// Show the newest N entries.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[command(flatten)]
        json: Json,
    },
    /// Finish or roll back what interrupted operations left (commands that change state do it first).
    #[command(after_help = "Example: standby recover")]
    Recover,
    /// Run this hypervisor host's agent for a controller elsewhere; `--data-dir` is the agent's own.
    #[command(after_help = "Example: standby agent --listen 0.0.0.0:7301 --data-dir /var/lib/standby-agent")]
    Agent {
        /// The address and port to listen on.
        #[arg(long)]
        listen: String,
        /// Drive this host's VMs through its libvirt daemon (`qemu:///system`) instead of
        /// standby's own QEMU driver: the domains libvirt already runs are protected as they are.
        #[arg(long)]
        libvirt: Option<String>,
    },
    /// Run jobs on their intervals until stopped.
    #[command(after_help = "Example: standby daemon --tick 5")]
    Daemon {
        /// Seconds between checks for due jobs.
        #[arg(long, default_value_t = 5)]
        tick: u64,
    },
}

#[derive(Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example: standby failover web --point latest"
)]
pub(crate) struct FailoverArgs {
    #[command(subcommand)]
    pub(crate) action: Option<FailoverCmd>,
    /// The source VMs whose replicas take over.
    #[arg(required = true)]
    pub(crate) vms: Vec<String>,
    /// The restore point: an id from `standby replica points VM`, or `latest`.
    #[arg(long, default_value = "latest")]
    pub(crate) point: String,
    /// Run the replica even though the source VM is running (two copies, e.g. for a test).
    #[arg(long)]
    pub(crate) force: bool,
    /// The source's host is lost (site down, link cut): fail over without it. The source
    /// is fenced (paused, powered off, its disks kept) when its host answers again.
    #[arg(long)]
    pub(crate) source_unreachable: bool,
    /// The job whose replica takes over, when a VM is in more than one.
    #[arg(long)]
    pub(crate) job: Option<String>,
    #[command(flatten)]
    pub(crate) json: Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum FailoverCmd {
    /// For maintenance: sync, shut the source down, sync again, verify, fail over. No data loss.
    #[command(after_help = "Example: standby failover planned web --shutdown-timeout 120")]
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
    #[command(after_help = "Example: standby failover permanent web")]
    Permanent {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Power the replicas off and discard everything written during failover.
    #[command(after_help = "Example: standby failover undo web")]
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
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example: standby failback web --to original --switch manual"
)]
pub(crate) struct FailbackArgs {
    #[command(subcommand)]
    pub(crate) action: Option<FailbackCmd>,
    /// The protected VMs whose replicas are in failover.
    #[arg(required = true)]
    pub(crate) vms: Vec<String>,
    /// Where the replica's state goes: `original` (the source VM's own disks),
    /// `existing:VM` (a VM registered beforehand, e.g. restored from a backup) or
    /// `new:HOST:DIR` (a new VM, its disks created in DIR on HOST).
    #[arg(long, required = true)]
    pub(crate) to: Option<FailbackTarget>,
    /// When production takes over: `auto` (right after phase 1), `manual`
    /// (`standby failback switch`) or `at:TIME` (RFC 3339; `standby daemon` runs it).
    #[arg(long, default_value = "auto")]
    pub(crate) switch: SwitchMode,
    /// Power the production VM on after the switch.
    #[arg(long)]
    pub(crate) power_on: bool,
    /// Seconds the replica's guest gets to shut down at the switch before it is powered off.
    #[arg(long, default_value_t = 900)]
    pub(crate) shutdown_timeout: u64,
    /// The job whose replica fails back, when a VM is in more than one.
    #[arg(long)]
    pub(crate) job: Option<String>,
    #[command(flatten)]
    pub(crate) json: Json,
}

#[derive(Subcommand, Debug)]
pub(crate) enum FailbackCmd {
    /// Phase 2 now: shut the replicas down, send their last changes, state failback.
    #[command(after_help = "Example: standby failback switch web")]
    Switch {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Production works: keep the replica's final state as a restore point, resume replication.
    #[command(after_help = "Example: standby failback commit web")]
    Commit {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Production does not work: power it off, and run the replica again as it was.
    #[command(after_help = "Example: standby failback undo web")]
    Undo {
        #[arg(required = true)]
        vms: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Failbacks in progress: target, method, bytes moved, switch.
    #[command(after_help = "Example: standby failback list --json")]
    List {
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Args, Debug)]
pub(crate) struct Json {
    /// Print JSON for scripts.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum VmCmd {
    /// Register an existing libvirt domain as it is (its disks and configuration are read
    /// from its definition; nothing in libvirt changes).
    #[command(after_help = "Example: standby vm import web --host kvm1")]
    Import {
        /// The domain's name, as `virsh list --all` shows it.
        domain: String,
        /// A host added with `standby host add NAME --libvirt URI`.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        json: Json,
    },
    /// Define a VM from existing disk images.
    #[command(
        after_help = "Example: standby vm create web --disk /srv/web.qcow2 --format qcow2 --memory 1024 --nic virtio-net-pci"
    )]
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
        /// A NIC: MODEL (virtio-net-pci or e1000) with user-mode networking, or
        /// MODEL,bridge=NAME,mac=MAC on a bridge, or MODEL,tap=NAME,mac=MAC on a tap; repeat.
        #[arg(long = "nic")]
        nics: Vec<String>,
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        #[arg(long, requires = "kernel")]
        append: Option<String>,
        /// QEMU's machine type (pc, q35, pc-q35-7.2, ...); default: QEMU's.
        #[arg(long)]
        machine: Option<String>,
        /// QEMU's CPU model (qemu64, Skylake-Server, ...); default: QEMU's.
        #[arg(long)]
        cpu_model: Option<String>,
        /// Boot UEFI (Debian's OVMF) instead of BIOS; needs --nvram.
        #[arg(long, requires = "nvram")]
        uefi: bool,
        /// The VM's UEFI variable store; made from OVMF's template when it does not exist.
        #[arg(long, requires = "uefi")]
        nvram: Option<String>,
        /// Give the VM an emulated TPM 2.0 (swtpm) keeping its state in this file (made at
        /// its first start; an existing one is the VM's TPM as it was).
        #[arg(long, value_name = "STATE_FILE")]
        tpm: Option<String>,
        #[arg(long, default_value = LOCAL_HOST)]
        host: String,
        #[command(flatten)]
        json: Json,
    },
    /// Start a VM (refused beside its running counterpart).
    #[command(after_help = "Example: standby vm start web")]
    Start {
        name: String,
        /// Start even though the VM's counterpart (source or replica) is running, or the VM
        /// was retired by a permanent failover; recorded in the history.
        #[arg(long)]
        force: bool,
    },
    /// Ask the guest to shut down; power off after the timeout.
    #[command(after_help = "Example: standby vm shutdown web --timeout 60")]
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Power off at once.
    #[command(after_help = "Example: standby vm stop web")]
    Stop { name: String },
    /// VMs with their role, state and configuration.
    #[command(after_help = "Example: standby vm list --json")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// One VM: its state, disks and configuration.
    #[command(after_help = "Example: standby vm show web")]
    Show {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// Change a stopped VM's memory, CPUs, NICs or kernel (applies at its next start).
    #[command(after_help = "Example: standby vm change web --memory 2048 --cpus 2")]
    Change {
        name: String,
        #[arg(long)]
        memory: Option<u32>,
        #[arg(long)]
        cpus: Option<u32>,
        /// The VM's NICs from now on (MODEL, MODEL,bridge=NAME,mac=MAC or MODEL,tap=NAME,mac=MAC).
        #[arg(long = "nic", conflicts_with = "no_nics")]
        nics: Vec<String>,
        /// Remove every NIC.
        #[arg(long)]
        no_nics: bool,
        #[arg(long, conflicts_with = "no_kernel")]
        kernel: Option<String>,
        /// Boot from the disks again: drop the kernel, initrd and kernel options.
        #[arg(long)]
        no_kernel: bool,
        #[arg(long)]
        initrd: Option<String>,
        #[arg(long)]
        append: Option<String>,
        /// QEMU's machine type from now on; `default` for QEMU's.
        #[arg(long)]
        machine: Option<String>,
        /// QEMU's CPU model from now on; `default` for QEMU's.
        #[arg(long)]
        cpu_model: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Forget a VM's definition; its disks stay. Refused while a job or plan uses it.
    #[command(after_help = "Example: standby vm delete old-web")]
    Delete { name: String },
    /// Print the VM's serial console log.
    #[command(after_help = "Example: standby vm console web --follow")]
    Console {
        name: String,
        /// Keep printing as the guest writes.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum PlanCmd {
    /// Define a failover plan: VMs in start order, commands before and after.
    #[command(after_help = "Example: standby plan create site --vm db:30 --vm web --post /usr/local/bin/switch-dns")]
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
        /// Go on when a VM fails over unsuccessfully or a command fails (default: stop).
        #[arg(long)]
        continue_on_failure: bool,
        /// Seconds each command may run before it is killed.
        #[arg(long, default_value_t = standby_engine::DEFAULT_HOOK_TIMEOUT_SECS)]
        hook_timeout: u64,
        #[command(flatten)]
        json: Json,
    },
    /// Failover plans.
    #[command(after_help = "Example: standby plan list")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// One failover plan.
    #[command(after_help = "Example: standby plan show site --json")]
    Show {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// Change a plan: its VMs (the whole list, in order), commands, failure policy, limits.
    #[command(after_help = "Example: standby plan change site --vm db:60 --vm web --hook-timeout 120")]
    Change {
        name: String,
        /// VM[:DELAY_SECS], in start order: replaces the plan's VMs.
        #[arg(long = "vm")]
        vms: Vec<String>,
        #[arg(long, conflicts_with = "no_pre")]
        pre: Option<String>,
        #[arg(long)]
        no_pre: bool,
        #[arg(long, conflicts_with = "no_post")]
        post: Option<String>,
        #[arg(long)]
        no_post: bool,
        #[arg(long, conflicts_with = "stop_on_failure")]
        continue_on_failure: bool,
        #[arg(long)]
        stop_on_failure: bool,
        /// Seconds each command may run before it is killed.
        #[arg(long)]
        hook_timeout: Option<u64>,
        #[command(flatten)]
        json: Json,
    },
    /// Delete a plan; its VMs and replicas are not touched.
    #[command(after_help = "Example: standby plan delete site")]
    Delete { name: String },
    /// Fail over every VM of the plan, in order, honouring the delays.
    #[command(after_help = "Example: standby plan run site")]
    Run {
        name: String,
        /// Run replicas even where the source VM still runs.
        #[arg(long)]
        force: bool,
        /// The production hosts are lost: fail over without them; each source is fenced
        /// when its host answers again.
        #[arg(long)]
        source_unreachable: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Undo the failover of every VM of the plan.
    #[command(after_help = "Example: standby plan undo site")]
    Undo {
        name: String,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum JobCmd {
    /// Replicate VMs to a directory on a DR host, keeping a chain of restore points.
    #[command(
        after_help = "Example: standby job create nightly --vm web --target-host local --target-dir /srv/dr --every 1h --retain 7"
    )]
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
        /// Between hosts, compress blocks with none, lz4 or zstd (default: zstd, fast level).
        #[arg(long)]
        compression: Option<String>,
        /// Between hosts, at most this on the wire: bytes per second (100M) or bits (800Mbit).
        #[arg(long)]
        bandwidth: Option<String>,
        /// How long a dropped link between hosts may stay down before a run fails (default 5m).
        #[arg(long)]
        retry_window: Option<String>,
        /// SRC=DST: at failover, a replica's NIC on network SRC (a libvirt network,
        /// bridge:NAME or tap:NAME) goes on DST; every network the VMs' NICs are on must be
        /// mapped. Repeat.
        #[arg(long = "network-map")]
        network_map: Vec<String>,
        #[command(flatten)]
        freeze: FreezeArgs,
        #[command(flatten)]
        json: Json,
    },
    /// Run a job now and wait; exit 0 only when every VM got a restore point.
    #[command(after_help = "Example: standby job run nightly")]
    Run {
        name: String,
        #[command(flatten)]
        json: Json,
    },
    /// Jobs, their targets, schedules and last runs.
    #[command(after_help = "Example: standby job list --json")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// Change a job's retention or interval, or the VMs it protects.
    #[command(after_help = "Example: standby job change nightly --retain 14 --every 30m --add-vm db")]
    Change {
        name: String,
        /// Restore points to keep; fewer are pruned at the next run.
        #[arg(long)]
        retain: Option<u32>,
        /// Run under `standby daemon` at this interval (30s, 15m, 1h, 1d).
        #[arg(long, conflicts_with = "no_schedule")]
        every: Option<String>,
        /// Run on demand only.
        #[arg(long)]
        no_schedule: bool,
        #[arg(long = "add-vm")]
        add_vms: Vec<String>,
        /// A VM whose replica holds no restore points (else: standby replica delete).
        #[arg(long = "remove-vm")]
        remove_vms: Vec<String>,
        /// Between hosts, compress blocks with none, lz4 or zstd.
        #[arg(long)]
        compression: Option<String>,
        /// Between hosts, at most this on the wire (100M, 800Mbit), or `none` for no limit.
        #[arg(long)]
        bandwidth: Option<String>,
        /// How long a dropped link between hosts may stay down before a run fails (30s, 5m).
        #[arg(long)]
        retry_window: Option<String>,
        #[command(flatten)]
        freeze: FreezeArgs,
        #[command(flatten)]
        json: Json,
    },
    /// Let a disabled job run again.
    #[command(after_help = "Example: standby job enable nightly")]
    Enable { name: String },
    /// Stop a job from running (the daemon skips it); its restore points stay.
    #[command(after_help = "Example: standby job disable nightly")]
    Disable { name: String },
    /// Delete a job and its replicas; restore points go only with --delete-points.
    #[command(after_help = "Example: standby job delete nightly --delete-points --yes")]
    Delete {
        name: String,
        #[command(flatten)]
        points: PointsArgs,
        #[command(flatten)]
        json: Json,
    },
}

/// Consistent points: how a run freezes a running guest's filesystems (through its
/// qemu-guest-agent) just around its instant.
#[derive(Args, Debug)]
pub(crate) struct FreezeArgs {
    /// Never ask the guest agent: points of running VMs are crash-consistent.
    #[arg(long, conflicts_with = "freeze")]
    pub(crate) no_freeze: bool,
    /// Freeze the guest again around each instant (the default).
    #[arg(long)]
    pub(crate) freeze: bool,
    /// How long the freeze, and each freeze command, may take before the run thaws the
    /// guest and takes a crash-consistent point instead (default 10s).
    #[arg(long)]
    pub(crate) freeze_timeout: Option<String>,
    /// Run this in the guest (its /bin/sh -c, through the agent) before each freeze; when
    /// it fails, the point is crash-consistent.
    #[arg(long, conflicts_with = "no_pre_freeze", allow_hyphen_values = true)]
    pub(crate) pre_freeze: Option<String>,
    #[arg(long)]
    pub(crate) no_pre_freeze: bool,
    /// Run this in the guest after each thaw.
    #[arg(long, conflicts_with = "no_post_freeze", allow_hyphen_values = true)]
    pub(crate) post_freeze: Option<String>,
    #[arg(long)]
    pub(crate) no_post_freeze: bool,
}

impl FreezeArgs {
    pub(crate) fn spec(self) -> standby_engine::FreezeSpec {
        let command = |given: Option<String>, none: bool| if none { Some(None) } else { given.map(Some) };
        standby_engine::FreezeSpec {
            enabled: if self.no_freeze { Some(false) } else { self.freeze.then_some(true) },
            timeout: self.freeze_timeout,
            pre_freeze: command(self.pre_freeze, self.no_pre_freeze),
            post_freeze: command(self.post_freeze, self.no_post_freeze),
        }
    }
}

#[derive(Args, Debug)]
pub(crate) struct PointsArgs {
    /// Delete the restore point files from the DR host (asks for confirmation).
    #[arg(long, conflicts_with = "keep_files")]
    pub(crate) delete_points: bool,
    /// Keep the restore point files on the DR host; standby forgets them.
    #[arg(long)]
    pub(crate) keep_files: bool,
    /// Confirm --delete-points without asking (for scripts).
    #[arg(long, requires = "delete_points")]
    pub(crate) yes: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ReplicaCmd {
    /// Replicas: state, restore points, last operation, what needs attention.
    #[command(after_help = "Example: standby replica list")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// Restore points of a VM's replica, oldest first.
    #[command(after_help = "Example: standby replica points web --job nightly")]
    Points {
        vm: String,
        /// The job, when the VM is in more than one.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// Remove a VM's replica from its job; its restore points go only with --delete-points.
    #[command(after_help = "Example: standby replica delete web --job nightly --delete-points")]
    Delete {
        vm: String,
        /// The job, when the VM is in more than one.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        points: PointsArgs,
        #[command(flatten)]
        json: Json,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum TaskCmd {
    /// The newest tasks (long operations), with progress.
    #[command(after_help = "Example: standby task list --limit 5")]
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        json: Json,
    },
    /// One task; --follow shows its progress until it ends.
    #[command(after_help = "Example: standby task show 42 --follow")]
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
pub(crate) enum HostCmd {
    /// Hosts: the accelerator VMs start with here, and whether each agent answers.
    #[command(after_help = "Example: standby host list")]
    List {
        #[command(flatten)]
        json: Json,
    },
    /// Enrol a host's agent (--address, --token), or this machine's libvirtd (--libvirt).
    #[command(after_help = "Example: standby host add kvm1 --libvirt qemu:///system")]
    Add {
        name: String,
        /// The agent's address and port.
        #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
        address: Option<String>,
        /// The `enrolment token:` the agent printed (also in its data directory).
        #[arg(long, required_unless_present = "libvirt", conflicts_with = "libvirt")]
        token: Option<String>,
        /// The libvirt daemon of this machine whose domains are the host's VMs.
        #[arg(long)]
        libvirt: Option<String>,
        /// Declare the host lost after this much silence (`10m`), so that failover goes
        /// ahead without `--source-unreachable`; default: only the operator declares it.
        #[arg(long)]
        lost_after: Option<String>,
    },
    /// Change how a host is declared lost: `--lost-after 10m`, or `--lost-after never`.
    #[command(after_help = "Example: standby host change prod1 --lost-after 10m")]
    Change {
        name: String,
        /// Silence after which the controller declares the host lost (counted from the
        /// first failed contact: `host list`, `standby daemon` checks, a failover); `never`.
        #[arg(long)]
        lost_after: String,
        #[command(flatten)]
        json: Json,
    },
    /// Forget an agent's host (refused while a VM or job uses it).
    #[command(after_help = "Example: standby host remove dr1")]
    Remove { name: String },
    /// Boot a test guest under KVM; VMs use KVM from then on only if it booted.
    #[command(
        after_help = "Example: standby host probe --kernel /boot/vmlinuz --initrd /var/lib/standby/guest.cpio.gz"
    )]
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

impl PointsArgs {
    /// What becomes of restore points; `--delete-points` is confirmed by `--yes` or by
    /// the operator typing `yes` on a terminal.
    pub(crate) fn decide(&self, what: &str) -> Result<Option<Points>> {
        use std::io::IsTerminal;
        if self.keep_files {
            return Ok(Some(Points::Keep));
        }
        if !self.delete_points {
            return Ok(None);
        }
        if !self.yes {
            if !std::io::stdin().is_terminal() {
                anyhow::bail!(
                    "--delete-points deletes the restore points of {what} for good; confirm with --yes, or run it on a terminal"
                );
            }
            eprint!("This deletes the restore points of {what} for good. Type yes to go on: ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if answer.trim() != "yes" {
                anyhow::bail!("not confirmed; nothing was changed");
            }
        }
        Ok(Some(Points::Delete))
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Cli;

    /// Every subcommand says in one line what it does and shows an example of itself that
    /// parses.
    #[test]
    fn every_subcommand_has_help_and_an_example_that_parses() {
        fn walk(cmd: &clap::Command, path: &str, checked: &mut usize) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let here = format!("{path} {}", sub.get_name());
                let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
                assert!(!about.is_empty() && !about.contains('\n'), "`{here}` needs a one-line help text");
                let example = sub.get_after_help().map(|h| h.to_string()).unwrap_or_default();
                let line = example.strip_prefix("Example: ").unwrap_or_else(|| panic!("`{here}` has no example"));
                assert!(line.starts_with(&here), "`{here}`'s example runs something else: {line}");
                if let Err(e) = Cli::try_parse_from(line.split_whitespace()) {
                    // A group's example may be its subcommand's; every example must parse.
                    panic!("`{here}`'s example does not parse: {line}: {e}");
                }
                *checked += 1;
                walk(sub, &here, checked);
            }
        }
        let mut checked = 0;
        walk(&Cli::command(), "standby", &mut checked);
        assert!(checked > 40, "only {checked} subcommands found");
    }
}
