//! The lifecycle across the hosts: replication, failover, undo, failback, planned failover.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use standby_testkit::{identical, qemu_img, read_image, Ledger};

use crate::sites::*;

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
