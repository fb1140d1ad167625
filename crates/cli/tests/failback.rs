//! User story: the production site is back. The operator fails back from the replica to
//! production (its original disks, a VM recovered elsewhere, or a new VM), switches, and
//! commits or undoes. Production ends byte-identical to the replica's final state.

use std::time::Duration;

use serde_json::Value;
use standby_testkit::{bitmaps, identical, ledger_append, make_disk, qemu_img, qemu_io, read_image, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const START: u64 = 2048;
const COUNT: u64 = 3000;
const MIB: u64 = 1 << 20;

/// The state of web's replica.
fn state(env: &Env) -> String {
    let list = env.json(&["replica", "list"]);
    let web = list.as_array().unwrap().iter().find(|r| r["vm"] == "web").expect("web's replica");
    web["state"].as_str().unwrap().to_owned()
}

fn failback_row(env: &Env) -> Value {
    env.json(&["failback", "list"])[0].clone()
}

fn vm_row(env: &Env, name: &str) -> Option<Value> {
    env.json(&["vm", "list"]).as_array().unwrap().iter().find(|v| v["name"] == name).cloned()
}

fn write(image: &str, pattern: u8, offset_kib: u64, len_kib: u64) {
    qemu_io(image, "qcow2", &[format!("write -P {pattern:#x} {offset_kib}k {len_kib}k")]);
}

/// The same history on every call, with no guest: a source written between and after
/// two runs, a failover to the older point, the replica written (data and zeroes). With
/// `lose_bitmap` the source's dirty bitmap is gone, so standby cannot trust its metadata.
fn diverged(env: &Env, lose_bitmap: bool) -> String {
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x11, 0, 4)]);
    env.ok(&["vm", "create", "web", "--disk", &disk, "--memory", "64"]);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    write(&disk, 0x22, 8 * 1024, 1024);
    env.ok(&["job", "run", "j"]);
    // Written after the last run: only the source's bitmap knows.
    write(&disk, 0x33, 12 * 1024, 512);
    let first = env.points("web")[0]["id"].as_i64().unwrap().to_string();
    env.ok(&["failover", "web", "--point", &first]);
    env.ok(&["vm", "stop", "web_replica"]);
    let overlay = env.path("dr/web/failover-d0.qcow2");
    write(&overlay, 0x44, 20 * 1024, 1024);
    qemu_io(&overlay, "qcow2", &["write -z 0 64k".into()]);
    if lose_bitmap {
        for b in bitmaps(&disk) {
            qemu_img(&["bitmap", "--remove", &disk, &b]);
        }
    }
    disk
}

#[test]
fn quick_rollback_and_digest_give_the_same_bytes() {
    let (quick, digest) = (Env::new(BIN), Env::new(BIN));
    let mut disks = Vec::new();
    let mut read = Vec::new();
    for (env, lose) in [(&quick, false), (&digest, true)] {
        let disk = diverged(env, lose);
        let before = read_image(&disk);
        let out = env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
        assert!(out.contains("web: ok: phase 1 done") && out.contains("ready to switch"), "{out}");
        assert_eq!(state(env), "ready_to_switch");
        assert_eq!(read_image(&disk), before, "phase 1 must not write the original disk itself");
        let row = failback_row(env);
        assert_eq!(row["method"], if lose { "digest" } else { "quick" }, "{row}");
        read.push((row["phase1"]["read"].as_u64().unwrap(), row["phase1"]["zeroed"].as_u64().unwrap()));
        // The source may not start while its disks are being synced, not even forced.
        let err = env.fails(&["vm", "start", "web", "--force"]);
        assert!(err.contains("target of web's failback"), "{err}");

        // Written on the replica after phase 1: goes with the switch.
        write(&env.path("dr/web/failover-d0.g1.qcow2"), 0x55, 24 * 1024, 256);
        let out = env.ok(&["failback", "switch", "web"]);
        assert!(out.contains("web: ok: switched"), "{out}");
        assert_eq!(state(env), "failback");
        let row = failback_row(env);
        assert_eq!(row["phase2"]["read"].as_u64().unwrap(), 256 * 1024, "phase 2 reads only what changed: {row}");
        assert!(identical(&disk, &env.path("dr/web/failover-d0.g1.qcow2")), "production differs from the replica");
        // The replica's final state is production's now: it may not run again, not even forced.
        let err = env.fails(&["vm", "start", "web_replica", "--force"]);
        assert!(err.contains("undo the failback"), "{err}");
        assert!(env.processes().is_empty(), "{:?}", env.processes());
        disks.push(disk);
    }
    assert!(identical(&disks[0], &disks[1]), "quick rollback and digest differ");
    // Quick rollback touched only the blocks its metadata named: 1 MiB of data and 64 KiB
    // of zeroes written on the replica, the 1 MiB of the newer point and the 512 KiB the
    // source wrote after it. Where the replica reads zero nothing is read, so it read only
    // the replica's 1 MiB of data.
    assert_eq!(read[0], (MIB, 64 * 1024 + MIB + 512 * 1024), "quick rollback (read, zeroed)");
    assert!(read[1].0 >= 4 * MIB, "digest reads every block the replica holds: {:?}", read[1]);

    // Commit: replication resumes from the switch, incrementally.
    let env = &quick;
    let out = env.ok(&["failback", "commit", "web"]);
    assert!(out.contains("web: ok: failback committed"), "{out}");
    assert_eq!(state(env), "ready");
    assert!(vm_row(env, "web_replica").is_none());
    let kept = env.points("web").pop().unwrap();
    assert!(identical(kept["disks"][0]["path"].as_str().unwrap(), &disks[0]), "the kept point is the final state");
    write(&disks[0], 0x66, 28 * 1024, 128);
    env.ok(&["job", "run", "j"]);
    let next = env.points("web").pop().unwrap();
    assert_eq!(next["method"], "cbt", "{next}");
    assert_eq!(next["bytes_transferred"].as_u64().unwrap(), 128 * 1024, "{next}");
    assert!(identical(next["disks"][0]["path"].as_str().unwrap(), &disks[0]));

    // Undo after the switch: production off, its disk reads as the replica's final state,
    // the replica runs again as it was.
    let env = &digest;
    env.ok(&["vm", "start", "web"]);
    env.ok(&["vm", "stop", "web"]);
    write(&disks[1], 0x77, 2 * 1024, 64);
    let out = env.ok(&["failback", "undo", "web"]);
    assert!(out.contains("web: ok: failback undone"), "{out}");
    assert_eq!(state(env), "failover");
    assert!(identical(&disks[1], &env.path("dr/web/failover-d0.g1.qcow2")));
    assert_eq!(vm_row(env, "web_replica").unwrap()["state"], "running");
    // And a later failback still works.
    env.ok(&["vm", "stop", "web_replica"]);
    let out = env.ok(&["failback", "web", "--to", "original"]);
    assert!(out.contains("switched"), "{out}");
    assert!(identical(&disks[1], &env.path("dr/web/failover-d0.g2.qcow2")));
    env.ok(&["failback", "commit", "web"]);
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("web", 0), &disks[1]));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// The guest writes during failover and on; after switch and commit production holds every
/// write the replica's guest acknowledged, and replication goes on from there.
#[test]
fn failback_to_the_original_with_a_running_guest() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x21, 0, 2)]);
    env.create_guest_vm("web", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    for want in [5, 30] {
        env.wait_console("web", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= want);
        env.ok(&["job", "run", "j"]);
    }
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    let first = env.points("web")[0]["id"].as_i64().unwrap().to_string();
    env.ok(&["failover", "web", "--point", &first]);
    let console =
        env.wait_console("web_replica", Duration::from_secs(60), "replica boot", |c| c.contains("LEDGER-RESUME"));
    let resumed: u64 = console.lines().find_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).unwrap();
    env.wait_console("web_replica", Duration::from_secs(60), "writes in failover", |c| {
        Ledger::acknowledged(c) >= resumed + 20
    });

    let out = env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    assert!(out.contains("ready to switch"), "{out}");
    assert_eq!(failback_row(&env)["method"], "quick");
    // The replica kept serving through phase 1.
    let at_phase1 = Ledger::acknowledged(&env.console("web_replica"));
    env.wait_console("web_replica", Duration::from_secs(60), "writes after phase 1", |c| {
        Ledger::acknowledged(c) >= at_phase1 + 10
    });
    let out = env.ok(&["failback", "switch", "web"]);
    assert!(out.contains("switched") && !out.contains("powered off"), "{out}");
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    let ledger = Ledger { start_block: START };
    let held = ledger.records_in(&read_image(&disk), COUNT).unwrap();
    assert!(held >= acked, "production holds {held} records, the replica acknowledged {acked}");

    env.ok(&["failback", "commit", "web"]);
    assert!(identical(&env.latest_disk("web", 0), &disk));
    env.ok(&["vm", "start", "web"]);
    let console = env
        .wait_console("web", Duration::from_secs(60), "production boot", |c| c.matches("LEDGER-RESUME").count() >= 2);
    let resumed: u64 =
        console.lines().filter_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).next_back().unwrap();
    assert_eq!(resumed, held, "production boots from the replica's final state");
    env.wait_console("web", Duration::from_secs(60), "production writes", |c| Ledger::acknowledged(c) >= held + 5);
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!(last["method"], "cbt", "{last}");
    assert!(last["bytes_transferred"].as_u64().unwrap() < MIB, "only production's writes travel: {last}");
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk));
    let history = env.json(&["history", "web"]).to_string();
    for op in ["\"failback\"", "\"failback switch\"", "\"commit failback\""] {
        assert!(history.contains(op), "history lacks {op}");
    }
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// A VM without a guest, replicated, failed over, its replica stopped and written.
fn in_failover(env: &Env) -> String {
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x11, 0, 3)]);
    env.ok(&["vm", "create", "web", "--disk", &disk, "--memory", "64", "--cpus", "1"]);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "web"]);
    env.ok(&["vm", "stop", "web_replica"]);
    write(&env.path("dr/web/failover-d0.qcow2"), 0x44, 1024, 2048);
    write(&env.path("dr/web/failover-d0.qcow2"), 0x45, 8 * 1024, 1024);
    disk
}

#[test]
fn failback_to_an_existing_vm_moves_the_identity() {
    let env = Env::new(BIN);
    let old_disk = in_failover(&env);
    // Restored from a backup elsewhere: an older state, its own configuration.
    let restored = env.path("elsewhere/web2.qcow2");
    std::fs::create_dir_all(env.path("elsewhere")).unwrap();
    make_disk(&restored, "qcow2", 16, &[(0x11, 0, 2), (0x99, 8, 1)]);
    env.ok(&["vm", "create", "web2", "--disk", &restored, "--memory", "96"]);
    env.ok(&["vm", "start", "web2"]);
    let old = read_image(&old_disk);

    let out = env.ok(&["failback", "web", "--to", "existing:web2", "--switch", "manual"]);
    assert!(out.contains("web2 was running") && out.contains("powered off"), "{out}");
    assert_eq!(failback_row(&env)["method"], "digest");
    assert_eq!(vm_row(&env, "web2").unwrap()["state"], "stopped");
    let out = env.ok(&["failback", "switch", "web", "--json"]);
    assert!(out.contains("switched"), "{out}");
    // The protected VM is web2's VM now: its disks, its configuration; web2 is gone.
    let web = env.json(&["vm", "show", "web"]);
    assert_eq!(web["disks"][0]["path"], restored.as_str(), "{web}");
    assert_eq!(web["memory_mib"], 96);
    assert!(vm_row(&env, "web2").is_none());
    assert!(identical(&restored, &env.path("dr/web/failover-d0.g1.qcow2")));
    assert_eq!(read_image(&old_disk), old, "the old source's disk is left alone");

    // Undo puts both definitions back; the restored VM's disk reads as the replica's.
    env.ok(&["failback", "undo", "web"]);
    assert_eq!(state(&env), "failover");
    assert_eq!(env.json(&["vm", "show", "web"])["disks"][0]["path"], old_disk.as_str());
    assert_eq!(env.json(&["vm", "show", "web2"])["disks"][0]["path"], restored.as_str());
    assert!(identical(&restored, &env.path("dr/web/failover-d0.g1.qcow2")));

    // Again, with the switch right after phase 1, and commit: later runs replicate web2's disk.
    env.ok(&["vm", "stop", "web_replica"]);
    env.ok(&["failback", "web", "--to", "existing:web2", "--power-on"]);
    assert_eq!(env.json(&["vm", "show", "web"])["state"], "running");
    env.ok(&["failback", "commit", "web"]);
    env.ok(&["vm", "stop", "web"]);
    write(&restored, 0x66, 4 * 1024, 64);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!((last["method"].as_str(), last["bytes_transferred"].as_u64()), (Some("cbt"), Some(64 * 1024)));
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &restored));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

#[test]
fn failback_to_a_new_vm_copies_everything() {
    let env = Env::new(BIN);
    let old_disk = in_failover(&env);
    let dir = env.path("newsite");
    let out = env.ok(&["failback", "web", "--to", &format!("new:local:{dir}"), "--switch", "manual"]);
    assert!(out.contains("by full"), "{out}");
    let new_disk = format!("{dir}/web-d0.qcow2");
    // Not published before the switch: the VM record still names the old disk.
    assert_eq!(env.json(&["vm", "show", "web"])["disks"][0]["path"], old_disk.as_str());
    // Undo before the switch: nothing of the new VM stays; the replica runs on.
    let out = env.ok(&["failback", "undo", "web"]);
    assert!(out.contains("before its switch"), "{out}");
    assert!(!std::path::Path::new(&new_disk).exists());
    assert_eq!(vm_row(&env, "web_replica").unwrap()["state"], "running");

    // No guest to shut down: the replica is powered off after the timeout.
    let out = env.ok(&["failback", "web", "--to", &format!("new:local:{dir}"), "--shutdown-timeout", "1"]);
    assert!(out.contains("did not shut down within 1 s and was powered off"), "{out}");
    let web = env.json(&["vm", "show", "web"]);
    assert_eq!((web["disks"][0]["path"].as_str(), web["cpus"].as_u64()), (Some(new_disk.as_str()), Some(1)));
    assert!(identical(&new_disk, &env.path("dr/web/failover-d0.g2.qcow2")));
    env.ok(&["failback", "commit", "web"]);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!((last["method"].as_str(), last["bytes_transferred"].as_u64()), (Some("cbt"), Some(0)));
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &new_disk));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

#[test]
fn a_scheduled_switch_runs_under_the_daemon() {
    let env = Env::new(BIN);
    let disk = in_failover(&env);
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(4)).to_string();
    let out = env.ok(&["failback", "web", "--to", "original", "--switch", &format!("at:{at}")]);
    assert!(out.contains("under standby daemon"), "{out}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(state(&env), "ready_to_switch", "without a daemon nothing switches");
    // A daemon started after the time switches at once.
    let mut daemon = env
        .command(&["daemon", "--tick", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while state(&env) != "failback" && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(300));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert_eq!(state(&env), "failback");
    assert!(identical(&disk, &env.path("dr/web/failover-d0.g1.qcow2")));
    let history = env.json(&["history", "web"]).to_string();
    assert!(history.contains("standby --data-dir") && history.contains("daemon"), "{history}");
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// The replica VM's top overlay, as standby records it.
fn replica_top(env: &Env) -> String {
    env.json(&["vm", "show", "web_replica"])["disks"][0]["path"].as_str().unwrap().to_owned()
}

fn working_files(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.path("src"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".failback-"))
        .collect()
}

/// Kills standby at `fp`, lets the next command recover, and checks where that left
/// everything: rolled back (phase 1) or completed (switch, commit, undo), never between.
fn crash_at(fp: &str) {
    let env = Env::new(BIN);
    let disk = in_failover(&env);
    let original = read_image(&disk);
    let (args, recovered): (&[&str], &str) = match fp.split('.').next().unwrap() {
        "failback" => (&["failback", "web", "--to", "original", "--switch", "manual"], "phase 1 rolled back"),
        "switch" => {
            env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
            (&["failback", "switch", "web"], "switch completed")
        }
        "commit" => {
            env.ok(&["failback", "web", "--to", "original"]);
            (&["failback", "commit", "web"], "commit failback completed")
        }
        _ => {
            env.ok(&["failback", "web", "--to", "original"]);
            (&["failback", "undo", "web"], "undo failback completed")
        }
    };
    let killed = env.run_killed_at(fp, args);
    assert!(killed.stderr.contains(&format!("fail point {fp} reached")), "{fp}: {}", killed.stderr);
    let rec = env.ok(&["recover"]);
    assert!(rec.contains(recovered), "{fp}: {rec}");
    assert!(working_files(&env).is_empty(), "{fp}: working layers left: {:?}", working_files(&env));
    let final_state = vm_row(&env, "web_replica").map(|_| replica_top(&env)).unwrap_or_default();
    match fp.split('.').next().unwrap() {
        "failback" => {
            assert_eq!(state(&env), "failover", "{fp}");
            assert_eq!(read_image(&disk), original, "{fp}: the original disk was written");
            assert!(env.json(&["failback", "list"]).as_array().unwrap().is_empty(), "{fp}");
            let out = env.ok(&["failback", "web", "--to", "original"]);
            assert!(out.contains("switched"), "{fp}: {out}");
            assert!(identical(&disk, &replica_top(&env)), "{fp}");
        }
        "switch" => {
            assert_eq!(state(&env), "failback", "{fp}");
            assert!(identical(&disk, &final_state), "{fp}: production is not the replica's final state");
        }
        "commit" => {
            assert_eq!(state(&env), "ready", "{fp}");
            assert!(vm_row(&env, "web_replica").is_none(), "{fp}");
            assert!(identical(&env.latest_disk("web", 0), &disk), "{fp}");
        }
        _ => {
            assert_eq!(state(&env), "failover", "{fp}");
            assert_eq!(vm_row(&env, "web_replica").unwrap()["state"], "running", "{fp}");
            assert!(identical(&disk, &final_state), "{fp}: production is neither before nor the replica's state");
            env.ok(&["vm", "stop", "web_replica"]);
            env.ok(&["failback", "web", "--to", "original"]);
        }
    }
    // A second recovery changes nothing; the lifecycle goes on to a correct incremental run.
    env.ok(&["replica", "list"]);
    if state(&env) == "failback" {
        env.ok(&["failback", "commit", "web"]);
    }
    write(&disk, 0x66, 12 * 1024, 64);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!(last["method"], "cbt", "{fp}: {last}");
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk), "{fp}");
    assert!(env.processes().is_empty(), "{fp}: {:?}", env.processes());
}

#[test]
fn kill_during_failback_phase_1() {
    for fp in ["failback.after-target-off", "failback.after-working", "failback.after-protect", "failback.mid-transfer"]
    {
        crash_at(fp);
    }
}

#[test]
fn kill_during_switch() {
    for fp in ["switch.after-shutdown", "switch.after-final-transfer", "switch.mid-commit", "switch.after-identity"] {
        crash_at(fp);
    }
}

#[test]
fn kill_during_commit_and_undo() {
    for fp in ["commit.after-point", "undo-failback.after-stop", "undo-failback.after-restore"] {
        crash_at(fp);
    }
}

#[test]
fn bad_failback_requests_change_nothing() {
    let env = Env::new(BIN);
    in_failover(&env);
    let small = env.path("src/small.qcow2");
    make_disk(&small, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "small", "--disk", &small]);
    std::fs::create_dir_all(env.path("taken")).unwrap();
    make_disk(&env.path("taken/web-d0.qcow2"), "qcow2", 1, &[]);
    let before = env.snapshot();
    let taken = format!("new:local:{}", env.path("taken"));
    for (args, expect) in [
        (&["failback", "web"][..], "--to"),
        (&["failback", "web", "--to", "elsewhere"], "unknown failback target"),
        (&["failback", "web", "--to", "new:local"], "absolute directory"),
        (&["failback", "web", "--to", "original", "--switch", "later"], "auto, manual or at:TIME"),
        (&["failback", "web", "--to", "original", "--switch", "at:tomorrow"], "RFC 3339"),
        (&["failback", "ghost", "--to", "original"], "unknown VM"),
        (&["failback", "small", "--to", "original"], "has no replica"),
        (&["failback", "web", "--to", "existing:nobody"], "register the recovered VM first"),
        (&["failback", "web", "--to", "existing:web"], "use --to original"),
        (&["failback", "web", "--to", "existing:web_replica"], "a replica VM"),
        (&["failback", "web", "--to", "existing:small"], "must be the same size"),
        (&["failback", "web", "--to", "new:mars:/srv"], "unknown host"),
        (&["failback", "web", "--to", &taken], "already exists"),
        (&["failback", "switch", "web"], "cannot switch"),
        (&["failback", "commit", "web"], "cannot commit failback"),
        (&["failback", "undo", "web"], "cannot undo failback"),
    ] {
        let r = env.run(args);
        assert_ne!(r.code, Some(0), "{args:?}");
        let text = format!("{}{}", r.stdout, r.stderr);
        assert!(text.contains(expect), "{args:?}: expected {expect:?} in {text}");
        assert_eq!(env.snapshot(), before, "{args:?} changed state");
        assert!(working_files(&env).is_empty(), "{args:?}");
    }
    // The old source running elsewhere would keep the name a failback gives away.
    env.ok(&["vm", "start", "web"]);
    let before = env.snapshot();
    let r = env.run(&["failback", "web", "--to", &format!("new:local:{}", env.path("newsite"))]);
    assert!(r.code == Some(1) && r.stdout.contains("shut it down first"), "{}", r.stdout);
    assert_eq!(env.snapshot(), before);
    env.ok(&["vm", "stop", "web"]);
    // A VM that is not in failover fails alone in a batch; the others fail back.
    let disk = env.path("src/db.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x12, 0, 1)]);
    env.ok(&["vm", "create", "db", "--disk", &disk, "--memory", "64"]);
    env.ok(&["job", "create", "k", "--vm", "db", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "k"]);
    let r = env.run(&["failback", "web", "db", "--to", "original", "--switch", "manual", "--json"]);
    assert_eq!(r.code, Some(1));
    let out: Value = serde_json::from_str(&r.stdout).unwrap();
    let ok: Vec<(&str, bool)> =
        out.as_array().unwrap().iter().map(|o| (o["vm"].as_str().unwrap(), o["ok"].as_bool().unwrap())).collect();
    assert_eq!(ok, vec![("web", true), ("db", false)]);
    // Committing needs the replica off; in ready to switch, the replica is untouched.
    let err = env.run(&["failback", "commit", "web"]);
    assert!(err.stdout.contains("cannot commit failback"), "{}", err.stdout);
    env.ok(&["failback", "undo", "web"]);
    assert_eq!(state(&env), "failover");
    env.ok(&["vm", "stop", "web_replica"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// A failback undone before its switch leaves the replica on a newer overlay generation
/// (taken live); permanent failover must flatten every generation, through QEMU's own node.
#[test]
fn permanent_failover_after_an_undone_failback() {
    let env = Env::new(BIN);
    in_failover(&env);
    env.ok(&["vm", "start", "web_replica"]);
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    assert_eq!(replica_top(&env), env.path("dr/web/failover-d0.g1.qcow2"));
    env.ok(&["failback", "undo", "web"]);
    let reference = env.path("reference.raw");
    qemu_img(&["convert", "-U", "-O", "raw", &replica_top(&env), &reference]);
    let out = env.ok(&["failover", "permanent", "web"]);
    assert!(out.contains("web: ok"), "{out}");
    let disk = replica_top(&env);
    let info = qemu_img(&["info", "-U", &disk]);
    assert!(!info.contains("backing file"), "{info}");
    assert!(identical(&disk, &reference), "the flattened disk differs from what the replica ran");
    let left: Vec<_> = std::fs::read_dir(env.path("dr/web"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| *p != disk)
        .collect();
    assert!(left.is_empty(), "files left beside the permanent disk: {left:?}");
    env.ok(&["vm", "stop", "web_replica"]);
}

/// Killed right after the live protective point: QEMU writes to the new overlay, which the
/// recovery must find from QEMU itself so that the switch later sends those writes.
#[test]
fn kill_after_a_live_protective_point() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x21, 0, 2)]);
    env.create_guest_vm("web", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "web"]);
    env.wait_console("web_replica", Duration::from_secs(60), "writes in failover", |c| Ledger::acknowledged(c) >= 10);
    env.run_killed_at("failback.after-protect", &["failback", "web", "--to", "original", "--switch", "manual"]);
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("phase 1 rolled back"), "{rec}");
    assert_eq!(state(&env), "failover");
    assert_eq!(replica_top(&env), env.path("dr/web/failover-d0.g1.qcow2"), "the overlay QEMU writes to");
    let at_kill = Ledger::acknowledged(&env.console("web_replica"));
    env.wait_console("web_replica", Duration::from_secs(60), "writes after recovery", |c| {
        Ledger::acknowledged(c) >= at_kill + 10
    });
    let out = env.ok(&["failback", "web", "--to", "original", "--shutdown-timeout", "30"]);
    assert!(out.contains("switched") && !out.contains("powered off"), "{out}");
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    let held = Ledger { start_block: START }.records_in(&read_image(&disk), COUNT).unwrap();
    assert!(held >= acked, "production holds {held} records, the replica acknowledged {acked}");
    assert!(identical(&disk, &replica_top(&env)));
    env.ok(&["failback", "commit", "web"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// A raw disk has no dirty bitmap: every phase that would use one compares instead, and
/// the result is the same.
#[test]
fn a_raw_original_disk_is_compared_by_digest() {
    let env = Env::new(BIN);
    let disk = env.path("src/raw.img");
    make_disk(&disk, "raw", 16, &[(0x11, 0, 3)]);
    env.ok(&["vm", "create", "web", "--disk", &disk, "--memory", "64"]);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "web"]);
    env.ok(&["vm", "stop", "web_replica"]);
    write(&env.path("dr/web/failover-d0.qcow2"), 0x44, 1024, 512);
    let out = env.ok(&["failback", "web", "--to", "original"]);
    assert!(out.contains("by digest") && out.contains("raw"), "{out}");
    assert!(identical(&disk, &replica_top(&env)));
    // Undo without a bitmap compares too; production reads as the replica's final state.
    qemu_io(&disk, "raw", &["write -P 0x77 8M 64k".into()]);
    env.ok(&["failback", "undo", "web"]);
    assert!(identical(&disk, &replica_top(&env)));
    env.ok(&["vm", "stop", "web_replica"]);
    env.ok(&["failback", "web", "--to", "original"]);
    env.ok(&["failback", "commit", "web"]);
    qemu_io(&disk, "raw", &["write -P 0x66 12M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!((last["method"].as_str(), last["bytes_transferred"].as_u64()), (Some("digest"), Some(64 * 1024)));
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

/// The last `LEDGER-RESUME` a console shows: how many records the guest found at its last boot.
fn last_resume(console: &str) -> u64 {
    console.lines().filter_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).next_back().unwrap()
}

/// The whole lifecycle with a real guest writing, for one target: failback while it
/// writes, switch, production checked; production runs and is undone, the replica comes
/// back exactly as it was; failback again with power-on, commit, an incremental run.
fn guest_lifecycle(target: &str) {
    let env = Env::new(BIN);
    let ledger = Ledger { start_block: START };
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x21, 0, 2)]);
    let append = ledger_append(START, COUNT, 20_000);
    env.create_guest_vm("web", &disk, 160, &append);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    env.ok(&["job", "run", "j"]);
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    let (to, production_disk) = match target {
        "existing" => {
            // Recovered from a backup: the restore point's state, as a standalone image.
            std::fs::create_dir_all(env.path("restored")).unwrap();
            let restored = env.path("restored/web2.qcow2");
            qemu_img(&["convert", "-O", "qcow2", &env.latest_disk("web", 0), &restored]);
            env.create_guest_vm("web2", &restored, 160, &append);
            ("existing:web2".to_owned(), restored)
        }
        "new" => (format!("new:local:{}", env.path("newsite")), env.path("newsite/web-d0.qcow2")),
        _ => ("original".to_owned(), disk.clone()),
    };
    env.ok(&["failover", "web"]);
    env.wait_console("web_replica", Duration::from_secs(60), "writes in failover", |c| {
        c.contains("LEDGER-RESUME") && Ledger::acknowledged(c) >= last_resume(c) + 20
    });

    let out = env.ok(&["failback", "web", "--to", &to, "--shutdown-timeout", "30"]);
    assert!(out.contains("switched") && !out.contains("powered off"), "{target}: {out}");
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    let held = ledger.records_in(&read_image(&production_disk), COUNT).unwrap();
    assert!(held >= acked, "{target}: production holds {held} records, the replica acknowledged {acked}");
    assert!(identical(&production_disk, &replica_top(&env)), "{target}: production is not the replica's state");
    let at_switch = read_image(&replica_top(&env));

    // Production runs, writes, and is found wanting: undo.
    env.ok(&["vm", "start", "web"]);
    let c = env.wait_console("web", Duration::from_secs(60), "production writes", |c| {
        c.matches("LEDGER-RESUME").count() >= 2 && Ledger::acknowledged(c) >= held + 5
    });
    assert_eq!(last_resume(&c), held, "{target}: production booted from the replica's final state");
    let out = env.ok(&["failback", "undo", "web"]);
    assert!(out.contains("failback undone"), "{target}: {out}");
    let c = env.wait_console("web_replica", Duration::from_secs(60), "replica back", |c| {
        c.matches("LEDGER-RESUME").count() >= 2
    });
    assert_eq!(last_resume(&c), held, "{target}: the replica came back as it was at the switch");
    if target == "new" {
        assert!(!std::path::Path::new(&production_disk).exists(), "the new VM's disks are gone");
    } else {
        assert!(read_image(&production_disk) == at_switch, "{target}: the target's disk is not the replica's state");
    }

    // Again, for good.
    env.wait_console("web_replica", Duration::from_secs(60), "replica writes", |c| {
        Ledger::acknowledged(c) >= held + 10
    });
    let out = env.ok(&["failback", "web", "--to", &to, "--shutdown-timeout", "30", "--power-on"]);
    assert!(out.contains("powered on"), "{target}: {out}");
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    env.ok(&["failback", "commit", "web"]);
    let c = env.wait_console("web", Duration::from_secs(60), "production writes", |c| {
        c.matches("LEDGER-RESUME").count() >= 3 && Ledger::acknowledged(c) >= last_resume(c) + 5
    });
    assert!(last_resume(&c) >= acked, "{target}: production lost writes the replica acknowledged");
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!(last["method"], "cbt", "{target}: {last}");
    assert!(last["bytes_transferred"].as_u64().unwrap() < MIB, "{target}: {last}");
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &production_disk), "{target}");
    assert!(env.processes().is_empty(), "{target}: {:?}", env.processes());
}

#[test]
fn guest_lifecycle_original() {
    guest_lifecycle("original");
}

#[test]
fn guest_lifecycle_existing() {
    guest_lifecycle("existing");
}

#[test]
fn guest_lifecycle_new() {
    guest_lifecycle("new");
}

/// The replica's QEMU killed during failback phase 1, just after its protective point:
/// phase 1 either completes from the frozen layers or rolls back; either way the failback
/// then brings production every write the replica's guest acknowledged before it died.
#[test]
fn a_replica_qemu_killed_during_phase_1_loses_no_acknowledged_write() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x21, 0, 2)]);
    env.create_guest_vm("web", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "web"]);
    env.wait_console("web_replica", Duration::from_secs(60), "writes in failover", |c| Ledger::acknowledged(c) >= 20);
    let pattern = env.path("data/hosts/local/vms/web_replica/console.log");
    let r = env.run_killing_at(
        "failback.after-protect",
        &pattern,
        &["failback", "web", "--to", "original", "--switch", "manual"],
    );
    assert_eq!(env.json(&["vm", "show", "web_replica"])["state"], "stopped", "the replica's QEMU is gone");
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    if r.code == Some(0) {
        assert_eq!(state(&env), "ready_to_switch", "{}", r.stdout);
    } else {
        // Rolled back: still in failover, the original disk not written, and a new
        // failback from the stopped replica works.
        assert_eq!(state(&env), "failover", "{}{}", r.stdout, r.stderr);
        assert!(working_files(&env).is_empty(), "{:?}", working_files(&env));
        env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    }
    env.ok(&["failback", "switch", "web"]);
    let held = Ledger { start_block: START }.records_in(&read_image(&disk), COUNT).unwrap();
    assert!(held >= acked, "production holds {held} records, the replica acknowledged {acked}");
    env.ok(&["failback", "commit", "web"]);
    assert!(identical(&env.latest_disk("web", 0), &disk));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}
