//! A client for qemu-guest-agent on a VM's virtio-serial port (QEMU serves the host end as
//! a unix socket): JSON commands, each answered by one JSON line.
//!
//! The channel is a byte pipe with no session: an answer to a command an earlier client
//! gave up on may still be on its way. So every connection starts with
//! `guest-sync-delimited`, whose answer the agent precedes with a 0xFF byte, and everything
//! before that byte is stale. Every read has a deadline: an agent that hangs (or a guest
//! without one) is a timeout, never a hung standby.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What talking to a guest agent can end in.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the guest agent's socket {socket}")]
    Connect { socket: String, source: std::io::Error },
    #[error("the guest agent did not answer {command} within {secs} s")]
    Timeout { command: String, secs: u64 },
    #[error("the guest agent refused {command}: {desc}")]
    Refused { command: String, desc: String },
    #[error("the VM has no guest agent channel")]
    NotConfigured,
    #[error("the guest agent's channel failed during {command}: {detail}")]
    Channel { command: String, detail: String },
}

pub type Result<T> = std::result::Result<T, AgentError>;

#[derive(Debug)]
pub struct GuestAgent {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

/// How a command run in the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exited {
    pub code: i32,
    /// What it printed (stdout, then stderr), at most what the agent captured.
    pub output: String,
}

impl GuestAgent {
    /// Connects and synchronises; `timeout` bounds the synchronisation, so a VM whose
    /// guest runs no agent is told apart quickly.
    pub fn connect(socket: &str, timeout: Duration) -> Result<GuestAgent> {
        let stream =
            UnixStream::connect(socket).map_err(|source| AgentError::Connect { socket: socket.into(), source })?;
        let writer = stream.try_clone().map_err(|source| AgentError::Connect { socket: socket.into(), source })?;
        let mut agent = GuestAgent { reader: BufReader::new(stream), writer };
        agent.sync(timeout)?;
        Ok(agent)
    }

    fn sync(&mut self, timeout: Duration) -> Result<()> {
        const COMMAND: &str = "guest-sync-delimited";
        // Unique enough that a stale answer to an earlier sync is not taken for this one
        // (the agent takes any integer; JSON readers keep 53 bits exactly).
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let id = ((nanos as u64) ^ (u64::from(std::process::id()) << 32)) % (1 << 52);
        // A lone 0xFF first: the agent drops whatever half a command an earlier client,
        // killed mid-write, left in its parser.
        self.writer
            .write_all(&[0xFF])
            .map_err(|e| AgentError::Channel { command: COMMAND.into(), detail: e.to_string() })?;
        self.send(COMMAND, &json!({ "id": id }))?;
        let deadline = Instant::now() + timeout;
        loop {
            // Everything up to the delimiter is what the channel held before.
            let mut skipped = Vec::new();
            self.read_until(0xFF, &mut skipped, COMMAND, deadline, timeout)?;
            let mut line = String::new();
            self.set_deadline(COMMAND, deadline, timeout)?;
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(AgentError::Channel { command: COMMAND.into(), detail: "QEMU closed it".into() }),
                Ok(_) => {}
                Err(e) => return Err(Self::read_err(COMMAND, e, timeout)),
            }
            // A line that does not read, or answers another sync, is stale: on to the next.
            let answer: Option<Value> = serde_json::from_str(line.trim()).ok();
            if answer.and_then(|a| a.get("return").and_then(Value::as_u64)) == Some(id) {
                return Ok(());
            }
        }
    }

    fn send(&mut self, command: &str, arguments: &Value) -> Result<()> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments.clone();
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| AgentError::Channel { command: command.into(), detail: e.to_string() })
    }

    fn set_deadline(&mut self, command: &str, deadline: Instant, timeout: Duration) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AgentError::Timeout { command: command.into(), secs: timeout.as_secs() });
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| AgentError::Channel { command: command.into(), detail: e.to_string() })
    }

    fn read_err(command: &str, e: std::io::Error, timeout: Duration) -> AgentError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                AgentError::Timeout { command: command.into(), secs: timeout.as_secs() }
            }
            _ => AgentError::Channel { command: command.into(), detail: e.to_string() },
        }
    }

    fn read_until(
        &mut self,
        byte: u8,
        into: &mut Vec<u8>,
        command: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        loop {
            self.set_deadline(command, deadline, timeout)?;
            let mut b = [0u8; 1];
            match self.reader.read(&mut b) {
                Ok(0) => return Err(AgentError::Channel { command: command.into(), detail: "QEMU closed it".into() }),
                Ok(_) if b[0] == byte => return Ok(()),
                Ok(_) => into.push(b[0]),
                Err(e) => return Err(Self::read_err(command, e, timeout)),
            }
        }
    }

    fn read_line(&mut self, command: &str, deadline: Instant, timeout: Duration) -> Result<Value> {
        loop {
            self.set_deadline(command, deadline, timeout)?;
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(AgentError::Channel { command: command.into(), detail: "QEMU closed it".into() }),
                Ok(_) if line.trim().is_empty() => continue,
                Ok(_) => {
                    return serde_json::from_str(line.trim_start_matches('\u{FF}')).map_err(|e| AgentError::Channel {
                        command: command.into(),
                        detail: format!("unreadable answer {line:?}: {e}"),
                    })
                }
                Err(e) => return Err(Self::read_err(command, e, timeout)),
            }
        }
    }

    fn run(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        self.send(command, &arguments)?;
        let deadline = Instant::now() + timeout;
        let answer = self.read_line(command, deadline, timeout)?;
        if let Some(err) = answer.get("error") {
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("no reason given");
            return Err(AgentError::Refused { command: command.into(), desc: desc.into() });
        }
        Ok(answer.get("return").cloned().unwrap_or(Value::Null))
    }
}

impl AgentChannel for GuestAgent {
    fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value> {
        self.run(command, arguments, timeout)
    }
}

/// A way to give the guest agent one command and have its answer: the socket QEMU serves
/// ([`GuestAgent`]), or a management layer that owns that socket (libvirt's
/// `qemu-agent-command`). The DR verbs are the same over either.
pub trait AgentChannel {
    /// Runs one command and returns what it returned, waiting at most `timeout`.
    fn execute(&mut self, command: &str, arguments: Value, timeout: Duration) -> Result<Value>;

    /// Freezes every filesystem the guest can freeze; how many it froze.
    fn freeze(&mut self, timeout: Duration) -> Result<u64> {
        let n = self.execute("guest-fsfreeze-freeze", json!({}), timeout)?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// Thaws them; how many it thawed (0 when none was frozen).
    fn thaw(&mut self, timeout: Duration) -> Result<u64> {
        let n = self.execute("guest-fsfreeze-thaw", json!({}), timeout)?;
        Ok(n.as_u64().unwrap_or(0))
    }

    /// `frozen` or `thawed`, as the agent says.
    fn freeze_status(&mut self, timeout: Duration) -> Result<String> {
        let s = self.execute("guest-fsfreeze-status", json!({}), timeout)?;
        Ok(s.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `command` with the guest's `/bin/sh -c` and waits for it to end, at most
    /// `timeout` in all.
    fn exec(&mut self, command: &str, timeout: Duration) -> Result<Exited> {
        let deadline = Instant::now() + timeout;
        let started = self.execute(
            "guest-exec",
            json!({ "path": "/bin/sh", "arg": ["-c", command], "capture-output": true }),
            timeout,
        )?;
        let pid = started.get("pid").and_then(Value::as_i64).ok_or_else(|| AgentError::Channel {
            command: "guest-exec".into(),
            detail: format!("no pid in {started}"),
        })?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::Timeout {
                    command: format!("the command {command:?}"),
                    secs: timeout.as_secs(),
                });
            }
            let status = self.execute("guest-exec-status", json!({ "pid": pid }), left)?;
            if status.get("exited").and_then(Value::as_bool) == Some(true) {
                let text = |key: &str| {
                    status
                        .get(key)
                        .and_then(Value::as_str)
                        .and_then(base64_decode)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                let code = status.get("exitcode").and_then(Value::as_i64).unwrap_or(-1) as i32;
                return Ok(Exited { code, output: format!("{}{}", text("out-data"), text("err-data")) });
            }
            std::thread::sleep(Duration::from_millis(100).min(left));
        }
    }
}

/// The agent sends captured output as standard base64.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// An agent that answers a stale command first: the client must skip it.
    #[test]
    fn a_stale_answer_before_the_sync_delimiter_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut flush = [0u8; 1];
            r.read_exact(&mut flush).unwrap();
            assert_eq!(flush[0], 0xFF, "the client flushes the agent's parser first");
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["arguments"]["id"].clone();
            // A stale answer, a broken line and a stale sync, each before a delimiter.
            s.write_all(b"{\"return\": 1}\n\xff{\"ret\n\xff{\"return\": 12345}\n\xff").unwrap();
            s.write_all(format!("{{\"return\": {id}}}\n").as_bytes()).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("guest-fsfreeze-freeze"), "{line}");
            s.write_all(b"{\"return\": 2}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            // No answer to the thaw, and the channel stays open: the client times out.
            std::thread::sleep(Duration::from_secs(1));
            line
        });
        let mut agent = GuestAgent::connect(path.to_str().unwrap(), Duration::from_secs(5)).unwrap();
        assert_eq!(agent.freeze(Duration::from_secs(5)).unwrap(), 2);
        let err = agent.thaw(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout { .. }), "{err}");
        assert!(server.join().unwrap().contains("guest-fsfreeze-thaw"));
    }

    #[test]
    fn an_agent_that_never_answers_the_sync_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = GuestAgent::connect(path.to_str().unwrap(), Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("did not answer guest-sync-delimited"), "{err}");
    }
}
