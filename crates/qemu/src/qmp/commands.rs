//! The QMP commands standby sends, one type per command with the type of its reply: a
//! misspelt argument or a reply field read under the wrong name is a compile error here,
//! not a command QEMU refuses (or, worse, a field silently read as absent) at run time.
//! Names and fields follow QEMU's schema (`qapi/block-core.json`, `qapi/block-export.json`,
//! `qapi/run-state.json`, `qapi/transaction.json`) as QEMU 7.2 has it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its arguments are the fields of the type, its `return` is `Reply`.
pub trait Command: Serialize {
    const NAME: &'static str;
    type Reply: DeserializeOwned;
}

/// The `{}` most commands return.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Empty {}

macro_rules! command {
    ($ty:ident, $name:literal, $reply:ty) => {
        impl Command for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

#[derive(Debug, Serialize)]
pub struct QmpCapabilities {}
command!(QmpCapabilities, "qmp_capabilities", Empty);

// ---- the VM as a whole ----

#[derive(Debug, Serialize)]
pub struct SystemPowerdown {}
command!(SystemPowerdown, "system_powerdown", Empty);

#[derive(Debug, Serialize)]
pub struct Quit {}
command!(Quit, "quit", Empty);

#[derive(Debug, Serialize)]
pub struct Stop {}
command!(Stop, "stop", Empty);

#[derive(Debug, Serialize)]
pub struct Cont {}
command!(Cont, "cont", Empty);

#[derive(Debug, Serialize)]
pub struct QueryStatus {}
command!(QueryStatus, "query-status", StatusInfo);

#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

// ---- block devices and nodes ----

#[derive(Debug, Serialize)]
pub struct QueryBlock {}
command!(QueryBlock, "query-block", Vec<BlockInfo>);

#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    pub device: String,
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A node as `query-block` (inserted) and `query-named-block-nodes` describe it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    pub node_name: String,
    pub file: String,
    #[serde(default)]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BlockDirtyInfo {
    /// Optional in the schema: an unnamed bitmap is none of standby's.
    #[serde(default)]
    pub name: Option<String>,
    pub recording: bool,
    /// Absent when the bitmap was saved cleanly.
    #[serde(default)]
    pub inconsistent: bool,
}

#[derive(Debug, Serialize)]
pub struct QueryNamedBlockNodes {
    pub flat: bool,
}
command!(QueryNamedBlockNodes, "query-named-block-nodes", Vec<BlockDeviceInfo>);

/// Opens a qcow2 image as a node over `backing` (a node name): a fleecing target.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAddQcow2 {
    driver: &'static str,
    pub node_name: String,
    pub file: FileRef,
    pub backing: String,
}
command!(BlockdevAddQcow2, "blockdev-add", Empty);

impl BlockdevAddQcow2 {
    pub fn new(node_name: String, filename: String, backing: String) -> BlockdevAddQcow2 {
        BlockdevAddQcow2 { driver: "qcow2", node_name, file: FileRef { driver: "file", filename }, backing }
    }
}

#[derive(Debug, Serialize)]
pub struct FileRef {
    driver: &'static str,
    pub filename: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", Empty);

// ---- dirty bitmaps ----

#[derive(Debug, Clone, Serialize)]
pub struct BitmapRef {
    pub node: String,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockDirtyBitmapAdd {
    pub node: String,
    pub name: String,
    pub persistent: bool,
}

#[derive(Debug, Serialize)]
pub struct BlockDirtyBitmapRemove(pub BitmapRef);
command!(BlockDirtyBitmapRemove, "block-dirty-bitmap-remove", Empty);

#[derive(Debug, Serialize)]
pub struct BlockDirtyBitmapEnable(pub BitmapRef);
command!(BlockDirtyBitmapEnable, "block-dirty-bitmap-enable", Empty);

#[derive(Debug, Serialize)]
pub struct BlockDirtyBitmapMerge {
    pub node: String,
    pub target: String,
    pub bitmaps: Vec<String>,
}
command!(BlockDirtyBitmapMerge, "block-dirty-bitmap-merge", Empty);

// ---- block jobs ----

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevBackup {
    pub device: String,
    pub target: String,
    pub sync: &'static str,
    pub job_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStream {
    pub device: String,
    pub job_id: String,
}
command!(BlockStream, "block-stream", Empty);

#[derive(Debug, Serialize)]
pub struct BlockJobCancel {
    pub device: String,
    pub force: bool,
}
command!(BlockJobCancel, "block-job-cancel", Empty);

#[derive(Debug, Serialize)]
pub struct QueryBlockJobs {}
command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobInfo {
    /// The job's id (for jobs started with one, as all of standby's are).
    pub device: String,
    /// `running`, `paused`, `ready`, `concluded`, ...
    pub status: String,
}

// ---- snapshots, as one transaction ----

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevSnapshotSync {
    pub node_name: String,
    pub snapshot_file: String,
    pub snapshot_node_name: String,
    pub format: &'static str,
    /// `existing`: the image was created beforehand, by standby, with its own mode.
    pub mode: &'static str,
}

/// One action of a `transaction`: all of them happen at one instant, or none.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "kebab-case")]
pub enum Action {
    BlockDirtyBitmapAdd(BlockDirtyBitmapAdd),
    BlockDirtyBitmapDisable(BitmapRef),
    BlockdevBackup(BlockdevBackup),
    BlockdevSnapshotSync(BlockdevSnapshotSync),
}

#[derive(Debug, Serialize)]
pub struct Transaction {
    pub actions: Vec<Action>,
}
command!(Transaction, "transaction", Empty);

// ---- NBD exports ----

/// QEMU 7.2 takes the legacy (`SocketAddressLegacy`) form here.
#[derive(Debug, Serialize)]
pub struct NbdServerStart {
    pub addr: LegacyUnixAddress,
}
command!(NbdServerStart, "nbd-server-start", Empty);

#[derive(Debug, Serialize)]
pub struct LegacyUnixAddress {
    #[serde(rename = "type")]
    kind: &'static str,
    data: UnixPath,
}

#[derive(Debug, Serialize)]
struct UnixPath {
    path: String,
}

impl LegacyUnixAddress {
    pub fn unix(path: String) -> LegacyUnixAddress {
        LegacyUnixAddress { kind: "unix", data: UnixPath { path } }
    }
}

#[derive(Debug, Serialize)]
pub struct NbdServerStop {}
command!(NbdServerStop, "nbd-server-stop", Empty);

#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAddNbd {
    #[serde(rename = "type")]
    kind: &'static str,
    pub id: String,
    pub node_name: String,
    pub name: String,
    pub writable: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<BitmapRef>,
}
command!(BlockExportAddNbd, "block-export-add", Empty);

impl BlockExportAddNbd {
    /// A read-only export named as its id.
    pub fn read_only(id: String, node_name: String, bitmaps: Vec<BitmapRef>) -> BlockExportAddNbd {
        BlockExportAddNbd { kind: "nbd", name: id.clone(), id, node_name, writable: false, bitmaps }
    }
}

#[derive(Debug, Serialize)]
pub struct BlockExportDel {
    pub id: String,
    /// `hard`: drop connected clients instead of waiting for them.
    pub mode: &'static str,
}
command!(BlockExportDel, "block-export-del", Empty);

#[derive(Debug, Serialize)]
pub struct QueryBlockExports {}
command!(QueryBlockExports, "query-block-exports", Vec<BlockExportInfo>);

#[derive(Debug, Clone, Deserialize)]
pub struct BlockExportInfo {
    pub id: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What goes on the wire is QEMU's spelling, checked against the schema by hand once.
    #[test]
    fn commands_serialize_as_qemu_spells_them() {
        let t = Transaction {
            actions: vec![
                Action::BlockDirtyBitmapAdd(BlockDirtyBitmapAdd {
                    node: "disk0".into(),
                    name: "b".into(),
                    persistent: true,
                }),
                Action::BlockDirtyBitmapDisable(BitmapRef { node: "disk0".into(), name: "a".into() }),
                Action::BlockdevBackup(BlockdevBackup {
                    device: "disk0".into(),
                    target: "f".into(),
                    sync: "none",
                    job_id: "f".into(),
                }),
            ],
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "b", "persistent": true}},
                {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "a"}},
                {"type": "blockdev-backup", "data": {"device": "disk0", "target": "f", "sync": "none", "job-id": "f"}},
            ]})
        );
        assert_eq!(
            serde_json::to_value(BlockdevAddQcow2::new("n".into(), "/f".into(), "disk0".into())).unwrap(),
            json!({"driver": "qcow2", "node-name": "n", "file": {"driver": "file", "filename": "/f"}, "backing": "disk0"})
        );
        assert_eq!(
            serde_json::to_value(NbdServerStart { addr: LegacyUnixAddress::unix("/s".into()) }).unwrap(),
            json!({"addr": {"type": "unix", "data": {"path": "/s"}}})
        );
        assert_eq!(
            serde_json::to_value(BlockExportAddNbd::read_only("e".into(), "n".into(), Vec::new())).unwrap(),
            json!({"type": "nbd", "id": "e", "node-name": "n", "name": "e", "writable": false})
        );
        assert_eq!(
            serde_json::to_value(BlockDirtyBitmapRemove(BitmapRef { node: "d".into(), name: "b".into() })).unwrap(),
            json!({"node": "d", "name": "b"})
        );
        assert_eq!(serde_json::to_value(Quit {}).unwrap(), json!({}));
    }

    #[test]
    fn replies_read_what_qemu_sends_and_refuse_what_is_missing() {
        let nodes: Vec<BlockDeviceInfo> = serde_json::from_value(json!([{
            "node-name": "disk0", "file": "/a.qcow2", "ro": false, "drv": "qcow2",
            "dirty-bitmaps": [{"name": "b", "recording": true, "busy": false, "persistent": true,
                               "count": 0, "granularity": 65536, "inconsistent": true}]
        }, {"node-name": "f", "file": "/f"}]))
        .unwrap();
        assert!(nodes[0].dirty_bitmaps[0].inconsistent && nodes[1].dirty_bitmaps.is_empty());
        // A node without a name is not something standby can address: an error, not "".
        assert!(serde_json::from_value::<Vec<BlockDeviceInfo>>(json!([{"file": "/a"}])).is_err());
        assert!(serde_json::from_value::<StatusInfo>(json!({"status": "paused"})).is_err());
    }
}
