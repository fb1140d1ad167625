//! Progress on a terminal: one bar per VM while a job runs, with the current step (the
//! disk it copies), the throughput, and between hosts the compression ratio so far.
//! Without a terminal (scripts, CI) each step is one line on stderr instead, and byte
//! counts stay quiet.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use standby_engine::Progress;

pub struct Terminal {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
    /// Each subject's current step, which the ratio is shown after.
    steps: Mutex<HashMap<String, String>>,
}

impl Terminal {
    pub fn new() -> Terminal {
        let multi = std::io::stderr().is_terminal().then(MultiProgress::new);
        Terminal { multi, bars: Mutex::new(HashMap::new()), steps: Mutex::new(HashMap::new()) }
    }

    fn bar(&self, subject: &str) -> Option<ProgressBar> {
        let multi = self.multi.as_ref()?;
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            bars.entry(subject.to_owned())
                .or_insert_with(|| {
                    let style = ProgressStyle::with_template(
                        "{prefix:>12} {bar:30} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    let b = multi.add(ProgressBar::new(0).with_style(style));
                    b.set_prefix(subject.to_owned());
                    b
                })
                .clone(),
        )
    }

    pub fn finish(&self) {
        let bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        for b in bars.values() {
            b.finish();
        }
    }
}

impl Progress for Terminal {
    fn step(&self, subject: &str, step: &str) {
        match self.bar(subject) {
            Some(b) => {
                self.steps.lock().unwrap_or_else(|e| e.into_inner()).insert(subject.to_owned(), step.to_owned());
                b.set_message(step.to_owned())
            }
            None => eprintln!("{subject}: {step}"),
        }
    }

    fn wire(&self, subject: &str, data: u64, wire: u64) {
        if let Some(b) = self.bar(subject) {
            let steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
            let step = steps.get(subject).map_or("", String::as_str);
            b.set_message(format!("{step}  {:.1}x on the wire", data as f64 / wire.max(1) as f64));
        }
    }

    fn bytes(&self, subject: &str, done: u64, total: u64) {
        if let Some(b) = self.bar(subject) {
            b.set_length(total);
            b.set_position(done);
        }
    }
}
