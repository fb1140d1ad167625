//! User story: standby runs VMs itself: start, console, guest shutdown, power off, status
//! read back by any later standby process.

use std::time::Duration;

use standby_testkit::{guest, make_disk, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

#[test]
fn lifecycle_console_and_reattach() {
    let env = Env::new(BIN);
    let (kernel, initrd) = guest();
    let disk = env.path("src/v.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    let append = "console=ttyS0 quiet panic=-1 standby.workload=idle";
    env.ok(&[
        "vm",
        "create",
        "v",
        "--disk",
        &disk,
        "--memory",
        "128",
        "--cpus",
        "2",
        "--nic",
        "virtio-net-pci",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        append,
    ]);
    let v = env.json(&["vm", "show", "v"]);
    assert_eq!((v["name"].as_str(), v["state"].as_str(), v["cpus"].as_u64()), (Some("v"), Some("stopped"), Some(2)));

    env.ok(&["vm", "start", "v"]);
    let err = env.fails(&["vm", "start", "v"]);
    assert!(err.contains("is running"), "{err}");
    // Every command is a new standby process: each one finds the running QEMU again.
    let list = env.json(&["vm", "list"]);
    assert_eq!(list[0]["state"], "running");
    assert!(list[0]["pid"].as_u64().is_some());
    env.wait_console("v", Duration::from_secs(60), "guest boot", |c| c.contains("STANDBY-GUEST up workload=idle"));

    // The ACPI power button reaches the guest, which shuts down by itself.
    let out = env.ok(&["vm", "shutdown", "v", "--timeout", "60"]);
    assert!(out.contains("guest shut down"), "{out}");
    assert!(env.console("v").contains("STANDBY-GUEST shutdown requested"));
    assert_eq!(env.json(&["vm", "show", "v"])["state"], "stopped");

    // A second boot appends to the same console log; stop powers off at once.
    env.ok(&["vm", "start", "v"]);
    env.wait_console("v", Duration::from_secs(60), "second boot", |c| c.matches("STANDBY-GUEST up").count() == 2);
    env.ok(&["vm", "stop", "v"]);
    assert_eq!(env.json(&["vm", "show", "v"])["state"], "stopped");
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}

#[test]
fn guest_that_ignores_shutdown_is_powered_off_after_the_timeout() {
    let env = Env::new(BIN);
    let disk = env.path("src/v.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    // Without `console=ttyS0` nothing of this guest's boot is visible, and during early boot
    // no ACPI handler listens yet: shutdown must fall back to power off.
    env.create_guest_vm("v", &disk, 128, "quiet panic=-1 init=/bin/busybox");
    env.ok(&["vm", "start", "v"]);
    let out = env.ok(&["vm", "shutdown", "v", "--timeout", "1"]);
    assert!(out.contains("powered off"), "{out}");
    assert_eq!(env.json(&["vm", "show", "v"])["state"], "stopped");
}

#[test]
fn concurrent_commands_do_not_corrupt_state() {
    let env = Env::new(BIN);
    let mut children = Vec::new();
    for i in 0..8 {
        let disk = env.path(&format!("src/c{i}.qcow2"));
        make_disk(&disk, "qcow2", 8, &[(0x10 + i as u8, 0, 1)]);
        children.push(env.command(&["vm", "create", &format!("c{i}"), "--disk", &disk]).spawn().unwrap());
    }
    for c in &mut children {
        assert!(c.wait().unwrap().success());
    }
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "c0",
        "--vm",
        "c1",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
    ]);
    // While another command holds VM c0 (its lock, taken here as any standby process
    // takes it), a run replicates c1 and refuses c0 as busy, naming the holder.
    let lock = env.path("data/locks/vm-c0.lock");
    std::fs::write(&lock, "a test holding c0 (pid 1)").unwrap();
    let mut holder = std::process::Command::new("flock").args(["--no-fork", &lock, "sleep", "30"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = env.run(&["job", "run", "j", "--json"]);
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    let outcomes: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let of = |vm: &str| outcomes.as_array().unwrap().iter().find(|o| o["vm"] == vm).unwrap().clone();
    assert_eq!(of("c1")["error"], serde_json::Value::Null, "{outcomes}");
    assert!(of("c0")["error"].as_str().unwrap().contains("VM c0 is busy"), "{outcomes}");
    assert!(env.points("c0").is_empty());
    assert_eq!(env.points("c1").len(), 1);

    // Two runs of one job at once: for each VM, either both got a point (one after the
    // other) or one did and the other was told the VM is busy; every point a run reports is
    // listed, every listed point is exact, and no run failed for another reason.
    let out = || std::process::Stdio::piped();
    let a = env.command(&["job", "run", "j", "--json"]).stdout(out()).stderr(out()).spawn().unwrap();
    let b = env.command(&["job", "run", "j", "--json"]).stdout(out()).stderr(out()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let runs: Vec<serde_json::Value> =
        [&a, &b].iter().map(|o| serde_json::from_slice(&o.stdout).expect("job run --json")).collect();
    assert_eq!(env.json(&["vm", "list"]).as_array().unwrap().len(), 8);
    for (vm, before) in [("c0", 0), ("c1", 1)] {
        let mut made = 0;
        for run in &runs {
            let o = run.as_array().unwrap().iter().find(|o| o["vm"] == vm).unwrap();
            match o["error"].as_str() {
                None => made += 1,
                Some(e) => assert!(e.contains(&format!("VM {vm} is busy")), "{vm}: a run failed otherwise: {e}"),
            }
        }
        assert!(made >= 1, "{vm}: neither run replicated it: {runs:?}");
        let points = env.points(vm);
        assert_eq!(points.len(), before + made, "{vm}: the points listed are the points the runs made");
        let disk = env.path(&format!("src/{vm}.qcow2"));
        for p in points {
            assert!(standby_testkit::identical(p["disks"][0]["path"].as_str().unwrap(), &disk));
        }
    }
}

#[test]
fn kvm_probe_decides_the_accelerator() {
    let mut env = Env::new(BIN);
    env.unset_env("STANDBY_ACCEL");
    let (kernel, initrd) = guest();
    assert!(env.ok(&["host", "list"]).contains("local  accel=tcg"), "TCG until a probe says otherwise");
    // The test's own answer, found the way an operator would: boot the guest under KVM.
    let expected = if boots_under_kvm(&env, &kernel, &initrd) { "kvm" } else { "tcg" };
    let out = env.ok(&["host", "probe", "--kernel", &kernel, "--initrd", &initrd]);
    let said = if out.contains("VMs start with KVM") { "kvm" } else { "tcg" };
    assert_eq!(said, expected, "the probe said {out:?}");
    assert!(env.ok(&["host", "list"]).contains(&format!("local  accel={expected}")));
    // A VM then starts with that accelerator, and boots.
    let disk = env.path("src/p.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    env.create_guest_vm("p", &disk, 128, "console=ttyS0 quiet panic=-1");
    env.ok(&["vm", "start", "p"]);
    let qemu = env.processes();
    assert!(qemu.len() == 1 && qemu[0].contains(&format!("-accel {expected}")), "{qemu:?}");
    env.wait_console("p", Duration::from_secs(60), "boot", |c| c.contains("STANDBY-GUEST up"));
    env.ok(&["vm", "stop", "p"]);
    let err = env.fails(&["host", "probe", "--kernel", "/nonexistent", "--initrd", &initrd]);
    assert!(err.contains("does not exist"), "{err}");
}

/// A guest's console log is read piece by piece and rotated at start, so neither memory
/// nor disk grows with everything a guest ever printed.
#[test]
fn console_logs_are_read_in_pieces_and_rotated_at_start() {
    let env = Env::new(BIN);
    let disk = env.path("src/c.qcow2");
    make_disk(&disk, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "c", "--disk", &disk, "--format", "qcow2", "--memory", "64"]);
    let dir = env.path("data/hosts/local/vms/c");
    std::fs::create_dir_all(&dir).unwrap();
    // 9 MiB of numbered lines: more than one read's worth, and over the rotation size.
    let mut old = String::new();
    let mut i = 0u64;
    while old.len() < 9 << 20 {
        old.push_str(&format!("old console line {i}\n"));
        i += 1;
    }
    std::fs::write(format!("{dir}/console.log"), &old).unwrap();
    let shown = env.ok(&["vm", "console", "c"]);
    assert!(shown == old, "vm console printed {} bytes of {}", shown.len(), old.len());
    env.ok(&["vm", "start", "c"]);
    env.ok(&["vm", "stop", "c"]);
    assert_eq!(std::fs::read_to_string(format!("{dir}/console.log.1")).unwrap(), old, "the old log is kept once");
    let now = std::fs::metadata(format!("{dir}/console.log")).map(|m| m.len()).unwrap_or(0);
    assert!(now < 1 << 20, "the new log starts afresh: {now} bytes");
    assert!(!env.ok(&["vm", "console", "c"]).contains("old console line"));
}

/// Whether the test guest reaches userspace under KVM here within 15 s (the bound the
/// probe uses): QEMU run directly, not through standby.
fn boots_under_kvm(env: &Env, kernel: &str, initrd: &str) -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    let console = env.path("oracle-console.log");
    let mut qemu = std::process::Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-nodefaults", "-display", "none", "-no-user-config", "-m", "128", "-no-reboot"])
        .args(["-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet panic=-1"])
        .args(["-chardev", &format!("file,id=c,path={console}"), "-serial", "chardev:c"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let start = std::time::Instant::now();
    let mut up = false;
    while start.elapsed() < Duration::from_secs(15) {
        if std::fs::read_to_string(&console).is_ok_and(|c| c.contains("STANDBY-GUEST up")) {
            up = true;
            break;
        }
        if qemu.try_wait().ok().flatten().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    up
}
