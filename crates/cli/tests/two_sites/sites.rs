//! What the two-site tests share: the namespaces, the agents, and reading their results.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use standby_testkit::{ledger_append, qemu_img, read_image, Env, Ledger};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_standby");

pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Network namespaces: `ctl` with a bridge, and one veth link from it to each host's
/// (`prod`, `dr`, and a third when asked); removed, with every process in them, when dropped.
pub(crate) struct Sites {
    pub(crate) names: Vec<String>,
    subnet: String,
}

impl Sites {
    pub(crate) fn new() -> Sites {
        Sites::with_hosts(2)
    }

    pub(crate) fn with_hosts(hosts: usize) -> Sites {
        // One subnet and set of names per test: tests (and test processes) run side by side.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = (std::process::id() * 8 + n) % 250 + 1;
        let names = ["sbc", "sbp", "sbd", "sbn"][..=hosts].iter().map(|k| format!("{k}{id}")).collect();
        let sites = Sites { names, subnet: format!("10.231.{id}") };
        for n in &sites.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let ctl = &sites.names[0];
        ip(&["-n", ctl, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", ctl, "addr", "add", &format!("{}.254/24", sites.subnet), "dev", "br0"]);
        ip(&["-n", ctl, "link", "set", "br0", "up"]);
        for (i, ns) in sites.names[1..].iter().enumerate() {
            let port = format!("v{}", i + 1);
            ip(&["link", "add", &port, "netns", ctl, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["-n", ctl, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{}.{}/24", sites.subnet, i + 1), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        sites
    }

    pub(crate) fn ctl(&self) -> &str {
        &self.names[0]
    }

    /// Address of host `i` (1: production, 2: DR, 3: the third).
    pub(crate) fn address(&self, i: usize) -> String {
        format!("{}.{i}:7400", self.subnet)
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for n in &self.names {
            // The agents and the QEMU processes they started live in the namespaces.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", n]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// A process the test started (an agent, tcpdump), ended when dropped.
pub(crate) struct Process(pub(crate) Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `standby agent` in namespace `ns` on `listen` and returns its enrolment token.
pub(crate) fn agent(ns: &str, dir: &str, listen: &str) -> (Process, String) {
    start_agent(ns, dir, listen, "enrolment token: ")
}

/// Starts an agent that is enrolled already, once it listens.
pub(crate) fn agent_again(ns: &str, dir: &str, listen: &str) -> Process {
    start_agent(ns, dir, listen, "listening on ").0
}

/// Starts `standby agent` and waits for the line that begins with `until`; the agent and
/// the rest of that line.
pub(crate) fn start_agent(ns: &str, dir: &str, listen: &str, until: &str) -> (Process, String) {
    start_agent_with(ns, dir, listen, until, &[])
}

/// The same, with `extra` arguments for the agent.
pub(crate) fn start_agent_with(ns: &str, dir: &str, listen: &str, until: &str, extra: &[&str]) -> (Process, String) {
    let mut child = Process(
        Command::new("ip")
            .args(["netns", "exec", ns, BIN, "--data-dir", dir, "agent", "--listen", listen])
            .args(extra)
            .env("STANDBY_ACCEL", "tcg")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent"),
    );
    let out = BufReader::new(child.0.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("the agent says {until}"));
        if let Some(rest) = line.strip_prefix(until) {
            return (child, rest.to_owned());
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the agent did not say {until}");
    }
}

/// The controller (its commands run in the controller's namespace) with both hosts'
/// agents running, with separate data directories, and enrolled as prod1 and dr1.
pub(crate) struct Enrolled {
    pub(crate) env: Env,
    pub(crate) prod_dir: String,
    pub(crate) dr_dir: String,
    pub(crate) agents: (Process, Process),
}

pub(crate) fn enrolled(sites: &Sites) -> Enrolled {
    let mut env = Env::new(BIN);
    env.in_netns(sites.ctl());
    enrol(env, sites)
}

/// Starts and enrols both agents for the controller `env`.
pub(crate) fn enrol(env: Env, sites: &Sites) -> Enrolled {
    let (prod_dir, dr_dir) = (env.path("agent-prod"), env.path("agent-dr"));
    let (prod, prod_token) = agent(&sites.names[1], &prod_dir, &sites.address(1));
    let (dr, dr_token) = agent(&sites.names[2], &dr_dir, &sites.address(2));
    env.ok(&["host", "add", "prod1", "--address", &sites.address(1), "--token", &prod_token]);
    env.ok(&["host", "add", "dr1", "--address", &sites.address(2), "--token", &dr_token]);
    Enrolled { env, prod_dir, dr_dir, agents: (prod, dr) }
}

/// VM web on prod1, started: a guest that writes its ledger from block 8192 (32 MiB) of
/// its 128 MiB disk, returned.
pub(crate) fn ledger_guest(env: &Env) -> String {
    let disk = env.path("src/web.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &disk, "128M"]);
    let (kernel, initrd) = standby_testkit::guest();
    let append = format!("console=ttyS0 quiet panic=-1 {}", ledger_append(8192, 20000, 20000));
    env.ok(&[
        "vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2", "--memory", "192", "--kernel",
        &kernel, "--initrd", &initrd, "--append", &append,
    ]);
    env.ok(&["vm", "start", "web"]);
    disk
}

pub(crate) fn point_ids(env: &Env, vm: &str) -> Vec<i64> {
    env.points(vm).iter().map(|p| p["id"].as_i64().unwrap()).collect()
}

/// The pid of the QEMU an agent with data in `agent_dir` runs for `vm`, if it runs.
pub(crate) fn qemu_pid(agent_dir: &str, vm: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(format!("{agent_dir}/host/vms/{vm}/qemu.pid")).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// A command that must fail; what it said on either stream (a batch reports per VM on
/// stdout).
pub(crate) fn refused(env: &Env, args: &[&str]) -> String {
    let r = env.run(args);
    assert_ne!(r.code, Some(0), "standby {args:?} should have failed:\n{}", r.stdout);
    format!("{}{}", r.stdout, r.stderr)
}

pub(crate) fn ledger_records(ledger: Ledger, env: &Env, image: &str) -> u64 {
    let raw = env.path("check.raw");
    qemu_img(&["convert", "-U", "-O", "raw", image, &raw]);
    ledger.records_in(&read_image(&raw), 20000).unwrap()
}

/// A disk of `mib` MiB of random bytes at `at_mib` in a 128 MiB qcow2 (created if
/// needed): data no compression shrinks, so a bandwidth limit sets the run's length.
pub(crate) fn random_data(env: &Env, disk: &str, at_mib: u64, mib: u64) {
    let mut bytes = vec![0u8; (mib << 20) as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ at_mib;
    for chunk in bytes.chunks_mut(8) {
        // xorshift: fast, and nothing a compressor can fold.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let raw = env.path("random.raw");
    std::fs::write(&raw, &bytes).unwrap();
    if !std::path::Path::new(disk).exists() {
        qemu_img(&["create", "-q", "-f", "qcow2", disk, "128M"]);
    }
    // Copied in at `at_mib` through qemu-io's own file reader: the image stays a real qcow2.
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -s {raw} {at_mib}M {mib}M"))
        .arg(disk)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
}

/// Every file under `dir`, sorted.
pub(crate) fn files_under(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path().display().to_string();
        match e.file_type().unwrap().is_dir() {
            true => out.extend(files_under(&p)),
            false => out.push(p),
        }
    }
    out.sort();
    out
}

/// Waits (at most `within`) for a background `standby` command to end: its code and what it said.
pub(crate) fn ended(mut run: Process, within: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = run.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the command did not end within {within:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut said = String::new();
    for pipe in [
        run.0.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
        run.0.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read>),
    ]
    .into_iter()
    .flatten()
    {
        let mut p = pipe;
        let _ = p.read_to_string(&mut said);
    }
    (status.code(), said)
}
