//! User story: a job with an interval runs by itself under `standby daemon`, and a long
//! run can be followed from another terminal.

use std::process::Stdio;
use std::time::{Duration, Instant};

use standby_testkit::{identical, make_disk, qemu_io, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

#[test]
fn daemon_runs_jobs_on_their_interval() {
    let env = Env::new(BIN);
    let disk = env.path("src/d.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x1, 0, 2)]);
    env.ok(&["vm", "create", "d", "--disk", &disk]);
    env.ok(&[
        "job",
        "create",
        "often",
        "--vm",
        "d",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
        "--every",
        "2s",
    ]);
    env.ok(&["job", "create", "manual", "--vm", "d", "--target-host", "local", "--target-dir", &env.path("dr2")]);
    let mut daemon =
        env.command(&["daemon", "--tick", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    let often = || env.json(&["replica", "points", "d", "--job", "often"]).as_array().unwrap().len();
    while often() == 0 && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    qemu_io(&disk, "qcow2", &[]); // the image is free between runs
    std::thread::sleep(Duration::from_millis(4500));
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let points = env.json(&["replica", "points", "d", "--job", "often"]);
    let n = points.as_array().unwrap().len();
    assert!((2..=5).contains(&n), "a 2 s interval over about 5 s gave {n} runs");
    let manual = env.json(&["replica", "points", "d", "--job", "manual"]);
    assert!(manual.as_array().unwrap().is_empty(), "a job without --every must not run by itself");
    let last = points.as_array().unwrap().last().unwrap()["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(identical(&last, &disk));
}

#[test]
fn a_running_job_can_be_followed_from_another_terminal() {
    let env = Env::new(BIN);
    let disk = env.path("src/big.qcow2");
    make_disk(&disk, "qcow2", 1024, &[(0x3, 0, 768)]);
    env.ok(&["vm", "create", "big", "--disk", &disk]);
    env.ok(&["job", "create", "j", "--vm", "big", "--target-host", "local", "--target-dir", &env.path("dr")]);
    let run = env.command(&["job", "run", "j"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // Another terminal: find the running task and follow it to its end.
    let start = Instant::now();
    let id = loop {
        let tasks = env.json(&["task", "list"]);
        if let Some(t) = tasks.as_array().unwrap().iter().find(|t| t["status"] == "running") {
            break t["id"].as_i64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no running task appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    let follow = env.ok(&["task", "show", &id.to_string(), "--follow"]);
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let lines: Vec<&str> = follow.lines().collect();
    assert!(lines.len() >= 2, "following showed no progress:\n{follow}");
    assert!(lines.last().unwrap().contains(": ok ["), "{follow}");
    assert!(follow.contains("job-run j"), "{follow}");
    let t = env.json(&["task", "show", &id.to_string()]);
    assert_eq!(t[0]["done_bytes"], t[0]["total_bytes"]);
    assert_eq!(t[0]["total_bytes"].as_u64().unwrap(), 768 << 20);
}

#[test]
fn the_daemon_survives_database_errors_and_a_clock_stepped_back() {
    let env = Env::new(BIN);
    let dr = env.path("dr");
    for (vm, job) in [("d", "good"), ("e", "bad")] {
        let disk = env.path(&format!("src/{vm}.qcow2"));
        make_disk(&disk, "qcow2", 8, &[(0x1, 0, 1)]);
        env.ok(&["vm", "create", vm, "--disk", &disk, "--format", "qcow2"]);
        env.ok(&["job", "create", job, "--vm", vm, "--target-host", "local", "--target-dir", &dr, "--every", "2s"]);
    }
    // `bad` has a row the daemon cannot read; `good` last ran in the future (the clock
    // was stepped back since): it must run within an interval, not when the clock
    // reaches 2999, and `bad` must not stop it.
    env.sql(
        "UPDATE jobs SET every_secs = 'garbage' WHERE name = 'bad';
         UPDATE jobs SET last_run_at = '2999-01-01T00:00:00Z' WHERE name = 'good';",
    );
    let log = env.path("daemon.log");
    let mut daemon = env
        .command(&["daemon", "--tick", "1"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let points = |vm: &str| env.json(&["replica", "points", vm]).as_array().unwrap().len();
    let wait_for = |vm: &str| {
        let start = Instant::now();
        while points(vm) == 0 && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
        }
        points(vm)
    };
    assert!(wait_for("d") >= 1, "good did not run: {}", std::fs::read_to_string(&log).unwrap());
    assert!(std::fs::read_to_string(&log).unwrap().contains("cannot be read"), "the damaged row is named");
    // Now every check fails (the job table itself is gone, as from a damaged database):
    // the daemon stays up, says so, and backs off.
    env.sql("ALTER TABLE jobs RENAME TO jobs_aside");
    std::thread::sleep(Duration::from_millis(3000));
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited on a database error");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("check failed") && text.contains("retrying in"), "{text}");
    // Repaired: the other job runs too.
    env.sql("ALTER TABLE jobs_aside RENAME TO jobs; UPDATE jobs SET every_secs = 2 WHERE name = 'bad'");
    assert!(wait_for("e") >= 1, "bad did not run after its repair: {}", std::fs::read_to_string(&log).unwrap());
    assert!(daemon.try_wait().unwrap().is_none(), "the daemon exited");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(identical(&env.latest_disk("d", 0), &env.path("src/d.qcow2")));
}

#[test]
fn the_daemon_skips_a_disabled_job() {
    let env = Env::new(BIN);
    let disk = env.path("src/d.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x1, 0, 1)]);
    env.ok(&["vm", "create", "d", "--disk", &disk, "--format", "qcow2"]);
    let dr = env.path("dr");
    env.ok(&["job", "create", "j", "--vm", "d", "--target-host", "local", "--target-dir", &dr, "--every", "1s"]);
    env.ok(&["job", "disable", "j"]);
    let mut daemon =
        env.command(&["daemon", "--tick", "1"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    assert!(env.json(&["replica", "points", "d"]).as_array().unwrap().is_empty(), "a disabled job ran");
}
