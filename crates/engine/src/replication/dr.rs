//! The DR side: restore-point layers, the chains standby builds from its own records, and
//! the repair that makes the replica directory hold exactly what the database names.

use standby_host::{Chain, Format, Host, Layer};
use standby_store::RestorePointRecord;

use crate::Result;

/// The file of restore point `seq`'s layer for disk `idx`.
pub fn layer_path(dir: &str, seq: i64, idx: usize) -> String {
    format!("{dir}/{seq:06}-d{idx}.qcow2")
}

fn is_layer_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".qcow2") else {
        return false;
    };
    let Some((seq, disk)) = stem.split_once("-d") else {
        return false;
    };
    seq.len() == 6
        && seq.bytes().all(|b| b.is_ascii_digit())
        && !disk.is_empty()
        && disk.bytes().all(|b| b.is_ascii_digit())
}

/// The chain under `layer`, from the database's parent links, top first. Every restore
/// point's disk rows are searched, so layers repointed by retention are found.
pub fn chain_of(points: &[RestorePointRecord], layer: &str) -> Chain {
    let mut layers = Vec::new();
    let mut cur = Some(layer.to_owned());
    while let Some(path) = cur.take() {
        // A cycle would mean a corrupt database; it must not hang us.
        if layers.iter().any(|l: &Layer| l.path == path) {
            break;
        }
        let parent = points.iter().flat_map(|p| &p.disks).find(|d| d.layer == path).and_then(|d| d.parent.clone());
        layers.push(Layer { path, format: Format::Qcow2 });
        cur = parent;
    }
    Chain { layers }
}

/// Makes every layer header name the parent the database names, so that operators'
/// `qemu-img` follows the right chain after retention moved layers.
pub fn fix_headers(host: &dyn Host, points: &[RestorePointRecord]) -> Result<()> {
    for d in points.iter().flat_map(|p| &p.disks) {
        let info = host.image_info(&d.layer, true)?;
        if info.backing_filename != d.parent {
            host.image_set_backing_name(&d.layer, d.parent.as_deref())?;
        }
    }
    Ok(())
}

/// Deletes layer files no restore point uses: leftovers of failed or interrupted runs and
/// of retention. Returns the files removed.
pub fn remove_orphans(host: &dyn Host, dir: &str, points: &[RestorePointRecord]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in host.list_dir(dir)? {
        let path = format!("{dir}/{name}");
        let used = points.iter().flat_map(|p| &p.disks).any(|d| d.layer == path);
        if is_layer_name(&name) && !used {
            host.remove_file(&path)?;
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use standby_store::RpDiskRecord;

    fn rp(seq: i64, layer: &str, parent: Option<&str>) -> RestorePointRecord {
        RestorePointRecord {
            id: seq,
            replica_id: 1,
            seq,
            created_at: String::new(),
            method: "full".into(),
            bytes_transferred: 0,
            bytes_read: 0,
            duration_ms: 0,
            pruning: false,
            disks: vec![RpDiskRecord {
                idx: 0,
                layer: layer.into(),
                parent: parent.map(Into::into),
                size: 1,
                method: "full".into(),
                bitmap: None,
                bytes_transferred: 0,
            }],
        }
    }

    #[test]
    fn chains_follow_database_parents_only() {
        let points = [rp(1, "/a", None), rp(2, "/b", Some("/a")), rp(3, "/c", Some("/b"))];
        let c = chain_of(&points, "/c");
        let paths: Vec<_> = c.layers.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["/c", "/b", "/a"]);
        // A layer not yet recorded (a run's new layer) stacks on a given chain instead.
        assert_eq!(chain_of(&points, "/a").layers.len(), 1);
    }

    #[test]
    fn cyclic_records_do_not_hang() {
        let points = [rp(1, "/a", Some("/b")), rp(2, "/b", Some("/a"))];
        assert_eq!(chain_of(&points, "/a").layers.len(), 2);
    }

    #[test]
    fn layer_names() {
        assert!(is_layer_name("000012-d0.qcow2"));
        assert_eq!(layer_path("/x", 12, 0), "/x/000012-d0.qcow2");
        assert!(!is_layer_name("disk.qcow2"));
        assert!(!is_layer_name("000012-d.qcow2"));
        assert!(!is_layer_name("notes.txt"));
    }
}
