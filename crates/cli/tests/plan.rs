//! User story: a site goes down; one command fails over its VMs in a set order, with a
//! delay after each start, and one command undoes it all.

use serde_json::Value;
use standby_testkit::{make_disk, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// Guest-less VMs: QEMU runs (the firmware finds nothing to boot), enough for plans.
fn world(names: &[&str]) -> Env {
    let env = Env::new(BIN);
    let dr = env.path("dr");
    let mut job = vec!["job", "create", "j", "--target-host", "local", "--target-dir", &dr];
    for n in names {
        let disk = env.path(&format!("src/{n}.qcow2"));
        make_disk(&disk, "qcow2", 8, &[(0x11, 0, 1)]);
        env.ok(&["vm", "create", n, "--disk", &disk, "--memory", "64"]);
        job.extend(["--vm", n]);
    }
    env.ok(&job);
    env.ok(&["job", "run", "j"]);
    env
}

fn states(env: &Env) -> Vec<String> {
    env.json(&["replica", "list"]).as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn plan_starts_vms_in_order_with_their_delays() {
    let env = world(&["a", "b", "c"]);
    let pre = env.path("pre-ran");
    let post = env.path("post-ran");
    env.ok(&[
        "plan",
        "create",
        "site",
        "--vm",
        "a:1",
        "--vm",
        "b:2",
        "--vm",
        "c",
        "--pre",
        &format!("echo \"$STANDBY_PLAN\" > {pre}"),
        "--post",
        &format!("touch {post}"),
    ]);
    let shown = env.json(&["plan", "show", "site"]);
    assert_eq!(shown[0]["vms"][1]["delay_secs"], 2);
    let run = env.json(&["plan", "run", "site"]);
    assert_eq!(run["ok"], true, "{run}");
    assert_eq!(std::fs::read_to_string(&pre).unwrap().trim(), "site");
    assert!(std::path::Path::new(&post).exists());
    let steps = run["steps"].as_array().unwrap();
    let order: Vec<&str> = steps.iter().map(|s| s["vm"].as_str().unwrap()).collect();
    assert_eq!(order, ["a", "b", "c"]);
    let t: Vec<f64> = steps.iter().map(|s| s["started_after_secs"].as_f64().unwrap()).collect();
    // Each start comes after the previous one's delay, and not much later (tolerance 1 s).
    assert!(t[0] < 1.0, "{t:?}");
    assert!((1.0..2.0).contains(&(t[1] - t[0])), "b after a's 1 s delay: {t:?}");
    assert!((2.0..3.0).contains(&(t[2] - t[1])), "c after b's 2 s delay: {t:?}");
    assert_eq!(states(&env), ["failover", "failover", "failover"]);
    assert_eq!(env.processes().len(), 3, "{:?}", env.processes());

    let out = env.ok(&["plan", "undo", "site"]);
    assert_eq!(out.matches(": ok:").count(), 3, "{out}");
    assert_eq!(states(&env), ["ready", "ready", "ready"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
    let history = env.json(&["history"]);
    assert!(history.as_array().unwrap().iter().any(|h| h["vm"] == "plan:site" && h["operation"] == "plan run"));
}

#[test]
fn a_failing_vm_stops_the_plan_unless_told_to_continue() {
    let env = world(&["a", "b", "c"]);
    env.ok(&["plan", "create", "stopper", "--vm", "a", "--vm", "b", "--vm", "c"]);
    env.ok(&["plan", "create", "goer", "--vm", "a", "--vm", "b", "--vm", "c", "--continue-on-failure"]);
    env.ok(&["failover", "b"]);
    let r = env.run(&["plan", "run", "stopper", "--json"]);
    assert_eq!(r.code, Some(1));
    let run: Value = serde_json::from_str(&r.stdout).unwrap();
    let results: Vec<&str> = run["steps"].as_array().unwrap().iter().map(|s| s["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["ok", "failed", "not started"]);
    assert_eq!(states(&env), ["failover", "failover", "ready"]);
    env.ok(&["failover", "undo", "a"]);
    let r = env.run(&["plan", "run", "goer", "--json"]);
    assert_eq!(r.code, Some(1));
    let run: Value = serde_json::from_str(&r.stdout).unwrap();
    let results: Vec<&str> = run["steps"].as_array().unwrap().iter().map(|s| s["result"].as_str().unwrap()).collect();
    assert_eq!(results, ["ok", "failed", "ok"]);
    env.ok(&["plan", "undo", "goer"]);
    assert!(env.processes().is_empty());
}

#[test]
fn bad_plans_are_refused_and_change_nothing() {
    let env = world(&["a", "b"]);
    let disk = env.path("src/lonely.qcow2");
    make_disk(&disk, "qcow2", 8, &[]);
    env.ok(&["vm", "create", "lonely", "--disk", &disk]);
    env.ok(&["plan", "create", "p", "--vm", "a"]);
    let before = env.ok(&["plan", "list", "--json"]);
    for (args, expect) in [
        (&["plan", "create", "q", "--vm", "ghost"][..], "unknown VM"),
        (&["plan", "create", "q", "--vm", "a:-5"], "not a whole number of seconds"),
        (&["plan", "create", "q", "--vm", "a:soon"], "not a whole number of seconds"),
        (&["plan", "create", "q", "--vm", "a", "--vm", "a"], "named twice"),
        (&["plan", "create", "q", "--vm", "lonely"], "has no replica"),
        (&["plan", "create", "p", "--vm", "b"], "already exists"),
        (&["plan", "run", "nope"], "unknown plan"),
    ] {
        let err = env.fails(args);
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err}");
        assert_eq!(env.ok(&["plan", "list", "--json"]), before, "{args:?} changed the plans");
    }
    // A failing pre-command fails the plan before any VM.
    env.ok(&["plan", "create", "guarded", "--vm", "a", "--pre", "exit 3"]);
    let err = env.fails(&["plan", "run", "guarded"]);
    assert!(err.contains("pre-failover command") && err.contains("no VM was failed over"), "{err}");
    assert_eq!(states(&env), ["ready", "ready"]);
}

#[test]
fn a_hung_plan_command_is_killed_at_its_limit_and_the_policy_decides() {
    let env = world(&["a"]);
    let never = env.path("never-touched");
    // A background child that outlives its shell unless the whole group is killed; its
    // command line (the shell's) names the marker, so env.processes() would show it.
    let hang = format!("(sleep 30; touch {never}) & wait");
    env.ok(&["plan", "create", "strict", "--vm", "a", "--pre", &hang, "--hook-timeout", "1"]);
    let r = env.run_within(std::time::Duration::from_secs(20), &["plan", "run", "strict"]);
    assert_ne!(r.code, Some(0));
    assert!(r.stderr.contains("did not finish within 1 s and was killed"), "{}", r.stderr);
    assert!(r.stderr.contains("no VM was failed over"), "{}", r.stderr);
    assert_eq!(states(&env), ["ready"]);
    // Killed with everything it started: the shell whose command line names the marker is gone.
    assert!(env.processes().is_empty(), "{:?}", env.processes());

    // With --continue-on-failure a hung command does not hold the failover.
    env.ok(&[
        "plan",
        "create",
        "disaster",
        "--vm",
        "a",
        "--pre",
        &hang,
        "--post",
        &hang,
        "--hook-timeout",
        "1",
        "--continue-on-failure",
    ]);
    let r = env.run_within(std::time::Duration::from_secs(30), &["plan", "run", "disaster", "--json"]);
    assert_eq!(r.code, Some(1), "a killed command fails the run: {}", r.stderr);
    let run: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(run["steps"][0]["result"], "ok", "{run}");
    assert!(run["pre_command"].as_str().unwrap().contains("was killed"), "{run}");
    assert!(run["post_command"].as_str().unwrap().contains("was killed"), "{run}");
    assert_eq!(states(&env), ["failover"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!std::path::Path::new(&never).exists());
    env.ok(&["plan", "undo", "disaster"]);
    assert!(env.processes().is_empty(), "{:?}", env.processes());
}
