//! A lost production site: failover without it, and the fence when it returns.

use std::time::{Duration, Instant};

use standby_testkit::{identical, Env, Ledger};

use crate::sites::*;

#[test]
fn a_lost_production_site_fails_over_and_its_source_is_fenced_when_it_returns() {
    let sites = Sites::new();
    let Enrolled { env, prod_dir, dr_dir, agents: _agents } = enrolled(&sites);
    let disk = ledger_guest(&env);
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    let ledger = Ledger { start_block: 8192 };
    env.wait_console("web", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    env.ok(&["job", "run", "nightly"]);
    let in_point = ledger_records(ledger, &env, &env.latest_disk("web", 0));
    let source_pid = qemu_pid(&prod_dir, "web").expect("the source runs on the production host");
    let source_console = format!("{prod_dir}/host/vms/web/console.log");

    // The production site is cut off; its guest goes on writing.
    ip(&["-n", sites.ctl(), "link", "set", "v1", "down"]);
    let dr_files = || {
        let mut f: Vec<String> =
            std::fs::read_dir(env.path("dr")).unwrap().flatten().map(|e| e.path().display().to_string()).collect();
        f.sort();
        f
    };
    let before = dr_files();
    let err = refused(&env, &["failover", "web"]);
    assert!(err.contains("prod1 is unreachable") && err.contains("--source-unreachable"), "{err}");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready", "a refused failover changes nothing");
    assert_eq!(dr_files(), before, "a refused failover changes nothing");
    assert!(qemu_pid(&dr_dir, "web_replica").is_none());
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("prod1") && err.contains("unreachable"), "{err}");

    let t0 = Instant::now();
    let out = env.ok(&["failover", "web", "--source-unreachable"]);
    eprintln!("failover with the production host unreachable took {:.1} s", t0.elapsed().as_secs_f64());
    assert!(out.contains("runs on dr1") && out.contains("declared lost"), "{out}");
    let replica_pid = qemu_pid(&dr_dir, "web_replica").expect("the replica runs on the DR host");
    let history = env.ok(&["history", "web"]);
    assert!(
        history.contains("declared lost by the operator (failover --source-unreachable)"),
        "the history says how prod1 was declared lost:\n{history}"
    );
    // Both lists say what waits for prod1.
    let prod1 = env.json(&["host", "list"]).as_array().unwrap().iter().find(|h| h["name"] == "prod1").cloned().unwrap();
    assert_eq!(prod1["state"], "offline", "{prod1}");
    assert!(prod1["fences"][0].as_str().is_some_and(|f| f.contains("VM web")), "{prod1}");
    let fence = env.json(&["replica", "list"])[0]["fence"].as_str().unwrap_or_default().to_owned();
    assert!(fence.contains("not fenced yet"), "{fence}");
    // The source still writes, unaware: these records are after the failover instant.
    let at_failover = Ledger::acknowledged(&std::fs::read_to_string(&source_console).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while Ledger::acknowledged(&std::fs::read_to_string(&source_console).unwrap()) < at_failover + 20 {
        assert!(Instant::now() < deadline, "the cut-off source stopped writing");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "the source ran through the partition");

    // The link is back: the next recover fences the source, paused then powered off, and
    // keeps its disk as it left it in a protective image beside it.
    ip(&["-n", sites.ctl(), "link", "set", "v1", "up"]);
    let out = env.ok(&["recover"]);
    assert!(out.contains("still ran") && out.contains("paused, then powered off"), "{out}");
    assert_eq!(qemu_pid(&prod_dir, "web"), None, "the source's QEMU is gone after the fence");
    assert_eq!(qemu_pid(&dr_dir, "web_replica"), Some(replica_pid), "the replica runs on, alone");
    let protective: Vec<String> = std::fs::read_dir(env.path("src"))
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .filter(|p| p.contains("web.qcow2.protective-"))
        .collect();
    assert_eq!(protective.len(), 1, "{protective:?}");
    let kept = &protective[0];
    assert!(out.contains(kept.as_str()), "{out}");
    assert!(identical(&disk, kept), "the protective image is the source disk as the fence left it");
    let records = ledger_records(ledger, &env, kept);
    assert!(
        records >= at_failover + 20 && records > in_point,
        "the protective image holds {records} records: the source's writes after the failover ({at_failover} then) \
         and after the restore point ({in_point})"
    );
    let history = env.ok(&["history", "web"]);
    for step in ["paused", "powered off", "protective", "disks as it left them"] {
        assert!(history.contains(step), "{step} missing from:\n{history}");
    }
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("web_replica"), "the replica runs: the source may not: {err}");
    assert_eq!(env.ok(&["recover"]).trim(), "nothing to recover", "the fence is carried out once");
    let fence = env.json(&["replica", "list"])[0]["fence"].as_str().unwrap_or_default().to_owned();
    assert!(fence.contains(kept.as_str()), "{fence}");

    // Failback to the original reports where the source's own writes are, and leaves them.
    let kept_digest = standby_testkit::file_digest(kept);
    let out = env.ok(&["failback", "web", "--to", "original", "--switch", "manual", "--shutdown-timeout", "30"]);
    assert!(out.contains(kept.as_str()), "failback reports the protective image: {out}");
    env.ok(&["failback", "switch", "web"]);
    env.ok(&["failback", "commit", "web"]);
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    assert_eq!(standby_testkit::file_digest(kept), kept_digest, "failback left the protective image as it was");
}

#[test]
fn a_killed_production_agent_silent_past_its_lost_after_is_declared_lost_and_fenced_on_its_restart() {
    let sites = Sites::new();
    let Enrolled { env, prod_dir, dr_dir, mut agents } = enrolled(&sites);
    let disk = ledger_guest(&env);
    env.ok(&["job", "create", "nightly", "--vm", "web", "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    env.wait_console("web", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 5);
    env.ok(&["job", "run", "nightly"]);
    let source_pid = qemu_pid(&prod_dir, "web").expect("the source runs on the production host");

    // The controller declares prod1 lost by itself after 3 s of silence; bad values and
    // hosts are refused, changing nothing.
    for (args, says) in [
        (&["host", "change", "prod1", "--lost-after", "soon"][..], "--lost-after"),
        (&["host", "change", "mars", "--lost-after", "5m"][..], "mars"),
        (&["host", "change", "local", "--lost-after", "5m"][..], "cannot lose it"),
    ] {
        let err = env.fails(args);
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let prod1 = |env: &Env| {
        env.json(&["host", "list"]).as_array().unwrap().iter().find(|h| h["name"] == "prod1").cloned().unwrap()
    };
    assert_eq!(prod1(&env)["lost_after"], serde_json::Value::Null);
    env.ok(&["host", "change", "prod1", "--lost-after", "3s"]);
    assert_eq!(prod1(&env)["lost_after"], "3s");

    // A short outage, seen by `host list`, ends with a run that prod1 answers: the silence
    // is over, and a later outage is counted from its own first missed answer.
    let _ = agents.0 .0.kill();
    let _ = agents.0 .0.wait();
    assert!(prod1(&env)["silent_since"].is_string());
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    env.ok(&["job", "run", "nightly"]);
    std::thread::sleep(Duration::from_secs(4));

    // The production agent dies; the VM it started does not.
    let _ = agents.0 .0.kill();
    let _ = agents.0 .0.wait();
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "the source outlives its agent");
    let host = prod1(&env);
    assert_eq!((host["state"].as_str(), host["declared_lost"].as_bool()), (Some("offline"), Some(false)), "{host}");
    assert!(host["silent_since"].is_string(), "{host}");
    // Not silent long enough yet: the failover is refused, saying when it will not be.
    let err = refused(&env, &["failover", "web"]);
    assert!(err.contains("prod1 is unreachable") && err.contains("after 3s of silence"), "{err}");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready", "a refused failover changes nothing");
    std::thread::sleep(Duration::from_secs(4));
    let list = env.ok(&["host", "list"]);
    assert!(list.contains("declared lost: silent since"), "{list}");
    let out = env.ok(&["failover", "web"]);
    assert!(out.contains("runs on dr1") && out.contains("declared lost by the controller"), "{out}");
    let history = env.ok(&["history", "web"]);
    assert!(history.contains("no answer from prod1 since") && history.contains("--lost-after 3s"), "{history}");
    let replica_pid = qemu_pid(&dr_dir, "web_replica").expect("the replica runs on the DR host");
    assert_eq!(qemu_pid(&prod_dir, "web"), Some(source_pid), "nobody could stop the source yet");

    // The agent starts again and finds its VM: the next recover fences it, and its disk is
    // kept as it left it.
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    let out = env.ok(&["recover"]);
    assert!(out.contains("still ran") && out.contains("paused, then powered off"), "{out}");
    assert_eq!(qemu_pid(&prod_dir, "web"), None, "the source's QEMU is gone after the fence");
    assert_eq!(qemu_pid(&dr_dir, "web_replica"), Some(replica_pid), "the replica runs on, alone");
    let host = prod1(&env);
    assert_eq!((host["state"].as_str(), &host["silent_since"]), (Some("online"), &serde_json::Value::Null), "{host}");
    let kept: Vec<String> = files_under(&env.path("src")).into_iter().filter(|p| p.contains(".protective-")).collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(identical(&disk, &kept[0]), "the protective image is the source disk as the fence left it");
    let err = refused(&env, &["vm", "start", "web"]);
    assert!(err.contains("web_replica"), "the replica runs: the source may not: {err}");
}
