//! User story: standby is killed (SIGKILL) at any step of a run. The restore points that
//! existed stay intact, no half-made point appears, nothing is left behind, and the next
//! run is exact and loses no change.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use standby_testkit::{identical, ledger_append, make_disk, qemu_img, qemu_io, read_image, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// Fail points at or after the database commit leave the new restore point in place.
fn commits(fp: &str) -> bool {
    matches!(fp, "replicate.after-commit" | "retention.after-commit-layer" | "retention.after-drop")
}

fn ids(points: &[Value]) -> Vec<i64> {
    points.iter().map(|p| p["id"].as_i64().unwrap()).collect()
}

fn dr_files(env: &Env, vm: &str) -> Vec<String> {
    let mut f: Vec<String> = std::fs::read_dir(env.path(&format!("dr/{vm}")))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    f.sort();
    f
}

fn used_layers(points: &[Value]) -> Vec<String> {
    let mut u: Vec<String> = points
        .iter()
        .flat_map(|p| p["disks"].as_array().unwrap().iter().map(|d| d["path"].as_str().unwrap().to_owned()))
        .collect();
    u.sort();
    u
}

/// Kills a run of a stopped VM at `fp` and checks every invariant afterwards.
fn crash_stopped_vm_at(fp: &str) {
    let env = Env::new(BIN);
    let disk = env.path("src/c.qcow2");
    make_disk(&disk, "qcow2", 48, &[(0x11, 0, 4)]);
    env.ok(&["vm", "create", "c", "--disk", &disk]);
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "c",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
        "--retain",
        "2",
    ]);
    let mut refs: HashMap<i64, String> = HashMap::new();
    let snapshot = |env: &Env, refs: &mut HashMap<i64, String>| {
        let id = *ids(&env.points("c")).last().unwrap();
        let r = env.path(&format!("ref{id}.qcow2"));
        qemu_img(&["convert", "-O", "qcow2", &disk, &r]);
        refs.insert(id, r);
    };
    for i in 0..2u64 {
        qemu_io(&disk, "qcow2", &[format!("write -P {:#x} {}M 1M", 0x20 + i, 5 + i)]);
        env.ok(&["job", "run", "j"]);
        snapshot(&env, &mut refs);
    }
    let before = ids(&env.points("c"));

    // Enough change for several transfer chunks, then the kill.
    qemu_io(&disk, "qcow2", &["write -P 0x41 10M 12M".into(), "write -z 0 1M".into()]);
    let at_kill = env.path("at-kill.qcow2");
    qemu_img(&["convert", "-O", "qcow2", &disk, &at_kill]);
    env.run_killed_at(fp, &["job", "run", "j"]);

    let after = env.points("c");
    if commits(fp) {
        let new = *ids(&after).last().unwrap();
        assert!(!before.contains(&new), "{fp}: the committed point should be listed");
        let path = after.last().unwrap()["disks"][0]["path"].as_str().unwrap();
        assert!(identical(path, &at_kill), "{fp}: committed point differs from the disk at the kill");
        refs.insert(new, at_kill.clone());
    } else {
        assert_eq!(ids(&after), before, "{fp}: an interrupted run must leave no restore point");
    }
    for p in &after {
        let id = p["id"].as_i64().unwrap();
        assert!(identical(p["disks"][0]["path"].as_str().unwrap(), &refs[&id]), "{fp}: point {id} changed");
    }

    // Reading changed nothing; recovery frees the source image the killed run's servers held.
    let recovered = env.ok(&["recover"]);
    assert!(recovered.contains("VM c"), "{fp}: {recovered}");
    // Changes made after the kill, and those the killed run was carrying, all arrive.
    qemu_io(&disk, "qcow2", &["write -P 0x42 30M 1M".into()]);
    let out = env.ok(&["job", "run", "j"]);
    let points = env.points("c");
    assert_eq!(points.len(), 2, "{fp}: retention keeps 2\n{out}");
    let last = points.last().unwrap();
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk), "{fp}: run after recovery is not exact");
    assert_ne!(last["method"], "full", "{fp}: recovery must not force a full copy");
    // Nothing orphaned: layers, servers, bitmaps, task states.
    // The layers the points use, and the marker that makes the directory the replica's.
    let mut expected = used_layers(&points);
    expected.insert(0, env.path("dr/c/.standby-replica"));
    assert_eq!(dr_files(&env, "c"), expected, "{fp}: stray files in the replica directory");
    assert!(env.processes().is_empty(), "{fp}: processes left: {:?}", env.processes());
    assert_eq!(standby_testkit::bitmaps(&disk).len(), 1, "{fp}: bitmaps {:?}", standby_testkit::bitmaps(&disk));
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    let tasks = env.json(&["task", "list"]);
    assert!(tasks.as_array().unwrap().iter().any(|t| t["interrupted"] == true), "{fp}: killed task not shown");
}

#[test]
fn kill_after_checkpoint() {
    crash_stopped_vm_at("replicate.after-checkpoint");
}

#[test]
fn kill_mid_transfer() {
    crash_stopped_vm_at("replicate.mid-transfer");
}

#[test]
fn kill_before_commit() {
    crash_stopped_vm_at("replicate.before-commit");
}

#[test]
fn kill_after_commit() {
    crash_stopped_vm_at("replicate.after-commit");
}

#[test]
fn kill_during_retention() {
    crash_stopped_vm_at("retention.after-commit-layer");
    crash_stopped_vm_at("retention.after-drop");
}

/// A fail point no crash test names is a step nobody has killed standby at.
/// Every fail point was reached by a standby process the suite ran, as the processes
/// themselves logged it (`STANDBY_FAILPOINT_LOG`). `make test` runs this after the rest
/// of the suite; alone it has nothing to check.
#[test]
#[ignore = "run by `make test` after the whole suite, which writes the log it reads"]
fn every_fail_point_was_reached_by_the_suite() {
    let log = std::env::var("STANDBY_FAILPOINT_LOG").expect("STANDBY_FAILPOINT_LOG names the suite's log");
    let text = std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{log}: {e}; run the suite first"));
    let reached: std::collections::BTreeSet<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let missing: Vec<&&str> = standby_engine::failpoint::ALL.iter().filter(|fp| !reached.contains(**fp)).collect();
    assert!(missing.is_empty(), "fail points no test reached: {missing:?}");
}

/// A running VM: the kill leaves a fleecing node, a block job, an export and an NBD server
/// inside QEMU. The next run clears them while the guest keeps writing.
#[test]
fn kill_while_replicating_a_running_vm() {
    let env = Env::new(BIN);
    let disk = env.path("src/r.qcow2");
    make_disk(&disk, "qcow2", 48, &[(0x11, 0, 12)]);
    env.create_guest_vm("r", &disk, 160, &ledger_append(8192, 2000, 20_000));
    env.ok(&["job", "create", "j", "--vm", "r", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "r"]);
    env.wait_console("r", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    for fp in ["replicate.mid-transfer", "replicate.before-commit"] {
        let n = env.points("r").len();
        env.run_killed_at(fp, &["job", "run", "j"]);
        assert_eq!(env.points("r").len(), n, "{fp}: interrupted run made a point");
        assert_eq!(env.json(&["vm", "show", "r"])["state"], "running", "{fp}: the VM must keep running");
        let acked = Ledger::acknowledged(&env.console("r"));
        env.ok(&["job", "run", "j"]);
        let path = env.latest_disk("r", 0);
        let k = Ledger { start_block: 8192 }.records_in(&read_image(&path), 2000).unwrap();
        assert!(k >= acked, "{fp}: point has {k} records, guest acknowledged {acked}");
    }
    env.ok(&["vm", "shutdown", "r", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("r", 0), &disk));
    assert_eq!(env.points("r").last().unwrap()["method"], "cbt");
    assert!(env.processes().is_empty(), "left: {:?}", env.processes());
    assert!(std::fs::read_dir(env.path("data/hosts/local/vms/r"))
        .unwrap()
        .all(|e| { !e.unwrap().file_name().to_string_lossy().starts_with("fleece") }));
}

// ---- Other processes die too: the servers and VMs standby works with ----

/// A `qemu-nbd` server killed while it serves a run (the source's frozen view, then the
/// DR layer being written): the run fails, no point is published from the broken view,
/// the points that existed stay exact, nothing is left behind, and the next run is exact.
#[test]
fn killed_nbd_servers_fail_the_run_and_lose_nothing() {
    let env = Env::new(BIN);
    let disk = env.path("src/c.qcow2");
    make_disk(&disk, "qcow2", 160, &[(0x11, 0, 4)]);
    env.ok(&["vm", "create", "c", "--disk", &disk, "--format", "qcow2"]);
    let dr = env.path("dr");
    env.ok(&["job", "create", "j", "--vm", "c", "--target-host", "local", "--target-dir", &dr, "--retain", "3"]);
    env.ok(&["job", "run", "j"]);
    let mut refs: HashMap<i64, String> = HashMap::new();
    let keep = |env: &Env, refs: &mut HashMap<i64, String>| {
        let id = *ids(&env.points("c")).last().unwrap();
        let r = env.path(&format!("ref{id}.qcow2"));
        qemu_img(&["convert", "-O", "qcow2", &disk, &r]);
        refs.insert(id, r);
    };
    keep(&env, &mut refs);
    for (i, server) in ["src-r1-d0", "dst-r1-d0"].into_iter().enumerate() {
        let before = ids(&env.points("c"));
        // Many more chunks than the transfer has workers: most are still to come at the kill.
        qemu_io(&disk, "qcow2", &[format!("write -P {:#x} {}M 96M", 0x50 + i, 8 + i)]);
        let pattern = env.path(&format!("data/hosts/local/nbd/{server}"));
        let r = env.run_killing_at("replicate.mid-transfer", &pattern, &["job", "run", "j"]);
        assert_eq!(r.code, Some(1), "{server}: a run whose server died must fail:\n{}{}", r.stdout, r.stderr);
        let after = env.points("c");
        assert_eq!(ids(&after), before, "{server}: a point was published from a broken view");
        for p in &after {
            let id = p["id"].as_i64().unwrap();
            assert!(identical(p["disks"][0]["path"].as_str().unwrap(), &refs[&id]), "{server}: point {id} changed");
        }
        assert!(env.processes().is_empty(), "{server}: processes left: {:?}", env.processes());
        let mut expected = used_layers(&after);
        expected.insert(0, env.path("dr/c/.standby-replica"));
        assert_eq!(dr_files(&env, "c"), expected, "{server}: stray files");
        env.ok(&["job", "run", "j"]);
        let last = env.points("c").last().unwrap().clone();
        assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk), "{server}: next run not exact");
        assert_ne!(last["method"], "full", "{server}: a failed run must not force a full copy");
        keep(&env, &mut refs);
    }
}

/// The source's QEMU killed while its frozen view is being read: the run fails and makes
/// no point; the VM is down (as after any crash), and the next run, offline, holds every
/// write the guest acknowledged before it died.
#[test]
fn a_killed_source_qemu_fails_the_run_and_the_next_one_holds_every_acknowledged_write() {
    let env = Env::new(BIN);
    let disk = env.path("src/r.qcow2");
    make_disk(&disk, "qcow2", 48, &[(0x11, 0, 12)]);
    env.create_guest_vm("r", &disk, 160, &ledger_append(8192, 2000, 20_000));
    env.ok(&["job", "create", "j", "--vm", "r", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "r"]);
    env.wait_console("r", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    // The first run copies the 12 MiB written before: several chunks, the kill in between.
    let pattern = env.path("data/hosts/local/vms/r/console.log");
    let r = env.run_killing_at("replicate.mid-transfer", &pattern, &["job", "run", "j"]);
    assert_eq!(r.code, Some(1), "a run whose source died must fail:\n{}{}", r.stdout, r.stderr);
    assert!(env.points("r").is_empty(), "a point was published from a broken view");
    assert_eq!(env.json(&["vm", "show", "r"])["state"], "stopped");
    let acked = Ledger::acknowledged(&env.console("r"));
    env.ok(&["job", "run", "j"]);
    let points = env.points("r");
    assert_eq!(points.len(), 1);
    let path = points[0]["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(identical(&path, &disk), "the next run is exact");
    let k = Ledger { start_block: 8192 }.records_in(&read_image(&path), 2000).unwrap();
    assert!(k >= acked, "point has {k} records, the guest acknowledged {acked} before it died");
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}
