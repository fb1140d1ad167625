//! User story: protect the VMs people already run under libvirt, as they are. A real
//! libvirtd from Debian's packages runs TCG domains of the test guest; standby imports
//! one, replicates it through libvirt's checkpoints and pull-mode backups (running and
//! stopped), fails over to a replica domain defined with the job's network map, and
//! undoes it; `virsh` shows exactly what is expected after each step.

use std::time::Duration;

use serde_json::Value;
use standby_testkit::libvirt::{self, checkpoints, domains, open_for_qemu, try_virsh, virsh, Domain};
use standby_testkit::{identical, ledger_append, make_disk, read_image, tpm_resets, with_ledger, Bridge, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const LEDGER_START: u64 = 4096;
const LEDGER_MAX: u64 = 3000;

/// Names unique to this test process: one libvirtd serves the whole suite.
fn unique(what: &str) -> String {
    format!("{what}{}", std::process::id() % 100_000)
}

/// libvirtd running (started here on a fresh machine: `host add` needs it to answer), the
/// test's directory open to its QEMU user, and the host `kvm` added.
fn setup(env: &Env) {
    libvirt::ensure_daemon();
    open_for_qemu(env.root());
    env.ok(&["host", "add", "kvm", "--libvirt", libvirt::URI]);
}

/// A domain `tag<pid>` of the test guest writing its ledger to a new 64 MiB qcow2 disk
/// holding `patterns` (not imported): the domain, its name, its disk, and the disk's
/// content before the guest wrote.
fn ledger_domain(
    env: &Env,
    tag: &str,
    patterns: &[(u8, u64, u64)],
    nics: &[(&str, &str, &str)],
) -> (Domain, String, String, Vec<u8>) {
    ledger_domain_booting(env, tag, patterns, nics, "")
}

/// The same, with `extra` on the guest's kernel command line.
fn ledger_domain_booting(
    env: &Env,
    tag: &str,
    patterns: &[(u8, u64, u64)],
    nics: &[(&str, &str, &str)],
    extra: &str,
) -> (Domain, String, String, Vec<u8>) {
    let name = unique(tag);
    let disk = env.path(&format!("src/{tag}.qcow2"));
    make_disk(&disk, "qcow2", 64, patterns);
    let base = read_image(&disk);
    let append = format!("{} {extra}", ledger_append(LEDGER_START, LEDGER_MAX, 20_000));
    let dom = Domain::define(&name, &disk, &append, &env.path(&format!("src/{tag}.console.log")), nics);
    (dom, name, disk, base)
}

/// The source disk before the guest wrote, plus ledger records 1..=k, as raw.
fn reference(env: &Env, base: &[u8], k: u64, name: &str) -> String {
    let path = env.path(name);
    std::fs::write(&path, with_ledger(base, LEDGER_START, k)).unwrap();
    path
}

/// Runs the job, and checks the new point against the ledger the guest acknowledged.
fn run_and_check(env: &Env, job: &str, vm: &str, base: &[u8], method: &str, tag: &str) -> Value {
    let acked = Ledger::acknowledged(&env.console(vm));
    env.ok(&["job", "run", job]);
    let points = env.json(&["replica", "points", vm, "--job", job]);
    let rp = points.as_array().and_then(|p| p.last()).unwrap().clone();
    assert_eq!(rp["method"], method, "{tag}: {rp}");
    let path = rp["disks"][0]["path"].as_str().unwrap();
    let k = (Ledger { start_block: LEDGER_START }).records_in(&read_image(path), LEDGER_MAX).unwrap();
    assert!(k >= acked, "{tag}: the point holds records 1..={k}, the guest had {acked} acknowledged");
    let r = reference(env, base, k, &format!("{tag}.raw"));
    assert!(identical(path, &r), "{tag}: the point differs from the disk at its instant");
    rp
}

#[test]
fn a_libvirt_domain_is_replicated_failed_over_on_the_mapped_bridge_and_undone() {
    let env = Env::new(BIN);
    setup(&env);
    let (br_prod, br_dr) = (Bridge::new(&unique("sbp")), Bridge::new(&unique("sbd")));
    let mac = "52:54:00:5b:00:01";
    let (dom, name, disk, base) =
        ledger_domain(&env, "lvweb", &[(0xab, 0, 8), (0xcd, 40, 4)], &[("bridge", &br_prod.0, mac)]);
    let defined = virsh(&["dumpxml", "--inactive", &name]);

    // Imported as it is: libvirt's definition does not change.
    let v = env.json(&["vm", "import", &name, "--host", "kvm"]);
    assert_eq!((v["driver"].as_str(), v["disks"][0]["path"].as_str()), (Some("libvirt"), Some(disk.as_str())));
    assert_eq!(virsh(&["dumpxml", "--inactive", &name]), defined);
    assert!(env.ok(&["vm", "list"]).lines().any(|l| l.starts_with(&name) && l.trim_end().ends_with("libvirt")));

    // A NIC on a bridge the map does not name is refused at job creation.
    let before = env.snapshot();
    let dr = env.path("dr");
    let job = ["job", "create", "j", "--vm", &name, "--target-host", "kvm", "--target-dir", &dr];
    let err = env.fails(&job);
    assert!(err.contains(&format!("--network-map bridge:{}=DEST", br_prod.0)), "{err}");
    assert_eq!(env.snapshot(), before, "a refused job changes nothing");
    let map = format!("bridge:{}=bridge:{}", br_prod.0, br_dr.0);
    let mut with_map = job.to_vec();
    with_map.extend(["--network-map", &map]);
    env.ok(&with_map);

    // Started through libvirt: the domain runs in virsh.
    env.ok(&["vm", "start", &name]);
    assert_eq!(dom.state(), "running");
    env.wait_console(&name, Duration::from_secs(90), "10 ledger writes", |c| Ledger::acknowledged(c) >= 10);

    run_and_check(&env, "j", &name, &base, "full", "run1");
    assert_eq!(checkpoints(&name).len(), 1, "the first point's checkpoint");
    env.wait_console(&name, Duration::from_secs(60), "more writes", |c| Ledger::acknowledged(c) >= 40);
    let rp2 = run_and_check(&env, "j", &name, &base, "cbt", "run2");
    // Incremental from libvirt's checkpoint: the ledger's clusters, not the disk.
    assert!(rp2["bytes_transferred"].as_u64().unwrap() < 4 << 20, "{rp2}");
    let cps = checkpoints(&name);
    assert_eq!(cps.len(), 1, "only the newest point's checkpoint stays: {cps:?}");
    assert!(cps[0].ends_with("-2"), "{cps:?}");

    // Stopped: read offline from its image, with the same bitmaps.
    env.ok(&["vm", "stop", &name]);
    assert_eq!(dom.state(), "shut off");
    env.ok(&["job", "run", "j"]);
    let rp3 = env.points(&name).last().unwrap().clone();
    assert_eq!(rp3["method"], "cbt", "{rp3}");
    assert!(identical(rp3["disks"][0]["path"].as_str().unwrap(), &disk), "the stopped domain's point is its disk");
    assert!(checkpoints(&name)[0].ends_with("-3"), "the offline point's checkpoint is recorded in libvirt");

    // Failover: a replica domain on the DR bridge, with the MAC kept and a new UUID. The
    // source's autostart goes off, so that a reboot of its host does not start it.
    virsh(&["autostart", &name]);
    let out = env.ok(&["failover", &name]);
    assert!(out.contains("autostart of") && out.contains("switched off"), "{out}");
    assert!(!dom.autostart(), "the source does not start at its host's boot");
    let replica = format!("{name}_replica");
    assert_eq!(domains(&name), [name.clone(), replica.clone()]);
    let xml = virsh(&["dumpxml", &replica]);
    assert!(xml.contains(&format!("<source bridge='{}'/>", br_dr.0)), "mapped bridge: {xml}");
    assert!(!xml.contains(&br_prod.0), "nothing on the production bridge: {xml}");
    assert!(xml.contains(&format!("<mac address='{mac}'/>")), "MAC kept: {xml}");
    let uuid = |x: &str| x.split("<uuid>").nth(1).and_then(|r| r.split("</uuid>").next()).unwrap_or("").to_owned();
    assert_ne!(uuid(&xml), uuid(&defined), "a replica has a UUID of its own");
    assert!(xml.contains(&format!("{dr}/{name}/failover-d0.qcow2")), "{xml}");
    assert!(xml.contains(&format!("{dr}/{name}/000003-d0.qcow2")), "the chain is in the XML: {xml}");
    assert_eq!(try_virsh(&["domstate", &replica]).1.trim(), "running");
    // The replica's guest continues from the point: its ledger goes on.
    env.wait_console(&replica, Duration::from_secs(90), "the replica's guest writing", |c| {
        Ledger::acknowledged(c) >= 5
    });
    // Never two writers: the source is refused while its replica runs.
    let err = env.fails(&["vm", "start", &name]);
    assert!(err.contains(&format!("its counterpart {replica} is running")), "{err}");
    assert_eq!(dom.state(), "shut off");

    // Undo: the replica domain is gone from libvirt; the source is the VM of record.
    env.ok(&["failover", "undo", &name]);
    assert!(dom.autostart(), "undo switches the source's autostart back on");
    assert!(env.ok(&["history", &name]).contains("switched back on"));
    assert_eq!(domains(&name), std::slice::from_ref(&name));
    assert_eq!(virsh(&["dumpxml", "--inactive", &name]), defined, "the source's definition never changed");
    // The next run is still incremental from the same checkpoint.
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("(cbt,"), "{out}");
    assert!(identical(&env.latest_disk(&name, 0), &disk));
    assert!(checkpoints(&name)[0].ends_with("-4"), "{:?}", checkpoints(&name));

    // The job's removal takes its checkpoints out of the domain.
    env.ok(&["job", "delete", "j", "--delete-points", "--yes"]);
    assert_eq!(checkpoints(&name), Vec::<String>::new());
}

#[test]
fn two_jobs_protecting_one_domain_keep_their_own_incremental_chains() {
    let env = Env::new(BIN);
    setup(&env);
    let (_dom, name, _disk, base) = ledger_domain(&env, "lvtwo", &[(0x11, 0, 4)], &[]);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    for (job, dir) in [("a", "dr/a"), ("b", "dr/b")] {
        std::fs::create_dir_all(env.path(dir)).unwrap();
        env.ok(&["job", "create", job, "--vm", &name, "--target-host", "kvm", "--target-dir", &env.path(dir)]);
    }
    env.ok(&["vm", "start", &name]);
    env.wait_console(&name, Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    for round in 0..3 {
        for job in ["a", "b"] {
            let method = if round == 0 { "full" } else { "cbt" };
            run_and_check(&env, job, &name, &base, method, &format!("r{round}{job}"));
            // Each job keeps exactly its own newest checkpoint.
            assert_eq!(
                checkpoints(&name).len(),
                if round == 0 && job == "a" { 1 } else { 2 },
                "{:?}",
                checkpoints(&name)
            );
        }
        env.wait_console(&name, Duration::from_secs(60), "more writes", |c| {
            Ledger::acknowledged(c) >= 10 + 10 * (round + 1)
        });
    }
}

#[test]
fn a_run_killed_between_checkpoint_and_publish_is_followed_by_an_exact_incremental() {
    let env = Env::new(BIN);
    setup(&env);
    let (_dom, name, _disk, base) = ledger_domain(&env, "lvkill", &[(0x22, 8, 4)], &[]);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    env.ok(&["job", "create", "j", "--vm", &name, "--target-host", "kvm", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", &name]);
    env.wait_console(&name, Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    run_and_check(&env, "j", &name, &base, "full", "first");
    let first = checkpoints(&name);

    // Killed with libvirt's backup job running and the new checkpoint made.
    let r = env.run_killed_at("replicate.after-checkpoint", &["job", "run", "j"]);
    assert_ne!(r.code, Some(0));
    assert_eq!(checkpoints(&name).len(), 2, "the killed run's checkpoint is there: {:?}", checkpoints(&name));
    assert!(try_virsh(&["domjobinfo", &name]).1.contains("Backup"), "its backup job still runs");
    assert_eq!(env.points(&name).len(), 1, "no point from the killed run");

    // The next command recovers: the backup ends, the killed run's checkpoint goes, and
    // the run is incremental from the first point's checkpoint and exact.
    run_and_check(&env, "j", &name, &base, "cbt", "after-kill");
    assert!(!try_virsh(&["domjobinfo", &name]).1.contains("Backup"), "no backup job left");
    let now = checkpoints(&name);
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first);
    assert!(now[0].ends_with("-3"), "the killed run's sequence is not reused: {now:?}");
}

#[test]
fn bad_libvirt_input_is_refused_with_what_to_do_and_changes_nothing() {
    let env = Env::new(BIN);
    // A daemon that does not answer.
    let err =
        env.fails(&["host", "add", "gone", "--libvirt", "qemu:///system?socket=/tmp/standby-no-such-libvirt-sock"]);
    assert!(err.contains("is libvirtd running"), "{err}");
    let err = env.fails(&["host", "add", "far", "--libvirt", "qemu+ssh://elsewhere/system"]);
    assert!(err.contains("standby agent"), "{err}");
    setup(&env);
    let before = env.snapshot();
    let err = env.fails(&["vm", "import", "no-such-domain-standby", "--host", "kvm"]);
    assert!(err.contains("no-such-domain-standby") && err.contains("virsh list --all"), "{err}");
    let err = env.fails(&["vm", "import", "x", "--host", "local"]);
    assert!(err.contains("not driven by libvirt"), "{err}");

    // A domain with a network disk: refused, naming the disk.
    let name = unique("lvnet");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
         <disk type='network' device='disk'><driver name='qemu' type='raw'/>\
         <source protocol='nbd' name='x'><host name='127.0.0.1' port='10809'/></source><target dev='vda' bus='virtio'/></disk>\
         </devices></domain>"
    );
    let file = env.path("net.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", &file]);
    let err = env.fails(&["vm", "import", &name, "--host", "kvm"]);
    let _ = try_virsh(&["undefine", &name]);
    assert!(err.contains("disk vda is a network disk"), "{err}");

    // The host's own TPM: no replica could have it.
    let name = unique("lvtpm");
    let disk = env.path("src/t.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>\
         <target dev='vda' bus='virtio'/></disk><tpm model='tpm-tis'><backend type='passthrough'>\
         <device path='/dev/tpm0'/></backend></tpm></devices></domain>"
    );
    let file = env.path("tpm.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", &file]);
    let defined = env.snapshot();
    let err = env.fails(&["vm", "import", &name, "--host", "kvm"]);
    let _ = try_virsh(&["undefine", &name]);
    assert!(err.contains("the host's own") && err.contains("emulated"), "{err}");
    assert_eq!(env.snapshot(), defined, "a refused import changes nothing");

    // A libvirt domain's replicas need a libvirt DR host.
    let name = unique("lvloc");
    let disk = env.path("src/l.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    let _dom = Domain::define(&name, &disk, "console=ttyS0", &env.path("src/console.log"), &[]);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    let with_vm = env.snapshot();
    let err =
        env.fails(&["job", "create", "j", "--vm", &name, "--target-host", "local", "--target-dir", &env.path("dr")]);
    assert!(err.contains("--libvirt"), "{err}");
    let err = env.fails(&[
        "job",
        "create",
        "j",
        "--vm",
        &name,
        "--target-host",
        "kvm",
        "--target-dir",
        &env.path("dr"),
        "--network-map",
        "nonsense",
    ]);
    assert!(err.contains("SRC=DST"), "{err}");
    assert_eq!(env.snapshot(), with_vm, "refused jobs change nothing");
    assert_ne!(before, with_vm);
}

#[test]
fn a_planned_failover_of_a_libvirt_domain_fails_back_to_the_original_with_switch_and_commit() {
    let env = Env::new(BIN);
    setup(&env);
    let (dom, name, disk, _base) = ledger_domain(&env, "lvback", &[(0x33, 0, 4)], &[]);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    env.ok(&["job", "create", "j", "--vm", &name, "--target-host", "kvm", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", &name]);
    env.wait_console(&name, Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    env.ok(&["job", "run", "j"]);
    // Planned: a run while it serves, the guest shut down through libvirt, a final run,
    // the stopped source compared block by block with the newest point, then failover.
    virsh(&["autostart", &name]);
    let out = env.ok(&["failover", "planned", &name, "--shutdown-timeout", "60"]);
    assert!(!dom.autostart(), "autostart off while the replica serves: {out}");
    assert!(out.contains("ok"), "{out}");
    assert_eq!(dom.state(), "shut off", "the source was shut down");
    assert!(identical(&env.latest_disk(&name, 0), &disk), "the final point is the stopped source");
    let replica = format!("{name}_replica");
    // The replica's guest writes its ledger anew, from record 1.
    env.wait_console(&replica, Duration::from_secs(90), "the replica writing", |c| Ledger::acknowledged(c) >= 20);

    // A new VM on the host that holds the domain would take over its name (and its TPM's
    // state): refused, changing nothing (but the running replica's own overlay).
    let settled = |s: String| s.lines().filter(|l| !l.contains("/failover-d0.qcow2")).collect::<Vec<_>>().join("\n");
    let state = settled(env.snapshot());
    let new = format!("new:kvm:{}", env.path("newsite"));
    let r = env.run(&["failback", &name, "--to", &new]);
    let said = format!("{}{}", r.stdout, r.stderr);
    assert!(r.code != Some(0) && said.contains("already holds a VM definition named"), "{said}");
    assert_eq!(settled(env.snapshot()), state, "a refused failback changes nothing");

    // Phase 1 while the replica serves: the original's disk is not written.
    let before = read_image(&disk);
    let out = env.ok(&["failback", &name, "--to", "original", "--switch", "manual"]);
    assert!(out.contains("ready to switch"), "{out}");
    assert_eq!(read_image(&disk), before, "phase 1 must not write the original's disk");
    assert_eq!(try_virsh(&["domstate", &replica]).1.trim(), "running", "the replica serves during phase 1");
    let top = env.json(&["vm", "show", &replica])["disks"][0]["path"].as_str().unwrap().to_owned();
    assert!(top.ends_with("failover-d0.g1.qcow2"), "the protective point moved the replica to a new generation: {top}");
    assert!(virsh(&["dumpxml", &replica]).contains(&top), "libvirt's replica writes to it");

    // The switch: the replica goes down, its final state lands in the original's disk.
    let out = env.ok(&["failback", "switch", &name]);
    assert!(out.contains("switched"), "{out}");
    let acked = Ledger::acknowledged(&env.console(&replica));
    assert_eq!(try_virsh(&["domstate", &replica]).1.trim(), "shut off");
    assert!(identical(&disk, &top), "the original holds the replica's final state");
    let k = (Ledger { start_block: LEDGER_START }).records_in(&read_image(&disk), LEDGER_MAX).unwrap();
    assert!(k >= acked, "the original holds records 1..={k}, the replica had acknowledged {acked}");
    assert_eq!(dom.state(), "shut off");

    // The original runs again through libvirt; commit takes the replica domain away.
    env.ok(&["vm", "start", &name]);
    assert_eq!(dom.state(), "running");
    let out = env.ok(&["failback", "commit", &name]);
    assert!(out.contains("committed"), "{out}");
    assert!(dom.autostart(), "the failback's commit switches the source's autostart back on");
    assert_eq!(domains(&name), std::slice::from_ref(&name), "the replica domain is undefined");
    // Replication resumes incrementally from the switch: its bitmap is a checkpoint now.
    env.ok(&["vm", "stop", &name]);
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("(cbt,"), "{out}");
    assert!(identical(&env.latest_disk(&name, 0), &disk), "the point after the failback is the original's disk");
    assert_eq!(checkpoints(&name).len(), 1, "{:?}", checkpoints(&name));
}

#[test]
fn libvirt_domains_with_an_agent_get_application_points_and_a_hung_agent_a_thawed_crash_point() {
    let env = Env::new(BIN);
    setup(&env);
    let (db, name, _disk, base) = ledger_domain(&env, "lvdb", &[(0x44, 0, 4)], &[]);
    // Every freeze of this one waits 6 s in the guest before it freezes.
    let (slow, slow_name, _d, slow_base) =
        ledger_domain_booting(&env, "lvslow", &[(0x45, 0, 4)], &[], "standby.agent_hang=6");
    for (n, dir, extra) in [(&name, "dr/db", None), (&slow_name, "dr/slow", Some("2s"))] {
        env.ok(&["vm", "import", n, "--host", "kvm"]);
        std::fs::create_dir_all(env.path(dir)).unwrap();
        let mut args = vec!["job", "create", if extra.is_some() { "slow" } else { "j" }, "--vm", n];
        let dir = env.path(dir);
        args.extend(["--target-host", "kvm", "--target-dir", &dir]);
        if let Some(t) = extra {
            args.extend(["--freeze-timeout", t]);
        }
        env.ok(&args);
        env.ok(&["vm", "start", n]);
    }
    for n in [&name, &slow_name] {
        env.wait_console(n, Duration::from_secs(90), "the agent and ledger writes", |c| {
            c.contains("STANDBY-GUEST agent on") && Ledger::acknowledged(c) >= 10
        });
    }

    let rp = run_and_check(&env, "j", &name, &base, "full", "lv-first");
    assert_eq!(rp["consistency"], "application", "{rp}");
    let c = env.console(&name);
    assert!(c.find("fsfreeze freeze").unwrap() < c.find("fsfreeze thaw").unwrap(), "{c}");
    assert_eq!(db.freeze_status(), "thawed");

    // Killed with the guest frozen: libvirt's domain stays frozen until recovery.
    env.run_killed_at("replicate.while-frozen", &["job", "run", "j"]);
    assert_eq!(db.freeze_status(), "frozen");
    let out = env.ok(&["recover"]);
    assert!(out.contains("thawed 1 filesystem(s)"), "{out}");
    assert_eq!(db.freeze_status(), "thawed");
    let rp = run_and_check(&env, "j", &name, &base, "cbt", "lv-after-kill");
    assert_eq!(rp["consistency"], "application", "{rp}");
    assert_eq!(checkpoints(&name).len(), 1, "{:?}", checkpoints(&name));

    // The hung agent: libvirt gives up after the job's 2 s, the point is crash-consistent,
    // and the run thaws the late freeze.
    let rp = run_and_check(&env, "slow", &slow_name, &slow_base, "full", "lv-hung");
    assert_eq!(rp["consistency"], "crash", "{rp}");
    let c = env.console(&slow_name);
    assert_eq!((c.matches("fsfreeze freeze").count(), c.matches("fsfreeze thaw").count()), (1, 1), "{c}");
    assert_eq!(slow.freeze_status(), "thawed");
    let (ok, list) = try_virsh(&["list", "--all", "--name"]);
    assert!(ok && list.contains(&name) && list.contains(&slow_name), "{list}");
}

#[test]
fn a_uefi_domains_variables_and_tpm_state_go_with_its_points_to_its_replica_domain_and_back() {
    // As Windows 11 needs it: UEFI and a TPM 2.0 (the guest counts its TPM's resets, a
    // persistent counter each boot raises, so each boot shows which state its TPM has).
    let env = Env::new(BIN);
    setup(&env);
    let name = unique("lvefi");
    let disk = env.path("src/efi.qcow2");
    make_disk(&disk, "qcow2", 32, &[(0x61, 0, 2)]);
    let vars = format!("/var/lib/libvirt/qemu/nvram/{name}_VARS.fd");
    let _ = std::fs::remove_file(&vars);
    let append = ledger_append(LEDGER_START, LEDGER_MAX, 20_000);
    let dom = Domain::define_booting(&name, &disk, &append, &env.path("src/efi.console.log"), &[], Some(&vars), true);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    let shown = env.json(&["vm", "show", &name]);
    assert_eq!(shown["firmware"]["vars"], vars.as_str(), "its store, as libvirt names it");
    assert_eq!(shown["tpm"]["model"], "tpm-tis", "{shown}");
    env.ok(&["job", "create", "j", "--vm", &name, "--target-host", "kvm", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", &name]);
    env.wait_console(&name, Duration::from_secs(120), "a UEFI boot and ledger writes", |c| {
        c.contains("STANDBY-GUEST uefi boots=0") && !tpm_resets(c).is_empty() && Ledger::acknowledged(c) >= 10
    });
    let first = tpm_resets(&env.console(&name))[0];
    env.ok(&["job", "run", "j"]);
    let point = env.points(&name).last().unwrap().clone();
    let running = point["uefi_vars"].as_str().unwrap().to_owned();
    assert_eq!(
        standby_testkit::file_digest(&running),
        standby_testkit::file_digest(&vars),
        "running: the domain's store"
    );
    let tpm_running = point["tpm_state"].as_str().expect("a running TPM's state is kept").to_owned();
    assert!(std::fs::metadata(&tpm_running).unwrap().len() > 1000, "{tpm_running}: swtpm's state, whole");

    // Stopped through libvirt: byte for byte the domain's store and TPM state.
    env.ok(&["vm", "shutdown", &name, "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    let point = env.points(&name).last().unwrap().clone();
    let stopped = point["uefi_vars"].as_str().unwrap().to_owned();
    assert_eq!(
        standby_testkit::file_digest(&stopped),
        standby_testkit::file_digest(&vars),
        "stopped: the domain's store"
    );
    let source_tpm = libvirt::tpm_state_file(&name);
    assert_eq!(
        standby_testkit::file_digest(point["tpm_state"].as_str().unwrap()),
        standby_testkit::file_digest(&source_tpm),
        "stopped: the domain's TPM state"
    );

    // The replica domain gets its own copies, boots with the point's variables and TPM.
    let source_tpm_now = standby_testkit::file_digest(&source_tpm);
    env.ok(&["failover", &name]);
    let replica = format!("{name}_replica");
    let xml = virsh(&["dumpxml", "--inactive", &replica]);
    assert!(xml.contains(&format!("<nvram>{}/", env.path("dr"))), "its own store in the DR directory: {xml}");
    assert!(!xml.contains(&vars), "never the source's store: {xml}");
    assert!(xml.contains("<tpm model='tpm-tis'>"), "{xml}");
    let replica_tpm = libvirt::tpm_state_file(&replica);
    env.wait_console(&replica, Duration::from_secs(120), "the replica's UEFI boot", |c| {
        c.contains("STANDBY-GUEST uefi boots=1") && !tpm_resets(c).is_empty()
    });
    assert_eq!(standby_testkit::file_digest(&source_tpm), source_tpm_now, "its own TPM: the source's is untouched");
    assert_eq!(
        tpm_resets(&env.console(&replica)),
        [first + 1],
        "the replica's TPM goes on from the point's state (a new TPM would count from the start)"
    );

    // Failback to the original: the domain starts through libvirt on the replica's
    // variables and TPM state.
    env.ok(&["failback", &name, "--to", "original", "--switch", "manual"]);
    env.ok(&["failback", "switch", &name]);
    let carried = standby_testkit::file_digest(&source_tpm);
    assert_eq!(carried, standby_testkit::file_digest(&replica_tpm), "the source holds the replica's final TPM state");
    env.ok(&["vm", "start", &name]);
    assert_eq!(dom.state(), "running");
    env.wait_console(&name, Duration::from_secs(120), "the source's UEFI boot", |c| {
        c.contains("STANDBY-GUEST uefi boots=2") && !tpm_resets(c).is_empty()
    });
    assert_eq!(tpm_resets(&env.console(&name)), [first + 2], "the source's TPM goes on from the replica's");
    env.ok(&["failback", "commit", &name]);
    assert_eq!(domains(&name), std::slice::from_ref(&name), "the replica domain is undefined");
    let kept = env.points(&name).last().unwrap()["tpm_state"].as_str().unwrap().to_owned();
    assert_eq!(standby_testkit::file_digest(&kept), carried, "commit keeps the replica's final TPM state");
    assert!(
        !std::path::Path::new(&replica_tpm).parent().unwrap().exists(),
        "the replica's TPM state went with its domain: {replica_tpm}"
    );
    let _ = std::fs::remove_file(&vars);
}

#[test]
fn a_domain_changed_behind_standbys_back_is_refused_at_its_next_run_saying_what_changed() {
    let env = Env::new(BIN);
    setup(&env);
    let name = unique("lvdrift");
    let disk = env.path("src/drift.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x33, 0, 1)]);
    let _dom = Domain::define(&name, &disk, "console=ttyS0", &env.path("src/drift.console.log"), &[]);
    env.ok(&["vm", "import", &name, "--host", "kvm"]);
    env.ok(&["job", "create", "j", "--vm", &name, "--target-host", "kvm", "--target-dir", &env.path("dr")]);
    env.ok(&["job", "run", "j"]);

    // A disk attached in libvirt after the import: a point without it would lose it at failover.
    let extra = env.path("src/drift-b.qcow2");
    make_disk(&extra, "qcow2", 16, &[]);
    open_for_qemu(env.root());
    virsh(&["attach-disk", &name, &extra, "vdb", "--config", "--subdriver", "qcow2"]);
    let refused = |what: &str| {
        let points = env.points(&name).len();
        let r = env.run(&["job", "run", "j"]);
        let said = format!("{}{}", r.stdout, r.stderr);
        assert!(r.code != Some(0), "{what}: the run must fail: {said}");
        assert!(said.contains(&format!("{what} changed since `vm import`")) && said.contains("vm import"), "{said}");
        assert_eq!(env.points(&name).len(), points, "{what}: no point was made");
    };
    refused("its disks");
    virsh(&["detach-disk", &name, "vdb", "--config"]);
    env.ok(&["job", "run", "j"]);

    // A TPM added: a replica without its state would not open what the guest sealed.
    let xml = virsh(&["dumpxml", "--inactive", &name])
        .replace("</devices>", "<tpm model='tpm-tis'><backend type='emulator' version='2.0'/></tpm></devices>");
    let file = env.path("drift.xml");
    std::fs::write(&file, xml).unwrap();
    virsh(&["define", &file]);
    refused("its TPM");
    assert_eq!(env.points(&name).len(), 2);
}
