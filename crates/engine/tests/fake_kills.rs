//! standby killed at every fail point of every operation, on the fake host, in one
//! process: the operation panics there, so none of its own error handling runs (the batch
//! runner records the panic as a failure, and locks go with the unwound stack as they go
//! with a dead process); the next engine opens the same data directory and host,
//! recovers, and must find every restore point as it was, the replica idle, and the
//! lifecycle able to go on. One test: the fail point hook is process-wide.
//!
//! Fail points passed inside transfer workers (`*.mid-transfer`) end that worker only: the
//! operation sees a failed transfer and cleans up, which is the path this proves there.

mod site;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use site::{Site, DISK};
use standby_engine::failpoint;
use standby_engine::{Despite, FailbackOptions, FailbackTarget, NoProgress, PointChoice, SwitchMode};
use standby_fake::CLUSTER;

/// The panic payload of a fail point.
struct Killed;

fn vms() -> Vec<String> {
    vec!["web".into()]
}

fn ok(out: Vec<standby_engine::OpOutcome>) {
    assert!(out[0].ok, "{}", out[0].message);
}

fn failover(site: &Site) {
    ok(site.engine.failover(&vms(), None, PointChoice::Latest, Despite::default()));
    site.fake.guest_write("web_replica", 0, 4 * CLUSTER, &[0x44; 100]);
    site.fake.guest_write("web_replica", 0, 50 * CLUSTER, &[0x45; 100]);
}

fn failback_opts() -> FailbackOptions {
    FailbackOptions {
        target: FailbackTarget::Original,
        switch: SwitchMode::Manual,
        power_on: false,
        shutdown_timeout: Duration::from_secs(5),
    }
}

fn failback(site: &Site) {
    failover(site);
    ok(site.engine.failback(&vms(), None, &failback_opts(), &NoProgress));
}

fn run(site: &Site) {
    let out = site.engine.job_run("j", &NoProgress).unwrap();
    assert!(out[0].error.is_none(), "{:?}", out[0].error);
}

struct Case {
    point: &'static str,
    setup: fn(&Site),
    op: fn(&Site),
    /// Whether the operation writes the source VM's disk (failback to it does).
    writes_source: bool,
    /// Whether the source ran before and the operation shuts it down (a planned
    /// failover): rolled back, it must run again.
    restarts_source: bool,
}

/// Whether completing the operation removes restore points: retention drops the oldest,
/// permanent failover all of them.
fn drops_points(point: &str) -> bool {
    point.starts_with("retention.") || point.starts_with("permanent.")
}

fn cases() -> Vec<Case> {
    let replicate = |point| Case {
        point,
        setup: |s| {
            run(s);
            // Two ranges apart: two chunks, so that the transfer has a middle.
            s.fake.write_image(DISK, 5 * CLUSTER, &[0x55; 10]);
            s.fake.write_image(DISK, 40 * CLUSTER, &[0x56; 10]);
        },
        op: |s| drop(s.engine.job_run("j", &NoProgress)),
        writes_source: false,
        restarts_source: false,
    };
    let retention = |point| Case {
        point,
        setup: |s| {
            for i in 0..3u8 {
                s.fake.write_image(DISK, u64::from(i) * CLUSTER, &[i; 10]);
                run(s);
            }
            s.fake.write_image(DISK, 6 * CLUSTER, &[0x66; 10]);
        },
        op: |s| drop(s.engine.job_run("j", &NoProgress)),
        writes_source: false,
        restarts_source: false,
    };
    let failover_case = |point| Case {
        point,
        setup: run,
        op: |s| drop(s.engine.failover(&vms(), None, PointChoice::Latest, Despite::default())),
        writes_source: false,
        restarts_source: false,
    };
    let undo = |point| Case {
        point,
        setup: |s| {
            run(s);
            failover(s);
        },
        op: |s| drop(s.engine.failover_undo(&vms(), None)),
        writes_source: false,
        restarts_source: false,
    };
    let planned = |point| Case {
        point,
        setup: |s| {
            run(s);
            s.engine.vm_start("web", false).unwrap();
            s.fake.guest_write("web", 0, 3 * CLUSTER, &[0x33; 10]);
        },
        op: |s| drop(s.engine.failover_planned(&vms(), None, Duration::from_secs(5))),
        writes_source: false,
        restarts_source: true,
    };
    let permanent = |point| Case {
        point,
        setup: |s| {
            run(s);
            failover(s);
        },
        op: |s| drop(s.engine.failover_permanent(&vms(), None)),
        writes_source: false,
        restarts_source: false,
    };
    let failback_case = |point| Case {
        point,
        setup: |s| {
            run(s);
            failover(s);
        },
        op: |s| drop(s.engine.failback(&vms(), None, &failback_opts(), &NoProgress)),
        writes_source: true,
        restarts_source: false,
    };
    let switch = |point| Case {
        point,
        setup: |s| {
            run(s);
            failback(s);
        },
        op: |s| drop(s.engine.failback_switch(&vms(), None, &NoProgress)),
        writes_source: true,
        restarts_source: false,
    };
    // After the switch: undo then stops the target and restores it (before the switch
    // there is nothing to stop).
    let undo_failback = |point| Case {
        point,
        setup: |s| {
            run(s);
            failback(s);
            ok(s.engine.failback_switch(&vms(), None, &NoProgress));
        },
        op: |s| drop(s.engine.failback_undo(&vms(), None, &NoProgress)),
        writes_source: true,
        restarts_source: false,
    };
    // A planned failover ends in an ordinary one: killed there, its recovery must also
    // start the source again (it had shut it down).
    let planned_failover = |point| Case {
        op: |s| drop(s.engine.failover_planned(&vms(), None, Duration::from_secs(5))),
        ..planned(point)
    };
    let mut all = Vec::new();
    for p in failpoint::ALL.iter().filter(|p| p.starts_with("failover.")) {
        all.push(planned_failover(p));
    }
    for p in failpoint::ALL.iter().filter(|p| !REAL_HOSTS_ONLY.contains(p)) {
        let family = p.split('.').next().unwrap();
        all.push(match family {
            // Only a running guest is frozen.
            "replicate" if *p == "replicate.while-frozen" => Case {
                setup: |s| {
                    run(s);
                    s.engine.vm_start("web", false).unwrap();
                    s.fake.guest_write("web", 0, 5 * CLUSTER, &[0x57; 10]);
                },
                ..replicate(p)
            },
            "replicate" => replicate(p),
            "retention" => retention(p),
            "failover" => failover_case(p),
            "undo" => undo(p),
            "planned" => planned(p),
            "permanent" => permanent(p),
            "failback" => failback_case(p),
            "switch" => switch(p),
            "undo-failback" => undo_failback(p),
            "commit" => Case {
                point: p,
                setup: |s| {
                    run(s);
                    failback(s);
                    ok(s.engine.failback_switch(&vms(), None, &NoProgress));
                },
                op: |s| drop(s.engine.failback_commit(&vms(), None, &NoProgress)),
                writes_source: true,
                restarts_source: false,
            },
            other => panic!("fail point family {other} has no case here"),
        });
    }
    all
}

/// Fail points only a real host reaches: the fake keeps no UEFI variables, so no VM of
/// its is paused around an instant. crates/cli/tests/uefi.rs kills there on real QEMU, and
/// the suite's log proves it reached them.
const REAL_HOSTS_ONLY: &[&str] = &["replicate.while-paused"];

/// After recovery the replica's state is idle and the lifecycle goes on from it.
fn goes_on(site: &Site) {
    match site.state().as_str() {
        "ready" => {}
        "failover" => ok(site.engine.failover_undo(&vms(), None)),
        "permanent" => return,
        "ready_to_switch" | "failback" => {
            ok(site.engine.failback_undo(&vms(), None, &NoProgress));
            ok(site.engine.failover_undo(&vms(), None));
        }
        other => panic!("state {other} after recovery is not idle"),
    }
    assert_eq!(site.state(), "ready");
    let _ = site.engine.vm_stop("web");
    let out = site.engine.job_run("j", &NoProgress).unwrap();
    let rp = out[0].restore_point.as_ref().unwrap_or_else(|| panic!("no restore point: {:?}", out[0].error));
    let same = site.fake.read_image(&rp.disks[0].path) == site.fake.read_image(DISK);
    assert!(same, "the next restore point differs from the disk");
}

#[test]
fn a_kill_at_every_step_is_recovered_with_every_restore_point_intact() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<Killed>().is_none() {
            default_hook(info);
        }
    }));
    let reached: Arc<Mutex<Vec<String>>> = Arc::default();
    for case in cases() {
        let mut site = Site::protected();
        (case.setup)(&site);
        let before: BTreeMap<standby_model::PointId, Vec<u8>> = site
            .engine
            .replica_points("web", None)
            .unwrap()
            .iter()
            .map(|p| (p.id, site.fake.read_image(&p.disks[0].path)))
            .collect();
        let source = site.fake.read_image(DISK);

        let (point, log) = (case.point, reached.clone());
        failpoint::set_hook(Some(Arc::new(move |name: &str| {
            if name == point {
                log.lock().unwrap().push(name.to_owned());
                std::panic::panic_any(Killed);
            }
        })));
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.op)(&site)));
        failpoint::set_hook(None);
        assert!(reached.lock().unwrap().iter().any(|p| p == point), "{point}: the operation never reached it");

        site.reopen();
        let recovery = site.engine.recover_interrupted().unwrap();
        assert!(recovery.attention.is_empty(), "{point}: {:?}", recovery.attention);
        assert!(site.engine.recovery_needed().unwrap().is_empty(), "{point}: still needs recovery");
        let after = site.engine.replica_points("web", None).unwrap();
        if !drops_points(point) {
            for id in before.keys() {
                assert!(after.iter().any(|p| p.id == *id), "{point}: restore point {id} was lost");
            }
        }
        for p in after {
            if let Some(data) = before.get(&p.id) {
                assert!(&site.fake.read_image(&p.disks[0].path) == data, "{point}: restore point {} changed", p.id);
            }
        }
        if !case.writes_source {
            assert!(site.fake.read_image(DISK) == source, "{point}: the source disk changed");
        }
        assert!(!site.fake.frozen("web"), "{point}: recovery left the guest frozen");
        if case.restarts_source && site.state() == "ready" {
            assert!(site.fake.vm_chains("web").is_some(), "{point}: rolled back, the source must run again");
        }
        goes_on(&site);
    }
    let failover_points = failpoint::ALL.iter().filter(|p| p.starts_with("failover.")).count();
    let here = failpoint::ALL.len() - REAL_HOSTS_ONLY.len();
    assert_eq!(reached.lock().unwrap().len(), here + failover_points, "one kill per case");
}
