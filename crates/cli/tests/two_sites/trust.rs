//! Bad trust across the namespaces: refused before any request, nothing changed.

use std::process::Command;

use standby_testkit::Env;

use crate::sites::*;

/// A TLS 1.3 client in the controller's namespace that sends an agent a request line,
/// with the client certificate and key given (or none): what the agent answered, or
/// `refused: WHY` when it ended the connection before answering.
pub(crate) fn knock(sites: &Sites, address: &str, cert_key: Option<(&str, &str)>) -> String {
    const CLIENT: &str = r#"
import socket, ssl, sys
host, port = sys.argv[1].rsplit(":", 1)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
if len(sys.argv) > 3:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
try:
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="standby-agent") as s:
            s.sendall(b'{"op": "hello"}\n')
            got = s.recv(65536)
            print("answered: " + got.decode(errors="replace") if got else "refused: closed")
except (ssl.SSLError, OSError) as e:
    print(f"refused: {e}")
"#;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", sites.ctl(), "python3", "-c", CLIENT, address]);
    if let Some((cert, key)) = cert_key {
        c.args([cert, key]);
    }
    let out = c.output().expect("run python3");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A client certificate and key for `name`, signed with openssl by the authority in
/// `trust_dir`, valid from `start` until `end` (`YYYYMMDDHHMMSSZ`).
pub(crate) fn signed_between(dir: &str, trust_dir: &str, name: &str, start: &str, end: &str) -> (String, String) {
    const SIGN: &str = r#"
set -e
d=$1 trust=$2 name=$3 start=$4 end=$5
mkdir -p "$d"; : > "$d/index.txt"; echo 01 > "$d/serial"
printf '[ca]\ndefault_ca=d\n[d]\ndatabase=%s/index.txt\nnew_certs_dir=%s\nserial=%s/serial\ndefault_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n' "$d" "$d" "$d" > "$d/ca.cnf"
printf 'extendedKeyUsage=clientAuth,serverAuth\nsubjectAltName=DNS:%s\n' "$name" > "$d/ext"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" -subj "/CN=$name" 2>/dev/null
openssl ca -batch -notext -config "$d/ca.cnf" -cert "$trust/ca.pem" -keyfile "$trust/ca.key" -in "$d/$name.csr" \
  -out "$d/$name.pem" -startdate "$start" -enddate "$end" -extfile "$d/ext" 2>/dev/null
"#;
    let out = Command::new("bash").args(["-c", SIGN, "sign", dir, trust_dir, name, start, end]).output().unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (format!("{dir}/{name}.pem"), format!("{dir}/{name}.key"))
}

#[test]
fn bad_trust_across_the_namespaces_is_refused_and_changes_nothing() {
    let sites = Sites::with_hosts(3);
    let Enrolled { env, prod_dir, agents: _agents, .. } = enrolled(&sites);
    let site3_dir = env.path("agent-site3");
    let (_third, token) = agent(&sites.names[3], &site3_dir, &sites.address(3));
    env.ok(&["host", "add", "site3", "--address", &sites.address(3), "--token", &token]);
    let ours = (format!("{}/trust/controller.pem", env.data_dir()), format!("{}/trust/controller.key", env.data_dir()));
    // The client is sound: with the controller's own certificate the agent answers.
    let said = knock(&sites, &sites.address(1), Some((&ours.0, &ours.1)));
    assert!(said.starts_with("answered: "), "{said}");
    // A certificate of our authority signed here with openssl is accepted while it is
    // valid, which shows the expired one below is refused for its dates alone.
    let trust = format!("{}/trust", env.data_dir());
    let valid = signed_between(&env.path("certs"), &trust, "tester", "20260101000000Z", "20991231000000Z");
    let said = knock(&sites, &sites.address(1), Some((&valid.0, &valid.1)));
    assert!(said.starts_with("answered: "), "{said}");
    let expired = signed_between(&env.path("certs-old"), &trust, "tester", "20200101000000Z", "20200102000000Z");

    // site3 leaves: its certificate is revoked, and prod1 is told.
    let out = env.ok(&["host", "remove", "site3"]);
    assert!(out.contains("revoked") && !out.contains("not told"), "{out}");
    let before = files_under(&prod_dir);
    let hosts_before = env.json(&["host", "list"]);

    // Refused before any request is read: no certificate, a revoked one, one from
    // another authority (a second controller's); a used token and a wrong one enrol nothing.
    let site3 = (format!("{site3_dir}/agent.pem"), format!("{site3_dir}/agent.key"));
    let mut other = Env::new(BIN);
    other.in_netns(sites.ctl());
    let err = other.fails(&["host", "add", "prod1", "--address", &sites.address(1), "--token", &token]);
    assert!(err.contains("host prod1") && err.contains("refused"), "{err}");
    let foreign =
        (format!("{}/trust/controller.pem", other.data_dir()), format!("{}/trust/controller.key", other.data_dir()));
    for (what, cert) in [
        ("no certificate", None),
        ("a revoked certificate", Some(&site3)),
        ("a foreign CA", Some(&foreign)),
        ("an expired certificate", Some(&expired)),
    ] {
        let said = knock(&sites, &sites.address(1), cert.map(|(c, k)| (c.as_str(), k.as_str())));
        assert!(said.starts_with("refused: "), "{what}: {said}");
    }
    for bad in [token.clone(), format!("00ff.{}", token.split_once('.').unwrap().1)] {
        let err = env.fails(&["host", "add", "prod2", "--address", &sites.address(1), "--token", &bad]);
        assert!(err.contains("prod2") && (err.contains("refused") || err.contains("wrong")), "{err}");
    }

    // Nothing changed: the agent's files, and both hosts online as before.
    assert_eq!(files_under(&prod_dir), before, "a refused connection changes nothing on the agent");
    let hosts = env.json(&["host", "list"]);
    let names = |v: &serde_json::Value| -> Vec<(String, String)> {
        v.as_array().unwrap().iter().map(|h| (h["name"].to_string(), h["state"].to_string())).collect()
    };
    assert_eq!(names(&hosts), names(&hosts_before));
    assert!(!names(&hosts).iter().any(|(n, _)| n.contains("prod2") || n.contains("site3")), "{hosts}");
}
