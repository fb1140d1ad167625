//! The QMP events standby acts on. QEMU sends events to every monitor between replies;
//! the client keeps the ones below for whoever asks and drops the rest.

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A block job ended; `error` says why when it failed.
    BlockJobCompleted {
        device: String,
        error: Option<String>,
    },
    BlockJobCancelled {
        device: String,
    },
    /// A block job hit an I/O error (and, by its error policy, may have stopped).
    BlockJobError {
        device: String,
        operation: String,
    },
}

#[derive(Deserialize)]
struct Completed {
    device: String,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Cancelled {
    device: String,
}

#[derive(Deserialize)]
struct JobError {
    device: String,
    operation: String,
}

impl Event {
    /// The event a message carries, if it is one standby acts on. A known event whose
    /// data does not have its schema's fields is an error, not an event quietly lost.
    pub fn parse(name: &str, data: &Value) -> Result<Option<Event>, serde_json::Error> {
        let data = data.clone();
        Ok(Some(match name {
            "BLOCK_JOB_COMPLETED" => {
                let c: Completed = serde_json::from_value(data)?;
                Event::BlockJobCompleted { device: c.device, error: c.error }
            }
            "BLOCK_JOB_CANCELLED" => {
                Event::BlockJobCancelled { device: serde_json::from_value::<Cancelled>(data)?.device }
            }
            "BLOCK_JOB_ERROR" => {
                let e: JobError = serde_json::from_value(data)?;
                Event::BlockJobError { device: e.device, operation: e.operation }
            }
            _ => return Ok(None),
        }))
    }

    /// The block job the event is about.
    pub fn job(&self) -> &str {
        match self {
            Event::BlockJobCompleted { device, .. }
            | Event::BlockJobCancelled { device }
            | Event::BlockJobError { device, .. } => device,
        }
    }

    /// Whether the event says the job failed.
    pub fn failure(&self) -> Option<String> {
        match self {
            Event::BlockJobCompleted { error: Some(e), .. } => Some(e.clone()),
            Event::BlockJobError { operation, .. } => Some(format!("I/O error on {operation}")),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn events_parse_by_their_schema() {
        let done = Event::parse(
            "BLOCK_JOB_COMPLETED",
            &json!({"device": "j", "len": 1, "offset": 1, "speed": 0,
            "type": "stream", "error": "No space left on device"}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(done.failure().as_deref(), Some("No space left on device"));
        assert_eq!(done.job(), "j");
        let ok = Event::parse(
            "BLOCK_JOB_COMPLETED",
            &json!({"device": "j", "len": 1, "offset": 1, "speed": 0,
            "type": "stream"}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ok.failure(), None);
        let err = Event::parse("BLOCK_JOB_ERROR", &json!({"device": "f", "operation": "write", "action": "report"}));
        assert_eq!(err.unwrap().unwrap().failure().as_deref(), Some("I/O error on write"));
        assert_eq!(Event::parse("RESUME", &Value::Null).unwrap(), None);
        assert!(Event::parse("BLOCK_JOB_CANCELLED", &json!({"type": "backup"})).is_err());
    }
}
