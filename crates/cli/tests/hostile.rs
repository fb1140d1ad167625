//! User story: images on the DR side are not trusted. A backing-file name planted in a
//! restore point's header never changes what standby reads.

use standby_testkit::{identical, make_disk, qemu_img, qemu_io, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

#[test]
fn planted_backing_file_name_is_never_followed() {
    let env = Env::new(BIN);
    let disk = env.path("src/h.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x5, 0, 4)]);
    env.ok(&["vm", "create", "h", "--disk", &disk]);
    env.ok(&["job", "create", "j", "--vm", "h", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    qemu_io(&disk, "qcow2", &["write -P 0x6 8M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    // A decoy with other data, named in the header of the newest restore point's layer.
    let decoy = env.path("decoy.qcow2");
    make_disk(&decoy, "qcow2", 16, &[(0xee, 0, 16)]);
    let newest = env.latest_disk("h", 0);
    qemu_img(&["rebase", "-u", "-b", &decoy, "-F", "qcow2", &newest]);
    // Force a digest run, which reads the previous restore point through its chain: had
    // standby followed the planted name, every decoy block would differ and travel.
    let bitmap = standby_testkit::bitmaps(&disk).remove(0);
    qemu_img(&["bitmap", "--remove", &disk, &bitmap]);
    qemu_io(&disk, "qcow2", &["write -P 0x7 12M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    let points = env.points("h");
    let last = points.last().unwrap();
    assert_eq!(last["method"], "digest");
    assert_eq!(last["bytes_transferred"].as_u64().unwrap(), 64 << 10, "only the changed block may travel");
    // Read the new point through standby's own chain: layers from the database, the
    // bottom one without backing, exactly as standby opens them.
    let mut node = serde_json::Value::Null;
    for p in &points {
        let file = serde_json::json!({"driver": "file", "filename": p["disks"][0]["path"]});
        node = serde_json::json!({"driver": "qcow2", "file": file, "backing": node});
    }
    let explicit = format!("json:{node}");
    assert!(identical(&explicit, &disk), "standby followed the planted backing file");
}

#[test]
fn hostile_source_image_is_refused() {
    let env = Env::new(BIN);
    let bad = env.path("src/bad.qcow2");
    std::fs::write(&bad, b"QFI\xfb\x00\x00\x00\x03garbage header that is no qcow2 image at all").unwrap();
    let err = env.fails(&["vm", "create", "x", "--disk", &bad]);
    assert!(err.contains("not a usable disk image"), "{err}");
    assert!(env.json(&["vm", "list"]).as_array().unwrap().is_empty());
}
