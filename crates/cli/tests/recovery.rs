//! User story: after a crash, an operator looks before acting. Commands that read report
//! what waits for recovery and change nothing; `standby recover` (or any command that
//! changes state) recovers. One damaged row flags its replica; the others go on.

use standby_testkit::{identical, make_disk, qemu_io, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

fn vm(env: &Env, name: &str) -> String {
    let disk = env.path(&format!("src/{name}.qcow2"));
    make_disk(&disk, "qcow2", 32, &[(0x31, 0, 8)]);
    env.ok(&["vm", "create", name, "--disk", &disk, "--format", "qcow2"]);
    disk
}

#[test]
fn reading_commands_report_what_waits_for_recovery_and_change_nothing() {
    let env = Env::new(BIN);
    let disk = vm(&env, "c");
    env.ok(&["job", "create", "j", "--vm", "c", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    qemu_io(&disk, "qcow2", &["write -P 0x44 1M 16M".into()]);
    env.run_killed_at("replicate.mid-transfer", &["job", "run", "j"]);
    // The killed run's servers may still be starting or ending by themselves (a server
    // whose client went away exits): wait until nothing moves.
    let still = || (env.snapshot(), env.processes());
    let mut before = still();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = still();
        if now == before {
            break;
        }
        before = now;
    }
    let (before, left) = before;
    let list = env.run(&["replica", "list", "--json"]);
    assert_eq!(list.code, Some(0), "{}", list.stderr);
    assert!(list.stderr.contains("waits for recovery; run standby recover"), "{}", list.stderr);
    let views: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(views[0]["state"], "replicating");
    assert!(views[0]["needs_attention"].as_str().unwrap().contains("interrupted replicating"), "{views}");
    for args in [
        &["replica", "points", "c"][..],
        &["vm", "list"],
        &["vm", "show", "c"],
        &["job", "list"],
        &["task", "list"],
        &["history"],
        &["plan", "list"],
        &["failback", "list"],
        &["host", "list"],
    ] {
        env.ok(args);
        assert_eq!(env.snapshot(), before, "standby {args:?} changed state while only reading");
        assert_eq!(env.processes(), left, "standby {args:?} touched the killed run's processes");
    }
    let out = env.ok(&["recover"]);
    assert!(out.contains("rolled back an interrupted replication run"), "{out}");
    assert!(env.processes().is_empty(), "{:?}", env.processes());
    let views = env.json(&["replica", "list"]);
    assert_eq!((views[0]["state"].as_str(), views[0]["needs_attention"].as_str()), (Some("ready"), None));
    assert_eq!(env.ok(&["recover"]).trim(), "nothing to recover");
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("c", 0), &disk));
}

#[test]
fn one_damaged_replica_row_does_not_stop_the_others() {
    let env = Env::new(BIN);
    for n in ["a", "b", "c"] {
        vm(&env, n);
    }
    let dr = env.path("dr");
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "a",
        "--vm",
        "b",
        "--vm",
        "c",
        "--target-host",
        "local",
        "--target-dir",
        &dr,
    ]);
    env.ok(&["job", "run", "j"]);
    // a: a state no standby knows; c: a column of the wrong type.
    env.sql(
        "UPDATE replicas SET state = 'bogus' WHERE vm_id = (SELECT id FROM vms WHERE name = 'a');
         UPDATE replicas SET next_seq = 'x' WHERE vm_id = (SELECT id FROM vms WHERE name = 'c');",
    );
    let list = env.json(&["replica", "list"]);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{list}");
    let a = rows.iter().find(|r| r["vm"] == "a").expect("a is listed");
    assert!(a["needs_attention"].as_str().unwrap().contains("unknown replica state \"bogus\""), "{a}");
    let b = rows.iter().find(|r| r["vm"] == "b").expect("b is listed");
    assert_eq!((b["state"].as_str(), b["needs_attention"].as_str()), (Some("ready"), None));
    let c = rows.iter().find(|r| r["vm"] == "c").expect("c's row is named by its VM");
    assert!(c["needs_attention"].as_str().unwrap().contains("cannot be read"), "{c}");
    assert!(c["needs_attention"].as_str().unwrap().contains("replicas row"), "{c}");

    // A run: b gets its point; a and c fail, each saying why.
    let r = env.run(&["job", "run", "j", "--json"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("needs attention"), "recovery names the damaged rows: {}", r.stderr);
    let outcomes: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let of =
        |vm: &str| outcomes.as_array().unwrap().iter().find(|o| o["vm"].as_str().unwrap().starts_with(vm)).cloned();
    assert_eq!(of("b").unwrap()["error"], serde_json::Value::Null, "{outcomes}");
    assert!(of("a").unwrap()["error"].as_str().unwrap().contains("bogus"), "{outcomes}");
    assert!(of("c").unwrap()["error"].as_str().unwrap().contains("cannot be read"), "{outcomes}");
    assert_eq!(env.points("b").len(), 2);
    // The damaged replica is left alone: what reads it says which row to repair.
    let err = env.fails(&["replica", "points", "a"]);
    assert!(err.contains("replicas row") && err.contains("bogus"), "{err}");
    env.sql("UPDATE replicas SET state = 'ready' WHERE vm_id = (SELECT id FROM vms WHERE name = 'a')");
    assert_eq!(env.points("a").len(), 1, "repaired, its one restore point is as it was");
}
