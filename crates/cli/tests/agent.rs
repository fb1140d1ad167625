//! User story: a DR host runs `standby agent`; the controller enrols it with the token it
//! printed, and from then on reaches it over mutual TLS only. A wrong or reused token
//! changes nothing; an agent that stops answering is shown offline; a host in use cannot
//! be removed. An error on the agent's side names the host. (Whole lifecycles across
//! agents in network namespaces: `two_sites.rs`.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use standby_testkit::Env;

const BIN: &str = env!("CARGO_BIN_EXE_standby");

/// A running agent on loopback, killed when dropped.
struct Agent {
    child: Child,
    address: String,
    token: Option<String>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an agent with its files in `dir` on a free loopback port, and reads what it
/// says at start (its address and, before enrolment, its token).
fn agent(dir: &str, listen: &str) -> Agent {
    let mut child = Command::new(BIN)
        .args(["--data-dir", dir, "agent", "--listen", listen])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut address, mut token) = (None, None);
    let start = Instant::now();
    // The token, when there is one, comes right after the address.
    let window = Duration::from_millis(500);
    while address.is_none() || (token.is_none() && start.elapsed() < window) {
        let wait = if address.is_some() { window.saturating_sub(start.elapsed()) } else { Duration::from_secs(20) };
        let line = match rx.recv_timeout(wait) {
            Ok(line) => line,
            Err(_) if address.is_some() => break,
            Err(e) => panic!("the agent said nothing ({e}); it is {:?}", child.try_wait()),
        };
        if let Some(a) = line.strip_prefix("listening on ") {
            address = Some(a.to_owned());
        }
        if let Some(t) = line.strip_prefix("enrolment token: ") {
            token = Some(t.to_owned());
        }
    }
    Agent { child, address: address.unwrap(), token }
}

fn host<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array().unwrap().iter().find(|h| h["name"] == name)
}

#[test]
fn an_agent_is_enrolled_once_with_its_token_and_then_reached_over_mutual_tls() {
    let env = Env::bounded(BIN, Duration::from_secs(60));
    let dir = env.path("agent-dr1");
    let a = agent(&dir, "127.0.0.1:0");
    let token = a.token.clone().expect("a new agent prints its enrolment token");
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(format!("{dir}/{f}")).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode("enrolment-token"), 0o600);
    assert_eq!(mode("."), 0o700, "the agent's directory is its owner's only");
    assert_eq!(std::fs::read_to_string(format!("{dir}/enrolment-token")).unwrap().trim(), token);

    // A wrong secret, or no token at all, enrols nothing.
    let pin = token.split_once('.').unwrap().1;
    let err = env.fails(&["host", "add", "dr1", "--address", &a.address, "--token", &format!("00ff.{pin}")]);
    assert!(err.contains("wrong enrolment token") && err.contains("dr1"), "{err}");
    let err = env.fails(&["host", "add", "dr1", "--address", &a.address, "--token", "garbage"]);
    assert!(err.contains("enrolment token"), "{err}");
    assert!(host(&env.json(&["host", "list"]), "dr1").is_none(), "nothing was added");

    // A peer that connects and says nothing holds up nobody: enrolment does not wait for
    // its 30 s timeout.
    let _stalled = std::net::TcpStream::connect(&a.address).unwrap();
    let r =
        env.run_within(Duration::from_secs(15), &["host", "add", "dr1", "--address", &a.address, "--token", &token]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let out = r.stdout;
    assert!(out.contains("host dr1 enrolled"), "{out}");
    assert!(!std::path::Path::new(&format!("{dir}/enrolment-token")).exists(), "the token is used up");
    assert_eq!(mode("agent.key"), 0o600);
    assert_eq!(mode("../data/trust/ca.key"), 0o600, "the authority's key is the controller's owner's only");
    let list = env.json(&["host", "list"]);
    let dr1 = host(&list, "dr1").unwrap();
    assert_eq!((dr1["state"].as_str(), dr1["kind"].as_str()), (Some("online"), Some("agent")), "{list}");
    assert_eq!(dr1["address"], a.address.as_str());
    assert!(dr1["version"].is_string() && dr1["last_seen"].is_string(), "{dr1}");
    assert!(env.ok(&["host", "list"]).contains("local  accel="), "the local host reads as before");

    // The used token enrols nothing else, and a second controller (another authority) is
    // refused in the handshake.
    let err = env.fails(&["host", "add", "dr2", "--address", &a.address, "--token", &token]);
    assert!(err.contains("host dr2") && err.contains("refused"), "{err}");
    assert!(host(&env.json(&["host", "list"]), "dr2").is_none());
    let other = Env::bounded(BIN, Duration::from_secs(60));
    let err = other.fails(&["host", "add", "dr1", "--address", &a.address, "--token", &token]);
    assert!(err.contains("host dr1") && err.contains("refused"), "{err}");

    // The agent carries out what the controller asks on its host, and what fails there is
    // reported with the host's name: here a disk that host does not have.
    let missing = env.path("no-such-disk.qcow2");
    let err = env.fails(&["vm", "create", "web", "--host", "dr1", "--disk", &missing]);
    assert!(err.contains("host dr1") && err.contains(&missing), "{err}");
    assert!(env.fails(&["vm", "show", "web"]).contains("unknown VM"), "nothing was created");

    // A stopped agent is offline; started again, it answers as the same host.
    let address = a.address.clone();
    drop(a);
    let list = env.json(&["host", "list"]);
    let dr1 = host(&list, "dr1").unwrap();
    assert_eq!(dr1["state"], "offline", "{list}");
    assert!(dr1["error"].as_str().is_some_and(|e| e.contains("dr1") && e.contains("unreachable")), "{dr1}");
    assert_eq!(dr1["used_by"], serde_json::json!([]), "nothing uses it yet, so it blocks nothing");
    // Something that takes the agent's port and never answers costs `host list` a few
    // seconds, and is named for what it is.
    let squatter = std::net::TcpListener::bind(&address).unwrap();
    let r = env.run_within(Duration::from_secs(15), &["host", "list", "--json"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let dr1 = host(&list, "dr1").unwrap();
    assert_eq!(dr1["state"], "offline", "{list}");
    assert!(dr1["error"].as_str().is_some_and(|e| e.contains("gave no answer in time")), "{dr1}");
    drop(squatter);
    let again = agent(&dir, &address);
    assert!(again.token.is_none(), "an enrolled agent prints no token");
    assert_eq!(host(&env.json(&["host", "list"]), "dr1").unwrap()["state"], "online");

    // A second agent accepts the first one's certificate, as agents read from each other.
    let dir2 = env.path("agent-dr2");
    let b = agent(&dir2, "127.0.0.1:0");
    env.ok(&["host", "add", "dr2", "--address", &b.address, "--token", b.token.as_deref().unwrap()]);
    let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap();
    let as_dr1 =
        || standby_trust::client_config(&read("ca.pem"), &read("agent.pem"), &read("agent.key"), None).unwrap();
    assert!(standby_agent::hello("dr2", &b.address, as_dr1()).is_ok(), "dr2 takes dr1's certificate");

    let err = env.fails(&["host", "remove", "local"]);
    assert!(err.contains("cannot be removed"), "{err}");
    let out = env.ok(&["host", "remove", "dr1"]);
    assert!(out.contains("revoked") && !out.contains("not told"), "{out}");
    assert!(host(&env.json(&["host", "list"]), "dr1").is_none());
    let history = env.ok(&["history", "host:dr1"]);
    assert!(
        history.contains("host add") && history.contains("host remove") && history.contains("revoked"),
        "{history}"
    );
    // dr2 now refuses dr1's certificate in the handshake, and still answers the controller.
    let err = standby_agent::hello("dr2", &b.address, as_dr1()).unwrap_err().to_string();
    assert!(err.contains("refused"), "{err}");
    assert_eq!(host(&env.json(&["host", "list"]), "dr2").unwrap()["state"], "online");
    assert!(std::path::Path::new(&format!("{dir2}/crl.pem")).exists());

    // An agent that was down at the removal learns of it at the next `host list`.
    let address2 = b.address.clone();
    drop(b);
    std::fs::remove_file(format!("{dir2}/crl.pem")).unwrap();
    let _b = agent(&dir2, &address2);
    assert!(standby_agent::hello("dr2", &address2, as_dr1()).is_ok(), "without the list dr2 would take it");
    let dr2 = host(&env.json(&["host", "list"]), "dr2").unwrap().clone();
    assert!(dr2["error"].is_null(), "{dr2}");
    assert!(standby_agent::hello("dr2", &address2, as_dr1()).is_err(), "host list gave dr2 the list again");
}
