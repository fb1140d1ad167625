/// Where long operations report what they are doing. The CLI draws it on a terminal; the
/// engine also records it in the task row so another terminal can follow it.
pub trait Progress: Send + Sync {
    /// A new phase of the operation began for `subject` (a VM name).
    fn step(&self, subject: &str, step: &str);
    /// Bytes of the current transfer done out of total.
    fn bytes(&self, subject: &str, done: u64, total: u64);
    /// So far the current transfer sent `data` bytes of blocks between two hosts as
    /// `wire` bytes (compressed); reported only for transfers between hosts.
    fn wire(&self, _subject: &str, _data: u64, _wire: u64) {}
}

#[derive(Debug, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step(&self, _: &str, _: &str) {}
    fn bytes(&self, _: &str, _: u64, _: u64) {}
}
