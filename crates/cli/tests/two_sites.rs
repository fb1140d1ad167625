//! User story: production and DR are two hosts, each running `standby agent`, and the
//! controller sits on a third. Here each is a network namespace this test makes (veth
//! links on a bridge in the controller's namespace, addresses in 10.231.0.0/16 that exist
//! only inside them) and removes. The whole lifecycle goes across them: replication of a
//! running and a stopped VM (full, changed blocks, digest), failover to an older point and undo, failover, failback to
//! the original with switch and commit, an incremental run after it, and a planned failover; every result is
//! compared byte for byte and against the guest's write ledger, and a capture of the
//! production host's link holds none of the disk's known plaintext. Then the faults: a
//! lost production site (link cut, or its agent killed) and the fence when it returns, a
//! link cut within and past the retry window, a full DR disk, a killed agent on either
//! side of a run; failback to a new VM on a third host; and bad trust across the
//! namespaces (no, revoked, expired or foreign certificate; used or wrong token) refused.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use standby_testkit::{identical, ledger_append, qemu_img, read_image, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Network namespaces: `ctl` with a bridge, and one veth link from it to each host's
/// (`prod`, `dr`, and a third when asked); removed, with every process in them, when dropped.
struct Sites {
    names: Vec<String>,
    subnet: String,
}

impl Sites {
    fn new() -> Sites {
        Sites::with_hosts(2)
    }

    fn with_hosts(hosts: usize) -> Sites {
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

    fn ctl(&self) -> &str {
        &self.names[0]
    }

    /// Address of host `i` (1: production, 2: DR, 3: the third).
    fn address(&self, i: usize) -> String {
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
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `standby agent` in namespace `ns` on `listen` and returns its enrolment token.
fn agent(ns: &str, dir: &str, listen: &str) -> (Process, String) {
    start_agent(ns, dir, listen, "enrolment token: ")
}

/// Starts an agent that is enrolled already, once it listens.
fn agent_again(ns: &str, dir: &str, listen: &str) -> Process {
    start_agent(ns, dir, listen, "listening on ").0
}

/// Starts `standby agent` and waits for the line that begins with `until`; the agent and
/// the rest of that line.
fn start_agent(ns: &str, dir: &str, listen: &str, until: &str) -> (Process, String) {
    let mut child = Process(
        Command::new("ip")
            .args(["netns", "exec", ns, BIN, "--data-dir", dir, "agent", "--listen", listen])
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
struct Enrolled {
    env: Env,
    prod_dir: String,
    dr_dir: String,
    agents: (Process, Process),
}

fn enrolled(sites: &Sites) -> Enrolled {
    let mut env = Env::new(BIN);
    env.in_netns(sites.ctl());
    enrol(env, sites)
}

/// Starts and enrols both agents for the controller `env`.
fn enrol(env: Env, sites: &Sites) -> Enrolled {
    let (prod_dir, dr_dir) = (env.path("agent-prod"), env.path("agent-dr"));
    let (prod, prod_token) = agent(&sites.names[1], &prod_dir, &sites.address(1));
    let (dr, dr_token) = agent(&sites.names[2], &dr_dir, &sites.address(2));
    env.ok(&["host", "add", "prod1", "--address", &sites.address(1), "--token", &prod_token]);
    env.ok(&["host", "add", "dr1", "--address", &sites.address(2), "--token", &dr_token]);
    Enrolled { env, prod_dir, dr_dir, agents: (prod, dr) }
}

/// VM web on prod1, started: a guest that writes its ledger from block 8192 (32 MiB) of
/// its 128 MiB disk, returned.
fn ledger_guest(env: &Env) -> String {
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

fn point_ids(env: &Env, vm: &str) -> Vec<i64> {
    env.points(vm).iter().map(|p| p["id"].as_i64().unwrap()).collect()
}

#[test]
fn the_whole_lifecycle_runs_across_agents_on_two_hosts() {
    let sites = Sites::new();
    let Enrolled { env, agents: _agents, .. } = enrolled(&sites);
    let hosts = env.ok(&["host", "list"]);
    assert!(hosts.contains("prod1  online") && hosts.contains("dr1  online"), "{hosts}");

    // A running guest on the production host writes its ledger.
    let disk = ledger_guest(&env);
    let dr_target = env.path("dr");
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &dr_target]);
    let ledger = Ledger { start_block: 8192 };
    env.wait_console("web", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);

    // The production host's link is captured during the full copy (tcpdump on its port of
    // the bridge): the guest's ledger records are on the disk, and none is on the wire.
    let pcap = env.path("prod-link.pcap");
    let mut capture = Process(
        Command::new("ip")
            .args(["netns", "exec", sites.ctl(), "tcpdump", "-Z", "root", "--immediate-mode", "-U", "-i", "v1"])
            .args(["-s", "0", "-w", &pcap, "tcp"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tcpdump"),
    );
    // tcpdump says `listening on` once it captures.
    let mut said = BufReader::new(capture.0.stderr.take().unwrap());
    let mut first = String::new();
    let _ = said.read_line(&mut first);
    assert!(first.contains("listening on"), "tcpdump: {first}");

    // Two runs while the guest writes: a full copy, then changed blocks only. Each point
    // holds at least what the guest had seen acknowledged when its run began.
    for method in ["full", "cbt"] {
        let acked = Ledger::acknowledged(&env.console("web"));
        let out = env.ok(&["job", "run", "nightly"]);
        if method == "full" {
            let _ = Command::new("kill").args(["-INT", &capture.0.id().to_string()]).status();
            let _ = capture.0.wait();
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut said, &mut rest);
            let wire = std::fs::read(&pcap).expect("the capture");
            assert!(wire.len() > 16 << 10, "the run crossed the captured link ({} bytes captured; {rest})", wire.len());
            let known = b"STANDBY-LEDGER seq=";
            // The records are on the disk: the ledger check below finds at least `acked`
            // (10 or more) of them in this very point.
            assert!(!wire.windows(known.len()).any(|w| w == known), "a ledger record crossed the link in plaintext");
        }
        assert!(out.contains(&format!("({method},")), "{out}");
        assert!(out.contains("on the wire between hosts"), "the run crossed between the agents: {out}");
        let path = env.latest_disk("web", 0);
        let raw = env.path("check.raw");
        qemu_img(&["convert", "-U", "-O", "raw", &path, &raw]);
        let k = ledger.records_in(&read_image(&raw), 20000).unwrap();
        assert!(k >= acked, "the {method} point holds {k} records; {acked} were acknowledged before the run");
    }

    // Stopped: the newest point is the source disk byte for byte.
    env.ok(&["vm", "shutdown", "web", "--timeout", "60"]);
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt,"), "{out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the stopped VM's point equals its disk");

    // Without a bitmap to trust, a run compares by digest across the hosts: the source's
    // agent hashes its blocks, and only the changed 2 MiB travel.
    for b in standby_testkit::bitmaps(&disk) {
        qemu_img(&["bitmap", "--remove", &disk, &b]);
    }
    standby_testkit::qemu_io(&disk, "qcow2", &["write -P 0x33 5M 2M".into()]);
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(digest, 2.0 MiB transferred"), "{out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the digest point equals the disk");
    let ids = point_ids(&env, "web");
    assert_eq!(ids.len(), 4);

    // How the job's blocks travel is its own: 2 MiB of one byte cost 2 MiB on the wire
    // uncompressed, far less with lz4 (under a bandwidth limit). Bad values change nothing.
    for (bad, arg) in [(["--compression", "gzip"], "--compression"), (["--bandwidth", "fast"], "--bandwidth")] {
        let err = env.fails(&["job", "change", "nightly", bad[0], bad[1]]);
        assert!(err.contains(arg) && err.contains(bad[1]), "{err}");
    }
    assert_eq!(env.json(&["job", "list"])[0]["compression"], "zstd");
    for (compression, bandwidth, ratio) in [("none", "none", "(1.0x)"), ("lz4", "800Mbit", "")] {
        env.ok(&["job", "change", "nightly", "--compression", compression, "--bandwidth", bandwidth]);
        let job = &env.json(&["job", "list"])[0];
        assert_eq!(job["compression"], compression, "{job}");
        standby_testkit::qemu_io(&disk, "qcow2", &["write -P 0x44 9M 2M".into()]);
        let out = env.ok(&["job", "run", "nightly"]);
        eprintln!("compression {compression}, bandwidth {bandwidth}: {out}");
        assert!(out.contains("(cbt, 2.0 MiB transferred") && out.contains(ratio), "{compression}: {out}");
        if compression == "lz4" {
            assert_eq!(job["bandwidth"], 100_000_000, "{job}");
            assert!(!out.contains("(1.0x)") && out.contains("on the wire"), "lz4 shrinks one repeated byte: {out}");
        }
        assert!(identical(&disk, &env.latest_disk("web", 0)), "the {compression} point equals the disk");
    }
    env.ok(&["job", "change", "nightly", "--compression", "zstd", "--bandwidth", "none"]);
    let ids = point_ids(&env, "web");

    // Failover to the oldest point runs the replica on the DR host; undo discards it.
    let t0 = Instant::now();
    env.ok(&["failover", "web", "--point", &ids[0].to_string()]);
    eprintln!("failover with the production host reachable took {:.1} s", t0.elapsed().as_secs_f64());
    let replica = env.json(&["vm", "show", "web_replica"]);
    assert_eq!(replica["host"], "dr1", "{replica}");
    assert_eq!(replica["state"], "running", "{replica}");
    env.ok(&["failover", "undo", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");

    // Failover to the newest point; the replica's guest goes on writing its ledger.
    env.ok(&["failover", "web"]);
    let c = env.wait_console("web_replica", Duration::from_secs(90), "the ledger resuming", |c| {
        c.contains("LEDGER-RESUME") && Ledger::acknowledged(c) >= 5
    });
    let resumed = Ledger::acknowledged(&c);
    env.wait_console("web_replica", Duration::from_secs(90), "more ledger writes", |c| {
        Ledger::acknowledged(c) >= resumed + 10
    });

    // Failback to the original disk on the production host: phase 1 while the replica
    // runs, the switch, commit. The original then holds everything the replica acked.
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual", "--shutdown-timeout", "30"]);
    env.ok(&["failback", "switch", "web"]);
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    let raw = env.path("check.raw");
    qemu_img(&["convert", "-U", "-O", "raw", &disk, &raw]);
    let k = ledger.records_in(&read_image(&raw), 20000).unwrap();
    assert!(k >= acked, "the original holds {k} records; the replica acknowledged {acked}");
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");

    // Replication resumes incrementally from the switch, and is exact.
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt,"), "{out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "after failback the newest point equals the original");

    // Planned failover across the hosts: the source runs and writes again; it is synced,
    // shut down, synced and verified, and the replica on dr1 holds every record the
    // source acknowledged.
    let on_disk = ledger_records(ledger, &env, &disk);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(90), "the source writing again", |c| {
        Ledger::acknowledged(c) >= on_disk + 5
    });
    let out = env.ok(&["failover", "planned", "web", "--shutdown-timeout", "60"]);
    assert!(out.contains("web: ok") && out.contains("verified equal"), "{out}");
    let acked = Ledger::acknowledged(&env.console("web"));
    // The replica's console may still hold an earlier replica's lines: this one resumes
    // past what the disk held before the source ran again.
    let resumes = |c: &str| -> Vec<u64> {
        c.lines().filter_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).collect()
    };
    let c = env.wait_console("web_replica", Duration::from_secs(90), "the replica's ledger", |c| {
        resumes(c).iter().any(|&r| r > on_disk)
    });
    let resumed = resumes(&c).into_iter().max().unwrap();
    assert!(resumed >= acked && acked > on_disk, "the replica resumed at {resumed}; the source acknowledged {acked}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the newest point is the stopped source");
    assert_eq!(env.json(&["vm", "show", "web_replica"])["host"], "dr1");
    env.ok(&["failover", "undo", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");

    // Every step is in the history, under the hosts' names.
    let history = env.ok(&["history", "web"]);
    for step in [
        "failover",
        "undo failover",
        "failback",
        "failback switch",
        "commit failback",
        "replication",
        "planned failover",
    ] {
        assert!(history.contains(step), "{step} missing from:\n{history}");
    }
    assert!(history.contains("on dr1"), "{history}");
}

/// The pid of the QEMU an agent with data in `agent_dir` runs for `vm`, if it runs.
fn qemu_pid(agent_dir: &str, vm: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(format!("{agent_dir}/host/vms/{vm}/qemu.pid")).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// A command that must fail; what it said on either stream (a batch reports per VM on
/// stdout).
fn refused(env: &Env, args: &[&str]) -> String {
    let r = env.run(args);
    assert_ne!(r.code, Some(0), "standby {args:?} should have failed:\n{}", r.stdout);
    format!("{}{}", r.stdout, r.stderr)
}

fn ledger_records(ledger: Ledger, env: &Env, image: &str) -> u64 {
    let raw = env.path("check.raw");
    qemu_img(&["convert", "-U", "-O", "raw", image, &raw]);
    ledger.records_in(&read_image(&raw), 20000).unwrap()
}

#[test]
fn a_lost_production_site_fails_over_and_its_source_is_fenced_when_it_returns() {
    let sites = Sites::new();
    let Enrolled { env, prod_dir, dr_dir, agents: _agents } = enrolled(&sites);
    let disk = ledger_guest(&env);
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    let ledger = Ledger { start_block: 8192 };
    env.wait_console("web", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    env.ok(&["job", "run", "nightly"]);
    let in_point = ledger_records(ledger, &env, &env.latest_disk("web", 0));
    let source_pid = qemu_pid(&prod_dir, "web").expect("the source runs on the production host");
    let source_console = format!("{prod_dir}/host/vms/web/console.log");

    // The production site is cut off; its guest goes on writing.
    ip(&["-n", sites.ctl(), "link", "set", "v1", "down"]);
    let dr_files = || {
        let mut f: Vec<String> =
            std::fs::read_dir(env.path("dr")).unwrap().flatten().map(|e| e.path().display().to_string()).collect();
        f.sort();
        f
    };
    let before = dr_files();
    let err = refused(&env, &["failover", "web"]);
    assert!(err.contains("prod1 is unreachable") && err.contains("--source-unreachable"), "{err}");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready", "a refused failover changes nothing");
    assert_eq!(dr_files(), before, "a refused failover changes nothing");
    assert!(qemu_pid(&dr_dir, "web_replica").is_none());
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("prod1") && err.contains("unreachable"), "{err}");

    let t0 = Instant::now();
    let out = env.ok(&["failover", "web", "--source-unreachable"]);
    eprintln!("failover with the production host unreachable took {:.1} s", t0.elapsed().as_secs_f64());
    assert!(out.contains("runs on dr1") && out.contains("declared lost"), "{out}");
    let replica_pid = qemu_pid(&dr_dir, "web_replica").expect("the replica runs on the DR host");
    let history = env.ok(&["history", "web"]);
    assert!(
        history.contains("declared lost by the operator (failover --source-unreachable)"),
        "the history says how prod1 was declared lost:\n{history}"
    );
    // Both lists say what waits for prod1.
    let prod1 = env.json(&["host", "list"]).as_array().unwrap().iter().find(|h| h["name"] == "prod1").cloned().unwrap();
    assert_eq!(prod1["state"], "offline", "{prod1}");
    assert!(prod1["fences"][0].as_str().is_some_and(|f| f.contains("VM web")), "{prod1}");
    let fence = env.json(&["replica", "list"])[0]["fence"].as_str().unwrap_or_default().to_owned();
    assert!(fence.contains("not fenced yet"), "{fence}");
    // The source still writes, unaware: these records are after the failover instant.
    let at_failover = Ledger::acknowledged(&std::fs::read_to_string(&source_console).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Ledger::acknowledged(&std::fs::read_to_string(&source_console).unwrap()) < at_failover + 20 {
        assert!(Instant::now() < deadline, "the cut-off source stopped writing");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "the source ran through the partition");

    // The link is back: the next recover fences the source, paused then powered off, and
    // keeps its disk as it left it in a protective image beside it.
    ip(&["-n", sites.ctl(), "link", "set", "v1", "up"]);
    let out = env.ok(&["recover"]);
    assert!(out.contains("still ran") && out.contains("paused, then powered off"), "{out}");
    assert_eq!(qemu_pid(&prod_dir, "web"), None, "the source's QEMU is gone after the fence");
    assert_eq!(qemu_pid(&dr_dir, "web_replica"), Some(replica_pid), "the replica runs on, alone");
    let protective: Vec<String> = std::fs::read_dir(env.path("src"))
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains("web.qcow2.protective-"))
        .collect();
    assert_eq!(protective.len(), 1, "{protective:?}");
    let kept = &protective[0];
    assert!(out.contains(kept.as_str()), "{out}");
    assert!(identical(&disk, kept), "the protective image is the source disk as the fence left it");
    let records = ledger_records(ledger, &env, kept);
    assert!(
        records >= at_failover + 20 && records > in_point,
        "the protective image holds {records} records: the source's writes after the failover ({at_failover} then) \
         and after the restore point ({in_point})"
    );
    let history = env.ok(&["history", "web"]);
    for step in ["paused", "powered off", "protective", "disks as it left them"] {
        assert!(history.contains(step), "{step} missing from:\n{history}");
    }
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("web_replica"), "the replica runs: the source may not: {err}");
    assert_eq!(env.ok(&["recover"]).trim(), "nothing to recover", "the fence is carried out once");
    let fence = env.json(&["replica", "list"])[0]["fence"].as_str().unwrap_or_default().to_owned();
    assert!(fence.contains(kept.as_str()), "{fence}");

    // Failback to the original reports where the source's own writes are, and leaves them.
    let kept_digest = standby_testkit::file_digest(kept);
    let out = env.ok(&["failback", "web", "--to", "original", "--switch", "manual", "--shutdown-timeout", "30"]);
    assert!(out.contains(kept.as_str()), "failback reports the protective image: {out}");
    env.ok(&["failback", "switch", "web"]);
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    assert_eq!(standby_testkit::file_digest(kept), kept_digest, "failback left the protective image as it was");
}

/// A disk of `mib` MiB of random bytes at `at_mib` in a 128 MiB qcow2 (created if
/// needed): data no compression shrinks, so a bandwidth limit sets the run's length.
fn random_data(env: &Env, disk: &str, at_mib: u64, mib: u64) {
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
fn files_under(dir: &str) -> Vec<String> {
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

/// Runs `standby job run nightly` in the background while the link to the production
/// host is cut for `cut`, starting `after` into the run; what the run said, and its code.
fn run_across_a_cut(env: &Env, sites: &Sites, after: Duration, cut: Duration) -> (Option<i32>, String) {
    let child = env.command(&["job", "run", "nightly"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut run = Process(child.expect("start the run"));
    std::thread::sleep(after);
    assert!(run.0.try_wait().unwrap().is_none(), "the run ended before the cut: make it longer");
    // Another terminal follows the run, with what its blocks cost on the wire so far.
    let tasks = env.ok(&["task", "list"]);
    let line = tasks.lines().find(|l| l.contains("running")).unwrap_or_default();
    assert!(line.contains("x on the wire)") && line.contains("MiB/"), "{tasks}");
    ip(&["-n", sites.ctl(), "link", "set", "v1", "down"]);
    std::thread::sleep(cut);
    ip(&["-n", sites.ctl(), "link", "set", "v1", "up"]);
    ended(run, Duration::from_secs(180))
}

#[test]
fn a_cut_link_resumes_within_the_retry_window_and_fails_loudly_past_it() {
    let sites = Sites::new();
    let Enrolled { env, agents: _agents, .. } = enrolled(&sites);
    let disk = env.path("src/web.qcow2");
    std::fs::create_dir_all(env.path("src")).unwrap();
    random_data(&env, &disk, 0, 48);
    env.ok(&["vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2"]);
    // 48 MiB at 4 MB/s: the full copy takes about 12 s, uncompressed.
    env.ok(&[
        "job",
        "create",
        "nightly",
        "--vm",
        "web",
        "--target-host",
        "dr1",
        "--target-dir",
        &env.path("dr"),
        "--compression",
        "none",
        "--bandwidth",
        "4M",
        "--retry-window",
        "2m",
    ]);

    // Cut for 40 s, longer than either agent waits on a silent connection: the transfer
    // connects again once the link is back and goes on from where it was.
    let t0 = Instant::now();
    let (code, said) = run_across_a_cut(&env, &sites, Duration::from_secs(3), Duration::from_secs(40));
    eprintln!("a run across a 40 s cut took {:.0} s: {said}", t0.elapsed().as_secs_f64());
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("(full,") && said.contains("the link dropped and the transfer went on 1 time(s)"), "{said}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the resumed point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 1);

    // Past the window: the run fails, saying why, and leaves no restore point and no
    // partial layer; the next run is incremental and exact.
    env.ok(&["job", "change", "nightly", "--retry-window", "5s"]);
    random_data(&env, &disk, 64, 32);
    let before = files_under(&env.path("dr"));
    let (code, said) = run_across_a_cut(&env, &sites, Duration::from_secs(2), Duration::from_secs(45));
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("retry window") && said.contains("dr1"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 1, "no restore point from the failed run");
    assert_eq!(files_under(&env.path("dr")), before, "no partial layer is left");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
}

/// A tmpfs of a given size on a directory (mounted before an agent starts: mounts made
/// later do not reach its namespace here), unmounted when dropped.
struct Tmpfs(String);

impl Tmpfs {
    fn new(dir: &str, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir]).output();
        assert!(out.unwrap().status.success(), "mount a tmpfs on {dir}");
        Tmpfs(dir.to_owned())
    }

    /// The same filesystem, its files kept, with room for `size`.
    fn resize(&self, size: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}"), &self.0]).output();
        assert!(out.unwrap().status.success(), "resize the tmpfs on {}", self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).output();
    }
}

/// Waits (at most `within`) for a background `standby` command to end: its code and what it said.
fn ended(mut run: Process, within: Duration) -> (Option<i32>, String) {
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

/// Runs `standby job run nightly` and kills `agent` 2 s into it: the run's code and
/// what it said.
fn run_killing(env: &Env, agent: &mut Process) -> (Option<i32>, String) {
    let run = env.command(&["job", "run", "nightly"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut run = Process(run.expect("start the run"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(run.0.try_wait().unwrap().is_none(), "the run ended before the kill: make it longer");
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    ended(run, Duration::from_secs(120))
}

#[test]
fn a_full_dr_disk_or_a_killed_agent_on_either_side_fails_the_run_and_the_next_one_is_exact() {
    let sites = Sites::new();
    let mut env = Env::new(BIN);
    env.in_netns(sites.ctl());
    let dr = env.path("dr");
    let room = Tmpfs::new(&dr, "40M");
    let Enrolled { env, prod_dir, dr_dir, mut agents } = enrol(env, &sites);
    let disk = env.path("src/web.qcow2");
    random_data(&env, &disk, 0, 48);
    env.ok(&["vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2"]);
    env.ok(&[
        "job",
        "create",
        "nightly",
        "--vm",
        "web",
        "--target-host",
        "dr1",
        "--target-dir",
        &dr,
        "--compression",
        "none",
        "--bandwidth",
        "8M",
        "--retry-window",
        "20s",
    ]);

    // 48 MiB of random data do not fit in the DR host's 40 MiB: the run says so, and
    // leaves nothing behind.
    let before = files_under(&dr);
    let err = refused(&env, &["job", "run", "nightly"]);
    eprintln!("the run into a full disk said: {err}");
    assert!(err.contains("dr1") && err.contains("no space left"), "{err}");
    assert!(point_ids(&env, "web").is_empty(), "no restore point from the failed run");
    assert_eq!(files_under(&dr), before, "no partial layer is left on the full disk");
    // With room, the next run is a whole, exact first copy.
    room.resize("200M");
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(full,"), "{out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the point equals the disk");

    // The writing agent dies 2 s into a 4 s run: the run fails naming the host, and
    // nothing is published.
    random_data(&env, &disk, 64, 32);
    let before = files_under(&dr);
    let (code, said) = run_killing(&env, &mut agents.1);
    eprintln!("the run whose writing agent was killed said: {said}");
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("dr1") && said.contains("stopped answering"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 1, "no restore point from the killed run");

    // The agent starts again: the next run cleans up what the killed one left, sends the
    // changes it had not finished (not a full copy), and is exact.
    agents.1 = agent_again(&sites.names[2], &dr_dir, &sites.address(2));
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 2);
    let after: Vec<String> = files_under(&dr).into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(after.len(), 1, "one new layer, nothing the killed run left: {after:?}");

    // The reading agent, on the production host, dies mid-run: the run fails naming it
    // and publishes nothing; started again, the next run is incremental and exact.
    random_data(&env, &disk, 96, 32);
    let (code, said) = run_killing(&env, &mut agents.0);
    eprintln!("the run whose reading agent was killed said: {said}");
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("retry window") && said.contains("prod1 is unreachable"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 2, "no restore point from the killed run");
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 3);
}

#[test]
fn a_killed_production_agent_silent_past_its_lost_after_is_declared_lost_and_fenced_on_its_restart() {
    let sites = Sites::new();
    let Enrolled { env, prod_dir, dr_dir, mut agents } = enrolled(&sites);
    let disk = ledger_guest(&env);
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    env.wait_console("web", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "nightly"]);
    let source_pid = qemu_pid(&prod_dir, "web").expect("the source runs on the production host");

    // The controller declares prod1 lost by itself after 3 s of silence; bad values and
    // hosts are refused, changing nothing.
    for (args, says) in [
        (&["host", "change", "prod1", "--lost-after", "soon"][..], "--lost-after"),
        (&["host", "change", "mars", "--lost-after", "5m"][..], "mars"),
        (&["host", "change", "local", "--lost-after", "5m"][..], "cannot lose it"),
    ] {
        let err = env.fails(args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let prod1 = |env: &Env| {
        env.json(&["host", "list"]).as_array().unwrap().iter().find(|h| h["name"] == "prod1").cloned().unwrap()
    };
    assert_eq!(prod1(&env)["lost_after"], serde_json::Value::Null);
    env.ok(&["host", "change", "prod1", "--lost-after", "3s"]);
    assert_eq!(prod1(&env)["lost_after"], "3s");

    // A short outage, seen by `host list`, ends with a run that prod1 answers: the silence
    // is over, and a later outage is counted from its own first missed answer.
    let _ = agents.0 .0.kill();
    let _ = agents.0 .0.wait();
    assert!(prod1(&env)["silent_since"].is_string());
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    env.ok(&["job", "run", "nightly"]);
    std::thread::sleep(Duration::from_secs(4));

    // The production agent dies; the VM it started does not.
    let _ = agents.0 .0.kill();
    let _ = agents.0 .0.wait();
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "the source outlives its agent");
    let host = prod1(&env);
    assert_eq!((host["state"].as_str(), host["declared_lost"].as_bool()), (Some("offline"), Some(false)), "{host}");
    assert!(host["silent_since"].is_string(), "{host}");
    // Not silent long enough yet: the failover is refused, saying when it will not be.
    let err = refused(&env, &["failover", "web"]);
    assert!(err.contains("prod1 is unreachable") && err.contains("after 3s of silence"), "{err}");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready", "a refused failover changes nothing");
    std::thread::sleep(Duration::from_secs(4));
    let list = env.ok(&["host", "list"]);
    assert!(list.contains("declared lost: silent since"), "{list}");
    let out = env.ok(&["failover", "web"]);
    assert!(out.contains("runs on dr1") && out.contains("declared lost by the controller"), "{out}");
    let history = env.ok(&["history", "web"]);
    assert!(history.contains("no answer from prod1 since") && history.contains("--lost-after 3s"), "{history}");
    let replica_pid = qemu_pid(&dr_dir, "web_replica").expect("the replica runs on the DR host");
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "nobody could stop the source yet");

    // The agent starts again and finds its VM: the next recover fences it, and its disk is
    // kept as it left it.
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    let out = env.ok(&["recover"]);
    assert!(out.contains("still ran") && out.contains("paused, then powered off"), "{out}");
    assert_eq!(qemu_pid(&prod_dir, "web"), None, "the source's QEMU is gone after the fence");
    assert_eq!(qemu_pid(&dr_dir, "web_replica"), Some(replica_pid), "the replica runs on, alone");
    let host = prod1(&env);
    assert_eq!((host["state"].as_str(), &host["silent_since"]), (Some("online"), &serde_json::Value::Null), "{host}");
    let kept: Vec<String> = files_under(&env.path("src")).into_iter().filter(|p| p.contains(".protective-")).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(identical(&disk, &kept[0]), "the protective image is the source disk as the fence left it");
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("web_replica"), "the replica runs: the source may not: {err}");
}

#[test]
fn failback_to_a_new_vm_on_a_third_host_copies_the_replica_there() {
    let sites = Sites::with_hosts(3);
    let Enrolled { env, agents: _agents, .. } = enrolled(&sites);
    let (_third, token) = agent(&sites.names[3], &env.path("agent-site3"), &sites.address(3));
    env.ok(&["host", "add", "site3", "--address", &sites.address(3), "--token", &token, "--lost-after", "10m"]);
    let disk = env.path("src/web.qcow2");
    random_data(&env, &disk, 0, 16);
    env.ok(&["vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2"]);
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "nightly"]);

    // The replica runs on dr1 and its disk changes there (written while it is stopped:
    // this VM has no guest to write for it).
    env.ok(&["failover", "web"]);
    env.ok(&["vm", "stop", "web_replica"]);
    let overlay = env.json(&["vm", "show", "web_replica"])["disks"][0]["path"].as_str().unwrap().to_owned();
    standby_testkit::qemu_io(&overlay, "qcow2", &["write -P 0x5a 3M 1M".into(), "write -P 0xa5 100M 2M".into()]);

    // Failback builds web anew on site3, from dr1 straight to site3.
    let new_dir = env.path("site3");
    let out = env.ok(&["failback", "web", "--to", &format!("new:site3:{new_dir}"), "--shutdown-timeout", "1"]);
    assert!(out.contains("by full"), "{out}");
    let web = env.json(&["vm", "show", "web"]);
    let new_disk = format!("{new_dir}/web-d0.qcow2");
    assert_eq!((web["host"].as_str(), web["disks"][0]["path"].as_str()), (Some("site3"), Some(new_disk.as_str())));
    assert!(identical(&new_disk, &overlay), "the new VM's disk reads as the replica's");
    assert!(!identical(&new_disk, &disk), "the replica's writes are in it, not the old source's disk");

    // Committed, replication goes on from site3 to dr1, incrementally and exactly.
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 0 B transferred"), "{out}");
    assert!(identical(&env.latest_disk("web", 0), &new_disk), "the newest point is the new VM's disk");
    standby_testkit::qemu_io(&new_disk, "qcow2", &["write -P 0x77 40M 1M".into()]);
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 1.0 MiB transferred") && out.contains("on the wire between hosts"), "{out}");
    assert!(identical(&env.latest_disk("web", 0), &new_disk), "the next point is the new VM's disk");
    let history = env.json(&["history", "web"]);
    let failback = history.as_array().unwrap().iter().find(|h| h["operation"] == "failback").cloned();
    let detail = failback.as_ref().and_then(|h| h["detail"].as_str()).unwrap_or_default();
    assert!(detail.contains("new"), "{history}");
    let host = env.json(&["host", "list"]).as_array().unwrap().iter().find(|h| h["name"] == "site3").cloned().unwrap();
    assert_eq!(host["lost_after"], "10m", "{host}");
}

/// A TLS 1.3 client in the controller's namespace that sends an agent a request line,
/// with the client certificate and key given (or none): what the agent answered, or
/// `refused: WHY` when it ended the connection before answering.
fn knock(sites: &Sites, address: &str, cert_key: Option<(&str, &str)>) -> String {
    const CLIENT: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if len(sys.argv) > 3:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
try:
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="standby-agent") as s:
            s.sendall(b'{"op": "hello"}\n')
            got = s.recv(65536)
            print("answered: " + got.decode(errors="replace") if got else "refused: closed")
except (ssl.SSLError, OSError) as e:
    print(f"refused: {e}")
"#;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", sites.ctl(), "python3", "-c", CLIENT, address]);
    if let Some((cert, key)) = cert_key {
        c.args([cert, key]);
    }
    let out = c.output().expect("run python3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A client certificate and key for `name`, signed with openssl by the authority in
/// `trust_dir`, valid from `start` until `end` (`YYYYMMDDHHMMSSZ`).
fn signed_between(dir: &str, trust_dir: &str, name: &str, start: &str, end: &str) -> (String, String) {
    const SIGN: &str = r#"
set -e
d=$1 trust=$2 name=$3 start=$4 end=$5
mkdir -p "$d"; : > "$d/index.txt"; echo 01 > "$d/serial"
printf '[ca]\ndefault_ca=d\n[d]\ndatabase=%s/index.txt\nnew_certs_dir=%s\nserial=%s/serial\ndefault_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n' "$d" "$d" "$d" > "$d/ca.cnf"
printf 'extendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=DNS:%s\n' "$name" > "$d/ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" -subj "/CN=$name" 2>/dev/null
openssl ca -batch -notext -config "$d/ca.cnf" -cert "$trust/ca.pem" -keyfile "$trust/ca.key" -in "$d/$name.csr" \
  -out "$d/$name.pem" -startdate "$start" -enddate "$end" -extfile "$d/ext" 2>/dev/null
"#;
    let out = Command::new("bash").args(["-c", SIGN, "sign", dir, trust_dir, name, start, end]).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (format!("{dir}/{name}.pem"), format!("{dir}/{name}.key"))
}

#[test]
fn bad_trust_across_the_namespaces_is_refused_and_changes_nothing() {
    let sites = Sites::with_hosts(3);
    let Enrolled { env, prod_dir, agents: _agents, .. } = enrolled(&sites);
    let site3_dir = env.path("agent-site3");
    let (_third, token) = agent(&sites.names[3], &site3_dir, &sites.address(3));
    env.ok(&["host", "add", "site3", "--address", &sites.address(3), "--token", &token]);
    let ours = (format!("{}/trust/controller.pem", env.data_dir()), format!("{}/trust/controller.key", env.data_dir()));
    // The client is sound: with the controller's own certificate the agent answers.
    let said = knock(&sites, &sites.address(1), Some((&ours.0, &ours.1)));
    assert!(said.starts_with("answered: "), "{said}");
    // A certificate of our authority signed here with openssl is accepted while it is
    // valid, which shows the expired one below is refused for its dates alone.
    let trust = format!("{}/trust", env.data_dir());
    let valid = signed_between(&env.path("certs"), &trust, "tester", "20260101000000Z", "20991231000000Z");
    let said = knock(&sites, &sites.address(1), Some((&valid.0, &valid.1)));
    assert!(said.starts_with("answered: "), "{said}");
    let expired = signed_between(&env.path("certs-old"), &trust, "tester", "20200101000000Z", "20200102000000Z");

    // site3 leaves: its certificate is revoked, and prod1 is told.
    let out = env.ok(&["host", "remove", "site3"]);
    assert!(out.contains("revoked") && !out.contains("not told"), "{out}");
    let before = files_under(&prod_dir);
    let hosts_before = env.json(&["host", "list"]);

    // Refused before any request is read: no certificate, a revoked one, one from
    // another authority (a second controller's); a used token and a wrong one enrol nothing.
    let site3 = (format!("{site3_dir}/agent.pem"), format!("{site3_dir}/agent.key"));
    let mut other = Env::new(BIN);
    other.in_netns(sites.ctl());
    let err = other.fails(&["host", "add", "prod1", "--address", &sites.address(1), "--token", &token]);
    assert!(err.contains("host prod1") && err.contains("refused"), "{err}");
    let foreign =
        (format!("{}/trust/controller.pem", other.data_dir()), format!("{}/trust/controller.key", other.data_dir()));
    for (what, cert) in [
        ("no certificate", None),
        ("a revoked certificate", Some(&site3)),
        ("a foreign CA", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
    ] {
        let said = knock(&sites, &sites.address(1), cert.map(|(c, k)| (c.as_str(), k.as_str())));
        assert!(said.starts_with("refused: "), "{what}: {said}");
    }
    for bad in [token.clone(), format!("00ff.{}", token.split_once('.').unwrap().1)] {
        let err = env.fails(&["host", "add", "prod2", "--address", &sites.address(1), "--token", &bad]);
        assert!(err.contains("prod2") && (err.contains("refused") || err.contains("wrong")), "{err}");
    }

    // Nothing changed: the agent's files, and both hosts online as before.
    assert_eq!(files_under(&prod_dir), before, "a refused connection changes nothing on the agent");
    let hosts = env.json(&["host", "list"]);
    let names = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array().unwrap().iter().map(|h| (h["name"].to_string(), h["state"].to_string())).collect()
    };
    assert_eq!(names(&hosts), names(&hosts_before));
    assert!(!names(&hosts).iter().any(|(n, _)| n.contains("prod2") || n.contains("site3")), "{hosts}");
}
