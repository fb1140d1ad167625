//! Every name standby gives to what it leaves on disk, in QEMU and in `qemu-nbd`: one place,
//! so that the on-disk format is read here and recovery finds what a killed run left by
//! the same names that made it.
//!
//! A replica directory (`TARGET_DIR/VM/`) holds:
//!
//! | file | what | made by |
//! |---|---|---|
//! | `.standby-replica` | the ownership marker: data dir, job and VM that own the directory | job creation |
//! | `000042-d0.qcow2` | restore point sequence 42's layer of disk 0, over the previous point's | a run |
//! | `failover-d0.qcow2` | the replica VM's overlay of disk 0 in failover (generation 0) | failover |
//! | `failover-d0.g2.qcow2` | generation 2 over it, after failback protective points | failback phase 1 |
//!
//! Beside a target disk `DISK` a failback writes `DISK.failback-r<replica>.qcow2`, the
//! working layer its phases fill before the switch commits it.
//!
//! On the source, a replica's dirty bitmaps are `standby-r<replica>-<seq>`, the bitmap of
//! run `seq` starting at its instant. NBD servers are named by purpose and replica:
//! `dst-r<replica>-` (a DR layer being written), `fb-r<replica>-` (failback transfers),
//! `verify-r<replica>-d<disk>` (a planned failover's comparison). The source's views (QEMU
//! fleecing nodes, exports and `src-r<replica>-` servers) are named by the host's driver
//! (the QEMU driver's `live.rs`) from the replica id.

use standby_model::{ReplicaId, Seq};

/// The file of restore point `seq`'s layer for disk `idx`.
pub fn layer_path(dir: &str, seq: Seq, idx: usize) -> String {
    format!("{dir}/{seq:06}-d{idx}.qcow2")
}

/// The sequence in a layer file's name, if it is one `layer_path` makes.
pub fn layer_seq(name: &str) -> Option<Seq> {
    let (seq, disk) = name.strip_suffix(".qcow2")?.split_once("-d")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (seq.len() >= 6 && digits(seq) && digits(disk)).then(|| seq.parse().ok().map(Seq)).flatten()
}

/// The file that makes a replica directory provably one replica's: written when the job
/// is created (refused if it exists), checked before any run, failover or cleanup writes
/// or deletes anything there.
pub const OWNER_MARKER: &str = ".standby-replica";

const OVERLAY_PREFIX: &str = "failover-d";

/// The replica's overlay of disk `idx`, generation `gen`. Failover makes generation 0; each
/// failback's protective point freezes the top one and stacks the next over it.
pub fn overlay_path(dir: &str, idx: usize, gen: u32) -> String {
    match gen {
        0 => format!("{dir}/{OVERLAY_PREFIX}{idx}.qcow2"),
        g => format!("{dir}/{OVERLAY_PREFIX}{idx}.g{g}.qcow2"),
    }
}

/// The generation of an overlay path made by [`overlay_path`].
pub fn overlay_gen(path: &str) -> u32 {
    path.strip_suffix(".qcow2").and_then(|p| p.rsplit_once(".g")).and_then(|(_, g)| g.parse().ok()).unwrap_or(0)
}

/// Whether a file name in a replica directory is one of its overlays (or the replica's
/// variable store or TPM state, which go with them).
pub fn is_overlay(name: &str) -> bool {
    name.starts_with(OVERLAY_PREFIX)
}

/// The copy of a UEFI VM's variable store that restore point `seq` holds.
pub fn vars_path(dir: &str, seq: Seq) -> String {
    format!("{dir}/{seq:06}-vars.fd")
}

/// The copy of a VM's TPM state that restore point `seq` holds.
pub fn tpm_path(dir: &str, seq: Seq) -> String {
    format!("{dir}/{seq:06}-tpm.permall")
}

/// The sequence in the name of a point's copy of the VM's state beside its disks (its
/// variable store, its TPM's state), if it is one `vars_path` or `tpm_path` makes (or the
/// temporary file a crash left while writing it).
pub fn state_copy_seq(name: &str) -> Option<Seq> {
    let name = name.strip_suffix(".standby-tmp").unwrap_or(name);
    let seq = name.strip_suffix("-vars.fd").or_else(|| name.strip_suffix("-tpm.permall"))?;
    (seq.len() >= 6 && seq.bytes().all(|b| b.is_ascii_digit())).then(|| seq.parse().ok().map(Seq)).flatten()
}

/// The replica VM's own variable store in failover: a copy of its restore point's, which
/// the replica's firmware writes; goes with the overlays at undo.
pub fn replica_vars_path(dir: &str) -> String {
    format!("{dir}/{OVERLAY_PREFIX}vars.fd")
}

/// The replica VM's TPM state on standby's own driver (libvirt keeps a replica domain's
/// itself); goes with the overlays at undo.
pub fn replica_tpm_path(dir: &str) -> String {
    format!("{dir}/{OVERLAY_PREFIX}tpm.permall")
}

/// A `new:` failback target's TPM state on standby's own driver, beside its disks.
pub fn new_target_tpm_path(dir: &str, vm: &str) -> String {
    format!("{dir}/{vm}-tpm.permall")
}

/// A `new:` failback target's variable store, beside its disks.
pub fn new_target_vars_path(dir: &str, vm: &str) -> String {
    format!("{dir}/{vm}-vars.fd")
}

/// A failback's working layer over target disk `disk`.
pub fn working_path(disk: &str, replica_id: ReplicaId) -> String {
    format!("{disk}.failback-r{replica_id}.qcow2")
}

/// The source bitmap of run `seq`.
pub fn bitmap_name(replica_id: ReplicaId, seq: Seq) -> String {
    format!("standby-r{replica_id}-{seq}")
}

/// The run a bitmap name belongs to, if it is this replica's.
pub fn bitmap_seq(replica_id: ReplicaId, name: &str) -> Option<Seq> {
    name.strip_prefix(&format!("standby-r{replica_id}-"))?.parse().ok().map(Seq)
}

/// The NBD servers of DR layers being written.
pub fn target_prefix(replica_id: ReplicaId) -> String {
    format!("dst-r{replica_id}-")
}

/// The NBD servers of a failback's transfers.
pub fn failback_prefix(replica_id: ReplicaId) -> String {
    format!("fb-r{replica_id}-")
}

/// The NBD servers of a planned failover's comparison of disk `idx`.
pub fn verify_id(replica_id: ReplicaId, idx: u32) -> String {
    format!("{}d{idx}", verify_prefix(replica_id))
}

/// The start of every comparison server's name of a replica.
pub fn verify_prefix(replica_id: ReplicaId) -> String {
    format!("verify-r{replica_id}-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const R3: ReplicaId = ReplicaId(3);
    const R1: ReplicaId = ReplicaId(1);

    #[test]
    fn names_read_back_as_what_made_them() {
        assert_eq!(layer_path("/r", Seq(42), 1), "/r/000042-d1.qcow2");
        assert_eq!(layer_seq("000042-d1.qcow2"), Some(Seq(42)));
        assert_eq!(layer_seq("1234567-d0.qcow2"), Some(Seq(1_234_567)));
        for stranger in ["42-d1.qcow2", "000042-d.qcow2", "failover-d0.qcow2", "000042-d1.raw", ".standby-replica"] {
            assert_eq!(layer_seq(stranger), None, "{stranger}");
        }
        assert_eq!(overlay_path("/r", 1, 0), "/r/failover-d1.qcow2");
        assert_eq!(overlay_path("/r", 1, 3), "/r/failover-d1.g3.qcow2");
        for g in [0, 1, 12] {
            assert_eq!(overlay_gen(&overlay_path("/r.g7", 0, g)), g);
        }
        assert!(is_overlay("failover-d0.g2.qcow2") && !is_overlay("000001-d0.qcow2"));
        assert!(is_overlay("failover-dvars.fd"), "the replica's variable store goes with its overlays");
        assert_eq!(vars_path("/r", Seq(12)), "/r/000012-vars.fd");
        assert!(is_overlay("failover-dtpm.permall"), "and its TPM's state");
        assert_eq!(state_copy_seq("000012-vars.fd"), Some(Seq(12)));
        assert_eq!(state_copy_seq(&tpm_path("/r", Seq(12))[3..]), Some(Seq(12)));
        assert_eq!(state_copy_seq("000012-vars.fd.standby-tmp"), Some(Seq(12)), "a crash's leftover is found");
        assert_eq!(state_copy_seq("000012-tpm.permall.standby-tmp"), Some(Seq(12)));
        assert_eq!((state_copy_seq("12-vars.fd"), state_copy_seq("000012-d0.qcow2")), (None, None));
        assert_eq!(bitmap_seq(R3, &bitmap_name(R3, Seq(17))), Some(Seq(17)));
        assert_eq!(bitmap_seq(R3, &bitmap_name(ReplicaId(4), Seq(17))), None);
        assert_eq!(bitmap_seq(R3, "standby-r3-x"), None);
        // Each purpose's servers are found by a prefix no other purpose's name starts with.
        use standby_host::{fleece_prefix, serve_prefix};
        let ids = [serve_prefix(R1), target_prefix(R1), failback_prefix(R1), verify_id(R1, 0), fleece_prefix(R1)];
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                assert!(!a.starts_with(b.as_str()) && !b.starts_with(a.as_str()), "{a} {b}");
            }
        }
        let r11 = ReplicaId(11);
        assert!(!serve_prefix(R1).starts_with(&serve_prefix(r11)) && !serve_prefix(r11).starts_with(&serve_prefix(R1)));
    }
}
