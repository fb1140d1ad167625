//! A protected VM on a fake host, shared by the engine's fake-host tests.
#![allow(dead_code)]

use std::sync::Arc;

use standby_engine::{DriverConfig, Engine, JobSpec, NoProgress, RunOutcome, VmConfig, VmSpec};
use standby_fake::FakeHost;
use standby_host::{Format, Host};

pub const DISK: &str = "/src/web.qcow2";
pub const SIZE: u64 = 4 << 20;

#[derive(Debug)]
pub struct Site {
    pub fake: FakeHost,
    pub engine: Engine,
    _dir: tempfile::TempDir,
}

impl Site {
    /// A VM `web` with one 4 MiB disk holding data in its first 300 KB and at 2 MiB, and
    /// job `j` replicating it to `/dr`.
    pub fn protected() -> Site {
        let fake = FakeHost::new("local");
        fake.put_image(DISK, Format::Qcow2, SIZE, &[(0, &[0xab; 300_000]), (2 << 20, &[0x5a; 70_000])]);
        let dir = tempfile::tempdir().unwrap();
        let engine = open(&fake, dir.path());
        engine
            .vm_create(&VmSpec {
                name: "web".into(),
                host: "local".into(),
                disks: vec![DISK.into()],
                formats: vec!["qcow2".into()],
                config: VmConfig { cpus: 1, memory_mib: 128, driver: DriverConfig::default() },
            })
            .unwrap();
        engine
            .job_create(&JobSpec {
                name: "j".into(),
                vms: vec!["web".into()],
                target_host: "local".into(),
                target_dir: "/dr".into(),
                retain: Some(3),
                every: None,
                replica_suffix: None,
                compression: None,
                bandwidth: None,
                retry_window: None,
                network_map: Vec::new(),
                freeze: Default::default(),
            })
            .unwrap();
        Site { fake, engine, _dir: dir }
    }

    /// The same data directory and host, as the next standby process sees them.
    pub fn reopen(&mut self) {
        self.engine = open(&self.fake, self._dir.path());
    }

    pub fn run(&self) -> RunOutcome {
        let mut out = self.engine.job_run("j", &NoProgress).unwrap();
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    /// Runs and insists on a new restore point made by `method`; returns its disk's path.
    pub fn run_ok(&self, method: &str) -> String {
        let out = self.run();
        let rp = out.restore_point.unwrap_or_else(|| panic!("no restore point: {:?}", out.error));
        assert_eq!(rp.method, method, "{:?}", out.notes);
        rp.disks[0].path.clone()
    }

    pub fn state(&self) -> String {
        self.engine.replica_list().unwrap().into_iter().find(|r| r.vm == "web").unwrap().state
    }

    /// Every restore point's disk path and what it reads.
    pub fn contents(&self) -> Vec<(String, Vec<u8>)> {
        let points = self.engine.replica_points("web", None).unwrap();
        points.iter().map(|p| (p.disks[0].path.clone(), self.fake.read_image(&p.disks[0].path))).collect()
    }
}

fn open(fake: &FakeHost, dir: &std::path::Path) -> Engine {
    let host = fake.clone();
    Engine::open_on(&dir.join("data"), move |_| Ok(Arc::new(host) as Arc<dyn Host>)).unwrap()
}
