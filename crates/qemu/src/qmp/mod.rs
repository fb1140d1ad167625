//! A QMP client: JSON lines over a unix socket, typed commands ([`commands`]) in, typed
//! replies out. Events that arrive between a command and its answer are kept when they are
//! ones standby acts on ([`events`]): block jobs end asynchronously, and a job that failed
//! is gone from `query-block-jobs` by the time anyone polls.

pub mod commands;
pub mod events;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{QemuError, Result};
pub use commands::Command;
pub use events::Event;

#[derive(Debug)]
pub struct Qmp {
    socket: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Event>,
}

impl Qmp {
    /// Connects and leaves capabilities negotiation mode. `timeout` bounds every read, so a
    /// hung QEMU turns into an error instead of a hung standby.
    pub fn connect(socket: &str, timeout: Duration) -> Result<Qmp> {
        let io = |source| QemuError::QmpIo { socket: socket.into(), source };
        let stream = UnixStream::connect(socket).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut qmp = Qmp { socket: socket.into(), reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::QmpProtocol(format!("no QMP greeting on {socket}")));
        }
        qmp.run(&commands::QmpCapabilities {})?;
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

    /// Runs one command and returns its reply.
    pub fn run<C: Command>(&mut self, command: &C) -> Result<C::Reply> {
        let arguments = serde_json::to_value(command)
            .map_err(|e| QemuError::QmpProtocol(format!("cannot encode {}: {e}", C::NAME)))?;
        let reply = self.execute(C::NAME, arguments)?;
        serde_json::from_value(reply).map_err(|e| {
            QemuError::QmpProtocol(format!("QEMU's reply to {} does not read as its schema: {e}", C::NAME))
        })
    }

    /// The events kept since the last call, oldest first. Events QEMU sent while nothing
    /// was asked are read with the next command's reply.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({"execute": command});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QemuError::QmpIo { socket: self.socket.clone(), source })?;
        // A known event that does not read as its schema is an error, but only once the
        // command's own reply is read: returning early would leave that reply for the
        // next command to take as its own.
        let mut bad_event = None;
        loop {
            let reply = self.read_message()?;
            if let Some(name) = reply.get("event").and_then(Value::as_str) {
                let data = reply.get("data").cloned().unwrap_or(Value::Null);
                match Event::parse(name, &data) {
                    Ok(event) => self.events.extend(event),
                    Err(e) => {
                        bad_event =
                            Some(QemuError::QmpProtocol(format!("event {name} does not read as its schema: {e}")))
                    }
                }
                continue;
            }
            if let Some(e) = bad_event {
                return Err(e);
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
