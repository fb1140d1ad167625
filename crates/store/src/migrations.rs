//! Versioned schema. Each entry runs once, in order, inside a transaction; the database's
//! `user_version` records how many have run. Append only: never edit a released migration.

pub const MIGRATIONS: &[&str] = &[
    // 1: VMs, jobs, replicas, restore points, tasks.
    r#"
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    INSERT INTO hosts (name, kind, created_at) VALUES ('local', 'local', strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));

    CREATE TABLE vms (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        host TEXT NOT NULL REFERENCES hosts(name),
        cpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        nics TEXT NOT NULL,
        kernel TEXT,
        initrd TEXT,
        append TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE vm_disks (
        vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        path TEXT NOT NULL,
        format TEXT NOT NULL,
        PRIMARY KEY (vm_id, idx)
    );

    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        target_host TEXT NOT NULL REFERENCES hosts(name),
        target_dir TEXT NOT NULL,
        retain INTEGER NOT NULL CHECK (retain >= 1),
        every_secs INTEGER,
        last_run_at TEXT,
        created_at TEXT NOT NULL
    );
    CREATE TABLE replicas (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        vm_id INTEGER NOT NULL REFERENCES vms(id),
        state TEXT NOT NULL,
        dir TEXT NOT NULL,
        next_seq INTEGER NOT NULL DEFAULT 1,
        UNIQUE (job_id, vm_id)
    );
    CREATE TABLE restore_points (
        id INTEGER PRIMARY KEY,
        replica_id INTEGER NOT NULL REFERENCES replicas(id),
        seq INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        method TEXT NOT NULL,
        bytes_transferred INTEGER NOT NULL,
        bytes_read INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        pruning INTEGER NOT NULL DEFAULT 0,
        UNIQUE (replica_id, seq)
    );
    CREATE TABLE rp_disks (
        rp_id INTEGER NOT NULL REFERENCES restore_points(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        layer TEXT NOT NULL,
        parent TEXT,
        size INTEGER NOT NULL,
        method TEXT NOT NULL,
        bitmap TEXT,
        bytes_transferred INTEGER NOT NULL,
        PRIMARY KEY (rp_id, idx)
    );

    CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        status TEXT NOT NULL,
        step TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        done_bytes INTEGER NOT NULL DEFAULT 0,
        total_bytes INTEGER NOT NULL DEFAULT 0,
        message TEXT
    );
    "#,
    // 2: failover. Replica VMs are VMs with role 'replica'; the replica row remembers the
    // restore point it runs from and the step of an operation in flight; history records
    // every operation.
    r#"
    ALTER TABLE vms ADD COLUMN role TEXT NOT NULL DEFAULT 'source';
    ALTER TABLE vms ADD COLUMN replica_id INTEGER REFERENCES replicas(id);
    ALTER TABLE jobs ADD COLUMN replica_suffix TEXT NOT NULL DEFAULT '_replica';
    ALTER TABLE replicas ADD COLUMN failover_point INTEGER;
    ALTER TABLE replicas ADD COLUMN op_step TEXT;
    CREATE TABLE history (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        vm TEXT NOT NULL,
        operation TEXT NOT NULL,
        command TEXT NOT NULL,
        result TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX history_vm ON history (vm, id);
    "#,
    // 3: failover plans: ordered VMs with a delay after each start, commands around them.
    r#"
    CREATE TABLE plans (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        pre_command TEXT,
        post_command TEXT,
        on_failure TEXT NOT NULL CHECK (on_failure IN ('stop', 'continue')),
        created_at TEXT NOT NULL
    );
    CREATE TABLE plan_vms (
        plan_id INTEGER NOT NULL REFERENCES plans(id) ON DELETE CASCADE,
        pos INTEGER NOT NULL,
        vm TEXT NOT NULL,
        delay_secs INTEGER NOT NULL CHECK (delay_secs >= 0),
        PRIMARY KEY (plan_id, pos)
    );
    "#,
    // 4: failback. One row per replica with a failback in progress (from phase 1 until it is
    // committed or undone): where its state goes and everything the later phases need, as
    // one JSON record the engine owns.
    r#"
    CREATE TABLE failbacks (
        replica_id INTEGER PRIMARY KEY REFERENCES replicas(id),
        record TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    "#,
    // 5: configuration an operator changes: a job can be disabled (the daemon skips it, a
    // manual run is refused), and a plan's commands get a time limit.
    r#"
    ALTER TABLE jobs ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1));
    ALTER TABLE plans ADD COLUMN hook_timeout_secs INTEGER NOT NULL DEFAULT 300 CHECK (hook_timeout_secs >= 1);
    "#,
    // 6: a planned failover is a state of its own. Rows an interrupted planned failover
    // left as `ready` or `replicating` with its marker become `preparing_failover`.
    r#"
    UPDATE replicas SET state = 'preparing_failover'
     WHERE state IN ('ready', 'replicating') AND op_step LIKE 'planned:%';
    "#,
    // 7: hosts reached through an agent: where, and what it last said.
    r#"
    ALTER TABLE hosts ADD COLUMN address TEXT;
    ALTER TABLE hosts ADD COLUMN version TEXT;
    ALTER TABLE hosts ADD COLUMN last_seen TEXT;
    "#,
    // 8: fences. A failover made while the source's host was unreachable leaves one: the
    // source may still run there, so it is paused and powered off when its host answers
    // again, and its disks copied into protective images first. `fenced_at` is NULL until
    // then; `protective` lists the images, one path per line. `disks` (JSON) are the
    // source's disks at the failover: a failback elsewhere may redefine the VM meanwhile.
    r#"
    CREATE TABLE fences (
        replica_id INTEGER PRIMARY KEY REFERENCES replicas(id),
        vm TEXT NOT NULL,
        host TEXT NOT NULL,
        disks TEXT NOT NULL,
        declared_at TEXT NOT NULL,
        declared_by TEXT NOT NULL,
        fenced_at TEXT,
        found TEXT,
        protective TEXT
    );
    "#,
    // 9: how a job's data travels between hosts: compression, a bandwidth limit (bytes
    // per second on the wire; NULL for none), and how long a dropped link may stay down.
    r#"
    ALTER TABLE jobs ADD COLUMN compression TEXT NOT NULL DEFAULT 'zstd'
        CHECK (compression IN ('none', 'lz4', 'zstd'));
    ALTER TABLE jobs ADD COLUMN bandwidth INTEGER CHECK (bandwidth IS NULL OR bandwidth > 0);
    ALTER TABLE jobs ADD COLUMN retry_window_secs INTEGER NOT NULL DEFAULT 300 CHECK (retry_window_secs >= 0);
    "#,
    // 10: the serial of each agent's certificate, which `host remove` revokes. NULL for
    // hosts enrolled before: their certificates cannot be named in a revocation.
    r#"
    ALTER TABLE hosts ADD COLUMN cert_serial TEXT;
    "#,
    // 11: when a host is declared lost without the operator: after `lost_after_secs` of
    // silence (NULL: never), counted from `silent_since`, the first failed contact since
    // its last answer (NULL while it answers).
    r#"
    ALTER TABLE hosts ADD COLUMN lost_after_secs INTEGER CHECK (lost_after_secs IS NULL OR lost_after_secs > 0);
    ALTER TABLE hosts ADD COLUMN silent_since TEXT;
    "#,
    // 12: what a task's transfers between hosts cost on the wire so far: `wire_bytes` for
    // `wire_data_bytes` of blocks, the live compression ratio another terminal follows.
    r#"
    ALTER TABLE tasks ADD COLUMN wire_data_bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN wire_bytes INTEGER NOT NULL DEFAULT 0;
    "#,
    // 13: libvirt. The daemon a libvirt host's VMs live in (its connection URI); a VM's definition as `vm import` read it (NULL for standby's own
    // VMs), and where its NICs go (a replica's, from its job); a job's network map, the
    // source network (or bridge) of each NIC to the one its replica is put on; whether a
    // failover switched off the source's autostart (restored when it is the VM of record again).
    r#"
    ALTER TABLE vms ADD COLUMN domain_xml TEXT;
    ALTER TABLE vms ADD COLUMN network_map TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE jobs ADD COLUMN network_map TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE hosts ADD COLUMN libvirt_uri TEXT;
    ALTER TABLE replicas ADD COLUMN source_autostart_off INTEGER NOT NULL DEFAULT 0;
    "#,
    // 14: consistent points. How a job freezes a running guest around each run's instant
    // (JSON: enabled, timeout, pre- and post-freeze commands); what each point can promise:
    // `application` (frozen by the guest's agent), `crash`, or `offline` (a stopped VM's
    // images). Points made before this could not have been frozen: `crash`. A VM's machine
    // type and CPU model (NULL: QEMU's defaults), which its replica keeps; a UEFI VM's
    // firmware (JSON: loader and variable store; NULL for BIOS), and the copy of its
    // variable store each restore point holds.
    r#"
    ALTER TABLE vms ADD COLUMN machine TEXT;
    ALTER TABLE vms ADD COLUMN cpu_model TEXT;
    ALTER TABLE vms ADD COLUMN firmware TEXT;
    ALTER TABLE restore_points ADD COLUMN nvram TEXT;
    ALTER TABLE jobs ADD COLUMN quiesce TEXT NOT NULL DEFAULT '{"enabled":true,"timeout_secs":10}';
    ALTER TABLE restore_points ADD COLUMN consistency TEXT NOT NULL DEFAULT 'crash'
        CHECK (consistency IN ('application', 'crash', 'offline'));
    "#,
    // 15: TPMs. A VM's emulated TPM (JSON: device model, and where standby's own driver
    // keeps its state; NULL without one), and the copy of its state each restore point holds.
    r#"
    ALTER TABLE vms ADD COLUMN tpm TEXT;
    ALTER TABLE restore_points ADD COLUMN tpm_state TEXT;
    "#,
];
