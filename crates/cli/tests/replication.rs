//! User story: protect a running VM; every job run makes a restore point that is exactly
//! the VM's disk at one instant and holds every write the guest had seen acknowledged.

use std::time::Duration;

use standby_testkit::{
    identical, ledger_append, make_disk, qemu_img, qemu_io, read_image, with_ledger, Env, Ledger, LEDGER_BLOCK,
};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const LEDGER_START: u64 = 4096; // 16 MiB into the disk
const LEDGER_MAX: u64 = 3000;
const CLUSTER: u64 = 64 << 10;

/// The source disk's content before the guest wrote, plus ledger records 1..=k, as raw.
fn reference(env: &Env, base: &[u8], k: u64, name: &str) -> String {
    let path = env.path(name);
    std::fs::write(&path, with_ledger(base, LEDGER_START, k)).unwrap();
    path
}

/// The 64 KiB clusters that records `from..=to` touch: the most a CBT run may send.
fn ledger_clusters(from: u64, to: u64) -> u64 {
    let mut c: Vec<u64> = (from..=to).map(|s| (LEDGER_START + s - 1) * LEDGER_BLOCK as u64 / CLUSTER).collect();
    c.dedup();
    c.len() as u64
}

#[test]
fn running_vm_restore_points_match_the_disk_at_their_instant() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 64, &[(0xab, 0, 8), (0xcd, 40, 4)]);
    let base = read_image(&disk);
    env.create_guest_vm("web", &disk, 192, &ledger_append(LEDGER_START, LEDGER_MAX, 20_000));
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "web",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
        "--retain",
        "10",
    ]);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(60), "10 ledger writes", |c| Ledger::acknowledged(c) >= 10);

    let ledger = Ledger { start_block: LEDGER_START };
    let mut prev_k = 0;
    let mut checked = Vec::new();
    for run in 0..3 {
        let acked_before = Ledger::acknowledged(&env.console("web"));
        env.ok(&["job", "run", "j"]);
        let points = env.points("web");
        assert_eq!(points.len(), run + 1);
        let rp = points.last().unwrap();
        let path = rp["disks"][0]["path"].as_str().unwrap().to_owned();
        let k = ledger.records_in(&read_image(&path), LEDGER_MAX).unwrap();
        assert!(
            k >= acked_before,
            "run {run}: restore point holds records 1..={k}, guest had {acked_before} acknowledged"
        );
        let r = reference(&env, &base, k, &format!("ref{run}.raw"));
        assert!(identical(&path, &r), "run {run}: restore point differs from the disk at its instant");
        let sent = rp["bytes_transferred"].as_u64().unwrap();
        if run == 0 {
            assert_eq!(rp["method"], "full");
            // Allocated, non-zero data only: 12 MiB of patterns plus the records so far.
            assert!(sent >= 12 << 20 && sent <= (12 << 20) + (k + 16) * LEDGER_BLOCK as u64, "full run sent {sent}");
        } else {
            assert_eq!(rp["method"], "cbt", "run {run}");
            let bound = ledger_clusters(prev_k + 1, k) * CLUSTER;
            assert!(k > prev_k && sent > 0 && sent <= bound, "run {run}: sent {sent}, changed clusters hold {bound}");
        }
        checked.push((path, r));
        prev_k = k;
        std::thread::sleep(Duration::from_millis(800));
    }

    // A stopped VM replicates through qemu-nbd with the bitmap the running QEMU saved.
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    let acked = Ledger::acknowledged(&env.console("web"));
    env.ok(&["job", "run", "j"]);
    let rp = env.points("web").pop().unwrap();
    assert_eq!(rp["method"], "cbt");
    let path = rp["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(identical(&path, &disk), "restore point of the stopped VM differs from its disk");
    let k = ledger.records_in(&read_image(&path), LEDGER_MAX).unwrap();
    assert!(k >= acked, "final restore point holds {k} records, guest acknowledged {acked}");

    // Earlier restore points never changed.
    for (p, r) in &checked {
        assert!(identical(p, r), "restore point {p} changed after later runs");
    }
    for p in env.points("web") {
        let path = p["disks"][0]["path"].as_str().unwrap();
        assert!(qemu_img(&["check", "-U", path]).contains("No errors"), "{path} fails qemu-img check");
    }
}

#[test]
fn retention_keeps_exactly_n_and_the_rest_stay_intact() {
    let env = Env::new(BIN);
    let disk = env.path("src/db.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x11, 0, 4)]);
    env.ok(&["vm", "create", "db", "--disk", &disk]);
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "db",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
        "--retain",
        "3",
    ]);
    let mut refs = std::collections::HashMap::new();
    for i in 0..6u64 {
        qemu_io(&disk, "qcow2", &[format!("write -P {:#x} {}M 1M", 0x20 + i, 4 + i * 3)]);
        env.ok(&["job", "run", "j"]);
        let points = env.points("db");
        assert_eq!(points.len() as u64, (i + 1).min(3), "after run {i}");
        let id = points.last().unwrap()["id"].as_i64().unwrap();
        let r = env.path(&format!("ref{id}.qcow2"));
        qemu_img(&["convert", "-O", "qcow2", &disk, &r]);
        refs.insert(id, r);
        for p in &points {
            let path = p["disks"][0]["path"].as_str().unwrap();
            let id = p["id"].as_i64().unwrap();
            assert!(identical(path, &refs[&id]), "restore point {id} changed by retention (run {i})");
        }
        // The replica directory holds exactly the layers the restore points use, and the
        // marker that makes it the replica's.
        let mut files: Vec<String> =
            std::fs::read_dir(env.path("dr/db")).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
        files.sort();
        let mut used: Vec<String> = points.iter().map(|p| p["disks"][0]["path"].as_str().unwrap().to_owned()).collect();
        used.push(env.path("dr/db/.standby-replica"));
        used.sort();
        assert_eq!(files, used, "after run {i}");
    }
    // The oldest kept point is a standalone image: no backing file in its header.
    let oldest = env.points("db")[0]["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(!qemu_img(&["info", &oldest]).contains("backing file:"));
}

#[test]
fn several_disks_of_a_stopped_vm_each_get_their_own_method() {
    let env = Env::new(BIN);
    let a = env.path("src/a.qcow2");
    let b = env.path("src/b.raw");
    make_disk(&a, "qcow2", 16, &[(0x31, 0, 2)]);
    make_disk(&b, "raw", 16, &[(0x32, 1, 2)]);
    env.ok(&["vm", "create", "two", "--disk", &a, "--disk", &b]);
    env.ok(&["job", "create", "j", "--vm", "two", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    qemu_io(&a, "qcow2", &["write -P 0x41 8M 64k".into()]);
    qemu_io(&b, "raw", &["write -P 0x42 9M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    let rp = env.points("two").pop().unwrap();
    let disks = rp["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[0]["method"], "cbt");
    assert_eq!(disks[1]["method"], "digest", "a raw disk has no bitmap");
    assert_eq!(rp["method"], "digest");
    assert!(identical(disks[0]["path"].as_str().unwrap(), &a));
    assert!(identical(disks[1]["path"].as_str().unwrap(), &b));
    assert_eq!(disks[1]["bytes_transferred"].as_u64().unwrap(), 64 << 10, "digest sends only the changed block");
}

#[test]
fn running_vm_with_two_disks_is_captured_in_one_transaction() {
    let env = Env::new(BIN);
    let (kernel, initrd) = standby_testkit::guest();
    let a = env.path("src/a.qcow2");
    let b = env.path("src/b.qcow2");
    make_disk(&a, "qcow2", 32, &[(0x61, 0, 2)]);
    make_disk(&b, "qcow2", 16, &[(0x62, 4, 2)]);
    env.ok(&[
        "vm",
        "create",
        "two",
        "--disk",
        &a,
        "--disk",
        &b,
        "--memory",
        "160",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        &ledger_append(2048, 400, 20_000),
    ]);
    env.ok(&["job", "create", "j", "--vm", "two", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "two"]);
    env.wait_console("two", Duration::from_secs(60), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "j"]);
    env.wait_console("two", Duration::from_secs(60), "more ledger writes", |c| Ledger::acknowledged(c) >= 30);
    env.ok(&["job", "run", "j"]);
    let rp = env.points("two").pop().unwrap();
    assert_eq!(rp["disks"][0]["method"], "cbt");
    assert_eq!(rp["disks"][1]["method"], "cbt");
    assert_eq!(rp["disks"][1]["bytes_transferred"], 0, "nothing wrote to the second disk");
    env.ok(&["vm", "shutdown", "two", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("two", 0), &a));
    assert!(identical(&env.latest_disk("two", 1), &b));
}

/// Sends raw QMP commands to a monitor socket and returns each reply line, for a test
/// that must act on a VM behind standby's back.
fn qmp_raw(socket: &str, commands: &[&str]) -> Vec<String> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket).expect("connect to the monitor");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).unwrap(); // the greeting
    let mut replies = Vec::new();
    for c in std::iter::once(&r#"{"execute":"qmp_capabilities"}"#).chain(commands) {
        writeln!(writer, "{c}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if !line.contains("\"event\"") {
                break;
            }
        }
        replies.push(line.clone());
    }
    replies
}

/// A live view holds its instant only while QEMU's copy job copies old data aside: a job
/// that is gone before the view has been read (ended by an error, or by anyone) means the
/// view may hold data written after the instant. The run fails saying so, makes no restore
/// point, leaves nothing behind, and the next run makes a restore point that is the disk.
#[test]
fn a_view_whose_copy_job_stopped_makes_no_restore_point() {
    let env = Env::new(BIN);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 64, &[(0xab, 0, 8)]);
    env.create_guest_vm("web", &disk, 192, &ledger_append(LEDGER_START, LEDGER_MAX, 20_000));
    env.ok(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", "web"]);
    env.wait_console("web", Duration::from_secs(60), "5 ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "j"]);
    assert_eq!(env.points("web").len(), 1);

    let pause = env.path("paused-at-checkpoint");
    let run = env
        .command(&["job", "run", "j"])
        .env("STANDBY_FAILPOINT_PAUSE", format!("replicate.after-checkpoint={pause}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !std::path::Path::new(&pause).exists() {
        assert!(start.elapsed() < Duration::from_secs(120), "the run never reached its instant");
        std::thread::sleep(Duration::from_millis(20));
    }
    let monitor = format!("{}/hosts/local/vms/web/qmp-status.sock", env.data_dir());
    let jobs = qmp_raw(&monitor, &[r#"{"execute":"query-block-jobs"}"#]).pop().unwrap();
    let job = jobs.split('"').skip_while(|w| *w != "device").nth(2).unwrap().to_owned();
    assert!(job.starts_with("fleece-"), "the run's copy job: {jobs}");
    let cancel = format!(r#"{{"execute":"block-job-cancel","arguments":{{"device":"{job}","force":true}}}}"#);
    let reply = qmp_raw(&monitor, &[&cancel]).pop().unwrap();
    assert!(reply.contains("\"return\""), "{reply}");
    std::fs::remove_file(&pause).unwrap();
    let out = run.wait_with_output().unwrap();
    let stderr = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the run must fail: {stderr}");
    assert!(
        stderr.contains(&format!("copy job {job} stopped")) && stderr.contains("nothing read from it is kept"),
        "{stderr}"
    );
    assert_eq!(env.points("web").len(), 1, "no restore point from a broken view");
    let left: Vec<String> = std::fs::read_dir(format!("{}/hosts/local/vms/web", env.data_dir()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fleece-"))
        .collect();
    assert!(left.is_empty(), "fleecing scratch files left: {left:?}");
    let dr_files: Vec<String> = std::fs::read_dir(env.path("dr/web"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(dr_files.iter().filter(|n| n.ends_with(".qcow2")).count(), 1, "only the first layer: {dr_files:?}");

    // The changes the failed run saw are not lost: the next run's point is the disk.
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let points = env.points("web");
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["method"], "cbt");
    assert!(identical(&env.latest_disk("web", 0), &disk), "the next restore point differs from the disk");
}
