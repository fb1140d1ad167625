//! The replica directory on the DR host: who owns it, the restore-point layers, the chains
//! standby builds from its own records, and the repair that makes the directory hold
//! exactly what the database names.

use standby_host::{Chain, Format, Host, Layer};
use standby_model::Seq;
use standby_store::RestorePointRecord;

use crate::layout::{layer_seq, OWNER_MARKER};
use crate::{EngineError, Result};

/// Who a replica directory belongs to: one replica (job and VM) of one standby data
/// directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub data_dir: String,
    pub job: String,
    pub vm: String,
}

impl Owner {
    fn text(&self) -> String {
        format!("standby replica directory\ndata-dir: {}\njob: {}\nvm: {}\n", self.data_dir, self.job, self.vm)
    }
}

/// Claims `dir` (created if needed) for `owner`; refused when anyone claimed it before.
pub fn claim(host: &dyn Host, dir: &str, owner: &Owner) -> Result<()> {
    host.ensure_dir(dir)?;
    let marker = format!("{dir}/{OWNER_MARKER}");
    if host.create_file_new(&marker, &owner.text())? {
        return Ok(());
    }
    let theirs = host.read_small_file(&marker)?.unwrap_or_default();
    Err(EngineError::NotOwner { dir: dir.into(), reason: format!("it is claimed already: {}", summary(&theirs)) })
}

/// Ok only when `dir`'s marker names `owner`.
pub fn check_owner(host: &dyn Host, dir: &str, owner: &Owner) -> Result<()> {
    match host.read_small_file(&format!("{dir}/{OWNER_MARKER}"))? {
        Some(text) if text == owner.text() => Ok(()),
        Some(text) => {
            Err(EngineError::NotOwner { dir: dir.into(), reason: format!("its marker names {}", summary(&text)) })
        }
        None => Err(EngineError::NotOwner { dir: dir.into(), reason: format!("it has no {OWNER_MARKER} marker") }),
    }
}

fn summary(marker: &str) -> String {
    let field = |k: &str| marker.lines().find_map(|l| l.strip_prefix(k)).unwrap_or("?").trim().to_owned();
    format!("job {} VM {} of data directory {}", field("job:"), field("vm:"), field("data-dir:"))
}

/// The chain under `layer`, from the database's parent links, top first. Every restore
/// point's disk rows are searched, so layers repointed by retention are found. A layer
/// without a record, or records that loop, mean the database no longer describes the chain:
/// reading on would return zeros where data was, so it is an error naming the point.
pub fn chain_of(points: &[RestorePointRecord], layer: &str) -> Result<Chain> {
    let owner = |path: &str| points.iter().find(|p| p.disks.iter().any(|d| d.layer == path));
    let top = owner(layer).map_or_else(|| "an unrecorded point".to_owned(), |p| format!("restore point {}", p.seq));
    let mut layers: Vec<Layer> = Vec::new();
    let mut cur = Some(layer.to_owned());
    while let Some(path) = cur.take() {
        if layers.iter().any(|l| l.path == path) {
            return Err(EngineError::BrokenChain { point: top, problem: format!("its layers loop back to {path}") });
        }
        let Some(record) = points.iter().flat_map(|p| &p.disks).find(|d| d.layer == path) else {
            let problem = match layers.last() {
                Some(child) => format!("layer {} names parent {path}, which no restore point records", child.path),
                None => format!("layer {path} is not recorded"),
            };
            return Err(EngineError::BrokenChain { point: top, problem });
        };
        cur = record.parent.clone();
        layers.push(Layer { path, format: Format::Qcow2 });
    }
    Ok(Chain { layers })
}

/// Makes every layer header name the parent the database names, so that operators'
/// `qemu-img` follows the right chain after retention moved layers.
pub fn fix_headers(host: &dyn Host, points: &[RestorePointRecord]) -> Result<()> {
    for d in points.iter().flat_map(|p| &p.disks) {
        let info = host.image_info(&d.layer, Format::Qcow2, true)?;
        if info.backing_filename != d.parent {
            host.image_set_backing_name(&d.layer, d.parent.as_deref())?;
        }
    }
    Ok(())
}

/// Deletes layer files no restore point uses: leftovers of failed or interrupted runs and
/// of retention. Only names this replica's runs made are candidates: a layer name whose
/// sequence it has taken (`below_seq` is the next one). Anything else in the directory was
/// not made by standby and stays. Returns the files removed.
pub fn remove_orphans(
    host: &dyn Host,
    dir: &str,
    points: &[RestorePointRecord],
    below_seq: Seq,
) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in host.list_dir(dir)? {
        let path = format!("{dir}/{name}");
        let used = points.iter().flat_map(|p| &p.disks).any(|d| d.layer == path)
            || points.iter().any(|p| [&p.nvram, &p.tpm_state].iter().any(|f| f.as_deref() == Some(&path)));
        let seq = layer_seq(&name).or_else(|| crate::layout::state_copy_seq(&name));
        if seq.is_some_and(|s| s < below_seq) && !used {
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
            id: standby_model::PointId(seq),
            replica_id: standby_model::ReplicaId(1),
            seq: Seq(seq),
            created_at: String::new(),
            method: standby_model::Method::Full,
            bytes_transferred: 0,
            bytes_read: 0,
            duration_ms: 0,
            consistency: standby_model::Consistency::Crash,
            nvram: None,
            tpm_state: None,
            pruning: false,
            disks: vec![RpDiskRecord {
                idx: 0,
                layer: layer.into(),
                parent: parent.map(Into::into),
                size: 1,
                method: standby_model::Method::Full,
                bitmap: None,
                bytes_transferred: 0,
            }],
        }
    }

    #[test]
    fn chains_follow_database_parents_only() {
        let points = [rp(1, "/a", None), rp(2, "/b", Some("/a")), rp(3, "/c", Some("/b"))];
        let c = chain_of(&points, "/c").unwrap();
        let paths: Vec<_> = c.layers.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["/c", "/b", "/a"]);
        assert_eq!(chain_of(&points, "/a").unwrap().layers.len(), 1);
    }

    #[test]
    fn cyclic_records_are_an_error_naming_the_point() {
        let points = [rp(1, "/a", Some("/b")), rp(2, "/b", Some("/a"))];
        let e = chain_of(&points, "/a").unwrap_err().to_string();
        assert!(e.contains("restore point 1") && e.contains("loop back to /a"), "{e}");
    }

    #[test]
    fn a_missing_parent_is_an_error_naming_it() {
        let points = [rp(2, "/b", Some("/a")), rp(3, "/c", Some("/b"))];
        let e = chain_of(&points, "/c").unwrap_err().to_string();
        assert!(e.contains("restore point 3") && e.contains("layer /b names parent /a"), "{e}");
        let e = chain_of(&points, "/z").unwrap_err().to_string();
        assert!(e.contains("layer /z is not recorded"), "{e}");
    }
}
