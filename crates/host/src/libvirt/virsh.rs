//! libvirt's own client, `virsh`, with XML documents: the ecosystem's way to call the
//! checkpoint and backup APIs, which the Rust bindings do not wrap yet (as `qemu-img` is
//! for images). Every call names its connection, so one standby drives several daemons.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{HostError, Result};

#[derive(Debug)]
pub(crate) struct Virsh {
    pub(crate) uri: String,
    /// Where XML documents are written for `virsh` to read (the host's own directory).
    pub(crate) scratch: PathBuf,
}

static DOCUMENT: AtomicU64 = AtomicU64::new(0);

impl Virsh {
    /// Runs `virsh -c URI ARGS`; its standard output, or an error saying what failed.
    pub(crate) fn run(&self, what: &str, args: &[&str]) -> Result<String> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .map_err(|e| self.error(what, format!("cannot run virsh ({e}); install libvirt-clients")))?;
        if !out.status.success() {
            let detail = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
            return Err(self.error(what, detail));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `virsh ARGS FILE...` with each document written to a file of its own first.
    pub(crate) fn run_with(&self, what: &str, args: &[&str], documents: &[&str]) -> Result<String> {
        std::fs::create_dir_all(&self.scratch)
            .map_err(|e| self.error(what, format!("{}: {e}", self.scratch.display())))?;
        let files: Vec<PathBuf> = documents
            .iter()
            .map(|_| {
                let n = DOCUMENT.fetch_add(1, Ordering::Relaxed);
                self.scratch.join(format!("doc-{}-{n}.xml", std::process::id()))
            })
            .collect();
        let written = files.iter().zip(documents).try_for_each(|(f, d)| std::fs::write(f, d));
        let result = match written {
            Ok(()) => {
                let mut all: Vec<&str> = args.to_vec();
                all.extend(files.iter().filter_map(|f| f.to_str()));
                self.run(what, &all)
            }
            Err(e) => Err(self.error(what, format!("cannot write its XML under {}: {e}", self.scratch.display()))),
        };
        for f in &files {
            let _ = std::fs::remove_file(f);
        }
        result
    }

    pub(crate) fn error(&self, what: &str, detail: String) -> HostError {
        HostError::Libvirt { uri: self.uri.clone(), what: what.into(), hint: hint(&detail), detail }
    }
}

/// What to do about a failure, when its text says.
fn hint(detail: &str) -> String {
    if detail.contains("failed to connect") || detail.contains("Failed to connect socket") {
        "; is libvirtd running there? (`virsh -c URI version` answers when it is)".into()
    } else if detail.contains("Domain not found") || detail.contains("failed to get domain") {
        "; `virsh list --all` shows the domains it knows".into()
    } else {
        String::new()
    }
}

/// Whether an error says the domain does not exist (as opposed to libvirt failing).
pub(crate) fn is_missing_domain(e: &HostError) -> bool {
    matches!(e, HostError::Libvirt { detail, .. } if detail.contains("Domain not found") || detail.contains("failed to get domain"))
}

/// The QEMU process of a running domain of the local system daemon, from libvirt's pid file.
pub(crate) fn qemu_pid(uri: &str, domain: &str) -> Option<u32> {
    let dir = match uri {
        "qemu:///system" => Path::new("/run/libvirt/qemu"),
        _ => return None,
    };
    std::fs::read_to_string(dir.join(format!("{domain}.pid"))).ok()?.trim().parse().ok()
}
