//! What standby's end-to-end tests share: a scratch data directory and a way to run the
//! real `standby` binary in it, the test guest (kernel + initramfs built from Debian
//! packages by `scripts/guest/build.sh`), its write ledger, and reference images built
//! independently of standby to compare restore points against.

mod ledger;
pub mod libvirt;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use ledger::{ledger_record, with_ledger, Ledger, LEDGER_BLOCK};
use serde_json::Value;

/// One test's world: a data directory, a source directory and a DR directory.
#[derive(Debug)]
pub struct Env {
    dir: tempfile::TempDir,
    bin: PathBuf,
    envs: Vec<(String, String)>,
    /// Every command is bounded: one still running after this fails the test.
    limit: Duration,
    /// The network namespace every command runs in, when the test made one.
    netns: Option<String>,
}

/// The result of one `standby` command.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Env {
    /// `bin` is the `standby` binary under test (`env!("CARGO_BIN_EXE_standby")`).
    pub fn new(bin: &str) -> Env {
        // Short paths: unix socket names must stay under 108 bytes.
        let dir = tempfile::Builder::new().prefix("sb").tempdir_in("/tmp").expect("temp dir");
        for sub in ["src", "dr"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        // Every command is bounded: a hang fails its test instead of stalling the suite.
        Env {
            dir,
            bin: bin.into(),
            envs: vec![("STANDBY_ACCEL".into(), "tcg".into())],
            limit: Duration::from_secs(600),
            netns: None,
        }
    }

    /// An environment whose every command must end within `limit` (hostile input may
    /// make a command fail, never hang).
    pub fn bounded(bin: &str, limit: Duration) -> Env {
        let mut env = Env::new(bin);
        env.limit = limit;
        env
    }

    /// Runs every later command inside network namespace `ns` (which the test made).
    pub fn in_netns(&mut self, ns: &str) {
        self.netns = Some(ns.into());
    }

    pub fn unset_env(&mut self, key: &str) {
        self.envs.retain(|(k, _)| k != key);
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    pub fn data_dir(&self) -> String {
        self.path("data")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        c.arg("--data-dir").arg(self.data_dir()).args(args);
        // Never a terminal: a confirmation prompt must not wait for the test's tty.
        c.stdin(std::process::Stdio::null());
        c.env_remove("STANDBY_FAILPOINT");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_within(self.limit, args)
    }

    /// Runs, and fails the test if the command has not ended within `limit` (it is
    /// killed then): hostile input may make a command fail, never hang.
    pub fn run_within(&self, limit: Duration, args: &[&str]) -> Run {
        use std::io::Read;
        let mut child = self
            .command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run standby");
        // Read while it runs: a command with much to say must not block on a full pipe.
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_string(&mut text);
                }
                text
            })
        };
        let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("standby {args:?} hung: still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Run { code: status.code(), stdout: out.join().expect("stdout"), stderr: err.join().expect("stderr") }
    }

    /// Runs with fail point `fp` armed and insists the process was killed there.
    pub fn run_killed_at(&self, fp: &str, args: &[&str]) -> Run {
        let r = Run::from(self.command(args).env("STANDBY_FAILPOINT", fp).output().expect("run standby"));
        assert_eq!(r.code, None, "{fp}: standby {args:?} should have been killed:\n{}{}", r.stdout, r.stderr);
        assert!(r.stderr.contains(&format!("fail point {fp} reached")), "{fp}: {}", r.stderr);
        r
    }

    /// Runs with fail point `fp` set to SIGKILL every process whose command line holds
    /// `pattern` (one of this test's own: give a path under `root()`), and insists at least
    /// one was killed there; standby itself runs on.
    pub fn run_killing_at(&self, fp: &str, pattern: &str, args: &[&str]) -> Run {
        assert!(pattern.contains(&self.root().display().to_string()), "kill only this test's processes");
        let r = Run::from(
            self.command(args).env("STANDBY_FAILPOINT_KILL", format!("{fp}={pattern}")).output().expect("run standby"),
        );
        let killed = format!("fail point {fp} reached, killed ");
        let n = r.stderr.split(&killed).nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse::<u32>().ok());
        assert!(n.is_some_and(|n| n >= 1), "{fp}: nothing matching {pattern:?} was killed:\n{}", r.stderr);
        r
    }

    /// Runs and insists on success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(r.code, Some(0), "standby {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
        r.stdout
    }

    /// Runs and insists on failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_ne!(r.code, Some(0), "standby {args:?} should have failed:\n{}", r.stdout);
        r.stderr
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("standby {args:?} printed bad JSON ({e}): {out}"))
    }

    /// Restore points of `vm`, oldest first.
    pub fn points(&self, vm: &str) -> Vec<Value> {
        self.json(&["replica", "points", vm]).as_array().cloned().unwrap_or_default()
    }

    /// Path of disk `idx` of the newest restore point.
    pub fn latest_disk(&self, vm: &str, idx: usize) -> String {
        let points = self.points(vm);
        let last = points.last().expect("a restore point");
        last["disks"][idx]["path"].as_str().expect("disk path").to_owned()
    }

    /// Everything a "nothing changed" assertion compares: every row of every table of the
    /// database, and every file under this test's directory (the data directory, the
    /// sources, the whole DR tree) with a checksum of its bytes. Left out: a refusal's
    /// own history entry and task (result `failed`: a refused request is recorded, as it
    /// should be), lock files (a lock taken and dropped leaves its empty file), the database's
    /// files (their rows are compared) and console logs (a running guest writes them).
    pub fn snapshot(&self) -> String {
        let mut s = String::new();
        let db = self.dir.path().join("data/standby.db");
        if db.exists() {
            let conn = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .expect("open the database");
            let mut tables: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .and_then(|mut q| q.query_map([], |r| r.get(0))?.collect())
                .expect("list tables");
            tables.sort();
            for t in tables {
                let filter = match t.as_str() {
                    "history" => " WHERE result != 'failed'",
                    "tasks" => " WHERE status != 'failed'",
                    _ => "",
                };
                let mut q = conn.prepare(&format!("SELECT * FROM \"{t}\"{filter} ORDER BY rowid")).expect("query");
                let n = q.column_count();
                let rows: Vec<String> = q
                    .query_map([], |r| (0..n).map(|i| r.get_ref(i).map(cell)).collect::<Result<Vec<_>, _>>())
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                    .expect("read rows")
                    .into_iter()
                    .map(|r| r.join("|"))
                    .collect();
                s.push_str(&format!("table {t}:\n{}\n", rows.join("\n")));
            }
        }
        let mut files = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut files);
        s.push_str(&files.join("\n"));
        s
    }

    /// Runs SQL on standby's database behind its back: a damaged row, a clock that lied.
    pub fn sql(&self, statements: &str) {
        let conn = rusqlite::Connection::open(self.dir.path().join("data/standby.db")).expect("open the database");
        conn.busy_timeout(Duration::from_secs(30)).expect("busy timeout");
        conn.execute_batch(statements).unwrap_or_else(|e| panic!("{statements}: {e}"));
    }

    /// Defines VM `name` on `disk` booting the test guest with kernel command line `append`.
    pub fn create_guest_vm(&self, name: &str, disk: &str, memory_mib: u32, append: &str) {
        let (kernel, initrd) = guest();
        let memory = memory_mib.to_string();
        self.ok(&[
            "vm", "create", name, "--disk", disk, "--memory", &memory, "--kernel", &kernel, "--initrd", &initrd,
            "--append", append,
        ]);
    }

    /// What the guest agent of VM `vm` (standby's own driver, on this host) says of its
    /// filesystems: `frozen` or `thawed`. Spoken here by hand, not with standby's client,
    /// so that the test checks standby against the agent itself.
    pub fn guest_freeze_status(&self, vm: &str) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        let socket = format!("{}/hosts/local/vms/{vm}/qga.sock", self.data_dir());
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap_or_else(|e| panic!("{socket}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4711}}\n").unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut b = [0u8; 1];
        while b[0] != 0xFF {
            r.read_exact(&mut b).expect("the agent's sync delimiter");
        }
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("4711"), "sync answer {line:?}");
        s.write_all(b"{\"execute\":\"guest-fsfreeze-status\"}\n").unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        v["return"].as_str().unwrap_or_else(|| panic!("no status in {line:?}")).to_owned()
    }

    /// The VM's console log so far.
    pub fn console(&self, vm: &str) -> String {
        self.ok(&["vm", "console", vm])
    }

    /// Waits until `pred(console)` holds, or panics after `timeout`.
    pub fn wait_console(&self, vm: &str, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let c = self.console(vm);
            if pred(&c) {
                return c;
            }
            assert!(start.elapsed() < timeout, "VM {vm}: {what} did not happen within {timeout:?}; console:\n{c}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Processes whose command line mentions this test's directory (QEMU, qemu-nbd).
    pub fn processes(&self) -> Vec<String> {
        self.processes_here(false)
    }

    /// Processes whose command line mentions this test's directory; standby's own too
    /// when `with_standby` (a daemon the test started).
    fn processes_here(&self, with_standby: bool) -> Vec<String> {
        let me = self.root().display().to_string();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let zombie = std::fs::read_to_string(e.path().join("stat")).is_ok_and(|s| s.contains(") Z "));
            let standby = cmd.contains(self.bin.to_string_lossy().as_ref());
            if cmd.contains(&me) && !zombie && (with_standby || !standby) {
                found.push(format!("{name}: {cmd}"));
            }
        }
        found
    }
}

impl Drop for Env {
    /// No test leaves a VM, a server or a standby daemon running, pass or fail.
    fn drop(&mut self) {
        for p in self.processes_here(true) {
            if let Some(pid) = p.split(':').next() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

fn cell(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) => format!("blob of {} bytes", b.len()),
    }
}

/// Every entry under `dir`, as `relative path: what it is` (a file's sha256), sorted.
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read dir").flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).expect("under root").display().to_string();
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = e.file_type().expect("file type");
        if rel.starts_with("data/locks/") || name.starts_with("standby.db") || name == "console.log" {
            continue;
        }
        if kind.is_dir() {
            out.push(format!("{rel}/"));
            walk(root, &path, out);
        } else if kind.is_file() {
            out.push(format!("{rel}: {}", file_digest(&path.display().to_string())));
        } else {
            out.push(format!("{rel}: {kind:?}"));
        }
    }
}

/// The test guest's kernel and initramfs.
pub fn guest() -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/guest");
    let dir = dir
        .canonicalize()
        .unwrap_or_else(|_| panic!("the test guest is not built: run scripts/guest/build.sh (make test does)"));
    let k = dir.join("vmlinuz");
    let i = dir.join("initrd.gz");
    assert!(k.exists() && i.exists(), "the test guest is incomplete in {}", dir.display());
    (k.display().to_string(), i.display().to_string())
}

/// The reset counts the test guest's TPM reported at each boot its console holds
/// (`STANDBY-GUEST tpm resets=N`): a persistent counter each boot raises, so a boot's count
/// shows which TPM state it started from.
pub fn tpm_resets(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.split("STANDBY-GUEST tpm resets=").nth(1)?.trim().parse().ok()).collect()
}

/// Kernel command line for the ledger workload: records from block `start` on.
pub fn ledger_append(start_block: u64, count: u64, interval_us: u64) -> String {
    format!(
        "console=ttyS0 quiet panic=-1 standby.workload=ledger standby.ledger_start={start_block} standby.ledger_count={count} standby.ledger_interval={interval_us}"
    )
}

pub fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img").args(args).output().expect("qemu-img");
    assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs qemu-io commands (`write -P 0xab 0 1M` ...) against an image no VM holds.
pub fn qemu_io(image: &str, format: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(image).output().expect("qemu-io");
    assert!(o.status.success(), "qemu-io {cmds:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A disk with recognisable data: `size_mib`, with `patterns` (byte, offset MiB, length MiB)
/// written and the rest unallocated.
pub fn make_disk(path: &str, format: &str, size_mib: u64, patterns: &[(u8, u64, u64)]) {
    qemu_img(&["create", "-q", "-f", format, path, &format!("{size_mib}M")]);
    let cmds: Vec<String> = patterns.iter().map(|(b, off, len)| format!("write -P {b:#x} {off}M {len}M")).collect();
    if !cmds.is_empty() {
        qemu_io(path, format, &cmds);
    }
}

/// True when both images read the same, byte for byte (`qemu-img compare`).
pub fn identical(a: &str, b: &str) -> bool {
    let o = Command::new("qemu-img").args(["compare", "-q", "-U", a, b]).output().expect("qemu-img compare");
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("qemu-img compare {a} {b}: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

/// The guest-visible bytes of an image.
pub fn read_image(path: &str) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new_in("/tmp").expect("temp file");
    let out = tmp.path().display().to_string();
    qemu_img(&["convert", "-U", "-O", "raw", path, &out]);
    std::fs::read(&out).expect("read raw image")
}

/// Names of the dirty bitmaps stored in an image.
pub fn bitmaps(image: &str) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", "-U", image])).expect("qemu-img info JSON");
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// sha256 of an image file's bytes on disk (its exact state, not just its content).
pub fn file_digest(path: &str) -> String {
    let o = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(o.status.success(), "sha256sum {path}: {}", String::from_utf8_lossy(&o.stderr));
    let digest = String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(digest.len(), 64, "sha256sum {path} printed no digest");
    digest
}

/// [`file_digest`] of a file, or None when it does not exist.
pub fn digest_if_exists(path: &str) -> Option<String> {
    std::path::Path::new(path).exists().then(|| file_digest(path))
}

/// A bridge this test made (`ip link`), removed when dropped.
#[derive(Debug)]
pub struct Bridge(pub String);

impl Bridge {
    pub fn new(name: &str) -> Bridge {
        let _ = std::process::Command::new("ip").args(["link", "del", name]).output();
        for args in [vec!["link", "add", name, "type", "bridge"], vec!["link", "set", name, "up"]] {
            let o = std::process::Command::new("ip").args(&args).output().expect("ip (iproute2)");
            assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Bridge(name.into())
    }

    /// The interfaces on it now (the taps of the VMs whose NICs it carries).
    pub fn ports(&self) -> Vec<String> {
        let mut ports: Vec<String> = std::fs::read_dir(format!("/sys/class/net/{}/brif", self.0))
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        ports.sort();
        ports
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}
