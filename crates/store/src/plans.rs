//! Failover plans: their VMs in order, delays and commands.

use rusqlite::{params, Transaction};

use crate::*;

impl Store {
    pub fn insert_plan(&mut self, plan: &PlanRecord) -> Result<()> {
        let tx = self.tx()?;
        insert_plan_rows(&tx, plan)?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces a plan's definition, keeping its name and creation time, in one transaction.
    pub fn update_plan(&mut self, plan: &PlanRecord) -> Result<()> {
        let tx = self.tx()?;
        tx.execute("DELETE FROM plans WHERE name = ?1", [&plan.name])?;
        insert_plan_rows(&tx, plan)?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete_plan(&mut self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM plans WHERE name = ?1", [name])?;
        Ok(())
    }

    pub fn plans(&self) -> Result<Vec<PlanRecord>> {
        let mut st = self.conn.prepare(
            "SELECT id, name, pre_command, post_command, on_failure, created_at, hook_timeout_secs FROM plans ORDER BY name",
        )?;
        let rows: Vec<(i64, PlanRecord)> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    PlanRecord {
                        name: r.get(1)?,
                        vms: Vec::new(),
                        pre_command: r.get(2)?,
                        post_command: r.get(3)?,
                        on_failure: r.get(4)?,
                        created_at: r.get(5)?,
                        hook_timeout_secs: r.get::<_, i64>(6)? as u64,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut st = self.conn.prepare("SELECT vm, delay_secs FROM plan_vms WHERE plan_id = ?1 ORDER BY pos")?;
        let mut plans = Vec::new();
        for (id, mut plan) in rows {
            plan.vms = st
                .query_map([id], |r| Ok(PlanVm { vm: r.get(0)?, delay_secs: r.get::<_, i64>(1)? as u64 }))?
                .collect::<rusqlite::Result<_>>()?;
            plans.push(plan);
        }
        Ok(plans)
    }
}

fn insert_plan_rows(tx: &Transaction<'_>, plan: &PlanRecord) -> Result<()> {
    tx.execute(
        "INSERT INTO plans (name, pre_command, post_command, on_failure, created_at, hook_timeout_secs)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            plan.name,
            plan.pre_command,
            plan.post_command,
            plan.on_failure,
            plan.created_at,
            plan.hook_timeout_secs as i64
        ],
    )?;
    let id = tx.last_insert_rowid();
    for (pos, v) in plan.vms.iter().enumerate() {
        tx.execute(
            "INSERT INTO plan_vms (plan_id, pos, vm, delay_secs) VALUES (?1, ?2, ?3, ?4)",
            params![id, pos as i64, v.vm, v.delay_secs as i64],
        )?;
    }
    Ok(())
}
