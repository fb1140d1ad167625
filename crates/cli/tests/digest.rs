//! User story: when no bitmap can be trusted, standby compares digests and the restore
//! point is still exactly the disk.

use std::time::Duration;

use standby_testkit::{identical, ledger_append, make_disk, qemu_img, qemu_io, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

fn setup(env: &Env, format: &str) -> String {
    let disk = env.path(&format!("src/d.{format}"));
    make_disk(&disk, format, 32, &[(0x51, 0, 6), (0x52, 20, 2)]);
    env.ok(&["vm", "create", "d", "--disk", &disk]);
    env.ok(&["job", "create", "j", "--vm", "d", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    disk
}

fn last(env: &Env) -> serde_json::Value {
    env.points("d").pop().unwrap()
}

#[test]
fn removed_bitmap_falls_back_to_digest() {
    let env = Env::new(BIN);
    let disk = setup(&env, "qcow2");
    let info = qemu_img(&["info", "--output=json", &disk]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let name = v["format-specific"]["data"]["bitmaps"][0]["name"].as_str().unwrap().to_owned();
    qemu_img(&["bitmap", "--remove", &disk, &name]);
    qemu_io(&disk, "qcow2", &["write -P 0x61 3M 128k".into(), "write -z 20M 1M".into()]);
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("dirty bitmap missing or inconsistent"), "{out}");
    let rp = last(&env);
    assert_eq!(rp["method"], "digest");
    assert!(identical(rp["disks"][0]["path"].as_str().unwrap(), &disk));
    assert_eq!(rp["bytes_transferred"].as_u64().unwrap(), 128 << 10, "only the changed blocks travel");
    // The run started a fresh bitmap: the next one is CBT again.
    qemu_io(&disk, "qcow2", &["write -P 0x62 10M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    let rp = last(&env);
    assert_eq!(rp["method"], "cbt");
    assert!(identical(rp["disks"][0]["path"].as_str().unwrap(), &disk));
}

#[test]
fn bitmap_of_a_crashed_vm_is_not_trusted() {
    let env = Env::new(BIN);
    let disk = env.path("src/d.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x51, 0, 6)]);
    env.create_guest_vm("d", &disk, 160, &ledger_append(2048, 500, 10_000));
    env.ok(&["job", "create", "j", "--vm", "d", "--target-host", "local", "--target-dir", &env.path("dr")]);
    // A run while stopped stores the bitmap in the image; the running QEMU marks it in-use
    // there until it shuts down cleanly.
    env.ok(&["job", "run", "j"]);
    env.ok(&["vm", "start", "d"]);
    env.wait_console("d", Duration::from_secs(60), "more ledger writes", |c| Ledger::acknowledged(c) >= 40);
    // A crash: QEMU gets no chance to save its bitmaps.
    let pid = env.json(&["vm", "show", "d"])["pid"].as_u64().unwrap();
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let acked = Ledger::acknowledged(&env.console("d"));
    let bitmaps = qemu_img(&["info", &disk]);
    assert!(bitmaps.contains("in-use"), "the crashed VM's bitmap should be marked in-use:\n{bitmaps}");
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("dirty bitmap missing or inconsistent"), "{out}");
    let rp = last(&env);
    assert_eq!(rp["method"], "digest");
    let path = rp["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(identical(&path, &disk));
    let k = Ledger { start_block: 2048 }.records_in(&standby_testkit::read_image(&path), 500).unwrap();
    assert!(k >= acked, "restore point has {k} records, guest acknowledged {acked}");
    assert!(!qemu_img(&["info", &disk]).contains("in-use"), "the inconsistent bitmap was not cleared");
}

#[test]
fn raw_disk_is_compared_by_digest() {
    let env = Env::new(BIN);
    let disk = setup(&env, "raw");
    assert_eq!(last(&env)["method"], "full");
    qemu_io(&disk, "raw", &["write -P 0x71 1M 64k".into(), "write -z 21M 64k".into(), "write -P 0x72 30M 192k".into()]);
    env.ok(&["job", "run", "j"]);
    let rp = last(&env);
    assert_eq!(rp["method"], "digest");
    assert!(identical(rp["disks"][0]["path"].as_str().unwrap(), &disk));
    assert_eq!(rp["bytes_transferred"].as_u64().unwrap(), 256 << 10);
    // Nothing changed: nothing travels, and the point still reads the same.
    env.ok(&["job", "run", "j"]);
    let rp = last(&env);
    assert_eq!(rp["bytes_transferred"].as_u64().unwrap(), 0);
    assert!(identical(rp["disks"][0]["path"].as_str().unwrap(), &disk));
}

#[test]
fn grown_disk_is_compared_by_digest() {
    let env = Env::new(BIN);
    let disk = setup(&env, "qcow2");
    qemu_img(&["resize", &disk, "48M"]);
    qemu_io(&disk, "qcow2", &["write -P 0x73 40M 1M".into()]);
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("size changed"), "{out}");
    let rp = last(&env);
    assert_eq!(rp["disks"][0]["method"], "digest");
    assert_eq!(rp["disks"][0]["size"].as_u64().unwrap(), 48 << 20);
    assert!(identical(rp["disks"][0]["path"].as_str().unwrap(), &disk));
}
