//! standby's vocabulary. Everything here is pure: names, states, decisions. The engine asks
//! this crate what is allowed and what to do; it never performs I/O itself.

pub mod consistency;
mod failback;
mod ids;
pub mod image;
mod names;
pub mod recovery;
mod retention;
mod state;
pub mod step;
pub mod tracking;
mod vm;
pub mod wire;

pub use consistency::{Consistency, Quiesce};
pub use failback::{FailbackTarget, SwitchMode};
pub use ids::{PointId, ReplicaId, Seq};
pub use names::{parse_interval, NameError, VmName};
pub use retention::{points_to_drop, DEFAULT_RETAIN};
pub use state::{Method, ReplicaState, Role, Transition, TransitionError};
pub use step::Step;
pub use vm::{DriverConfig, Firmware, Tpm, VmChange, VmConfig};
