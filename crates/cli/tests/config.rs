//! User story: an operator's configuration changes. VMs, jobs, replicas and plans can be
//! changed and removed; each refusal says why and what to do first, and changes nothing;
//! each change is in the history.

use std::path::Path;

use serde_json::Value;
use standby_testkit::{bitmaps, file_digest, identical, make_disk, qemu_io, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// A command that must fail naming `expect`, leaving every table and file as it was.
fn refused(env: &Env, args: &[&str], expect: &str) {
    let before = env.snapshot();
    let err = env.fails(args);
    assert!(err.contains(expect), "standby {args:?}: expected {expect:?} in:\n{err}");
    assert_eq!(env.snapshot(), before, "standby {args:?} changed state");
}

fn history_has(env: &Env, who: &str, operation: &str, detail: &str) -> bool {
    env.json(&["history", who])
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["operation"] == operation && h["result"] == "ok" && h["detail"].as_str().unwrap().contains(detail))
}

fn vm_with_disk(env: &Env, name: &str) -> String {
    let disk = env.path(&format!("src/{name}.qcow2"));
    make_disk(&disk, "qcow2", 8, &[(0x21, 0, 1)]);
    env.ok(&["vm", "create", name, "--disk", &disk, "--format", "qcow2", "--memory", "64"]);
    disk
}

fn replica_files(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_vm_is_changed_while_stopped_and_deleted_once_nothing_uses_it() {
    let env = Env::new(BIN);
    let disk = vm_with_disk(&env, "a");
    let shown = env.json(&["vm", "change", "a", "--memory", "128", "--cpus", "2", "--nic", "e1000"]);
    assert_eq!((shown["memory_mib"].as_u64(), shown["cpus"].as_u64()), (Some(128), Some(2)));
    assert_eq!(shown["nics"], serde_json::json!(["e1000"]));
    assert!(history_has(&env, "a", "vm change", "memory 64 -> 128 MiB"));
    env.ok(&["vm", "change", "a", "--no-nics"]);
    assert_eq!(env.json(&["vm", "show", "a"])["nics"], serde_json::json!([]));
    refused(&env, &["vm", "change", "a", "--cpus", "2"], "nothing to change");
    refused(&env, &["vm", "change", "a", "--cpus", "0"], "out of range");
    refused(&env, &["vm", "change", "a", "--kernel", "/nonexistent/vmlinuz"], "does not exist");
    refused(&env, &["vm", "change", "a", "--append", "quiet"], "need --kernel");
    refused(&env, &["vm", "change", "ghost", "--cpus", "2"], "unknown VM");

    // Running: nothing QEMU cannot apply live is changed, and it is not deleted.
    env.ok(&["vm", "start", "a"]);
    refused(&env, &["vm", "change", "a", "--memory", "96"], "shut it down first");
    refused(&env, &["vm", "delete", "a"], "it is running");
    env.ok(&["vm", "stop", "a"]);

    // Used by a job and a plan: refused, naming what to do first.
    env.ok(&["job", "create", "j", "--vm", "a", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["plan", "create", "p", "--vm", "a"]);
    refused(&env, &["vm", "delete", "a"], "standby replica delete a --job j");
    refused(&env, &["replica", "delete", "a"], "plan p fails VM a over");
    env.ok(&["plan", "delete", "p"]);
    // The replica never ran: nothing to decide about, its directory goes.
    env.ok(&["replica", "delete", "a"]);
    assert!(!Path::new(&env.path("dr/a")).exists());
    let digest = file_digest(&disk);
    env.ok(&["vm", "delete", "a"]);
    assert_eq!(env.json(&["vm", "list"]), serde_json::json!([]));
    assert_eq!(file_digest(&disk), digest, "deleting a VM's definition must not touch its disk");
    assert!(history_has(&env, "a", "vm delete", &disk));
    refused(&env, &["vm", "delete", "a"], "unknown VM");
}

#[test]
fn a_job_changes_its_retention_schedule_and_vms() {
    let env = Env::new(BIN);
    let a = vm_with_disk(&env, "a");
    let b = vm_with_disk(&env, "b");
    env.ok(&["job", "create", "j", "--vm", "a", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    let job = &env.json(&["job", "change", "j", "--retain", "2", "--every", "1h", "--add-vm", "b"])[0];
    assert_eq!((job["retain"].as_u64(), job["every_secs"].as_u64()), (Some(2), Some(3600)));
    assert_eq!(job["vms"], serde_json::json!(["a", "b"]));
    assert!(Path::new(&env.path("dr/b/.standby-replica")).exists(), "the new VM's directory is claimed");
    refused(&env, &["job", "change", "j", "--add-vm", "b"], "in the job already");
    refused(&env, &["job", "change", "j", "--retain", "0"], "at least 1");
    refused(&env, &["job", "change", "j", "--every", "soon"], "interval");
    refused(&env, &["job", "change", "j", "--retain", "2"], "nothing to change");
    for _ in 0..2 {
        qemu_io(&a, "qcow2", &["write -P 0x33 0 64k".into()]);
        env.ok(&["job", "run", "j"]);
    }
    assert_eq!(env.points("a").len(), 2, "retain 2 keeps two");
    assert_eq!(env.points("b").len(), 2);
    env.ok(&["job", "change", "j", "--retain", "1", "--no-schedule"]);
    assert_eq!(env.json(&["job", "list"])[0]["every_secs"], Value::Null);
    env.ok(&["job", "run", "j"]);
    assert_eq!(env.points("a").len(), 1, "a lower retain prunes at the next run");
    assert!(identical(&env.latest_disk("a", 0), &a));
    refused(&env, &["job", "change", "j", "--remove-vm", "b"], "standby replica delete b --job j --delete-points");
    refused(&env, &["job", "change", "j", "--remove-vm", "ghost"], "not in job j");

    // Disabled: runs are refused, the points stay; enabled again, it runs.
    env.ok(&["job", "disable", "j"]);
    assert_eq!(env.json(&["job", "list"])[0]["enabled"], false);
    refused(&env, &["job", "run", "j"], "standby job enable j");
    refused(&env, &["job", "disable", "j"], "disabled already");
    env.ok(&["job", "enable", "j"]);
    env.ok(&["job", "run", "j"]);
    assert!(history_has(&env, "job:j", "job change", "retain 7 -> 2"));
    assert!(history_has(&env, "job:j", "job disable", "disabled"));
    assert!(history_has(&env, "b", "job change", "now protected by job j"));

    // A VM with no restore points leaves by `job change`.
    let c = vm_with_disk(&env, "c");
    env.ok(&["job", "change", "j", "--add-vm", "c"]);
    env.ok(&["job", "change", "j", "--remove-vm", "c"]);
    assert!(!Path::new(&env.path("dr/c")).exists());
    assert!(history_has(&env, "job:j", "job change", "VM c removed"));
    refused(&env, &["job", "change", "j", "--remove-vm", "a", "--remove-vm", "b"], "holds");
    env.ok(&["job", "create", "k", "--vm", "c", "--target-host", "local", "--target-dir", &env.path("dr2")]);
    refused(&env, &["job", "change", "k", "--remove-vm", "c"], "standby job delete k");
    let _ = (b, c);
}

#[test]
fn deleting_a_job_decides_what_becomes_of_its_restore_points() {
    let env = Env::new(BIN);
    let a = vm_with_disk(&env, "a");
    vm_with_disk(&env, "b");
    let dr = env.path("dr");
    env.ok(&["job", "create", "j", "--vm", "a", "--vm", "b", "--target-host", "local", "--target-dir", &dr]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["job", "run", "j"]);
    assert!(bitmaps(&a).iter().any(|b| b.starts_with("standby-r")), "{:?}", bitmaps(&a));
    refused(&env, &["job", "delete", "j"], "--delete-points");
    refused(&env, &["job", "delete", "j", "--delete-points"], "confirm with --yes");
    refused(&env, &["replica", "delete", "a", "--delete-points"], "confirm with --yes");

    // Keep the files: a's chain stays usable where it was, standby forgets it.
    let a_dir = env.path("dr/a");
    let layer = env.latest_disk("a", 0);
    let files_before: Vec<(String, String)> = replica_files(&a_dir)
        .into_iter()
        .filter(|f| !f.starts_with('.'))
        .map(|f| (f.clone(), file_digest(&format!("{a_dir}/{f}"))))
        .collect();
    let out = env.ok(&["replica", "delete", "a", "--keep-files"]);
    assert!(out.contains("stay in") && out.contains(&a_dir), "{out}");
    let files_after: Vec<(String, String)> =
        replica_files(&a_dir).into_iter().map(|f| (f.clone(), file_digest(&format!("{a_dir}/{f}")))).collect();
    assert_eq!(files_after, files_before, "kept files are untouched; only the ownership marker goes");
    assert!(identical(&layer, &a), "the kept chain still opens and holds the source's data");
    assert!(bitmaps(&a).iter().all(|b| !b.starts_with("standby-r")), "{:?}", bitmaps(&a));
    assert_eq!(env.json(&["job", "list"])[0]["vms"], serde_json::json!(["b"]));
    // The kept directory belongs to no job now, and no job may take it over.
    refused(
        &env,
        &["job", "create", "k", "--vm", "a", "--target-host", "local", "--target-dir", &dr],
        "already holds files",
    );

    // Delete the files of b with the job: only what its records name, never a stranger's file.
    let b_dir = env.path("dr/b");
    std::fs::write(format!("{b_dir}/operator-notes.txt"), "mine").unwrap();
    let out = env.ok(&["job", "delete", "j", "--delete-points", "--yes"]);
    assert!(out.contains("restore point(s) deleted"), "{out}");
    assert_eq!(replica_files(&b_dir), ["operator-notes.txt"]);
    assert_eq!(env.json(&["job", "list"]), serde_json::json!([]));
    assert_eq!(env.json(&["replica", "list"]), serde_json::json!([]));
    assert!(history_has(&env, "job:j", "job delete", "deleted"));
    assert!(history_has(&env, "b", "replica delete", "deleted"));
    refused(&env, &["job", "delete", "j"], "unknown job");
}

#[test]
fn nothing_is_removed_from_under_a_failover() {
    let env = Env::new(BIN);
    vm_with_disk(&env, "a");
    env.ok(&["job", "create", "j", "--vm", "a", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "a"]);
    refused(&env, &["replica", "delete", "a", "--delete-points", "--yes"], "standby failover undo a");
    refused(&env, &["job", "delete", "j", "--delete-points", "--yes"], "it is in failover");
    refused(&env, &["job", "change", "j", "--remove-vm", "a"], "it is in failover");
    refused(&env, &["vm", "delete", "a_replica"], "end the failover instead");
    refused(&env, &["vm", "delete", "a"], "job j protects it");
    env.ok(&["failover", "undo", "a"]);
    env.ok(&["replica", "delete", "a", "--delete-points", "--yes"]);
    assert!(!Path::new(&env.path("dr/a")).exists(), "{:?}", replica_files(&env.path("dr/a")));
}

#[test]
fn a_plan_is_changed_and_deleted() {
    let env = Env::new(BIN);
    for n in ["a", "b"] {
        vm_with_disk(&env, n);
    }
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "a",
        "--vm",
        "b",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
    ]);
    env.ok(&["plan", "create", "p", "--vm", "a", "--vm", "b"]);
    assert_eq!(env.json(&["plan", "show", "p"])[0]["hook_timeout_secs"], 300, "the default limit is 5 minutes");
    let p = &env.json(&[
        "plan",
        "change",
        "p",
        "--vm",
        "b:5",
        "--vm",
        "a",
        "--pre",
        "true",
        "--hook-timeout",
        "60",
        "--continue-on-failure",
    ])[0];
    let order: Vec<&str> = p["vms"].as_array().unwrap().iter().map(|v| v["vm"].as_str().unwrap()).collect();
    assert_eq!(order, ["b", "a"]);
    assert_eq!((p["hook_timeout_secs"].as_u64(), p["on_failure"].as_str()), (Some(60), Some("continue")));
    assert_eq!(p["pre_command"], "true");
    let p = &env.json(&["plan", "change", "p", "--no-pre", "--stop-on-failure"])[0];
    assert_eq!((p["pre_command"].clone(), p["on_failure"].as_str()), (Value::Null, Some("stop")));
    refused(&env, &["plan", "change", "p", "--vm", "ghost"], "unknown VM");
    refused(&env, &["plan", "change", "p", "--vm", "a", "--vm", "a"], "named twice");
    refused(&env, &["plan", "change", "p", "--hook-timeout", "0"], "out of range");
    refused(&env, &["plan", "change", "nope", "--hook-timeout", "5"], "unknown plan");
    env.ok(&["plan", "delete", "p"]);
    assert_eq!(env.json(&["plan", "list"]), serde_json::json!([]));
    for op in ["plan create", "plan change", "plan delete"] {
        assert!(history_has(&env, "plan:p", op, "VMs"), "{op} is in the history");
    }
    refused(&env, &["plan", "delete", "p"], "unknown plan");
}
