//! Hosts reached through an agent (`standby agent`): enrolment, which are online, and
//! removal. The controller's trust lives in `DATA_DIR/trust`: the installation's
//! authority, and the controller's own certificate signed by it at first use.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use standby_model::VmName;
use standby_trust::Authority;

use crate::{Engine, EngineError, Result, LOCAL_HOST};

/// One host as `standby host list --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub name: String,
    /// `local` or `agent`.
    pub kind: String,
    pub address: Option<String>,
    /// `online` or `offline`.
    pub state: &'static str,
    pub last_seen: Option<String>,
    pub version: Option<String>,
    /// The accelerator VMs start with, where standby runs them.
    pub accel: Option<&'static str>,
    /// Why an agent is offline.
    pub error: Option<String>,
    /// What runs on or replicates to this host (`VM web`, `job nightly`): what its being
    /// offline blocks.
    pub used_by: Vec<String>,
    /// Sources on this host that a failover left to fence when it answers again.
    pub fences: Vec<String>,
    /// Silence after which the controller declares the host lost by itself (`10m`);
    /// None: only the operator does (`failover --source-unreachable`).
    pub lost_after: Option<String>,
    /// Since when the host has not answered (the first failed contact after its last answer).
    pub silent_since: Option<String>,
    /// The silence has lasted longer than `lost_after`: a failover of its VMs goes ahead
    /// without `--source-unreachable`.
    pub declared_lost: bool,
}

/// A silence as an operator writes it: `10m`, `1h 30m`.
fn show_secs(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The `--lost-after` an operator gave: a duration, or `never`.
fn parse_lost_after(text: &str) -> Result<Option<u64>> {
    if text == "never" {
        return Ok(None);
    }
    let secs = standby_model::parse_interval(text)
        .map_err(|e| EngineError::BadArgument { arg: "--lost-after", why: format!("--lost-after {e}, or never") })?;
    Ok(Some(secs.as_secs()))
}

/// Whether a silence that began at `since` has lasted longer than `lost_after_secs`.
fn silence_exceeds(since: Option<&str>, lost_after_secs: Option<u64>) -> bool {
    let (Some(since), Some(limit)) = (since, lost_after_secs) else {
        return false;
    };
    humantime::parse_rfc3339(since)
        .ok()
        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok())
        .is_some_and(|silent| silent.as_secs() >= limit)
}

const CONTROLLER: &str = "standby-controller";

impl Engine {
    fn trust_dir(&self) -> std::path::PathBuf {
        self.data_dir.join("trust")
    }

    fn authority(&self) -> Result<Authority> {
        Ok(Authority::open_or_create(&self.trust_dir())?)
    }

    /// How the controller connects to its agents: its own key and certificate, made and
    /// signed by the authority at first use.
    pub(crate) fn controller_tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let (ca, cert, key) = self.controller_identity()?;
        Ok(standby_trust::client_config(ca.cert_pem(), &cert, &key, ca.crl_pem()?.as_deref())?)
    }

    /// The authority, and the controller's certificate and key.
    fn controller_identity(&self) -> Result<(Authority, String, String)> {
        let ca = self.authority()?;
        let dir = self.trust_dir();
        let (key_path, cert_path) = (dir.join("controller.key"), dir.join("controller.pem"));
        if !key_path.exists() {
            standby_trust::write_private(&key_path, &standby_trust::new_key()?)?;
        }
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|source| EngineError::DataDir { path: p.display().to_string(), source })
        };
        let key = read(&key_path)?;
        if !cert_path.exists() {
            let csr = standby_trust::request_with_key(CONTROLLER, &key)?;
            let cert = ca.sign(CONTROLLER, &csr, Duration::from_secs(5 * 365 * 86400))?;
            standby_trust::write_private(&cert_path, &cert)?;
        }
        let cert = read(&cert_path)?;
        Ok((ca, cert, key))
    }

    /// Enrols the agent at `address` (which printed `token`) as host `name`, declared lost
    /// by the controller after `lost_after` of silence when given.
    pub fn host_add(&self, name: &str, address: &str, token: &str, lost_after: Option<&str>) -> Result<HostView> {
        VmName::new(name)?;
        let lost_after = lost_after.map(parse_lost_after).transpose()?.flatten();
        if self.store().host_exists(name)? {
            return Err(EngineError::HostExists(name.into()));
        }
        let (authority, controller_cert, _) = self.controller_identity()?;
        let result =
            standby_agent::enrol(name, address, token, &authority, &controller_cert).map_err(EngineError::from);
        self.record(&format!("host:{name}"), "host add", &result, |e| {
            format!("agent {} at {address} enrolled (certificate {})", e.version, e.serial)
        });
        let enrolled = result?;
        self.store().insert_agent_host(name, address, &enrolled.version, &enrolled.serial)?;
        self.store().set_host_lost_after(name, lost_after)?;
        self.host_list()?.into_iter().find(|h| h.name == name).ok_or_else(|| EngineError::UnknownHost(name.into()))
    }

    /// Adds host `name`, whose VMs are the domains of the libvirt daemon at `uri` on this
    /// machine; refused, changing nothing, when the daemon does not answer.
    pub fn host_add_libvirt(&self, name: &str, uri: &str) -> Result<HostView> {
        VmName::new(name)?;
        if self.store().host_exists(name)? {
            return Err(EngineError::HostExists(name.into()));
        }
        if !uri.starts_with("qemu:///") {
            return Err(EngineError::BadArgument {
                arg: "--libvirt",
                why: format!(
                    "--libvirt {uri:?}: standby drives the QEMU daemon of this machine (qemu:///system); for \
                     another machine, run `standby agent` there"
                ),
            });
        }
        let host = standby_host::LibvirtHost::new(name, uri, &self.data_dir.join("hosts").join(name))?;
        let result = host.version().map_err(EngineError::from);
        self.record(&format!("host:{name}"), "host add", &result, |v| format!("{v} at {uri}"));
        let version = result?;
        self.store().insert_libvirt_host(name, uri, &version)?;
        self.host_list()?.into_iter().find(|h| h.name == name).ok_or_else(|| EngineError::UnknownHost(name.into()))
    }

    /// Every host, each agent asked whether it answers (a few seconds at most each).
    pub fn host_list(&self) -> Result<Vec<HostView>> {
        let records = self.store().hosts()?;
        let mut tls = None;
        let mut views = Vec::new();
        // Bound first: the store's guard must not live through the loop, which asks again.
        let open_fences = self.store().open_fences()?;
        for h in records {
            let mut view = HostView {
                name: h.name.clone(),
                kind: h.kind.clone(),
                address: h.address.clone(),
                state: "online",
                last_seen: h.last_seen.clone(),
                version: h.version.clone(),
                accel: None,
                error: None,
                used_by: self.store().host_users(&h.name)?,
                fences: open_fences
                    .iter()
                    .filter(|f| f.host == h.name)
                    .map(|f| format!("VM {} (its replica runs since {})", f.vm, f.declared_at))
                    .collect(),
                lost_after: h.lost_after_secs.map(show_secs),
                silent_since: h.silent_since.clone(),
                declared_lost: false,
            };
            if let Some(uri) = &h.libvirt_uri {
                view.address = Some(uri.clone());
                match standby_host::LibvirtHost::new(&h.name, uri, &self.data_dir.join("hosts").join(&h.name))
                    .and_then(|l| l.version())
                {
                    Ok(v) => view.version = Some(v),
                    Err(e) => {
                        view.state = "offline";
                        view.error = Some(crate::chain(&e));
                    }
                }
                views.push(view);
                continue;
            }
            match (&h.address, self.hosts.get(&h.name)) {
                (_, Some(local)) => view.accel = Some(local.accel().as_str()),
                (Some(address), None) => {
                    if tls.is_none() {
                        tls = Some(self.controller_tls()?);
                    }
                    let config = tls.clone().unwrap_or_else(|| unreachable!());
                    match standby_agent::hello(&h.name, address, config.clone()) {
                        Ok(hello) => {
                            self.store().host_seen(&h.name, &hello.version)?;
                            view.silent_since = None;
                            view.version = Some(match &hello.libvirt {
                                Some(uri) => format!("{}, VMs through libvirt at {uri}", hello.version),
                                None => hello.version,
                            });
                            view.last_seen = Some(standby_store::now());
                            // An agent that was offline at a `host remove` learns of it now.
                            if let Some(crl) = self.authority()?.crl_pem()? {
                                if hello.crl.as_deref() != Some(&standby_agent::crl_fingerprint(&crl)) {
                                    if let Err(e) = standby_agent::send_revocations(&h.name, address, config, &crl) {
                                        view.error =
                                            Some(format!("its revocation list is out of date: {}", crate::chain(&e)));
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            view.state = "offline";
                            // Only no answer at all is silence: a host that refuses or
                            // breaks the protocol is there, and a failover would not
                            // count it lost either.
                            if matches!(e, standby_agent::AgentError::Unreachable { .. }) {
                                view.silent_since = self.store().host_silent(&h.name)?;
                                view.declared_lost = silence_exceeds(view.silent_since.as_deref(), h.lost_after_secs);
                            }
                            view.error = Some(crate::chain(&e));
                        }
                    }
                }
                (None, None) => view.state = "offline",
            }
            views.push(view);
        }
        Ok(views)
    }

    /// Sets after how much silence the controller declares host `name` lost by itself
    /// (`never`: only the operator does).
    pub fn host_change(&self, name: &str, lost_after: &str) -> Result<HostView> {
        let secs = parse_lost_after(lost_after)?;
        let Some(h) = self.store().host(name)? else {
            return Err(EngineError::UnknownHost(name.into()));
        };
        if h.address.is_none() {
            return Err(EngineError::Refused {
                vm: name.into(),
                why: format!("host {name} is this machine: the controller cannot lose it"),
            });
        }
        self.store().set_host_lost_after(name, secs)?;
        let what = match secs {
            Some(s) => format!("declared lost after {} of silence", show_secs(s)),
            None => "declared lost only by the operator (failover --source-unreachable)".into(),
        };
        self.record_raw(&format!("host:{name}"), "host change", "ok", &what);
        self.host_list()?.into_iter().find(|h| h.name == name).ok_or_else(|| EngineError::UnknownHost(name.into()))
    }

    /// A host that did not answer: when its silence began, and, if it has lasted longer
    /// than the host's `--lost-after`, how the controller declares it lost.
    pub(crate) fn host_silence(&self, name: &str) -> Result<(Option<String>, Option<String>)> {
        // An answer this process had (a run a moment ago) ends a silence recorded before.
        self.note_answers()?;
        let since = self.store().host_silent(name)?;
        let lost_after = self.store().host(name)?.and_then(|h| h.lost_after_secs);
        let declared = silence_exceeds(since.as_deref(), lost_after).then(|| {
            format!(
                "the controller: no answer from {name} since {}, longer than its --lost-after {}",
                since.as_deref().unwrap_or("?"),
                show_secs(lost_after.unwrap_or(0))
            )
        });
        Ok((since, declared))
    }

    /// Records in the store when each remote host last answered this process: what ends
    /// the silences recorded before (a job run, a failback: any request that was answered).
    pub(crate) fn note_answers(&self) -> Result<()> {
        let answered: Vec<(String, std::time::SystemTime)> = {
            let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            remote.iter().filter_map(|(n, h)| Some((n.clone(), h.last_answer()?))).collect()
        };
        for (name, at) in answered {
            let at = humantime::format_rfc3339_seconds(at).to_string();
            self.store().host_answered_at(&name, &at)?;
        }
        Ok(())
    }

    /// Forgets an agent's host and revokes its certificate, telling every other agent;
    /// refused while a VM or a job uses it. Notes on agents that could not be told.
    pub fn host_remove(&self, name: &str) -> Result<Vec<String>> {
        if name == LOCAL_HOST {
            return Err(EngineError::Refused { vm: name.into(), why: "the local host cannot be removed".into() });
        }
        if !self.store().host_exists(name)? {
            return Err(EngineError::UnknownHost(name.into()));
        }
        let users = self.store().host_users(name)?;
        if !users.is_empty() {
            return Err(EngineError::Refused {
                vm: name.into(),
                why: format!("host {name} is used by {}; move or delete them first", users.join(", ")),
            });
        }
        let mut notes = Vec::new();
        // Revoked first: once the host is forgotten nothing would name its certificate.
        let serial = self.store().host_serial(name)?;
        match &serial {
            Some(serial) => {
                let crl = self.authority()?.revoke(serial)?;
                notes.push(format!("its certificate {serial} is revoked: every agent refuses it from now on"));
                let tls = self.controller_tls()?;
                let others = self.store().hosts()?;
                for h in others.iter().filter(|h| h.name != name) {
                    let Some(address) = &h.address else { continue };
                    if let Err(e) = standby_agent::send_revocations(&h.name, address, tls.clone(), &crl) {
                        notes.push(format!(
                            "host {} was not told of the revocation ({}); it is told when `standby host list` \
                             next reaches it",
                            h.name,
                            crate::chain(&e)
                        ));
                    }
                }
            }
            None if self.store().host(name)?.is_some_and(|h| h.libvirt_uri.is_some()) => {}
            None => notes.push(format!(
                "host {name} was enrolled before standby recorded certificate serials, so its certificate is \
                 not revoked: other agents still accept it until it expires"
            )),
        }
        self.store().delete_host(name)?;
        self.remote.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
        let what = match &serial {
            Some(s) => format!("forgotten; certificate {s} revoked"),
            None => "forgotten".into(),
        };
        self.record_raw(&format!("host:{name}"), "host remove", "ok", &what);
        Ok(notes)
    }
}
