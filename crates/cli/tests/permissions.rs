//! User story: what standby keeps is the operator's alone. The data directory, the
//! database, VM monitors, NBD sockets, DR layers and replica markers are owner-only,
//! whatever the umask; a data directory others may write is refused with the fix.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use standby_testkit::{make_disk, Env};

const BIN: &str = env!("CARGO_BIN_EXE_standby");

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")).permissions().mode() & 0o7777
}

#[test]
fn everything_standby_creates_is_owner_only() {
    let env = Env::new(BIN);
    let disk = env.path("src/p.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x1, 0, 1)]);
    env.create_guest_vm("p", &disk, 128, "console=ttyS0 quiet panic=-1 standby.workload=idle");
    env.ok(&["vm", "start", "p"]);
    env.wait_console("p", Duration::from_secs(60), "boot", |c| c.contains("STANDBY-GUEST up"));
    env.ok(&["job", "create", "j", "--vm", "p", "--target-host", "local", "--target-dir", &env.path("dr/site")]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "p", "--force"]);
    let data = env.data_dir();
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&format!("{data}/standby.db")), 0o600, "database");
    let vm_dir = format!("{data}/hosts/local/vms/p");
    for f in ["qmp.sock", "qmp-status.sock", "console.log"] {
        assert_eq!(mode(&format!("{vm_dir}/{f}")) & 0o077, 0, "{f} of the source VM");
    }
    for f in ["qmp.sock", "qmp-status.sock"] {
        assert_eq!(mode(&format!("{data}/hosts/local/vms/p_replica/{f}")) & 0o077, 0, "{f} of the replica VM");
    }
    let rdir = env.path("dr/site/p");
    assert_eq!(mode(&rdir) & 0o077, 0, "replica directory");
    let entries: Vec<_> = std::fs::read_dir(&rdir).unwrap().flatten().collect();
    assert!(entries.len() >= 3, "a layer, an overlay and the marker: {entries:?}");
    for e in entries {
        assert_eq!(mode(&e.path().display().to_string()) & 0o077, 0, "{}", e.path().display());
    }
    env.ok(&["failover", "undo", "p"]);
    env.ok(&["vm", "stop", "p"]);
}

#[test]
fn a_data_directory_others_may_write_is_refused_with_the_fix() {
    let env = Env::new(BIN);
    env.ok(&["vm", "list"]);
    let data = env.data_dir();
    let db = std::fs::read(format!("{data}/standby.db")).unwrap();
    for bad in [0o777, 0o775, 0o757] {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(bad)).unwrap();
        let err = env.fails(&["vm", "list"]);
        assert!(err.contains(&format!("mode {bad:04o}")) && err.contains(&format!("chmod 700 {data}")), "{err}");
        assert_eq!(mode(&data), bad, "refused, not changed");
    }
    assert_eq!(std::fs::read(format!("{data}/standby.db")).unwrap(), db);
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.ok(&["vm", "list"]);
}
