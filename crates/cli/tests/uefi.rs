//! User story: most production VMs boot UEFI, and their firmware's variable store (boot
//! entries, Secure Boot keys) is part of what makes them boot. standby keeps a copy of it
//! with every restore point, taken at the point's instant; a replica boots with its point's
//! copy, and failback brings the replica's variables back with its disks. The test guest
//! counts its boots in a UEFI variable of its own and says the count it found: the count a
//! replica finds is the one its restore point held, and the source back from failback
//! finds the replica's.

use std::time::Duration;

use standby_testkit::{digest_if_exists, guest, ledger_append, make_disk, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// VM `web` booting UEFI, its variable store at `src/web-vars.fd` (made by standby).
fn uefi_vm(env: &Env) -> (String, String) {
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x42, 0, 2)]);
    let vars = env.path("src/web-vars.fd");
    let (kernel, initrd) = guest();
    let append = ledger_append(4096, 2000, 20_000);
    env.ok(&[
        "vm", "create", "web", "--disk", &disk, "--memory", "192", "--kernel", &kernel, "--initrd", &initrd,
        "--append", &append, "--uefi", "--nvram", &vars,
    ]);
    (disk, vars)
}

#[test]
fn a_uefi_vms_variables_go_with_each_point_to_its_replica_and_come_back_at_failback() {
    let env = Env::new(BIN);
    let (_disk, vars) = uefi_vm(&env);
    assert_eq!(
        digest_if_exists(&vars),
        digest_if_exists(standby_engine::OVMF_VARS),
        "a new VM's store is OVMF's template"
    );
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(120), "a UEFI boot and ledger writes", |c| {
        c.contains("STANDBY-GUEST uefi boots=0") && Ledger::acknowledged(c) >= 10
    });

    // Running: the point's copy is the store at the instant (the guest wrote it at boot
    // and not since).
    env.ok(&["job", "run", "j"]);
    let p1 = env.points("web").last().cloned().unwrap();
    let p1_vars = p1["uefi_vars"].as_str().expect("the point holds the UEFI variables").to_owned();
    assert_eq!(digest_if_exists(&p1_vars), digest_if_exists(&vars), "running: the point's variables are the VM's");
    assert_ne!(
        digest_if_exists(&p1_vars),
        digest_if_exists(standby_engine::OVMF_VARS),
        "the guest's boot count is in them"
    );

    // Stopped: byte for byte the VM's store.
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let p2 = env.points("web").last().cloned().unwrap();
    let p2_vars = p2["uefi_vars"].as_str().unwrap().to_owned();
    assert_eq!(
        digest_if_exists(&p2_vars),
        digest_if_exists(&vars),
        "stopped: the point's variables are the VM's, byte for byte"
    );
    assert_ne!(p1_vars, p2_vars, "each point has its own copy");

    // The replica boots with its point's variables (it finds the source's count), in a
    // copy of its own: the point's stays as it was.
    env.ok(&["failover", "web"]);
    env.wait_console("web_replica", Duration::from_secs(120), "the replica's UEFI boot", |c| {
        c.contains("STANDBY-GUEST uefi boots=1") && Ledger::acknowledged(c) >= 5
    });
    let replica = env.json(&["vm", "show", "web_replica"]);
    let replica_vars = replica["firmware"]["vars"].as_str().unwrap().to_owned();
    assert!(replica_vars.starts_with(&env.path("dr")), "{replica}");
    assert_eq!(digest_if_exists(&p2_vars), digest_if_exists(&vars), "the point's copy is not the replica's to write");
    assert_ne!(digest_if_exists(&replica_vars), digest_if_exists(&p2_vars), "the replica counted its own boot");

    // Failback to the original: at the switch the source's store becomes the replica's.
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    env.ok(&["failback", "switch", "web"]);
    assert_eq!(
        digest_if_exists(&vars),
        digest_if_exists(&replica_vars),
        "the source holds the replica's final variables"
    );
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(120), "the source's UEFI boot", |c| {
        c.contains("STANDBY-GUEST uefi boots=2")
    });
    let final_vars = digest_if_exists(&replica_vars);
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(digest_if_exists(&replica_vars), None, "the replica's store went with it");
    // The point commit keeps of the replica's final state holds its final variables too.
    let kept = env.points("web").last().cloned().unwrap();
    assert_eq!(digest_if_exists(kept["uefi_vars"].as_str().expect("the kept point's variables")), final_vars, "{kept}");
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let p = env.points("web").last().cloned().unwrap();
    assert_eq!(
        digest_if_exists(p["uefi_vars"].as_str().unwrap()),
        digest_if_exists(&vars),
        "replication goes on with the variables"
    );
}

#[test]
fn undo_discards_the_replicas_variables_and_bad_uefi_settings_are_refused() {
    let env = Env::new(BIN);
    let disk = env.path("src/x.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    for (args, says) in [
        (vec!["--uefi"], "--nvram"),
        (vec!["--nvram", "/tmp/v.fd"], "--uefi"),
        (vec!["--uefi", "--nvram", "relative.fd"], "absolute file path"),
        (vec!["--uefi", "--nvram", "/no/such/dir/v.fd"], "absolute file path"),
        (vec!["--uefi", "--nvram", disk.as_str()], "not the 540672 of a variable store"),
    ] {
        let mut all = vec!["vm", "create", "x", "--disk", &disk];
        all.extend(args);
        let err = env.fails(&all);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    assert_eq!(env.json(&["vm", "list"]), serde_json::json!([]), "refused VMs are not defined");

    let (_disk, vars) = uefi_vm(&env);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "web"]);
    env.wait_console("web_replica", Duration::from_secs(120), "the replica's UEFI boot", |c| {
        c.contains("STANDBY-GUEST uefi boots=0")
    });
    let replica_vars = env.json(&["vm", "show", "web_replica"])["firmware"]["vars"].as_str().unwrap().to_owned();
    assert!(digest_if_exists(&replica_vars).is_some());
    env.ok(&["failover", "undo", "web"]);
    assert_eq!(digest_if_exists(&replica_vars), None, "undo discards what the replica wrote, its variables too");
    assert_eq!(
        digest_if_exists(&vars),
        digest_if_exists(standby_engine::OVMF_VARS),
        "the source's store was never touched"
    );
}

#[test]
fn a_run_killed_while_a_uefi_vm_is_paused_for_its_instant_leaves_it_running_again() {
    let env = Env::new(BIN);
    let (_disk, _vars) = uefi_vm(&env);
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(120), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    env.run_killed_at("replicate.while-paused", &["job", "run", "j"]);
    // Paused: a guest writing every 20 ms acknowledges nothing for a second and a half.
    let paused_at = Ledger::acknowledged(&env.console("web"));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(Ledger::acknowledged(&env.console("web")), paused_at, "the kill came while it was paused");
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("started VM web's CPUs again"), "{rec}");
    env.wait_console("web", Duration::from_secs(30), "writes after recovery", |c| {
        Ledger::acknowledged(c) >= paused_at + 10
    });
    assert!(env.points("web").is_empty(), "the killed run made no restore point");
    env.ok(&["job", "run", "j"]);
    assert_eq!(env.points("web").len(), 1, "the next run does");
}
