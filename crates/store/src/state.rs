//! The one place a replica's state and the step of its operation are written: every
//! change is a compare-and-set inside one transaction.

use rusqlite::{params, Transaction};

use crate::*;

/// What a transition does with the restore point a replica runs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverPoint {
    Keep,
    Set(Option<PointId>),
}

impl Store {
    /// The one way a replica's state changes: by transition `t` from the state `from` the
    /// caller read, with the step its operation reached (None once it is done) and the
    /// restore point it runs from, in one transaction. Refused, changing nothing, when the
    /// transition does not apply or the state is no longer `from` (another command moved it).
    pub fn transition(
        &mut self,
        id: ReplicaId,
        from: ReplicaState,
        t: Transition,
        step: Option<Step>,
        failover_point: FailoverPoint,
    ) -> Result<ReplicaState> {
        let to = from.apply(t)?;
        if let Some(s) = step {
            if s.state() != to {
                return Err(StoreError::Corrupt(format!("step {s} is not a step of {to}")));
            }
        }
        let tx = self.tx()?;
        check_state(&tx, id, from)?;
        let step = step.map(Step::to_db);
        match failover_point {
            FailoverPoint::Keep => tx.execute(
                "UPDATE replicas SET state = ?2, op_step = ?3 WHERE id = ?1",
                params![id, to.as_str(), step],
            )?,
            FailoverPoint::Set(p) => tx.execute(
                "UPDATE replicas SET state = ?2, op_step = ?3, failover_point = ?4 WHERE id = ?1",
                params![id, to.as_str(), step, p],
            )?,
        };
        tx.commit()?;
        Ok(to)
    }

    /// Ends the operation in progress on a replica that reached idle `state` (its last
    /// step, such as deleting files after publishing, is done).
    pub fn end_operation(&mut self, id: ReplicaId, state: ReplicaState) -> Result<()> {
        let tx = self.tx()?;
        check_state(&tx, id, state)?;
        tx.execute("UPDATE replicas SET op_step = NULL WHERE id = ?1", [id])?;
        tx.commit()?;
        Ok(())
    }

    /// Records the step an operation in progress reached; refused unless the replica is in
    /// the state the step belongs to.
    pub fn set_step(&mut self, id: ReplicaId, step: Step) -> Result<()> {
        let tx = self.tx()?;
        check_state(&tx, id, step.state())?;
        tx.execute("UPDATE replicas SET op_step = ?2 WHERE id = ?1", params![id, step.to_db()])?;
        tx.commit()?;
        Ok(())
    }

    /// Permanent failover's publishing step, in one transaction: the replica VM becomes an
    /// ordinary VM, the replica leaves its job (state `permanent`) and its restore points
    /// go from the records. The layer files are deleted after this.
    pub fn make_permanent(&mut self, replica_id: ReplicaId, vm: &str) -> Result<()> {
        let tx = self.tx()?;
        check_state(&tx, replica_id, ReplicaState::MakingPermanent)?;
        let to = ReplicaState::MakingPermanent.apply(Transition::PermanentDone)?;
        let step = Step::Permanent(standby_model::step::PermanentStep::DeletePoints);
        tx.execute("UPDATE vms SET role = ?2, replica_id = NULL WHERE name = ?1", params![vm, Role::Source.as_str()])?;
        // The source the replica replaced: one identity, so it must not run beside it.
        tx.execute(
            "UPDATE vms SET role = ?2 WHERE id = (SELECT vm_id FROM replicas WHERE id = ?1)",
            params![replica_id, Role::Retired.as_str()],
        )?;
        tx.execute(
            "UPDATE replicas SET state = ?2, op_step = ?3, failover_point = NULL WHERE id = ?1",
            params![replica_id, to.as_str(), step.to_db()],
        )?;
        tx.execute(
            "DELETE FROM rp_disks WHERE rp_id IN (SELECT id FROM restore_points WHERE replica_id = ?1)",
            [replica_id],
        )?;
        tx.execute("DELETE FROM restore_points WHERE replica_id = ?1", [replica_id])?;
        tx.commit()?;
        Ok(())
    }
}

/// Refuses, inside a transaction, unless replica `id` is in state `expected`.
fn check_state(tx: &Transaction<'_>, id: ReplicaId, expected: ReplicaState) -> Result<()> {
    let (found, vm): (String, String) = tx.query_row(
        "SELECT r.state, v.name FROM replicas r JOIN vms v ON v.id = r.vm_id WHERE r.id = ?1",
        [id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if found != expected.as_str() {
        return Err(StoreError::StateMoved { vm, expected, found });
    }
    Ok(())
}
