//! User story: an operator protects a running database VM and wants restore points its
//! applications start from as after a clean stop. The guest runs qemu-guest-agent (the
//! test guest carries Debian's, with one ext2 filesystem to freeze): each run freezes the
//! guest's filesystems just around its instant, with the job's pre- and post-freeze
//! commands around the freeze, and the point says `application`. An agent that hangs
//! costs the timeout and gives a `crash` point, and the guest is thawed; a run killed
//! while the guest is frozen is thawed by recovery.

use std::time::Duration;

use serde_json::Value;
use standby_testkit::{identical, ledger_append, make_disk, read_image, with_ledger, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const LEDGER_START: u64 = 4096;
const LEDGER_MAX: u64 = 3000;
/// The 4 KiB block the pre-freeze command writes its mark to, flushed; the guest's freeze
/// hook writes FREEZE-n to the next block as the freeze begins and THAW-n to the one after
/// once the thaw is done (`standby.agent_marks=1`).
const MARK_BLOCK: u64 = 100;

/// A VM `name` of the test guest writing its ledger to a new 64 MiB qcow2 disk; the disk's
/// content before the guest wrote.
fn ledger_vm(env: &Env, name: &str, extra_append: &str) -> Vec<u8> {
    let disk = env.path(&format!("src/{name}.qcow2"));
    make_disk(&disk, "qcow2", 64, &[(0x11, 8, 4)]);
    let base = read_image(&disk);
    let append = format!("{} {extra_append}", ledger_append(LEDGER_START, LEDGER_MAX, 20_000));
    env.create_guest_vm(name, &disk, 192, &append);
    base
}

/// Runs the job; the new point, checked byte for byte against the disk at its instant:
/// `base`, the ledger records the point holds (at least those acknowledged before the
/// run), and `marks` from block `MARK_BLOCK` on (the pre-freeze command's, the freeze's,
/// the thaw's; "" for none).
fn run_and_check(env: &Env, vm: &str, base: &[u8], marks: &[&str], tag: &str) -> (Value, String) {
    let acked = Ledger::acknowledged(&env.console(vm));
    let out = env.ok(&["job", "run", "j"]);
    let rp = env.points(vm).last().cloned().unwrap();
    let path = rp["disks"][0]["path"].as_str().unwrap().to_owned();
    let image = read_image(&path);
    let k = Ledger { start_block: LEDGER_START }.records_in(&image, LEDGER_MAX).unwrap();
    assert!(k >= acked, "{tag}: the point holds records 1..={k}, the guest had {acked} acknowledged");
    let mut expected = with_ledger(base, LEDGER_START, k);
    for (i, mark) in marks.iter().enumerate() {
        let at = ((MARK_BLOCK + i as u64) * 4096) as usize;
        expected[at..at + mark.len()].copy_from_slice(mark.as_bytes());
    }
    let reference = env.path(&format!("{tag}.raw"));
    std::fs::write(&reference, expected).unwrap();
    assert!(identical(&path, &reference), "{tag}: the point differs from the disk at its instant");
    (rp, out)
}

fn count(console: &str, what: &str) -> usize {
    console.matches(what).count()
}

#[test]
fn a_guest_with_its_agent_gets_application_points_frozen_around_the_instant_and_a_kill_is_thawed() {
    let env = Env::new(BIN);
    let base = ledger_vm(&env, "db", "standby.agent_marks=1");
    // What an application's pre-freeze command does: bring its files to a state it can
    // start from, flushed (here a numbered mark on the disk), and say so.
    let pre = format!(
        "n=$(($(cat /tmp/pre 2>/dev/null || echo 0) + 1)); echo $n > /tmp/pre; \
         printf 'PRE-FREEZE-%04d' $n | dd of=/dev/vda bs=4096 seek={MARK_BLOCK} conv=notrunc,fsync 2>/dev/null && \
         echo PRE-FREEZE-$n > /dev/console"
    );
    let post = "echo POST-FREEZE-$(cat /tmp/pre) > /dev/console";
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "db",
        "--target-host",
        "local",
        "--target-dir",
        &env.path("dr"),
        "--pre-freeze",
        &pre,
        "--post-freeze",
        post,
    ]);
    let job = env.json(&["job", "list"]);
    assert_eq!(job[0]["quiesce"]["timeout_secs"], 10, "{job}");
    env.ok(&["vm", "start", "db"]);
    env.wait_console("db", Duration::from_secs(90), "the agent and ledger writes", |c| {
        c.contains("STANDBY-GUEST agent on") && Ledger::acknowledged(c) >= 10
    });

    // The point holds what the command wrote and the freeze's mark, not the thaw's: it was
    // taken between them.
    let (rp, out) = run_and_check(&env, "db", &base, &["PRE-FREEZE-0001", "FREEZE-0001"], "first");
    assert_eq!((rp["method"].as_str(), rp["consistency"].as_str()), (Some("full"), Some("application")), "{rp}");
    assert!(out.contains("application-consistent"), "{out}");
    // In order: the command, the freeze, the thaw, the command after.
    let c = env.console("db");
    let at = |what: &str| c.find(what).unwrap_or_else(|| panic!("{what} is not on the console:\n{c}"));
    assert!(at("PRE-FREEZE-1") < at("STANDBY-GUEST fsfreeze freeze"), "{c}");
    assert!(at("STANDBY-GUEST fsfreeze freeze") < at("STANDBY-GUEST fsfreeze thaw"), "{c}");
    assert!(at("STANDBY-GUEST fsfreeze thaw") < at("POST-FREEZE-1"), "{c}");
    assert_eq!(env.guest_freeze_status("db"), "thawed");
    let table = env.ok(&["replica", "points", "db"]);
    assert!(table.contains("CONSISTENCY") && table.contains("application"), "{table}");

    // Killed with the guest frozen: it stays frozen until the next command recovers.
    env.run_killed_at("replicate.while-frozen", &["job", "run", "j"]);
    assert_eq!(env.guest_freeze_status("db"), "frozen");
    assert_eq!(env.points("db").len(), 1);
    let out = env.ok(&["recover"]);
    assert!(out.contains("thawed 1 filesystem(s)"), "{out}");
    assert_eq!(env.guest_freeze_status("db"), "thawed");
    // The application is brought back out of what the pre-freeze command did.
    env.wait_console("db", Duration::from_secs(30), "the post-freeze command", |c| c.contains("POST-FREEZE-2"));

    let (rp, _) = run_and_check(&env, "db", &base, &["PRE-FREEZE-0003", "FREEZE-0003", "THAW-0002"], "after-kill");
    assert_eq!((rp["method"].as_str(), rp["consistency"].as_str()), (Some("cbt"), Some("application")), "{rp}");
    assert_eq!(count(&env.console("db"), "STANDBY-GUEST fsfreeze freeze"), 3, "one freeze per run");
    assert_eq!(env.guest_freeze_status("db"), "thawed");

    // A pre-freeze command that fails: no freeze, a crash-consistent point, and why.
    env.ok(&["job", "change", "j", "--pre-freeze", "echo not-today; exit 3"]);
    let (rp, out) = run_and_check(&env, "db", &base, &["PRE-FREEZE-0003", "FREEZE-0003", "THAW-0003"], "pre-fails");
    assert_eq!(rp["consistency"], "crash", "{rp}");
    assert!(out.contains("pre-freeze command exited with 3 (not-today)"), "{out}");
    assert_eq!(count(&env.console("db"), "STANDBY-GUEST fsfreeze freeze"), 3, "no freeze after a failed command");
    env.ok(&["vm", "shutdown", "db", "--timeout", "30"]);
}

#[test]
fn a_hung_agent_costs_the_timeout_gives_a_crash_point_and_is_thawed_and_no_agent_a_crash_point() {
    let env = Env::new(BIN);
    // Every freeze waits 6 s in the guest before it freezes: longer than the job allows.
    let base = ledger_vm(&env, "slow", "standby.agent_hang=6");
    // A guest that runs no agent at all.
    let bare_base = ledger_vm(&env, "bare", "standby.agent=off");
    let dr = env.path("dr");
    let job = |name: &str, vm: &str, extra: &[&str]| {
        let mut args = vec!["job", "create", name, "--vm", vm, "--target-host", "local", "--target-dir", &dr];
        args.extend(extra);
        env.ok(&args);
    };
    job("j", "slow", &["--freeze-timeout", "2s"]);
    job("k", "bare", &[]);
    env.ok(&["vm", "start", "slow"]);
    env.ok(&["vm", "start", "bare"]);
    env.wait_console("slow", Duration::from_secs(90), "the agent and ledger writes", |c| {
        c.contains("STANDBY-GUEST agent on") && Ledger::acknowledged(c) >= 10
    });
    env.wait_console("bare", Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);

    // No agent: told apart by its silence to the first question, a crash point, and why.
    let acked = Ledger::acknowledged(&env.console("bare"));
    let out = env.ok(&["job", "run", "k"]);
    assert!(out.contains("guest agent does not answer") && out.contains("--no-freeze"), "{out}");
    let rp = env.points("bare").last().cloned().unwrap();
    assert_eq!(rp["consistency"], "crash", "{rp}");
    let path = rp["disks"][0]["path"].as_str().unwrap();
    let k = Ledger { start_block: LEDGER_START }.records_in(&read_image(path), LEDGER_MAX).unwrap();
    assert!(k >= acked, "the point holds records 1..={k}, the guest had {acked} acknowledged");
    let reference = env.path("bare.raw");
    std::fs::write(&reference, with_ledger(&bare_base, LEDGER_START, k)).unwrap();
    assert!(identical(path, &reference), "the agent-less point differs from the disk at its instant");
    assert!(!env.console("bare").contains("fsfreeze"), "no agent, no freeze");
    env.ok(&["vm", "stop", "bare"]);

    // The agent answers, but its freeze takes longer than the job allows.
    let (rp, out) = run_and_check(&env, "slow", &base, &[], "hung");
    assert_eq!(rp["consistency"], "crash", "{rp}");
    assert!(out.contains("did not answer guest-fsfreeze-freeze within 2 s"), "{out}");
    assert!(out.contains("crash-consistent point"), "{out}");
    // The freeze happened late, after the instant; the run waited for it and thawed.
    let c = env.console("slow");
    assert_eq!((count(&c, "fsfreeze freeze"), count(&c, "fsfreeze thaw")), (1, 1), "{c}");
    assert_eq!(env.guest_freeze_status("slow"), "thawed");

    // Freezing switched off: the agent is not asked.
    env.ok(&["job", "change", "j", "--no-freeze"]);
    let (rp, _) = run_and_check(&env, "slow", &base, &[], "no-freeze");
    assert_eq!(rp["consistency"], "crash", "{rp}");
    assert_eq!(count(&env.console("slow"), "fsfreeze freeze"), 1, "no freeze asked");

    // A stopped VM's point is of its closed images.
    env.ok(&["vm", "shutdown", "slow", "--timeout", "30"]);
    env.ok(&["job", "run", "j"]);
    assert_eq!(env.points("slow").last().unwrap()["consistency"], "offline");

    // Bad freeze settings: refused, naming the option, and nothing changes.
    let before = env.snapshot();
    for (args, says) in [
        (vec!["--freeze-timeout", "0s"], "--freeze-timeout"),
        (vec!["--freeze-timeout", "1h"], "out of range"),
        (vec!["--freeze-timeout", "soon"], "--freeze-timeout"),
        (vec!["--pre-freeze", " "], "--no-pre-freeze"),
    ] {
        let mut all = vec!["job", "change", "j"];
        all.extend(args);
        let err = env.fails(&all);
        assert!(err.contains(says), "{all:?}: {err}");
    }
    assert_eq!(env.snapshot(), before, "refused changes change nothing");
}
