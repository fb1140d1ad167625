//! libvirt-managed hosts behind agents: each agent drives its host's VMs through the local
//! libvirt daemon (`standby agent --libvirt qemu:///system`), and everything else is as
//! between any two agents: the data moves agent to agent, the controller moves none.
//! (Both "hosts" share this machine's libvirtd; the domains' names keep them apart.)

use std::time::Duration;

use standby_testkit::libvirt::{self, checkpoints, domains, open_for_qemu, Domain};
use standby_testkit::{ledger_append, make_disk, tpm_resets, Ledger};

use crate::sites::*;

#[test]
fn a_domain_on_a_libvirt_host_behind_its_agent_is_replicated_failed_over_and_failed_back() {
    libvirt::ensure_daemon();
    let sites = Sites::new();
    let mut env = standby_testkit::Env::new(BIN);
    env.in_netns(sites.ctl());
    open_for_qemu(env.root());
    let (prod_dir, dr_dir) = (env.path("agent-prod"), env.path("agent-dr"));

    // An agent told to drive a libvirt daemon that does not answer says so and makes nothing.
    let down = std::process::Command::new(BIN)
        .args(["--data-dir", &prod_dir, "agent", "--listen", "127.0.0.1:0"])
        .args(["--libvirt", "qemu:///system?socket=/tmp/standby-no-such-libvirt-sock"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&down.stderr);
    assert!(!down.status.success() && said.contains("is libvirtd running there"), "{said}");
    assert!(!std::path::Path::new(&prod_dir).exists(), "nothing was made for the refused agent");

    let with = ["--libvirt", libvirt::URI];
    let (_prod, prod_token) =
        start_agent_with(&sites.names[1], &prod_dir, &sites.address(1), "enrolment token: ", &with);
    let (_dr, dr_token) = start_agent_with(&sites.names[2], &dr_dir, &sites.address(2), "enrolment token: ", &with);
    env.ok(&["host", "add", "prod1", "--address", &sites.address(1), "--token", &prod_token]);
    env.ok(&["host", "add", "dr1", "--address", &sites.address(2), "--token", &dr_token]);
    let hosts = env.ok(&["host", "list"]);
    assert!(hosts.matches("VMs through libvirt at qemu:///system").count() == 2, "{hosts}");

    // A domain libvirt runs on the production host, imported through its agent.
    let name = format!("lvag{}", std::process::id() % 100_000);
    let disk = env.path("src/web.qcow2");
    make_disk(&disk, "qcow2", 64, &[(0x5a, 0, 4)]);
    // With a TPM: its state goes through the agents too.
    let append = ledger_append(4096, 3000, 20_000);
    let dom = Domain::define_booting(&name, &disk, &append, &env.path("src/console.log"), &[], None, true);
    env.ok(&["vm", "import", &name, "--host", "prod1"]);
    let vms = env.json(&["vm", "list"]);
    assert_eq!((vms[0]["host"].as_str(), vms[0]["driver"].as_str()), (Some("prod1"), Some("libvirt")), "{vms}");
    env.ok(&["job", "create", "j", "--vm", &name, "--target-host", "dr1", "--target-dir", &env.path("dr")]);
    env.ok(&["vm", "start", &name]);
    assert_eq!(dom.state(), "running", "started through libvirt");
    env.wait_console(&name, Duration::from_secs(90), "ledger writes", |c| Ledger::acknowledged(c) >= 10);
    let first = tpm_resets(&env.console(&name))[0];

    // Two runs between the agents, through libvirt's checkpoints: full, then changed blocks.
    let ledger = Ledger { start_block: 4096 };
    for method in ["full", "cbt"] {
        let acked = Ledger::acknowledged(&env.console(&name));
        let out = env.ok(&["job", "run", "j"]);
        assert!(out.contains(&format!("({method},")) && out.contains("on the wire between hosts"), "{out}");
        let k = ledger_records(ledger, &env, &env.latest_disk(&name, 0));
        assert!(k >= acked, "the {method} point holds {k} records; {acked} were acknowledged before the run");
        assert_eq!(checkpoints(&name).len(), 1, "only the newest point's checkpoint stays: {:?}", checkpoints(&name));
    }

    // Planned failover: the domain shut down through libvirt, the replica domain defined
    // and started on the DR host through its agent, with every acknowledged write.
    env.ok(&["failover", "planned", &name, "--shutdown-timeout", "30"]);
    let replica = format!("{name}_replica");
    assert_eq!(dom.state(), "shut off");
    assert_eq!(domains(&name), [name.clone(), replica.clone()], "virsh list --all");
    let resumed = env.wait_console(&replica, Duration::from_secs(90), "the replica's ledger", |c| {
        c.contains("LEDGER-RESUME") && Ledger::acknowledged(c) >= 5
    });
    let found: u64 =
        resumed.split("LEDGER-RESUME ").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap();
    let final_k = ledger_records(ledger, &env, &disk);
    assert_eq!(found, final_k, "the replica starts from the source's final state");
    assert_eq!(tpm_resets(&resumed), [first + 1], "and its TPM from the source's TPM state");

    // Failback to the original across the agents: the replica's writes land in the
    // source's disk, the domain starts through libvirt on the production host.
    env.ok(&["failback", &name, "--to", "original", "--switch", "manual"]);
    env.ok(&["failback", "switch", &name]);
    let acked = Ledger::acknowledged(&env.console(&replica));
    let k = ledger_records(ledger, &env, &disk);
    assert!(k >= acked, "the source holds records 1..={k}, the replica had acknowledged {acked}");
    env.ok(&["vm", "start", &name]);
    assert_eq!(dom.state(), "running");
    env.wait_console(&name, Duration::from_secs(90), "the source's TPM", |c| !tpm_resets(c).is_empty());
    assert_eq!(tpm_resets(&env.console(&name)), [first + 2], "the source's TPM goes on from the replica's");
    env.ok(&["failback", "commit", &name]);
    assert_eq!(domains(&name), std::slice::from_ref(&name), "virsh list --all after commit");
    env.ok(&["vm", "stop", &name]);
    let out = env.ok(&["job", "run", "j"]);
    assert!(out.contains("(cbt,"), "replication goes on incrementally: {out}");
    assert!(standby_testkit::identical(&env.latest_disk(&name, 0), &disk), "the newest point is the source's disk");
}
