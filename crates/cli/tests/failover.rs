//! User story: the production site is gone; the operator fails over to a replica, at the
//! latest or an older restore point, and can undo it. Restore points never change.

use std::time::Duration;

use serde_json::Value;
use standby_testkit::{file_digest, identical, ledger_append, make_disk, read_image, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const START: u64 = 2048;
const COUNT: u64 = 3000;

fn point_ids(env: &Env, vm: &str) -> Vec<i64> {
    env.points(vm).iter().map(|p| p["id"].as_i64().unwrap()).collect()
}

/// Every layer file of restore point `id`'s chain, with its digest.
fn chain_digests(env: &Env, vm: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(env.path(&format!("dr/{vm}")))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| !p.contains("failover-"))
        .map(|p| {
            let d = file_digest(&p);
            (p, d)
        })
        .collect();
    out.sort();
    out
}

fn vm_row(env: &Env, name: &str) -> Option<Value> {
    env.json(&["vm", "list"]).as_array().unwrap().iter().find(|v| v["name"] == name).cloned()
}

#[test]
fn failover_to_an_older_point_then_undo() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x21, 0, 2)]);
    env.create_guest_vm("web", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    let ledger = Ledger { start_block: START };
    let mut records = Vec::new();
    for want in [5, 30, 60] {
        env.wait_console("web", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= want);
        env.ok(&["job", "run", "j"]);
        records.push(ledger.records_in(&read_image(&env.latest_disk("web", 0)), COUNT).unwrap());
    }
    let ids = point_ids(&env, "web");
    assert!(records[1] < records[2], "the points must differ: {records:?}");

    // The source still runs: failover is refused without --force.
    let r = env.run(&["failover", "web", "--point", &ids[1].to_string()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stdout.contains("web: FAILED") && r.stdout.contains("web_replica") && r.stdout.contains("--force"),
        "{}",
        r.stdout
    );
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready", "a refused failover changes nothing");
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);

    let before = chain_digests(&env, "web");
    let out = env.ok(&["failover", "web", "--point", &ids[1].to_string()]);
    assert!(out.contains("web: ok: replica web_replica runs"), "{out}");
    let replica = env.json(&["replica", "list"])[0].clone();
    assert_eq!(replica["state"], "failover");
    assert_eq!(replica["failover_point"], ids[1]);
    let row = vm_row(&env, "web_replica").expect("the replica VM is listed");
    assert_eq!(
        (row["role"].as_str(), row["state"].as_str(), row["host"].as_str()),
        (Some("replica"), Some("running"), Some("local"))
    );

    // The replica booted from exactly restore point 2: its guest finds that point's records.
    let console =
        env.wait_console("web_replica", Duration::from_secs(60), "replica boot", |c| c.contains("LEDGER-RESUME"));
    let resumed: u64 = console.lines().find_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).unwrap();
    assert_eq!(resumed, records[1], "the replica must run from the chosen restore point");
    env.wait_console("web_replica", Duration::from_secs(60), "writes in failover", |c| {
        Ledger::acknowledged(c) >= records[1] + 10
    });

    // While in failover: replication pauses, the source may not start.
    let r = env.run(&["job", "run", "j"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("skipped") && r.stdout.contains("failover"), "{}", r.stdout);
    let err = env.fails(&["vm", "start", "web"]);
    assert!(err.contains("web_replica is running"), "{err}");
    let r = env.run(&["failover", "web"]);
    assert!(r.code == Some(1) && r.stdout.contains("undo it (standby failover undo VM)"), "{}", r.stdout);
    assert_eq!(chain_digests(&env, "web"), before, "restore points changed during failover");

    let out = env.ok(&["failover", "undo", "web"]);
    assert!(out.contains("web: ok"), "{out}");
    assert!(vm_row(&env, "web_replica").is_none());
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    assert_eq!(chain_digests(&env, "web"), before, "undo must leave the restore points as they were");
    assert!(env.processes().is_empty(), "{:?}", env.processes());
    let p2 = env.points("web")[1]["disks"][0]["path"].as_str().unwrap().to_owned();
    assert_eq!(ledger.records_in(&read_image(&p2), COUNT).unwrap(), records[1], "writes of the failover are gone");

    // Replication resumes incrementally.
    env.ok(&["job", "run", "j"]);
    let last = env.points("web").pop().unwrap();
    assert_eq!(last["method"], "cbt");
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk));

    let history = env.json(&["history", "web"]);
    let ops: Vec<(String, String)> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["operation"].as_str().unwrap().to_owned(), h["result"].as_str().unwrap().to_owned()))
        .collect();
    for want in [("failover", "failed"), ("failover", "ok"), ("replication", "skipped"), ("undo failover", "ok")] {
        assert!(ops.contains(&(want.0.into(), want.1.into())), "history lacks {want:?}: {ops:?}");
    }
    assert!(history.as_array().unwrap().iter().any(|h| h["command"].as_str().unwrap().contains("failover undo web")));
}

/// VMs without a guest: QEMU runs (the firmware finds nothing to boot), which is all the
/// failover machinery needs.
fn plain_vms(env: &Env, names: &[&str]) {
    for n in names {
        let disk = env.path(&format!("src/{n}.qcow2"));
        make_disk(&disk, "qcow2", 8, &[(0x31, 0, 1)]);
        env.ok(&["vm", "create", n, "--disk", &disk, "--memory", "64"]);
    }
    let mut args = vec!["job", "create", "j", "--target-host", "local", "--target-dir"];
    let dr = env.path("dr");
    args.push(&dr);
    for n in names {
        args.extend(["--vm", n]);
    }
    env.ok(&args);
    env.ok(&["job", "run", "j"]);
}

#[test]
fn batch_fails_only_the_vm_in_the_wrong_state() {
    let env = Env::new(BIN);
    plain_vms(&env, &["a", "b", "c"]);
    env.ok(&["failover", "b"]);
    let err = env.fails(&[
        "job",
        "create",
        "k",
        "--vm",
        "b_replica",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr2"),
    ]);
    assert!(err.contains("is a replica in failover"), "{err}");
    let r = env.run(&["failover", "a", "b", "c", "--json"]);
    assert_eq!(r.code, Some(1));
    let out: Value = serde_json::from_str(&r.stdout).unwrap();
    let ok: Vec<(String, bool)> = out
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["vm"].as_str().unwrap().to_owned(), o["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(ok, vec![("a".into(), true), ("b".into(), false), ("c".into(), true)]);
    for n in ["a_replica", "b_replica", "c_replica"] {
        assert_eq!(vm_row(&env, n).unwrap()["state"], "running", "{n}");
    }
    env.ok(&["failover", "undo", "a", "b", "c"]);
    assert!(env.json(&["replica", "list"]).as_array().unwrap().iter().all(|r| r["state"] == "ready"));
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

#[test]
fn bad_failover_requests_change_nothing() {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    let disk = env.path("src/lonely.qcow2");
    make_disk(&disk, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "lonely", "--disk", &disk]);
    let before = env.snapshot();
    for (args, expect) in [
        (&["failover", "a", "--point", "999"][..], "no restore point 999"),
        (&["failover", "a", "--point", "yesterday"], "neither `latest` nor a restore point id"),
        (&["failover", "undo", "a"], "not in failover"),
        (&["failover", "ghost"], "unknown VM"),
        (&["failover", "lonely"], "has no replica"),
    ] {
        let err = env.run(args);
        assert_ne!(err.code, Some(0), "{args:?}");
        let text = format!("{}{}", err.stdout, err.stderr);
        assert!(text.contains(expect), "{args:?}: expected {expect:?} in {text}");
        assert_eq!(env.snapshot(), before, "{args:?} changed state");
    }
    assert!(env.processes().is_empty());
    // With the source running, failover needs --force, runs both and says so.
    env.ok(&["vm", "start", "a"]);
    let r = env.run(&["failover", "a"]);
    assert!(r.code == Some(1) && r.stdout.contains("a_replica: its counterpart a is running"), "{}", r.stdout);
    let out = env.ok(&["failover", "a", "--force"]);
    assert!(out.contains("warning: source VM a is still running"), "{out}");
    assert_eq!(vm_row(&env, "a_replica").unwrap()["state"], "running");
    env.ok(&["failover", "undo", "a"]);
    env.ok(&["vm", "stop", "a"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

fn crash_failover_at(fp: &str) {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    let before = chain_digests(&env, "a");
    env.run_killed_at(fp, &["failover", "a"]);
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("interrupted failover"), "{fp}: {rec}");
    let list = env.run(&["replica", "list", "--json"]);
    let state = serde_json::from_str::<Value>(&list.stdout).unwrap()[0]["state"].as_str().unwrap().to_owned();
    let replica_vm = vm_row(&env, "a_replica");
    if fp == "failover.after-start" {
        assert_eq!(state, "failover", "{fp}: the replica ran, so the failover completes");
        assert_eq!(replica_vm.unwrap()["state"], "running");
        assert_eq!(env.processes().len(), 1, "{fp}: exactly one replica QEMU: {:?}", env.processes());
        env.ok(&["failover", "undo", "a"]);
    } else {
        assert_eq!(state, "ready", "{fp}: a failover whose replica never ran is rolled back");
        assert!(replica_vm.is_none(), "{fp}");
    }
    assert!(!std::path::Path::new(&env.path("dr/a/failover-d0.qcow2")).exists(), "{fp}: overlay left");
    assert!(env.processes().is_empty(), "{fp}: {:?}", env.processes());
    assert_eq!(chain_digests(&env, "a"), before, "{fp}: restore points changed");
    // A second recovery changes nothing; the next failover works.
    assert_eq!(env.ok(&["recover"]).trim(), "nothing to recover", "{fp}");
    env.ok(&["failover", "a"]);
    env.ok(&["failover", "undo", "a"]);
}

fn crash_undo_at(fp: &str) {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    let before = chain_digests(&env, "a");
    env.ok(&["failover", "a"]);
    env.run_killed_at(fp, &["failover", "undo", "a"]);
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("interrupted undo failover"), "{fp}: {rec}");
    let list = env.run(&["replica", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&list.stdout).unwrap()[0]["state"], "ready", "{fp}");
    assert!(vm_row(&env, "a_replica").is_none(), "{fp}");
    assert!(env.processes().is_empty(), "{fp}: {:?}", env.processes());
    assert_eq!(chain_digests(&env, "a"), before, "{fp}: restore points changed");
    env.ok(&["job", "run", "j"]);
}

#[test]
fn kill_during_failover() {
    for fp in ["failover.after-overlays", "failover.after-define", "failover.after-start"] {
        crash_failover_at(fp);
    }
}

#[test]
fn kill_during_undo() {
    for fp in ["undo.after-stop", "undo.after-discard"] {
        crash_undo_at(fp);
    }
}

#[test]
fn planned_failover_loses_no_acknowledged_write() {
    let env = Env::new(BIN);
    let disk = env.path("src/db.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x41, 0, 2)]);
    env.create_guest_vm("db", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "db", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "db"]);
    env.wait_console("db", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "j"]);
    env.wait_console("db", Duration::from_secs(60), "more ledger writes", |c| Ledger::acknowledged(c) >= 40);
    let out = env.ok(&["failover", "planned", "db", "--shutdown-timeout", "30"]);
    assert!(out.contains("db: ok") && out.contains("verified equal"), "{out}");
    assert!(!out.contains("powered off"), "the guest should have shut down by itself: {out}");
    // Every write the source's guest saw acknowledged, up to its shutdown, is on the replica.
    let acked = Ledger::acknowledged(&env.console("db"));
    assert!(env.console("db").contains("STANDBY-GUEST shutdown requested"));
    let console =
        env.wait_console("db_replica", Duration::from_secs(60), "replica boot", |c| c.contains("LEDGER-RESUME"));
    let resumed: u64 = console.lines().find_map(|l| l.trim().strip_prefix("LEDGER-RESUME ")?.parse().ok()).unwrap();
    assert!(resumed >= acked, "replica holds {resumed} records, the source acknowledged {acked}");
    let points = env.points("db");
    assert_eq!(points.len(), 3, "one point before, two made by the planned failover");
    let last = points.last().unwrap();
    assert!(identical(last["disks"][0]["path"].as_str().unwrap(), &disk), "newest point is the stopped source");
    let replica = env.json(&["replica", "list"])[0].clone();
    assert_eq!(
        (replica["state"].as_str(), replica["failover_point"].as_i64()),
        (Some("failover"), last["id"].as_i64())
    );
    assert_eq!(env.json(&["vm", "show", "db"])["state"], "stopped");
    env.ok(&["failover", "undo", "db"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

fn crash_planned_at(fp: &str) {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    env.ok(&["vm", "start", "a"]);
    env.run_killed_at(fp, &["failover", "planned", "a", "--shutdown-timeout", "1"]);
    let rec = env.ok(&["recover"]);
    let list = env.json(&["replica", "list"]);
    if fp == "failover.after-start" {
        // The replica runs: the failover the operator asked for is completed.
        assert!(rec.contains("completed an interrupted failover (a_replica runs)"), "{fp}: {rec}");
        assert_eq!(list[0]["state"], "failover", "{fp}");
        assert_eq!(env.json(&["vm", "show", "a"])["state"], "stopped", "{fp}");
        assert_eq!(vm_row(&env, "a_replica").unwrap()["state"], "running", "{fp}");
        assert_eq!(env.processes().len(), 1, "{fp}: {:?}", env.processes());
        env.ok(&["failover", "undo", "a"]);
        env.ok(&["vm", "start", "a"]);
    } else {
        // Never both stopped: the source that ran before runs again, and no replica runs.
        let what = if fp == "planned.after-first-sync" { "source a still runs" } else { "source a started again" };
        assert!(rec.contains(&format!("rolled back an interrupted planned failover; {what}")), "{fp}: {rec}");
        assert_eq!(list[0]["state"], "ready", "{fp}");
        assert_eq!(env.json(&["vm", "show", "a"])["state"], "running", "{fp}");
        assert!(vm_row(&env, "a_replica").is_none(), "{fp}");
        assert!(!std::path::Path::new(&env.path("dr/a/failover-d0.qcow2")).exists(), "{fp}: overlay left");
        assert_eq!(env.processes().len(), 1, "{fp}: {:?}", env.processes());
        let history = env.json(&["history", "a"]);
        assert!(
            history.as_array().unwrap().iter().any(|h| h["operation"] == "planned failover"
                && h["result"] == "rolled back"
                && h["detail"].as_str().unwrap().contains(what)),
            "{fp}: {history}"
        );
    }
    assert_eq!(env.ok(&["recover"]).trim(), "nothing to recover", "{fp}");
    let out = env.ok(&["failover", "planned", "a", "--shutdown-timeout", "1"]);
    assert!(out.contains("a: ok") && out.contains("powered off"), "{fp}: {out}");
    env.ok(&["failover", "undo", "a"]);
}

#[test]
fn kill_during_planned_failover() {
    for fp in [
        "planned.after-first-sync",
        "planned.after-shutdown",
        "planned.after-final-sync",
        // The failover inside it: before its replica runs, and after.
        "failover.after-overlays",
        "failover.after-define",
        "failover.after-start",
    ] {
        crash_planned_at(fp);
    }
}

fn layer_files(env: &Env, vm: &str) -> Vec<String> {
    let mut f: Vec<String> = std::fs::read_dir(env.path(&format!("dr/{vm}")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("failover-"))
        .collect();
    f.sort();
    f
}

#[test]
fn permanent_failover_of_a_running_replica() {
    let env = Env::new(BIN);
    let disk = env.path("src/app.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x51, 0, 3)]);
    env.create_guest_vm("app", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "app", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "app"]);
    env.wait_console("app", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "j"]);
    env.wait_console("app", Duration::from_secs(60), "more ledger writes", |c| Ledger::acknowledged(c) >= 20);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "planned", "app", "--shutdown-timeout", "30"]);
    env.wait_console("app_replica", Duration::from_secs(60), "writes in failover", |c| {
        c.lines().any(|l| l.starts_with("LEDGER-RESUME")) && Ledger::acknowledged(c) >= 10
    });
    let out = env.ok(&["failover", "permanent", "app"]);
    assert!(out.contains("app: ok: app_replica is an ordinary VM now"), "{out}");
    let replica = env.json(&["replica", "list"])[0].clone();
    assert_eq!(replica["state"], "permanent");
    assert_eq!(replica["restore_points"], 0);
    assert!(layer_files(&env, "app").is_empty(), "restore point layers left: {:?}", layer_files(&env, "app"));
    assert!(env.json(&["job", "list"])[0]["vms"].as_array().unwrap().is_empty(), "app left its job");
    // The old source is retired: shown so, and refused a start beside its replacement.
    let app = env.json(&["vm", "show", "app"]);
    assert_eq!((app["role"].as_str(), app["state"].as_str()), (Some("retired"), Some("stopped")));
    let err = env.fails(&["vm", "start", "app"]);
    assert!(err.contains("VM app is retired") && err.contains("app_replica") && err.contains("--force"), "{err}");
    assert_eq!(env.json(&["vm", "show", "app"])["state"], "stopped");
    let err = env.fails(&[
        "job",
        "create",
        "again",
        "--vm",
        "app",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr2"),
    ]);
    assert!(err.contains("retired"), "{err}");
    env.ok(&["vm", "start", "app", "--force"]);
    let forced = env.json(&["history", "app"]);
    assert!(
        forced.as_array().unwrap().iter().any(|h| h["result"] == "warning"
            && h["detail"].as_str().unwrap().contains("started with --force although permanent failover retired it")),
        "{forced}"
    );
    env.ok(&["vm", "stop", "app"]);
    let vm = vm_row(&env, "app_replica").unwrap();
    assert_eq!((vm["role"].as_str(), vm["state"].as_str()), (Some("source"), Some("running")), "kept running");
    let overlay = vm["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(!standby_testkit::qemu_img(&["info", "-U", &overlay]).contains("backing file:"));
    // It keeps working as an ordinary VM, its disk standalone: the ledger goes on.
    let now = Ledger::acknowledged(&env.console("app_replica"));
    env.wait_console("app_replica", Duration::from_secs(60), "writes after", |c| Ledger::acknowledged(c) >= now + 5);
    env.ok(&["vm", "shutdown", "app_replica", "--timeout", "30"]);
    let acked = Ledger::acknowledged(&env.console("app_replica"));
    let k = Ledger { start_block: START }.records_in(&read_image(&overlay), COUNT).unwrap();
    assert!(k >= acked, "standalone disk has {k} records, guest acknowledged {acked}");
    // Nothing of the job touches it any more.
    env.ok(&["job", "run", "j"]);
    assert!(layer_files(&env, "app").is_empty());
    let r = env.run(&["failover", "app"]);
    assert!(r.code == Some(1) && r.stdout.contains("permanent"), "{}", r.stdout);
}

fn crash_permanent_at(fp: &str) {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    env.ok(&["failover", "a"]);
    env.ok(&["vm", "stop", "a_replica"]);
    let overlay = env.path("dr/a/failover-d0.qcow2");
    let view = env.path("view.qcow2");
    standby_testkit::qemu_img(&["convert", "-O", "qcow2", &overlay, &view]);
    let layers = layer_files(&env, "a");
    env.run_killed_at(fp, &["failover", "permanent", "a"]);
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("interrupted permanent failover"), "{fp}: {rec}");
    let list = env.run(&["replica", "list", "--json"]);
    let state = serde_json::from_str::<Value>(&list.stdout).unwrap()[0]["state"].as_str().unwrap().to_owned();
    // Either way the VM's disk reads exactly as the failover view did.
    assert!(identical(&overlay, &view), "{fp}: the replica's disk changed");
    if fp == "permanent.after-publish" {
        assert_eq!(state, "permanent", "{fp}");
        assert!(layer_files(&env, "a").is_empty(), "{fp}: layers left");
        assert_eq!(vm_row(&env, "a_replica").unwrap()["role"], "source");
    } else {
        assert_eq!(state, "failover", "{fp}: not published, so still in failover");
        assert_eq!(layer_files(&env, "a"), layers, "{fp}: nothing deleted before the publish");
        env.ok(&["failover", "permanent", "a"]);
        assert!(identical(&overlay, &view), "{fp}");
    }
    env.ok(&["vm", "start", "a_replica"]);
    env.ok(&["vm", "stop", "a_replica"]);
}

#[test]
fn kill_during_permanent_failover() {
    for fp in ["permanent.after-flatten", "permanent.after-verify", "permanent.after-publish"] {
        crash_permanent_at(fp);
    }
}

#[test]
fn a_job_can_name_its_replica_vms() {
    let env = Env::new(BIN);
    let disk = env.path("src/s.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x1, 0, 1)]);
    env.ok(&["vm", "create", "s", "--disk", &disk, "--memory", "64"]);
    let dr = env.path("dr");
    let err = env.fails(&[
        "job",
        "create",
        "j",
        "--vm",
        "s",
        "--target-host",
        "local",
        "--target-dir",
        &dr,
        "--replica-suffix",
        "/x",
    ]);
    assert!(err.contains("--replica-suffix"), "{err}");
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "s",
        "--target-host",
        "local",
        "--target-dir",
        &dr,
        "--replica-suffix",
        "-dr",
    ]);
    env.ok(&["job", "run", "j"]);
    let out = env.ok(&["failover", "s"]);
    assert!(out.contains("replica s-dr runs"), "{out}");
    assert_eq!(vm_row(&env, "s-dr").unwrap()["role"], "replica");
    env.ok(&["failover", "undo", "s"]);
}

#[test]
fn a_second_operation_on_a_busy_vm_is_refused() {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    env.ok(&["vm", "start", "a"]);
    // The guest-less source never shuts down by itself: the planned failover holds the VM
    // for the whole timeout.
    let planned = env
        .command(&["failover", "planned", "a", "--shutdown-timeout", "4"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let r = env.run(&["failover", "a"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("VM a is busy: planned failover"), "{}", r.stdout);
    let err = env.fails(&["vm", "stop", "a"]);
    assert!(err.contains("is busy"), "{err}");
    let out = planned.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "failover");
    env.ok(&["failover", "undo", "a"]);
}

#[test]
fn a_recovery_that_cannot_finish_asks_for_attention_without_blocking_standby() {
    let env = Env::new(BIN);
    plain_vms(&env, &["a", "b"]);
    env.run_killed_at("failover.after-overlays", &["failover", "a"]);
    // Recovery needs the replica directory; make it unusable.
    let dir = env.path("dr/a");
    std::fs::rename(&dir, env.path("dr-a-aside")).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    let r = env.run(&["recover"]);
    assert_eq!(r.code, Some(1), "what could not be recovered fails `recover`: {}", r.stdout);
    assert!(r.stdout.contains("VM a needs attention"), "{}", r.stdout);
    let r = env.run(&["vm", "list"]);
    assert_eq!(r.code, Some(0), "other work goes on: {}", r.stderr);
    assert!(r.stderr.contains("VM a (job j): an interrupted failing_over"), "{}", r.stderr);
    let replicas = env.json(&["replica", "list"]);
    let a = replicas.as_array().unwrap().iter().find(|r| r["vm"] == "a").unwrap().clone();
    assert_eq!(a["state"], "failing_over");
    assert!(a["needs_attention"].as_str().unwrap().contains("standby history a"), "{a}");
    env.ok(&["failover", "b"]);
    // Once the cause is gone, the next command recovers it.
    std::fs::remove_file(&dir).unwrap();
    std::fs::rename(env.path("dr-a-aside"), &dir).unwrap();
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("rolled back an interrupted failover"), "{rec}");
    let replicas = env.json(&["replica", "list"]);
    let a = replicas.as_array().unwrap().iter().find(|r| r["vm"] == "a").unwrap().clone();
    assert_eq!((a["state"].as_str(), a["needs_attention"].is_null()), (Some("ready"), true));
    env.ok(&["failover", "undo", "b"]);
}

#[test]
fn a_vm_in_two_jobs_fails_over_to_the_replica_named() {
    let env = Env::new(BIN);
    let disk = env.path("src/t.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x1, 0, 1)]);
    env.ok(&["vm", "create", "t", "--disk", &disk, "--memory", "64"]);
    let (near, far) = (env.path("dr"), env.path("dr-far"));
    env.ok(&["job", "create", "near", "--vm", "t", "--target-host", "local", "--target-dir", &near]);
    env.ok(&[
        "job",
        "create",
        "far",
        "--vm",
        "t",
        "--target-host",
        "local",
        "--target-dir",
        &far,
        "--replica-suffix",
        "_far",
    ]);
    env.ok(&["job", "run", "near"]);
    env.ok(&["job", "run", "far"]);
    let r = env.run(&["failover", "t"]);
    assert!(r.code == Some(1) && r.stdout.contains("name one with --job"), "{}", r.stdout);
    let out = env.ok(&["failover", "t", "--job", "far"]);
    assert!(out.contains("replica t_far runs"), "{out}");
    let states: Vec<(String, String)> = env
        .json(&["replica", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["job"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(states, [("far".to_owned(), "failover".to_owned()), ("near".to_owned(), "ready".to_owned())]);
    env.ok(&["failover", "undo", "t", "--job", "far"]);
    assert!(env.processes().is_empty());
}

/// A live permanent failover pauses the guest while it verifies the standalone disk; a
/// standby killed there must not leave the guest paused for good.
#[test]
fn a_kill_while_verifying_a_running_replica_leaves_no_paused_guest() {
    let env = Env::new(BIN);
    let disk = env.path("src/app.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x51, 0, 3)]);
    env.create_guest_vm("app", &disk, 160, &ledger_append(START, COUNT, 20_000));
    env.ok(&["job", "create", "j", "--vm", "app", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "app"]);
    env.wait_console("app", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["failover", "planned", "app", "--shutdown-timeout", "30"]);
    env.wait_console("app_replica", Duration::from_secs(60), "writes in failover", |c| {
        c.lines().any(|l| l.starts_with("LEDGER-RESUME")) && Ledger::acknowledged(c) >= 10
    });
    env.run_killed_at("permanent.after-flatten", &["failover", "permanent", "app"]);
    // Paused: a guest writing every 20 ms acknowledges nothing for a second and a half.
    let paused_at = Ledger::acknowledged(&env.console("app_replica"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(Ledger::acknowledged(&env.console("app_replica")), paused_at, "the kill came while it was paused");
    let rec = env.ok(&["recover"]);
    assert!(
        rec.contains("rolled back an interrupted permanent failover") && rec.contains("resumed app_replica"),
        "{rec}"
    );
    env.wait_console("app_replica", Duration::from_secs(30), "writes after recovery", |c| {
        Ledger::acknowledged(c) >= paused_at + 10
    });
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "failover");
    // The failover goes on and can still be made permanent, losing nothing.
    let out = env.ok(&["failover", "permanent", "app"]);
    assert!(out.contains("app: ok"), "{out}");
    let overlay = vm_row(&env, "app_replica").unwrap()["disks"][0]["path"].as_str().unwrap().to_owned();
    env.ok(&["vm", "shutdown", "app_replica", "--timeout", "30"]);
    let acked = Ledger::acknowledged(&env.console("app_replica"));
    let k = Ledger { start_block: START }.records_in(&read_image(&overlay), COUNT).unwrap();
    assert!(k >= acked, "standalone disk has {k} records, guest acknowledged {acked}");
}

/// A planned failover killed inside its failover, whose source cannot start again at the
/// first recovery: the marker that says the source ran is kept until it runs, so the VM
/// stays flagged and a later recovery starts it; it is never forgotten with both down.
#[test]
fn a_source_that_cannot_restart_yet_is_not_forgotten() {
    let env = Env::new(BIN);
    plain_vms(&env, &["a"]);
    env.ok(&["vm", "start", "a"]);
    env.run_killed_at("failover.after-overlays", &["failover", "planned", "a", "--shutdown-timeout", "1"]);
    let disk = env.path("src/a.qcow2");
    let aside = env.path("a-aside.qcow2");
    std::fs::rename(&disk, &aside).unwrap();
    let r = env.run(&["recover"]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("VM a needs attention"), "{}", r.stdout);
    let list = env.run(&["replica", "list", "--json"]);
    assert!(list.stderr.contains("waits for recovery"), "still flagged: {}", list.stderr);
    std::fs::rename(&aside, &disk).unwrap();
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("source a started again"), "{rec}");
    assert_eq!(env.json(&["vm", "show", "a"])["state"], "running");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    env.ok(&["vm", "stop", "a"]);
}
