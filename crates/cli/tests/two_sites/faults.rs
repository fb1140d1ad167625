//! Faults during a run: a cut link, a full DR disk, a killed agent on either side.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use standby_testkit::{identical, Env};

use crate::sites::*;

/// Runs `standby job run nightly` in the background while the link to the production
/// host is cut for `cut`, starting `after` into the run; what the run said, and its code.
pub(crate) fn run_across_a_cut(env: &Env, sites: &Sites, after: Duration, cut: Duration) -> (Option<i32>, String) {
    let child = env.command(&["job", "run", "nightly"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut run = Process(child.expect("start the run"));
    std::thread::sleep(after);
    assert!(run.0.try_wait().unwrap().is_none(), "the run ended before the cut: make it longer");
    // Another terminal follows the run, with what its blocks cost on the wire so far.
    let tasks = env.ok(&["task", "list"]);
    let line = tasks.lines().find(|l| l.contains("running")).unwrap_or_default();
    assert!(line.contains("x on the wire)") && line.contains("MiB/"), "{tasks}");
    ip(&["-n", sites.ctl(), "link", "set", "v1", "down"]);
    std::thread::sleep(cut);
    ip(&["-n", sites.ctl(), "link", "set", "v1", "up"]);
    ended(run, Duration::from_secs(180))
}

#[test]
fn a_cut_link_resumes_within_the_retry_window_and_fails_loudly_past_it() {
    let sites = Sites::new();
    let Enrolled { env, agents: _agents, .. } = enrolled(&sites);
    let disk = env.path("src/web.qcow2");
    std::fs::create_dir_all(env.path("src")).unwrap();
    random_data(&env, &disk, 0, 48);
    env.ok(&["vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2"]);
    // 48 MiB at 4 MB/s: the full copy takes about 12 s, uncompressed.
    env.ok(&[
        "job",
        "create",
        "nightly",
        "--vm",
        "web",
        "--target-host",
        "dr1",
        "--target-dir",
        &env.path("dr"),
        "--compression",
        "none",
        "--bandwidth",
        "4M",
        "--retry-window",
        "2m",
    ]);

    // Cut for 40 s, longer than either agent waits on a silent connection: the transfer
    // connects again once the link is back and goes on from where it was.
    let t0 = Instant::now();
    let (code, said) = run_across_a_cut(&env, &sites, Duration::from_secs(3), Duration::from_secs(40));
    eprintln!("a run across a 40 s cut took {:.0} s: {said}", t0.elapsed().as_secs_f64());
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("(full,") && said.contains("the link dropped and the transfer went on 1 time(s)"), "{said}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the resumed point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 1);

    // Past the window: the run fails, saying why, and leaves no restore point and no
    // partial layer; the next run is incremental and exact.
    env.ok(&["job", "change", "nightly", "--retry-window", "5s"]);
    random_data(&env, &disk, 64, 32);
    let before = files_under(&env.path("dr"));
    let (code, said) = run_across_a_cut(&env, &sites, Duration::from_secs(2), Duration::from_secs(45));
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("retry window") && said.contains("dr1"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 1, "no restore point from the failed run");
    assert_eq!(files_under(&env.path("dr")), before, "no partial layer is left");
    assert_eq!(env.json(&["replica", "list"])[0]["state"], "ready");
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
}

/// A tmpfs of a given size on a directory (mounted before an agent starts: mounts made
/// later do not reach its namespace here), unmounted when dropped.
struct Tmpfs(String);

impl Tmpfs {
    fn new(dir: &str, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir]).output();
        assert!(out.unwrap().status.success(), "mount a tmpfs on {dir}");
        Tmpfs(dir.to_owned())
    }

    /// The same filesystem, its files kept, with room for `size`.
    fn resize(&self, size: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}"), &self.0]).output();
        assert!(out.unwrap().status.success(), "resize the tmpfs on {}", self.0);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).output();
    }
}

/// Runs `standby job run nightly` and kills `agent` 2 s into it: the run's code and
/// what it said.
pub(crate) fn run_killing(env: &Env, agent: &mut Process) -> (Option<i32>, String) {
    let run = env.command(&["job", "run", "nightly"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut run = Process(run.expect("start the run"));
    std::thread::sleep(Duration::from_secs(2));
    assert!(run.0.try_wait().unwrap().is_none(), "the run ended before the kill: make it longer");
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    ended(run, Duration::from_secs(120))
}

#[test]
fn a_full_dr_disk_or_a_killed_agent_on_either_side_fails_the_run_and_the_next_one_is_exact() {
    let sites = Sites::new();
    let mut env = Env::new(BIN);
    env.in_netns(sites.ctl());
    let dr = env.path("dr");
    let room = Tmpfs::new(&dr, "40M");
    let Enrolled { env, prod_dir, dr_dir, mut agents } = enrol(env, &sites);
    let disk = env.path("src/web.qcow2");
    random_data(&env, &disk, 0, 48);
    env.ok(&["vm", "create", "web", "--host", "prod1", "--disk", &disk, "--format", "qcow2"]);
    env.ok(&[
        "job",
        "create",
        "nightly",
        "--vm",
        "web",
        "--target-host",
        "dr1",
        "--target-dir",
        &dr,
        "--compression",
        "none",
        "--bandwidth",
        "8M",
        "--retry-window",
        "20s",
    ]);

    // 48 MiB of random data do not fit in the DR host's 40 MiB: the run says so, and
    // leaves nothing behind.
    let before = files_under(&dr);
    let err = refused(&env, &["job", "run", "nightly"]);
    eprintln!("the run into a full disk said: {err}");
    assert!(err.contains("dr1") && err.contains("no space left"), "{err}");
    assert!(point_ids(&env, "web").is_empty(), "no restore point from the failed run");
    assert_eq!(files_under(&dr), before, "no partial layer is left on the full disk");
    // With room, the next run is a whole, exact first copy.
    room.resize("200M");
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(full,"), "{out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the point equals the disk");

    // The writing agent dies 2 s into a 4 s run: the run fails naming the host, and
    // nothing is published.
    random_data(&env, &disk, 64, 32);
    let before = files_under(&dr);
    let (code, said) = run_killing(&env, &mut agents.1);
    eprintln!("the run whose writing agent was killed said: {said}");
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("dr1") && said.contains("stopped answering"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 1, "no restore point from the killed run");

    // The agent starts again: the next run cleans up what the killed one left, sends the
    // changes it had not finished (not a full copy), and is exact.
    agents.1 = agent_again(&sites.names[2], &dr_dir, &sites.address(2));
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 2);
    let after: Vec<String> = files_under(&dr).into_iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(after.len(), 1, "one new layer, nothing the killed run left: {after:?}");

    // The reading agent, on the production host, dies mid-run: the run fails naming it
    // and publishes nothing; started again, the next run is incremental and exact.
    random_data(&env, &disk, 96, 32);
    let (code, said) = run_killing(&env, &mut agents.0);
    eprintln!("the run whose reading agent was killed said: {said}");
    assert_ne!(code, Some(0), "{said}");
    assert!(said.contains("retry window") && said.contains("prod1 is unreachable"), "{said}");
    assert_eq!(point_ids(&env, "web").len(), 2, "no restore point from the killed run");
    agents.0 = agent_again(&sites.names[1], &prod_dir, &sites.address(1));
    let out = env.ok(&["job", "run", "nightly"]);
    assert!(out.contains("(cbt, 32.0 MiB transferred"), "still incremental, the changes not lost: {out}");
    assert!(identical(&disk, &env.latest_disk("web", 0)), "the next point equals the disk");
    assert_eq!(point_ids(&env, "web").len(), 3);
}
