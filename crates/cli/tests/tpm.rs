//! User story: a VM whose guest seals its disk keys to a TPM (BitLocker, LUKS with
//! systemd-cryptenroll) boots only with that TPM's state. standby's own driver gives such
//! a VM an emulated TPM 2.0 (swtpm), keeps a copy of its state with every restore point,
//! taken at the point's instant, gives a replica its point's copy, and brings the
//! replica's state back at failback. The test guest reads its TPM's reset count (a
//! persistent counter each boot raises) and says it: a replica goes on from its point's
//! count, and the source back from failback from the replica's; a new TPM would start over.

use std::time::Duration;

use standby_testkit::{digest_if_exists, guest, ledger_append, make_disk, tpm_resets, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// The count the VM's `boot`th boot (from 1, as its console keeps them) reported.
fn wait_resets(env: &Env, vm: &str, boot: usize, what: &str) -> u64 {
    env.wait_console(vm, Duration::from_secs(120), what, |c| tpm_resets(c).len() >= boot);
    tpm_resets(&env.console(vm))[boot - 1]
}

/// VM `web` of the test guest booting with `append`, its TPM's state in
/// `src/web-tpm.state` (returned; made at its first start).
fn tpm_vm(env: &Env, append: &str) -> String {
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x42, 0, 2)]);
    let state = env.path("src/web-tpm.state");
    let (kernel, initrd) = guest();
    env.ok(&[
        "vm", "create", "web", "--disk", &disk, "--memory", "192", "--kernel", &kernel, "--initrd", &initrd,
        "--append", append, "--tpm", &state,
    ]);
    state
}

#[test]
fn a_vms_tpm_state_goes_with_each_point_to_its_replica_and_comes_back_at_failback() {
    let env = Env::new(BIN);
    let state = tpm_vm(&env, &ledger_append(4096, 2000, 20_000));
    let shown = env.json(&["vm", "show", "web"]);
    assert_eq!((shown["tpm"]["model"].as_str(), shown["tpm"]["state"].as_str()), (Some("tpm-tis"), Some(&*state)));
    assert_eq!(digest_if_exists(&state), None, "a new TPM's state is made at its first start");
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);

    env.ok(&["vm", "start", "web"]);
    let first = wait_resets(&env, "web", 1, "the guest's TPM");
    env.ok(&["job", "run", "j"]);
    let p1 = env.points("web").last().cloned().unwrap();
    let p1_tpm = p1["tpm_state"].as_str().expect("a running VM's point holds its TPM state").to_owned();
    assert!(p1_tpm.starts_with(&env.path("dr")), "{p1}");
    assert!(digest_if_exists(&p1_tpm).is_some());

    // A second boot raises the count; stopped, the point is byte for byte the VM's state.
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["vm", "start", "web"]);
    assert_eq!(wait_resets(&env, "web", 2, "the guest's second boot"), first + 1);
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let p2 = env.points("web").last().cloned().unwrap();
    let p2_tpm = p2["tpm_state"].as_str().unwrap().to_owned();
    assert_eq!(
        digest_if_exists(&p2_tpm),
        digest_if_exists(&state),
        "stopped: the point's TPM state is the VM's, byte for byte"
    );
    assert_ne!(p1_tpm, p2_tpm, "each point has its own copy");

    // Failed over to the older point, the replica's TPM goes on from that point's state
    // (count `first`), not from the source's now (`first + 1`) nor from a new TPM's.
    let source_now = digest_if_exists(&state);
    env.ok(&["failover", "web", "--point", &p1["id"].to_string()]);
    assert_eq!(wait_resets(&env, "web_replica", 1, "the replica's TPM"), first + 1, "the older point's state");
    let replica_state =
        env.json(&["vm", "show", "web_replica"])["tpm"]["state"].as_str().expect("the replica's TPM").to_owned();
    assert!(replica_state.starts_with(&env.path("dr")), "{replica_state}");
    assert_eq!(digest_if_exists(&state), source_now, "the source's state is not the replica's to write");

    // Failback to the original: at the switch the source's TPM state becomes the replica's.
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    env.ok(&["failback", "switch", "web"]);
    let final_state = digest_if_exists(&replica_state);
    assert_eq!(digest_if_exists(&state), final_state, "the source holds the replica's final TPM state");
    env.ok(&["vm", "start", "web"]);
    assert_eq!(wait_resets(&env, "web", 3, "the source's TPM"), first + 2, "the source goes on from the replica");
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(digest_if_exists(&replica_state), None, "the replica's TPM state went with it");
    let kept = env.points("web").last().cloned().unwrap();
    assert_eq!(
        digest_if_exists(kept["tpm_state"].as_str().expect("the kept point's TPM state")),
        final_state,
        "{kept}"
    );

    // Replication goes on with the TPM state; an undone failover's replica TPM goes with
    // it, and the source's stays as it was.
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let p = env.points("web").last().cloned().unwrap();
    assert_eq!(
        digest_if_exists(p["tpm_state"].as_str().unwrap()),
        digest_if_exists(&state),
        "the next point holds the source's"
    );
    let source_before = digest_if_exists(&state);
    env.ok(&["failover", "web"]);
    let boots = tpm_resets(&env.console("web_replica")).len();
    assert_eq!(wait_resets(&env, "web_replica", boots + 1, "the second replica's TPM"), first + 3);
    env.ok(&["failover", "undo", "web"]);
    assert_eq!(digest_if_exists(&replica_state), None, "undo discards the replica's TPM state");
    assert_eq!(digest_if_exists(&state), source_before, "the source's TPM state was never touched");
}

#[test]
fn a_failover_or_switch_killed_at_its_tpm_step_recovers_with_the_right_state() {
    let env = Env::new(BIN);
    let state = tpm_vm(&env, "console=ttyS0 quiet panic=-1");
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    let first = wait_resets(&env, "web", 1, "the guest's TPM");
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);

    // Killed once the replica has its TPM state, before it started: rolled back, the state
    // goes with the overlays.
    env.run_killed_at("failover.after-define", &["failover", "web"]);
    let replica_state = env.path("dr/web/failover-dtpm.permall");
    assert!(digest_if_exists(&replica_state).is_some(), "the kill came after the replica got its TPM state");
    let rec = env.ok(&["recover"]);
    assert!(rec.contains("interrupted failover"), "{rec}");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    assert_eq!(digest_if_exists(&replica_state), None, "rolled back: the replica's TPM state went with its overlays");
    env.ok(&["failover", "web"]);
    assert_eq!(wait_resets(&env, "web_replica", 1, "the replica's TPM"), first + 1);

    // Killed after the switch carried the TPM state: recovery finishes the switch, and the
    // source starts on the replica's final state.
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    env.run_killed_at("switch.after-identity", &["failback", "switch", "web"]);
    env.ok(&["recover"]);
    assert_eq!(
        digest_if_exists(&state),
        digest_if_exists(&replica_state),
        "the source holds the replica's final TPM state"
    );
    env.ok(&["vm", "start", "web"]);
    assert_eq!(wait_resets(&env, "web", 2, "the source's TPM"), first + 2);
    env.ok(&["failback", "commit", "web"]);
}

#[test]
fn bad_tpm_settings_are_refused_and_define_nothing() {
    let env = Env::new(BIN);
    let disk = env.path("src/x.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    let comma = env.path("src/a,b.state");
    let vars = env.path("src/x-vars.fd");
    for (state, says) in [
        ("relative.state", "absolute file path"),
        ("/no/such/dir/x.state", "absolute file path"),
        (env.root().to_str().unwrap(), "absolute file path"),
        (comma.as_str(), "comma"),
        // swtpm would format it: a disk is never taken for a TPM's state.
        (disk.as_str(), "not a TPM's state"),
    ] {
        let err = env.fails(&["vm", "create", "x", "--disk", &disk, "--tpm", state]);
        assert!(err.contains(says) && err.contains("--tpm"), "{state}: {err}");
    }
    let err = env.fails(&["vm", "create", "x", "--disk", &disk, "--uefi", "--nvram", &vars, "--tpm", &vars]);
    assert!(err.contains("another file of this VM"), "{err}");
    assert_eq!(env.json(&["vm", "list"]), serde_json::json!([]), "refused VMs are not defined");
    assert!(!std::path::Path::new(&vars).exists(), "nothing was made for them");

    // Two VMs never share a TPM, and a failback never takes a VM of another kind.
    let state = env.path("src/x-tpm.state");
    env.ok(&["vm", "create", "x", "--disk", &disk, "--tpm", &state]);
    let other = env.path("src/y.qcow2");
    make_disk(&other, "qcow2", 16, &[]);
    let err = env.fails(&["vm", "create", "y", "--disk", &other, "--tpm", &state]);
    assert!(err.contains("already VM x's"), "{err}");
    // Nor is one VM's TPM state another's disk (it would probe as a raw image).
    std::fs::write(&state, b"nilmptws and the rest of a TPM's state").unwrap();
    let err = env.fails(&["vm", "create", "y", "--disk", &state]);
    assert!(err.contains("VM x's UEFI store or TPM state"), "{err}");
    std::fs::remove_file(&state).unwrap();
    env.ok(&["vm", "create", "y", "--disk", &other]);
    env.ok(&["job", "create", "j", "--vm", "x", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "x"]);
    let before = env.snapshot();
    let r = env.run(&["failback", "x", "--to", "existing:y"]);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(r.code != Some(0) && said.contains("has no TPM") && said.contains("has a TPM"), "{said}");
    assert_eq!(env.snapshot(), before, "a refused failback changes nothing");
    // A replica directory swtpm could not name is refused before anything is made.
    let err = env.fails(&["job", "create", "k", "--vm", "x", "--target-host", "local", "--target-dir", &comma]);
    assert!(err.contains("comma"), "{err}");
}
