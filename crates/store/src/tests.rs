use super::*;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("standby.db")).unwrap();
    (dir, store)
}

fn vm(name: &str) -> NewVm {
    NewVm {
        name: name.into(),
        host: "local".into(),
        config: VmConfig { cpus: 1, memory_mib: 128, driver: DriverConfig::default() },
        disks: vec![DiskRecord { path: format!("/d/{name}.qcow2"), format: Format::Qcow2 }],
        role: standby_model::Role::Source,
        replica_id: None,
    }
}

#[test]
fn migrates_once_and_has_local_host() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("standby.db");
    let s = Store::open(&path).unwrap();
    assert_eq!(s.schema_version().unwrap(), migrations::MIGRATIONS.len() as u32);
    assert_eq!(s.hosts().unwrap().iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["local"]);
    drop(s);
    let s = Store::open(&path).unwrap();
    assert_eq!(s.hosts().unwrap().iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["local"]);
}

#[test]
fn refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("standby.db");
    drop(Store::open(&path).unwrap());
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(Store::open(&path), Err(StoreError::TooNew { found: 99, .. })));
}

#[test]
fn retention_drop_repoints_layers() {
    let (_d, mut s) = open();
    let vm_id = s.insert_vm(&vm("a")).unwrap();
    let job = NewJob {
        name: "j".into(),
        target_host: "local".into(),
        target_dir: "/dr".into(),
        retain: 2,
        every_secs: None,
        replica_suffix: "_replica".into(),
        wire: Default::default(),
        network_map: Default::default(),
        quiesce: Default::default(),
    };
    s.insert_job(&job, &[(vm_id, "/dr/a".into())]).unwrap();
    let rep = s.replicas().unwrap().remove(0);
    let disk = |layer: &str, parent: Option<&str>| RpDiskRecord {
        idx: 0,
        layer: layer.into(),
        parent: parent.map(Into::into),
        size: 1,
        method: standby_model::Method::Full,
        bitmap: None,
        bytes_transferred: 0,
    };
    let mut ids = vec![];
    for (seq, layer, parent) in [(1, "l1", None), (2, "l2", Some("l1")), (3, "l3", Some("l2"))] {
        ids.push(
            s.insert_restore_point(&NewRestorePoint {
                replica_id: rep.id,
                seq: Seq(seq),
                created_at: now(),
                method: standby_model::Method::Full,
                bytes_transferred: 0,
                bytes_read: 0,
                duration_ms: 0,
                consistency: standby_model::Consistency::Application,
                nvram: None,
                tpm_state: None,
                disks: vec![disk(layer, parent)],
            })
            .unwrap(),
        );
    }
    // rp 1 goes: l2's data was committed into l1, so rp 2 now lives in l1.
    s.mark_pruning(ids[0]).unwrap();
    assert_eq!(s.restore_points(rep.id, false).unwrap().len(), 2);
    s.drop_restore_point(ids[0], &[("l2".into(), "l1".into())], &["l1".into()]).unwrap();
    let rps = s.restore_points(rep.id, true).unwrap();
    assert_eq!(rps.len(), 2);
    assert_eq!((rps[0].disks[0].layer.as_str(), rps[0].disks[0].parent.as_deref()), ("l1", None));
    assert_eq!((rps[1].disks[0].layer.as_str(), rps[1].disks[0].parent.as_deref()), ("l3", Some("l1")));
}

#[test]
fn history_is_bounded_per_vm_and_its_last_entry_is_one_lookup() {
    let (_d, mut s) = open();
    for i in 0..(HISTORY_KEEP + 250) {
        s.record_history("a", "op", "cmd", "ok", &format!("a{i}")).unwrap();
        if i % 10 == 0 {
            s.record_history("b", "op", "cmd", "ok", &format!("b{i}")).unwrap();
        }
    }
    // Writing alone bounds it: never more than the slack beyond what is kept.
    let a = s.history(Some("a"), u32::MAX).unwrap();
    assert!(a.len() > HISTORY_KEEP && a.len() <= HISTORY_KEEP + HISTORY_SLACK, "{} entries of a", a.len());
    assert_eq!(a.last().unwrap().detail, format!("a{}", HISTORY_KEEP + 249));
    let first: usize = a.first().unwrap().detail[1..].parse().unwrap();
    assert_eq!(first, HISTORY_KEEP + 250 - a.len(), "the newest are kept, oldest first");
    // Another VM's entries are its own to keep.
    assert_eq!(s.history(Some("b"), u32::MAX).unwrap().len(), (HISTORY_KEEP + 250).div_ceil(10));
    assert_eq!(s.last_history("b").unwrap().unwrap().detail, format!("b{}", HISTORY_KEEP + 240));
    assert!(s.last_history("nobody").unwrap().is_none());
    let newest = s.history(None, 3).unwrap();
    assert_eq!(newest.len(), 3);
    assert_eq!(newest[2].detail, format!("a{}", HISTORY_KEEP + 249));
}

#[test]
fn a_state_moves_only_by_a_transition_from_the_state_its_writer_read() {
    use standby_model::step::{FailoverStep, UndoStep};
    use standby_model::{ReplicaState as S, Step, Transition as T};
    let (_d, mut s) = open();
    let vm_id = s.insert_vm(&vm("a")).unwrap();
    let job = NewJob {
        name: "j".into(),
        target_host: "local".into(),
        target_dir: "/dr".into(),
        retain: 2,
        every_secs: None,
        replica_suffix: "_replica".into(),
        wire: Default::default(),
        network_map: Default::default(),
        quiesce: Default::default(),
    };
    s.insert_job(&job, &[(vm_id, "/dr/a".into())]).unwrap();
    let id = s.replicas().unwrap()[0].id;
    assert_eq!(s.transition(id, S::Ready, T::RunStarted, None, FailoverPoint::Keep).unwrap(), S::Replicating);
    // A second writer that read `ready` before is refused, and nothing changes.
    let step = Step::Failover { planned: None, at: FailoverStep::Overlays };
    let e =
        s.transition(id, S::Ready, T::FailoverStarted, Some(step), FailoverPoint::Set(Some(PointId(1)))).unwrap_err();
    assert!(matches!(e, StoreError::StateMoved { .. }), "{e}");
    assert!(e.to_string().contains("is replicating now, no longer ready"), "{e}");
    let r = s.replica(id).unwrap().unwrap();
    assert_eq!((r.state, r.failover_point, r.step), (S::Replicating, None, None));
    // A transition the table does not have, and a step of another operation.
    assert!(matches!(
        s.transition(id, S::Replicating, T::UndoDone, None, FailoverPoint::Keep),
        Err(StoreError::Transition(_))
    ));
    assert!(s.set_step(id, Step::Undo(UndoStep::Stop)).is_err());
    assert!(s.transition(id, S::Replicating, T::RunFinished, Some(step), FailoverPoint::Keep).is_err());
    assert_eq!(s.replica(id).unwrap().unwrap().state, S::Replicating);
    // What no standby wrote is an error naming the row, never a default.
    s.conn.execute("UPDATE replicas SET state = 'bogus'", []).unwrap();
    let e = s.replica(id).unwrap_err();
    assert!(crate::tests::chain(&e).contains(&format!("replicas row {id}: unknown replica state \"bogus\"")), "{e}");
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A planned failover the previous version left (`ready` or `replicating` with its
/// marker) is read as the state it is now, and can be moved on from it.
#[test]
fn planned_failover_rows_of_the_previous_version_become_its_state() {
    use standby_model::{ReplicaState as S, Transition as T};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("standby.db");
    let mut s = Store::open(&path).unwrap();
    let vm_id = s.insert_vm(&vm("a")).unwrap();
    let vm_b = s.insert_vm(&vm("b")).unwrap();
    let job = NewJob {
        name: "j".into(),
        target_host: "local".into(),
        target_dir: "/dr".into(),
        retain: 2,
        every_secs: None,
        replica_suffix: "_replica".into(),
        wire: Default::default(),
        network_map: Default::default(),
        quiesce: Default::default(),
    };
    s.insert_job(&job, &[(vm_id, "/dr/a".into()), (vm_b, "/dr/b".into())]).unwrap();
    s.conn
        .execute_batch(
            "UPDATE replicas SET state = 'ready', op_step = 'planned:source-was-running' WHERE dir = '/dr/a';
             UPDATE replicas SET state = 'replicating', op_step = 'planned:source-was-stopped' WHERE dir = '/dr/b';
             ALTER TABLE hosts DROP COLUMN address;
             ALTER TABLE hosts DROP COLUMN version;
             ALTER TABLE hosts DROP COLUMN last_seen;
             DROP TABLE fences;
             ALTER TABLE jobs DROP COLUMN compression;
             ALTER TABLE jobs DROP COLUMN bandwidth;
             ALTER TABLE jobs DROP COLUMN retry_window_secs;
             ALTER TABLE hosts DROP COLUMN cert_serial;
             ALTER TABLE hosts DROP COLUMN lost_after_secs;
             ALTER TABLE hosts DROP COLUMN silent_since;
             ALTER TABLE tasks DROP COLUMN wire_data_bytes;
             ALTER TABLE tasks DROP COLUMN wire_bytes;
             ALTER TABLE vms DROP COLUMN domain_xml;
             ALTER TABLE vms DROP COLUMN network_map;
             ALTER TABLE jobs DROP COLUMN network_map;
             ALTER TABLE hosts DROP COLUMN libvirt_uri;
             ALTER TABLE replicas DROP COLUMN source_autostart_off;
             ALTER TABLE jobs DROP COLUMN quiesce;
             ALTER TABLE vms DROP COLUMN machine;
             ALTER TABLE vms DROP COLUMN cpu_model;
             ALTER TABLE vms DROP COLUMN firmware;
             ALTER TABLE restore_points DROP COLUMN nvram;
             ALTER TABLE restore_points DROP COLUMN consistency;
             ALTER TABLE vms DROP COLUMN tpm;
             ALTER TABLE restore_points DROP COLUMN tpm_state;
             PRAGMA user_version = 5;",
        )
        .unwrap();
    drop(s);
    let mut s = Store::open(&path).unwrap();
    for r in s.replicas().unwrap() {
        assert_eq!(r.state, S::PreparingFailover, "{}", r.vm);
        assert!(matches!(r.step, Some(standby_model::Step::Planned { .. })), "{}", r.vm);
        assert_eq!(
            s.transition(r.id, r.state, T::PlannedRolledBack, None, FailoverPoint::Set(None)).unwrap(),
            S::Ready
        );
    }
}

#[test]
fn a_disk_format_no_standby_wrote_is_an_error_naming_the_row_never_raw() {
    let (_d, mut s) = open();
    let id = s.insert_vm(&vm("web")).unwrap();
    assert_eq!(s.vm("web").unwrap().unwrap().disks[0].format, Format::Qcow2);
    s.conn.execute("UPDATE vm_disks SET format = 'vmdk'", []).unwrap();
    let e = chain(&s.vm("web").unwrap_err());
    assert!(e.contains(&format!("vm_disks row {id}")) && e.contains("vmdk"), "{e}");
}

#[test]
fn a_fence_is_open_until_closed_with_its_protective_images_and_goes_with_its_replica() {
    let (_d, mut s) = open();
    let vm_id = s.insert_vm(&vm("a")).unwrap();
    let job = NewJob {
        name: "j".into(),
        target_host: "local".into(),
        target_dir: "/dr".into(),
        retain: 2,
        every_secs: None,
        replica_suffix: "_replica".into(),
        wire: Default::default(),
        network_map: Default::default(),
        quiesce: Default::default(),
    };
    s.insert_job(&job, &[(vm_id, "/dr/a".into())]).unwrap();
    let rep = s.replicas().unwrap().remove(0);
    let disks = vm("a").disks;
    s.open_fence(rep.id, "a", "prod1", &disks, "the operator").unwrap();
    let open = s.open_fences().unwrap();
    assert_eq!(open.len(), 1);
    assert!(open[0].is_open() && open[0].disks == disks && open[0].host == "prod1", "{open:?}");
    let kept = vec!["/d/a.qcow2.protective-1.qcow2".to_owned(), "/d/b.qcow2.protective-1.qcow2".to_owned()];
    s.close_fence(rep.id, "still ran", &kept).unwrap();
    assert!(s.open_fences().unwrap().is_empty());
    let f = s.fence(rep.id).unwrap().unwrap();
    assert!(!f.is_open() && f.fenced_at.is_some());
    assert_eq!((f.found.as_deref(), f.protective), (Some("still ran"), kept));
    s.delete_replica(rep.id).unwrap();
    assert!(s.fence(rep.id).unwrap().is_none(), "a replica's fence goes with it");
}
