//! Retention: the oldest restore points go, the rest stay readable at every instant.
//!
//! Dropping the oldest point `X` when the next point `Y` stacks a layer on `X`'s: commit
//! `Y`'s layer into `X`'s file (after which `X`'s file holds `Y`'s content, while `Y`'s own
//! layer on top still reads the same), then in one database transaction drop `X` and make
//! `Y` use `X`'s file. Only then do files go. A crash anywhere leaves `Y` intact: before the
//! transaction it reads through its own layer, after it through the committed file.

use standby_host::{Chain, Format, Host, Layer};
use standby_model::{points_to_drop, PointId, ReplicaId, Seq};
use standby_store::RestorePointRecord;

use crate::replica_dir;
use crate::{failpoint, Engine, EngineError, Result};

impl Engine {
    /// Drops restore points beyond `keep`, finishing any drop a crash interrupted first.
    pub(crate) fn apply_retention(
        &self,
        host: &dyn Host,
        replica_id: ReplicaId,
        dir: &str,
        keep: u32,
    ) -> Result<usize> {
        let all = self.store().restore_points(replica_id, true)?;
        let kept: Vec<PointId> = all.iter().filter(|p| !p.pruning).map(|p| p.id).collect();
        let mut doomed: Vec<PointId> = all.iter().filter(|p| p.pruning).map(|p| p.id).collect();
        doomed.extend(points_to_drop(&kept, keep));
        for id in &doomed {
            self.drop_oldest(host, replica_id, *id)?;
        }
        if !doomed.is_empty() {
            let points = self.store().restore_points(replica_id, true)?;
            replica_dir::fix_headers(host, &points)?;
            replica_dir::remove_orphans(host, dir, &points, self.next_seq(replica_id)?)?;
        }
        Ok(doomed.len())
    }

    /// Completes a retention drop a crash interrupted, repairs layer headers after an
    /// interruption, and removes layer files no restore point uses. Returns those files.
    pub(crate) fn finish_pruning(
        &self,
        host: &dyn Host,
        replica_id: ReplicaId,
        dir: &str,
        interrupted: bool,
    ) -> Result<Vec<String>> {
        let points = self.store().restore_points(replica_id, true)?;
        let pending: Vec<PointId> = points.iter().filter(|p| p.pruning).map(|p| p.id).collect();
        for id in &pending {
            self.drop_oldest(host, replica_id, *id)?;
        }
        let points = self.store().restore_points(replica_id, true)?;
        if interrupted || !pending.is_empty() {
            replica_dir::fix_headers(host, &points)?;
        }
        replica_dir::remove_orphans(host, dir, &points, self.next_seq(replica_id)?)
    }

    /// The replica's next sequence, read now: every lower one was taken by a run.
    pub(crate) fn next_seq(&self, replica_id: ReplicaId) -> Result<Seq> {
        let replica = self.store().replica(replica_id)?;
        Ok(replica.ok_or_else(|| EngineError::Invalid(format!("replica {replica_id} vanished")))?.next_seq)
    }

    fn drop_oldest(&self, host: &dyn Host, replica_id: ReplicaId, id: PointId) -> Result<()> {
        let points = self.store().restore_points(replica_id, true)?;
        let Some(pos) = points.iter().position(|p| p.id == id) else {
            return Ok(());
        };
        if pos != 0 {
            return Err(EngineError::Bug(format!(
                "restore point {id} is not the oldest; retention drops oldest first"
            )));
        }
        let doomed: &RestorePointRecord = &points[0];
        self.store().mark_pruning(id)?;
        let mut moves = Vec::new();
        let mut new_bases = Vec::new();
        for d in &doomed.disks {
            if d.parent.is_some() {
                return Err(EngineError::Bug(format!("oldest restore point {id} has a parent layer")));
            }
            let child = points[1..].iter().flat_map(|p| &p.disks).find(|c| c.parent.as_deref() == Some(&d.layer));
            if let Some(c) = child {
                let chain = Chain {
                    layers: vec![
                        Layer { path: c.layer.clone(), format: Format::Qcow2 },
                        Layer { path: d.layer.clone(), format: Format::Qcow2 },
                    ],
                };
                host.image_commit(&chain)?;
                host.sync_file(&d.layer)?;
                moves.push((c.layer.clone(), d.layer.clone()));
                new_bases.push(d.layer.clone());
            }
        }
        failpoint::hit("retention.after-commit-layer");
        self.store().drop_restore_point(id, &moves, &new_bases)?;
        failpoint::hit("retention.after-drop");
        Ok(())
    }
}
