//! User story: images are not trusted. A backing-file name planted in a restore point's
//! header never changes what standby reads and is never opened; a disk's format is stated
//! or probed once, never guessed again; paths QEMU would parse as options work as paths.
//! Every command here either works exactly or fails clearly, and none may hang: each runs
//! under a time limit (`Env::bounded`).

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use standby_testkit::{file_digest, identical, make_disk, qemu_img, qemu_io, read_image, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

#[test]
fn planted_backing_file_name_is_never_followed() {
    let env = Env::bounded(BIN, LIMIT);
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
    let explicit = explicit_chain(&points);
    assert!(identical(&explicit, &disk), "standby followed the planted backing file");
}

#[test]
fn hostile_source_image_is_refused() {
    let env = Env::bounded(BIN, LIMIT);
    let bad = env.path("src/bad.qcow2");
    std::fs::write(&bad, b"QFI\xfb\x00\x00\x00\x03garbage header that is no qcow2 image at all").unwrap();
    let err = env.fails(&["vm", "create", "x", "--disk", &bad]);
    assert!(err.contains("not a usable disk image"), "{err}");
    assert!(env.json(&["vm", "list"]).as_array().unwrap().is_empty());
}

const LIMIT: Duration = Duration::from_secs(120);

/// A FIFO, an `nbd:` URL, a `json:` description, a relative name and an absolute one outside
/// the DR tree, each planted as the backing name of the newest restore point's layer: the
/// next run stacks a layer on it, which must never open that name (a FIFO blocks the opener
/// forever; an NBD URL or `json:` connects wherever it says; a decoy would be read as data).
#[test]
fn planted_fifo_and_nbd_backing_names_are_never_opened() {
    let env = Env::bounded(BIN, LIMIT);
    let disk = env.path("src/f.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x5, 0, 4)]);
    env.ok(&["vm", "create", "f", "--disk", &disk, "--format", "qcow2"]);
    env.ok(&["job", "create", "j", "--vm", "f", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    let fifo = env.path("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let socket = env.path("evil.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    // A decoy with other data, reachable by a relative name from the layer's directory.
    let decoy = env.path("decoy.qcow2");
    make_disk(&decoy, "qcow2", 16, &[(0xee, 0, 16)]);
    let json = format!(r#"json:{{"driver":"nbd","server":{{"type":"unix","path":"{socket}"}},"export":"x"}}"#);
    for (planted, format) in [
        (fifo.clone(), "raw"),
        (format!("nbd+unix:///x?socket={socket}"), "raw"),
        (json, "raw"),
        ("../../decoy.qcow2".to_owned(), "qcow2"),
        (decoy.clone(), "qcow2"),
    ] {
        let newest = env.latest_disk("f", 0);
        qemu_img(&["rebase", "-u", "-b", &planted, "-F", format, &newest]);
        qemu_io(&disk, "qcow2", &["write -P 0x9 8M 64k".into()]);
        let r = env.run_within(LIMIT, &["job", "run", "j"]);
        assert_eq!(r.code, Some(0), "{planted}: {}{}", r.stdout, r.stderr);
        assert!(listener.accept().is_err(), "{planted}: something connected to the planted NBD address");
        assert!(identical(&explicit_chain(&env.points("f")), &disk), "{planted}: the newest point is not the disk");
    }
}

/// A raw disk whose guest wrote a qcow2 header stays raw: the stated format is stored and
/// every later open states it, so the header is data like any other.
#[test]
fn raw_disk_holding_a_qcow2_header_is_read_as_raw() {
    let env = Env::bounded(BIN, LIMIT);
    let header = env.path("h.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &header, "1G"]);
    let disk = env.path("src/raw.img");
    let mut bytes = std::fs::read(&header).unwrap();
    bytes.resize(8 << 20, 0x3c);
    std::fs::write(&disk, &bytes).unwrap();
    env.ok(&["vm", "create", "r", "--disk", &disk, "--format", "raw"]);
    assert_eq!(env.json(&["vm", "show", "r"])["disks"][0]["format"], "raw");
    env.ok(&["job", "create", "j", "--vm", "r", "--target-host", "local", "--target-dir", &env.path("dr")]);
    let r = env.run_within(LIMIT, &["job", "run", "j"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let point = env.latest_disk("r", 0);
    assert_eq!(read_image(&point), bytes, "the restore point holds the raw bytes, header included");

    // Not stated: probed once, shown, and the probe's answer is what is stored.
    let plain = env.path("src/plain.qcow2");
    make_disk(&plain, "qcow2", 8, &[]);
    let out = env.ok(&["vm", "create", "p", "--disk", &plain]);
    assert!(out.contains("(qcow2)") && out.contains("probed"), "{out}");
    let err = env.fails(&["vm", "create", "q", "--disk", &plain, "--disk", &disk, "--format", "raw"]);
    assert!(err.contains("one format per disk"), "{err}");
    let err = env.fails(&["vm", "create", "q", "--disk", &disk, "--format", "vmdk"]);
    assert!(err.contains("neither qcow2 nor raw"), "{err}");
}

#[test]
fn a_disk_with_a_backing_file_is_refused_with_what_to_do() {
    let env = Env::bounded(BIN, LIMIT);
    let base = env.path("src/base.qcow2");
    make_disk(&base, "qcow2", 8, &[(0x1, 0, 1)]);
    let top = env.path("src/top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top]);
    env.ok(&["vm", "list"]);
    let before = env.snapshot();
    for args in [vec!["--disk", top.as_str()], vec!["--disk", top.as_str(), "--format", "qcow2"]] {
        let mut a = vec!["vm", "create", "t"];
        a.extend(args);
        let err = env.fails(&a);
        assert!(err.contains("has a backing file") && err.contains("flatten it"), "{err}");
    }
    assert_eq!(env.snapshot(), before);
}

/// `,` ends a QEMU option value and `=` starts one; `:` and spaces trip URL-like parsers.
/// A disk path with all of them runs, replicates while the guest writes, and compares equal.
#[test]
fn disk_paths_with_commas_equals_colons_and_spaces_work() {
    let env = Env::bounded(BIN, LIMIT);
    let disk = env.path("src/a,file.locking=off:b c.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x42, 0, 2)]);
    env.create_guest_vm("c", &disk, 128, "console=ttyS0 quiet panic=-1 standby.workload=idle");
    env.ok(&["vm", "start", "c"]);
    env.wait_console("c", Duration::from_secs(60), "guest boot", |c| c.contains("STANDBY-GUEST up workload=idle"));
    env.ok(&["job", "create", "j", "--vm", "c", "--target-host", "local", "--target-dir", &env.path("dr")]);
    let r = env.run_within(LIMIT, &["job", "run", "j"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    env.ok(&["vm", "stop", "c"]);
    let r = env.run_within(LIMIT, &["job", "run", "j"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(identical(&explicit_chain(&env.points("c")), &disk));
}

/// Standby's own chain of the newest point: layers from the database, the bottom one
/// without backing, exactly as standby opens them.
fn explicit_chain(points: &[serde_json::Value]) -> String {
    let mut node = serde_json::Value::Null;
    for p in points {
        let file = serde_json::json!({"driver": "file", "filename": p["disks"][0]["path"]});
        node = serde_json::json!({"driver": "qcow2", "file": file, "backing": node});
    }
    format!("json:{node}")
}

/// Two jobs for one VM into one DR directory spelled differently would write the same
/// layer names and delete each other's layers as orphans. Every spelling is refused.
#[test]
fn one_directory_under_another_spelling_is_refused() {
    let env = Env::bounded(BIN, LIMIT);
    let disk = env.path("src/s.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x5, 0, 1)]);
    env.ok(&["vm", "create", "s", "--disk", &disk, "--format", "qcow2"]);
    let other = env.path("src/o.qcow2");
    make_disk(&other, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "o", "--disk", &other, "--format", "qcow2"]);
    env.ok(&["job", "create", "a", "--vm", "s", "--target-host", "local", "--target-dir", &env.path("dr")]);
    std::os::unix::fs::symlink(env.path("dr"), env.path("drlink")).unwrap();
    std::fs::create_dir_all(env.path("x")).unwrap();
    let before = env.snapshot();
    let spellings = [
        format!("{}/", env.path("dr")),
        env.path("dr").replace("/dr", "//dr"),
        format!("{}/../dr", env.path("x")),
        env.path("drlink"),
        env.path("drlink/."),
    ];
    for dir in &spellings {
        let err = env.fails(&["job", "create", "b", "--vm", "s", "--target-host", "local", "--target-dir", dir]);
        assert!(err.contains("already replicated"), "{dir}: {err}");
    }
    // Another VM whose replica directory would be the first replica's, or inside it.
    let err =
        env.fails(&["job", "create", "c", "--vm", "o", "--target-host", "local", "--target-dir", &env.path("dr/s")]);
    assert!(err.contains("keeps its restore points there"), "{err}");
    assert_eq!(env.snapshot(), before);
    let marker = std::fs::read_to_string(env.path("dr/s/.standby-replica")).unwrap();
    assert!(marker.contains("job: a") && marker.contains("vm: s"), "{marker}");
}

/// A replica directory is touched only while its marker names the replica; in it,
/// cleanup deletes only layer names the replica's own runs made.
#[test]
fn a_replica_directory_is_touched_only_while_provably_its_own() {
    let env = Env::bounded(BIN, LIMIT);
    let disk = env.path("src/m.qcow2");
    make_disk(&disk, "qcow2", 8, &[(0x5, 0, 1)]);
    env.ok(&["vm", "create", "m", "--disk", &disk, "--format", "qcow2"]);
    env.ok(&["job", "create", "j", "--vm", "m", "--target-host", "local", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);
    // Files another program put there, one named like a layer of a later run.
    let foreign = [env.path("dr/m/notes.txt"), env.path("dr/m/000007-d0.qcow2")];
    for f in &foreign {
        std::fs::write(f, b"not standby's").unwrap();
    }
    qemu_io(&disk, "qcow2", &["write -P 0x6 2M 64k".into()]);
    env.ok(&["job", "run", "j"]);
    for f in &foreign {
        assert_eq!(std::fs::read(f).unwrap(), b"not standby's", "{f} was touched");
    }
    assert!(identical(&explicit_chain(&env.points("m")), &disk));

    let marker = env.path("dr/m/.standby-replica");
    let mine = std::fs::read_to_string(&marker).unwrap();
    let layers: Vec<String> = env.points("m").iter().map(|p| p["disks"][0]["path"].as_str().unwrap().into()).collect();
    let digests = |ls: &[String]| ls.iter().map(|l| file_digest(l)).collect::<Vec<_>>();
    let kept = digests(&layers);
    for tampered in [Some(mine.replace("job: j", "job: someone-else")), None] {
        match &tampered {
            Some(t) => std::fs::write(&marker, t).unwrap(),
            None => std::fs::remove_file(&marker).unwrap(),
        }
        qemu_io(&disk, "qcow2", &["write -P 0x7 3M 64k".into()]);
        for args in [&["job", "run", "j"][..], &["failover", "m"]] {
            let r = env.run(args);
            let out = format!("{}{}", r.stdout, r.stderr);
            assert_ne!(r.code, Some(0), "{args:?}: {out}");
            assert!(out.contains("is not provably this replica's"), "{args:?}: {out}");
        }
        assert_eq!(digests(&layers), kept, "a layer changed under a foreign marker");
        assert_eq!(env.points("m").len(), 2);
        let names: Vec<_> = std::fs::read_dir(env.path("dr/m")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names.len(), 5 - usize::from(tampered.is_none()), "{names:?}: a file appeared or went");
    }
    std::fs::write(&marker, &mine).unwrap();
    env.ok(&["job", "run", "j"]);
    assert!(identical(&explicit_chain(&env.points("m")), &disk));
}

/// A DR layer whose header was cut short or had a bit flipped (a failing disk, a stray
/// write): a run over it fails naming the damage, within the limit, and publishes nothing;
/// the older points stay exact and can still be failed over to; once the layer is put
/// back, the next run is exact.
#[test]
fn damaged_dr_layer_headers_fail_clearly_and_lose_nothing() {
    let env = Env::bounded(BIN, LIMIT);
    let disk = env.path("src/d.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x5, 0, 4)]);
    env.ok(&["vm", "create", "d", "--disk", &disk, "--format", "qcow2", "--memory", "64"]);
    env.ok(&["job", "create", "j", "--vm", "d", "--target-host", "local", "--target-dir", &env.path("dr")]);
    let mut refs = Vec::new();
    for i in 0..2u8 {
        qemu_io(&disk, "qcow2", &[format!("write -P {:#x} {}M 64k", 0x10 + i, 8 + i)]);
        env.ok(&["job", "run", "j"]);
        let r = env.path(&format!("ref{i}.qcow2"));
        qemu_img(&["convert", "-O", "qcow2", &disk, &r]);
        refs.push(r);
    }
    let newest = env.latest_disk("d", 0);
    let saved = env.path("saved-layer.qcow2");
    std::fs::copy(&newest, &saved).unwrap();
    let damages: [(&str, Damage); 3] = [
        ("truncated header", |p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(40).unwrap()),
        ("flipped magic", |p| flip(p, 0, 0x40)),
        ("flipped cluster_bits", |p| flip(p, 23, 0x20)),
    ];
    for (what, damage) in damages {
        damage(&newest);
        qemu_io(&disk, "qcow2", &["write -P 0x33 12M 64k".into()]);
        let ids: Vec<i64> = env.points("d").iter().map(|p| p["id"].as_i64().unwrap()).collect();
        let r = env.run_within(LIMIT, &["job", "run", "j"]);
        assert_eq!(r.code, Some(1), "{what}: a run over a damaged layer must fail:\n{}{}", r.stdout, r.stderr);
        assert!(
            r.stdout.contains(&newest) || r.stderr.contains(&newest),
            "{what}: the error names the layer:\n{}{}",
            r.stdout,
            r.stderr
        );
        let now: Vec<i64> = env.points("d").iter().map(|p| p["id"].as_i64().unwrap()).collect();
        assert_eq!(now, ids, "{what}: a point was published over a damaged layer");
        let first = env.points("d")[0]["disks"][0]["path"].as_str().unwrap().to_owned();
        assert!(identical(&first, &refs[0]), "{what}: the older point changed");
        assert!(env.processes().is_empty(), "{what}: {:?}", env.processes());
        // The older point is still a way back.
        let older = ids[0].to_string();
        env.ok(&["failover", "d", "--point", &older]);
        env.ok(&["failover", "undo", "d"]);
        std::fs::copy(&saved, &newest).unwrap();
    }
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("d", 0), &disk), "the run after the repair is exact");
}

/// Something done to a layer file.
type Damage = fn(&str);

/// XORs one byte of a file.
fn flip(path: &str, offset: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset] ^= mask;
    std::fs::write(path, bytes).unwrap();
}
