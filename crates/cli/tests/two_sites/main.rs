//! User story: production and DR are two hosts, each running `standby agent`, and the
//! controller sits on a third. Here each is a network namespace the tests make (veth
//! links on a bridge in the controller's namespace, addresses in 10.231.0.0/16 that exist
//! only inside them) and remove. Every result is compared byte for byte and against the
//! guest's write ledger:
//! - `lifecycle`: replication of a running and a stopped VM (full, changed blocks, digest,
//!   each compression; a capture of the link holds no known plaintext), failover to an
//!   older point and undo, failback to the original with switch and commit, a planned
//!   failover, and failback to a new VM on a third host;
//! - `site_loss`: the production site lost (link cut, or its agent killed), failover
//!   without it, and the fence when it returns;
//! - `faults`: a link cut within and past the retry window, a full DR disk, a killed
//!   agent on either side of a run;
//! - `trust`: no, revoked, expired or foreign certificate, used or wrong token: refused;
//! - `libvirt`: both hosts' agents drive their VMs through libvirt: a domain imported,
//!   replicated between the agents, failed over to a replica domain on the DR host, failed back.

mod faults;
mod libvirt;
mod lifecycle;
mod site_loss;
mod sites;
mod trust;
