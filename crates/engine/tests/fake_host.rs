//! The engine alone, on an in-memory host: replication's choice of method, failover and
//! undo, permanent failover, with the bytes of every restore point checked. Each test
//! runs in milliseconds; the real-QEMU suite (`crates/cli/tests`) proves the same paths
//! on real images and guests.

mod site;

use site::{Site, DISK, SIZE};
use standby_engine::{Despite, PointChoice};
use standby_fake::CLUSTER;

#[test]
fn replication_picks_full_then_cbt_then_digest_when_tracking_is_lost() {
    let site = Site::protected();
    let fake = &site.fake;
    let first = site.run_ok("full");
    assert!(fake.read_image(&first) == fake.read_image(DISK), "contents differ");

    // Two clusters written by a running guest: CBT sends those and nothing else.
    site.engine.vm_start("web", false).unwrap();
    fake.guest_write("web", 0, CLUSTER + 10, &[0xcd; 1000]);
    fake.guest_write("web", 0, 3 * CLUSTER, &[0xce; 10]);
    let out = site.run();
    let rp = out.restore_point.unwrap();
    assert_eq!(rp.method, "cbt");
    assert_eq!(rp.bytes_transferred, 2 * CLUSTER, "only the changed clusters");
    assert!(fake.read_image(&rp.disks[0].path) == fake.read_image(DISK), "contents differ");

    // The bitmap vanishes behind standby's back: a digest comparison finds the change.
    for b in fake.bitmap_names(DISK) {
        fake.drop_bitmap(DISK, &b);
    }
    fake.guest_write("web", 0, 5 * CLUSTER, &[0x01; 5]);
    let out = site.run();
    let rp = out.restore_point.unwrap();
    assert_eq!(rp.method, "digest");
    assert!(out.notes.iter().any(|n| n.contains("disk 0") && n.contains("gone")), "{:?}", out.notes);
    assert!(fake.read_image(&rp.disks[0].path) == fake.read_image(DISK), "contents differ");

    // Tracking is back: the next run is CBT again, here of an unchanged disk.
    let out = site.run();
    assert_eq!(out.restore_point.as_ref().unwrap().method, "cbt");
    assert_eq!(out.restore_point.unwrap().bytes_transferred, 0);

    // A VM that crashed may have written what its bitmap never saw.
    fake.guest_write("web", 0, 7 * CLUSTER, &[0x02; 5]);
    fake.crash_vm("web");
    let out = site.run();
    let rp = out.restore_point.unwrap();
    assert_eq!(rp.method, "digest");
    assert!(out.notes.iter().any(|n| n.contains("not saved cleanly")), "{:?}", out.notes);
    assert!(fake.read_image(&rp.disks[0].path) == fake.read_image(DISK), "contents differ");
    // Stopped and cleanly tracked: CBT through the closed image.
    fake.write_image(DISK, 9 * CLUSTER, &[0x03; 5]);
    let out = site.run();
    let rp = out.restore_point.unwrap();
    assert_eq!((rp.method.as_str(), rp.bytes_transferred), ("cbt", CLUSTER), "{:?}", out.notes);
    assert_eq!(site.engine.replica_points("web", None).unwrap().len(), 3, "retention keeps 3");
    for (path, data) in site.contents() {
        assert_eq!(data.len() as u64, SIZE, "{path}");
    }
    assert!(fake.read_image(&site.run_ok("cbt")) == fake.read_image(DISK), "contents differ");
    assert!(fake.exports().is_empty(), "no export outlives a run: {:?}", fake.exports());
}

#[test]
fn failover_runs_a_restore_point_and_undo_leaves_it_as_it_was() {
    let site = Site::protected();
    let fake = &site.fake;
    let first = site.run_ok("full");
    fake.write_image(DISK, 0, &[0x11; 100]);
    site.run_ok("cbt");
    let before = site.contents();
    let first_id = site.engine.replica_points("web", None).unwrap()[0].id;

    let out = site.engine.failover(&["web".into()], None, PointChoice::Id(first_id), Despite::default());
    assert!(out[0].ok, "{}", out[0].message);
    assert_eq!(site.state(), "failover");
    let chains = fake.vm_chains("web_replica").expect("the replica VM runs");
    assert!(fake.read_chain(&chains[0]) == before[0].1, "it runs the chosen restore point");
    fake.guest_write("web_replica", 0, 0, &[0x99; 4096]);
    assert!(fake.read_chain(&chains[0]) != before[0].1);
    assert!(site.contents() == before, "the replica's writes go to its overlay only");

    let out = site.engine.failover_undo(&["web".into()], None);
    assert!(out[0].ok, "{}", out[0].message);
    assert_eq!(site.state(), "ready");
    assert!(fake.vm_chains("web_replica").is_none(), "the replica VM is off");
    assert!(site.contents() == before, "undo leaves every restore point as it was");
    assert!(!fake.files().iter().any(|f| f.contains("failover-")), "overlays are gone: {:?}", fake.files());
    assert!(fake.read_image(&first) == before[0].1, "contents differ");
    // Replication goes on from where it was.
    assert!(fake.read_image(&site.run_ok("cbt")) == fake.read_image(DISK), "contents differ");
}

#[test]
fn impossible_transitions_are_refused_and_change_nothing() {
    let site = Site::protected();
    site.run_ok("full");
    let out = site.engine.failover_undo(&["web".into()], None);
    assert!(!out[0].ok && out[0].message.contains("not in failover"), "{}", out[0].message);
    let out = site.engine.failover_permanent(&["web".into()], None);
    assert!(!out[0].ok, "{}", out[0].message);
    assert_eq!(site.state(), "ready");
    let out = site.engine.failover(
        &["web".into()],
        None,
        PointChoice::Id(standby_model::PointId(999_999)),
        Despite::default(),
    );
    assert!(!out[0].ok && out[0].message.contains("999999"), "{}", out[0].message);
    assert_eq!(site.state(), "ready");
    assert!(site.fake.vm_chains("web_replica").is_none());
}

#[test]
fn permanent_failover_makes_the_replica_independent_of_the_chain() {
    let site = Site::protected();
    let fake = &site.fake;
    site.run_ok("full");
    let out = site.engine.failover(&["web".into()], None, PointChoice::Latest, Despite::default());
    assert!(out[0].ok, "{}", out[0].message);
    fake.guest_write("web_replica", 0, 2 * CLUSTER, &[0x77; 10]);
    let expect = fake.read_chain(&fake.vm_chains("web_replica").unwrap()[0]);
    let out = site.engine.failover_permanent(&["web".into()], None);
    assert!(out[0].ok, "{}", out[0].message);
    assert_eq!(site.state(), "permanent");
    let chains = fake.vm_chains("web_replica").expect("the replica VM still runs");
    assert_eq!(chains[0].layers.len(), 1, "one standalone disk: {:?}", chains[0]);
    assert!(fake.read_chain(&chains[0]) == expect, "with everything the guest wrote");
}

#[test]
fn bad_requests_are_typed_errors_that_name_what_is_wrong_and_change_nothing() {
    use standby_engine::{EngineError, JobChange, VmChange};
    let site = Site::protected();
    let before = site.engine.job_show("j").unwrap();
    let e = site.engine.job_change("j", &JobChange { retain: Some(0), ..Default::default() }).unwrap_err();
    assert!(matches!(e, EngineError::BadArgument { arg: "--retain", .. }), "{e:?}");
    let e = site.engine.job_change("j", &JobChange { retain: Some(3), ..Default::default() }).unwrap_err();
    assert!(matches!(&e, EngineError::NothingToChange { subject, .. } if subject == "job j"), "{e:?}");
    let same = VmChange {
        memory_mib: Some(128),
        cpus: None,
        nics: None,
        kernel: None,
        initrd: None,
        append: None,
        ..VmChange::default()
    };
    let e = site.engine.vm_change("web", &same).unwrap_err();
    assert!(matches!(&e, EngineError::NothingToChange { subject, .. } if subject == "web"), "{e:?}");
    let huge = VmChange { cpus: Some(1000), ..same };
    let e = site.engine.vm_change("web", &huge).unwrap_err();
    assert!(matches!(e, EngineError::BadArgument { arg: "--cpus", .. }), "{e:?}");
    assert_eq!(site.engine.job_show("j").unwrap().retain, before.retain);
    assert_eq!(site.engine.vm_show("web").unwrap().config.cpus, 1);
}
