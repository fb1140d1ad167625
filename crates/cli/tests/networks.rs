//! User story: a production VM sits on a bridge with a MAC its network knows (DHCP
//! reservations, firewall rules). Its replica must serve from the DR site's bridge with
//! that MAC, and failback puts it back on its own bridge. standby's own driver puts a
//! bridged NIC on a tap device it attaches to the bridge; the job's network map says which
//! DR bridge each production bridge becomes.

use std::time::Duration;

use standby_testkit::{guest, identical, ledger_append, make_disk, read_image, Bridge, Env, Ledger};

const BIN: &str = env!("CARGO_BIN_EXE_standby");
const MAC: &str = "52:54:00:5b:01:01";

/// Bridge names unique to this test process (interfaces are the machine's).
fn unique(what: &str) -> String {
    format!("{what}{}", std::process::id() % 100_000)
}

#[test]
fn a_bridged_q35_vm_fails_over_onto_the_mapped_bridge_with_its_mac_and_machine_and_back_onto_its_own() {
    let env = Env::new(BIN);
    let (prod, dr) = (Bridge::new(&unique("sbnp")), Bridge::new(&unique("sbnd")));
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 48, &[(0x21, 0, 4)]);
    let (kernel, initrd) = guest();
    let append = ledger_append(4096, 3000, 20_000);
    let nic = format!("virtio-net-pci,bridge={},mac={MAC}", prod.0);
    env.ok(&[
        "vm",
        "create",
        "web",
        "--disk",
        &disk,
        "--memory",
        "192",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        &append,
        "--nic",
        &nic,
        "--machine",
        "q35",
        "--cpu-model",
        "qemu64",
    ]);
    env.ok(&["vm", "start", "web"]);
    let guest_nic = format!("STANDBY-GUEST nic eth0 {MAC}");
    env.wait_console("web", Duration::from_secs(90), "its NIC and ledger writes", |c| {
        c.contains(&guest_nic) && Ledger::acknowledged(c) >= 10
    });
    assert_eq!(prod.ports().len(), 1, "the VM's tap is on its bridge: {:?}", prod.ports());
    assert!(dr.ports().is_empty());

    // A job that does not say where the bridge goes at the DR site is refused.
    let dir = env.path("dr");
    let err = env.fails(&["job", "create", "j", "--vm", "web", "--target-host", "local", "--target-dir", &dir]);
    assert!(err.contains(&format!("has a NIC on bridge:{}", prod.0)) && err.contains("--network-map"), "{err}");
    // (The running guest writes its disk, so the snapshot is of what standby holds.)
    assert_eq!(env.json(&["job", "list"]), serde_json::json!([]), "a refused job changes nothing");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing is claimed in the DR directory");
    // Nor one that maps it where the DR host cannot put it: found now, not at the failover.
    let gone = unique("sbngone");
    for (to, says) in [
        (format!("bridge:{gone}"), format!("has no bridge {gone}")),
        ("default".into(), "bridges and taps only".into()),
    ] {
        let map = format!("bridge:{}={to}", prod.0);
        let err = env.fails(&[
            "job",
            "create",
            "j",
            "--vm",
            "web",
            "--target-host",
            "local",
            "--target-dir",
            &dir,
            "--network-map",
            &map,
        ]);
        assert!(err.contains(&says), "{map}: {err}");
    }
    assert_eq!(env.json(&["job", "list"]), serde_json::json!([]), "refused jobs change nothing");
    let map = format!("bridge:{}=bridge:{}", prod.0, dr.0);
    env.ok(&[
        "job",
        "create",
        "j",
        "--vm",
        "web",
        "--target-host",
        "local",
        "--target-dir",
        &dir,
        "--network-map",
        &map,
    ]);
    env.ok(&["job", "run", "j"]);

    // Planned failover: the source goes down, the replica comes up on the DR bridge with
    // the source's MAC, as its guest sees it.
    env.ok(&["failover", "planned", "web", "--shutdown-timeout", "30"]);
    env.wait_console("web_replica", Duration::from_secs(90), "the replica's NIC and writes", |c| {
        c.contains(&guest_nic) && Ledger::acknowledged(c) >= 10
    });
    assert!(prod.ports().is_empty(), "the source is off its bridge: {:?}", prod.ports());
    assert_eq!(dr.ports().len(), 1, "the replica's tap is on the DR bridge: {:?}", dr.ports());
    // The machine type and CPU model come along: the guest sees the hardware it knows.
    let qemu = env.processes().into_iter().find(|p| p.contains("guest=web_replica")).expect("the replica's QEMU");
    assert!(qemu.contains("-machine q35") && qemu.contains("-cpu qemu64"), "{qemu}");
    let shown = env.json(&["vm", "show", "web_replica"]);
    assert_eq!((shown["machine"].as_str(), shown["cpu_model"].as_str()), (Some("q35"), Some("qemu64")), "{shown}");

    // Failback to the original: the source comes back on its own bridge, not the DR one.
    env.ok(&["failback", "web", "--to", "original", "--switch", "manual"]);
    env.ok(&["failback", "switch", "web"]);
    let acked = Ledger::acknowledged(&env.console("web_replica"));
    let k = Ledger { start_block: 4096 }.records_in(&read_image(&disk), 3000).unwrap();
    assert!(k >= acked, "the original holds records 1..={k}, the replica had acknowledged {acked}");
    assert!(dr.ports().is_empty(), "the replica is off the DR bridge: {:?}", dr.ports());
    env.ok(&["vm", "start", "web"]);
    let resumed = format!("LEDGER-RESUME {k}");
    env.wait_console("web", Duration::from_secs(90), "the source's NIC again", |c| {
        c.contains(&guest_nic) && c.contains(&resumed)
    });
    assert_eq!(prod.ports().len(), 1, "the source's tap is on its own bridge again: {:?}", prod.ports());
    env.ok(&["failback", "commit", "web"]);
    env.ok(&["vm", "shutdown", "web", "--timeout", "30"]);
    assert!(prod.ports().is_empty() && dr.ports().is_empty(), "no tap outlives its VM");
    env.ok(&["job", "run", "j"]);
    assert!(identical(&env.latest_disk("web", 0), &disk), "replication goes on from the failback");
}

#[test]
fn a_nic_standby_cannot_put_on_a_network_is_refused_with_what_to_write() {
    let env = Env::new(BIN);
    let disk = env.path("src/a.qcow2");
    make_disk(&disk, "qcow2", 16, &[]);
    for (nic, says) in [
        ("e1000,bridge=br0", "add mac="),
        ("e1000,bridge=br0,mac=01:00:5e:00:00:01", "unicast"),
        ("e1000,vlan=4", "MODEL[,bridge=NAME|,tap=NAME][,mac=MAC]"),
        ("ne2k_pci", "is not one of"),
    ] {
        let err = env.fails(&["vm", "create", "a", "--disk", &disk, "--nic", nic]);
        assert!(err.contains(says), "{nic}: {err}");
    }
    let err = env.fails(&["vm", "create", "a", "--disk", &disk, "--machine", "q35,accel=kvm"]);
    assert!(err.contains("-machine help"), "{err}");
    assert_eq!(env.json(&["vm", "list"]), serde_json::json!([]), "refused VMs are not defined");
    // A bridge the host does not have: the VM is defined, but does not start, and says why.
    let gone = unique("sbgone");
    env.ok(&["vm", "create", "a", "--disk", &disk, "--nic", &format!("e1000,bridge={gone},mac=52:54:00:5b:02:01")]);
    let err = env.fails(&["vm", "start", "a"]);
    assert!(err.contains(&format!("bridge:{gone}, which host local does not have")), "{err}");
    assert_eq!(env.json(&["vm", "show", "a"])["state"], "stopped");
}

/// A persistent tap device this test made, removed when dropped.
struct Tap(String);

impl Tap {
    fn new(name: &str) -> Tap {
        let _ = std::process::Command::new("ip").args(["link", "del", name]).output();
        let o = std::process::Command::new("ip").args(["tuntap", "add", "dev", name, "mode", "tap"]).output().unwrap();
        assert!(o.status.success(), "ip tuntap: {}", String::from_utf8_lossy(&o.stderr));
        Tap(name.into())
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[test]
fn a_nic_on_an_operators_tap_fails_over_onto_the_mapped_bridge_with_its_mac() {
    let env = Env::new(BIN);
    let tap = Tap::new(&unique("sbtp"));
    let dr = Bridge::new(&unique("sbtd"));
    let disk = env.path("src/t.qcow2");
    make_disk(&disk, "qcow2", 16, &[(0x31, 0, 1)]);
    make_disk(&env.path("src/t2.qcow2"), "qcow2", 16, &[]);
    let (kernel, initrd) = guest();
    let mac = "52:54:00:5b:03:01";
    let nic = format!("virtio-net-pci,tap={},mac={mac}", tap.0);
    env.ok(&[
        "vm",
        "create",
        "t",
        "--disk",
        &disk,
        "--memory",
        "128",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--append",
        "console=ttyS0 quiet panic=-1",
        "--nic",
        &nic,
    ]);
    env.ok(&["vm", "start", "t"]);
    let qemu = env.processes().into_iter().find(|p| p.contains("guest=t ")).expect("the VM's QEMU");
    assert!(qemu.contains(&format!("ifname={},script=no", tap.0)), "QEMU opens the operator's tap: {qemu}");
    let guest_nic = format!("STANDBY-GUEST nic eth0 {mac}");
    env.wait_console("t", Duration::from_secs(90), "its NIC", |c| c.contains(&guest_nic));
    env.ok(&["vm", "stop", "t"]);

    // The map names the tap as tap:NAME; a destination the DR host lacks is refused.
    let dir = env.path("dr");
    let gone = format!("tap:{}", unique("sbtgone"));
    let err = env.fails(&[
        "job",
        "create",
        "j",
        "--vm",
        "t",
        "--target-host",
        "local",
        "--target-dir",
        &dir,
        "--network-map",
        &format!("tap:{}={gone}", tap.0),
    ]);
    assert!(err.contains("has no tap device") && err.contains("ip tuntap add"), "{err}");
    // A tap takes one NIC: two mapped onto one are refused now, not at the failover.
    let other = Tap::new(&unique("sbto"));
    env.ok(&["vm", "create", "t2", "--disk", &env.path("src/t2.qcow2"), "--format", "qcow2", "--nic", &nic]);
    let err = env.fails(&[
        "job",
        "create",
        "j",
        "--vm",
        "t",
        "--vm",
        "t2",
        "--target-host",
        "local",
        "--target-dir",
        &dir,
        "--network-map",
        &format!("tap:{}=tap:{}", tap.0, other.0),
    ]);
    assert!(err.contains("a tap takes one NIC"), "{err}");
    env.ok(&["vm", "delete", "t2"]);
    let map = format!("tap:{}=bridge:{}", tap.0, dr.0);
    env.ok(&["job", "create", "j", "--vm", "t", "--target-host", "local", "--target-dir", &dir, "--network-map", &map]);
    env.ok(&["job", "run", "j"]);
    env.ok(&["failover", "t"]);
    env.wait_console("t_replica", Duration::from_secs(90), "the replica's NIC", |c| c.contains(&guest_nic));
    assert_eq!(dr.ports().len(), 1, "the replica is on the DR bridge: {:?}", dr.ports());
    env.ok(&["failover", "undo", "t"]);
    assert!(dr.ports().is_empty(), "its tap went with it");
}
