//! A QMP client: JSON lines over a unix socket. Asynchronous events that arrive between a
//! command and its answer are skipped: standby polls state (`query-block-jobs`) instead.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{QemuError, Result};

#[derive(Debug)]
pub struct Qmp {
    socket: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode. `timeout` bounds every read, so a
    /// hung QEMU turns into an error instead of a hung standby.
    pub fn connect(socket: &str, timeout: Duration) -> Result<Qmp> {
        let io = |source| QemuError::QmpIo { socket: socket.into(), source };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp { socket: socket.into(), reader: BufReader::new(stream), writer };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol(format!("no QMP greeting on {socket}")));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QemuError::QmpIo { socket: self.socket.clone(), source })?;
        if n == 0 {
            return Err(QemuError::QmpProtocol(format!("QEMU closed the monitor {}", self.socket)));
        }
        serde_json::from_str(&line).map_err(|e| QemuError::QmpProtocol(format!("bad QMP message: {e}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({"execute": command});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QemuError::QmpIo { socket: self.socket.clone(), source })?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QemuError::Qmp {
                    command: command.into(),
                    class: err["class"].as_str().unwrap_or("?").into(),
                    desc: err["desc"].as_str().unwrap_or("?").into(),
                });
            }
            return Err(QemuError::QmpProtocol(format!("unexpected QMP reply {reply}")));
        }
    }
}
