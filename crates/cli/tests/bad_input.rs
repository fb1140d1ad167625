//! User story: an operator mistypes. Every bad input gets a clear error that says what is
//! wrong, a non-zero exit, and changes nothing.

use standby_testkit::{make_disk, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// Runs a command that must fail with `expect` in its message and leave state unchanged.
fn refused(env: &Env, args: &[&str], expect: &str) {
    let before = env.snapshot();
    let err = env.fails(args);
    assert!(err.contains(expect), "standby {args:?}: expected {expect:?} in:\n{err}");
    assert!(err.starts_with("error: "), "errors start with 'error: ': {err}");
    assert_eq!(env.snapshot(), before, "standby {args:?} changed state");
}

fn world() -> (Env, String) {
    let env = Env::new(BIN);
    let disk = env.path("src/a.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x1, 0, 1)]);
    env.ok(&["vm", "create", "a", "--disk", &disk]);
    env.ok(&["job", "create", "j", "--vm", "a", "--target-host", "local", "--target-dir", &env.path("dr")]);
    (env, disk)
}

#[test]
fn bad_vm_definitions() {
    let (env, disk) = world();
    let other = env.path("src/b.qcow2");
    make_disk(&other, "qcow2", 8, &[]);
    let garbage = env.path("src/garbage.vmdk");
    standby_testkit::qemu_img(&["create", "-q", "-f", "vmdk", &garbage, "1M"]);
    let missing = env.path("src/missing.qcow2");
    refused(&env, &["vm", "create", "b", "--disk", &missing], "no such file");
    refused(&env, &["vm", "create", "b", "--disk", "relative.qcow2"], "absolute path");
    refused(&env, &["vm", "create", "b", "--disk", &garbage], "not qcow2 or raw");
    refused(&env, &["vm", "create", "b", "--disk", &disk], "already a disk of VM a");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--disk", &other], "given twice");
    refused(&env, &["vm", "create", "a", "--disk", &other], "already exists");
    refused(&env, &["vm", "create", "bad/name", "--disk", &other], "may only hold");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--cpus", "0"], "out of range");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--memory", "1"], "out of range");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--nic", "rtl-bogus"], "NIC model");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--kernel", "/nonexistent/vmlinuz"], "does not exist");
    refused(&env, &["vm", "create", "b", "--disk", &other, "--host", "mars"], "unknown host");
    // clap's own refusals (missing --disk) also exit non-zero and change nothing.
    let before = env.snapshot();
    assert_ne!(env.run(&["vm", "create", "b"]).code, Some(0));
    assert_eq!(env.snapshot(), before);
}

#[test]
fn unknown_things_and_impossible_vm_transitions() {
    let (env, _) = world();
    refused(&env, &["vm", "start", "ghost"], "unknown VM \"ghost\"");
    refused(&env, &["vm", "show", "ghost"], "unknown VM");
    refused(&env, &["vm", "stop", "a"], "is stopped");
    refused(&env, &["vm", "shutdown", "a"], "is stopped");
    refused(&env, &["job", "run", "nojob"], "unknown job");
    refused(&env, &["replica", "points", "ghost"], "unknown VM");
    refused(&env, &["replica", "points", "a", "--job", "other"], "has no replica");
    refused(&env, &["task", "show", "999"], "unknown task");
}

#[test]
fn bad_jobs() {
    let (env, _) = world();
    let disk = env.path("src/c.qcow2");
    make_disk(&disk, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "c", "--disk", &disk]);
    let dr = env.path("dr");
    let file = env.path("src/a.qcow2");
    refused(
        &env,
        &["job", "create", "k", "--vm", "ghost", "--target-host", "local", "--target-dir", &dr],
        "unknown VM",
    );
    refused(&env, &["job", "create", "k", "--vm", "c", "--target-host", "mars", "--target-dir", &dr], "unknown host");
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", "rel"],
        "absolute path",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", &format!("{file}/x")],
        "not usable",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", "/proc/standby"],
        "not usable",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "a", "--target-host", "local", "--target-dir", &dr],
        "already replicated",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--vm", "c", "--target-host", "local", "--target-dir", &dr],
        "named twice",
    );
    refused(
        &env,
        &["job", "create", "j", "--vm", "c", "--target-host", "local", "--target-dir", &dr],
        "already exists",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", &dr, "--retain", "0"],
        "at least 1",
    );
    refused(
        &env,
        &["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", &dr, "--every", "soon"],
        "not a duration",
    );
}

#[test]
fn unwritable_target_fails_the_run_and_keeps_points() {
    let (env, disk) = world();
    env.ok(&["job", "run", "j"]);
    let before = env.points("a");
    // The replica directory turns into a file: no layer can be written there.
    let rdir = env.path("dr/a");
    std::fs::rename(&rdir, env.path("dr-a-moved")).unwrap();
    std::fs::write(&rdir, b"not a directory").unwrap();
    standby_testkit::qemu_io(&disk, "qcow2", &["write -P 0x9 0 64k".into()]);
    let r = env.run(&["job", "run", "j"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("a: FAILED"), "{}", r.stdout);
    std::fs::remove_file(&rdir).unwrap();
    std::fs::rename(env.path("dr-a-moved"), &rdir).unwrap();
    assert_eq!(env.points("a").len(), before.len());
    // Nothing was lost: the change arrives with the next run.
    env.ok(&["job", "run", "j"]);
    assert!(standby_testkit::identical(&env.latest_disk("a", 0), &disk));
}

#[test]
fn corrupt_database_is_reported_not_overwritten() {
    let env = Env::new(BIN);
    std::fs::create_dir_all(env.data_dir()).unwrap();
    let db = format!("{}/standby.db", env.data_dir());
    std::fs::write(&db, b"this is not a database at all, and standby must not eat it").unwrap();
    let err = env.fails(&["vm", "list"]);
    assert!(err.contains("cannot open standby's data"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), b"this is not a database at all, and standby must not eat it");
}
