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
    // Two runs of one job at once: each VM is replicated by exactly one of them, the other
    // says the VM is busy; no run corrupts the other's restore point.
    let out = || std::process::Stdio::piped();
    let a = env.command(&["job", "run", "j"]).stdout(out()).stderr(out()).spawn().unwrap();
    let b = env.command(&["job", "run", "j"]).stdout(out()).stderr(out()).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let outputs = format!("{}{}", String::from_utf8_lossy(&a.stdout), String::from_utf8_lossy(&b.stdout));
    for o in [&a, &b] {
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() || text.contains("is busy"), "a run failed for another reason: {outputs}");
    }
    assert_eq!(env.json(&["vm", "list"]).as_array().unwrap().len(), 8);
    for vm in ["c0", "c1"] {
        let points = env.points(vm);
        assert!(!points.is_empty() && points.len() <= 2, "{vm}: {points:?}");
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
    let out = env.ok(&["host", "probe", "--kernel", &kernel, "--initrd", &initrd]);
    let accel = if out.contains("VMs start with KVM") { "kvm" } else { "tcg" };
    assert!(env.ok(&["host", "list"]).contains(&format!("local  accel={accel}")));
    // Whatever the probe chose, a VM boots with it.
    let disk = env.path("src/p.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    env.create_guest_vm("p", &disk, 128, "console=ttyS0 quiet panic=-1");
    env.ok(&["vm", "start", "p"]);
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
