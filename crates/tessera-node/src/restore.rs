//! Building the replica a node runs: empty, or rebuilt from its write-ahead log — and, when the
//! log is damaged, from what [`crate::salvage`] keeps of it.
//!
//! All of it happens before the replica serves anything (its ports are bound, so connections
//! wait in the backlog): a replica whose log cannot be read says nothing, and one rebuilt from a
//! salvaged log says its first words in its new USIG epoch.

use crate::driver::{self, replay_log, timers_of_codes, Restored, WalStart};
use crate::metrics::ReplicaMetrics;
use crate::salvage::{self, Damage};
use crate::wal::{self, Snapshot, WalError, WalOwner};
use crate::{
    build_fresh_usig, build_usig_at, key_value_store, ClientKeys, Durability, NodeAuthenticator,
    NodeError, VerifiedCache,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use tessera_core::{Envelope, Replica};
use tessera_kv::KvStore;
use tessera_types::cluster::{ClusterConfig, ReplicaSecrets};
use tessera_types::ReplicaId;
use tracing::{info, warn};

/// The replica a node runs.
pub(crate) type NodeReplica = Replica<Envelope<KvStore>>;

/// How many salvages one start makes before it gives up. A salvage that fails to replay again
/// (the previous log damaged too) is followed by one that keeps less, and the last keeps
/// nothing (a `Start` and a `StartEpoch`), which replays on any executable that reads the log
/// format; so a fourth failure is not the log's.
const SALVAGES_MAX: usize = 3;

/// Everything a replica is built from.
pub(crate) struct Builder {
    pub cluster: ClusterConfig,
    pub secrets: ReplicaSecrets,
    pub me: ReplicaId,
    pub metrics: Arc<ReplicaMetrics>,
    pub clients: Arc<ClientKeys>,
    pub cache: Arc<VerifiedCache>,
}

/// Why one attempt to rebuild a replica from its log failed.
enum Rebuild {
    /// The log is damaged there: a salvage can go on without it.
    Damaged {
        error: Box<NodeError>,
        damage: Damage,
    },
    /// Anything else (configuration, IO, another owner's log): the start fails.
    Fatal(Box<NodeError>),
}

impl From<NodeError> for Rebuild {
    fn from(error: NodeError) -> Rebuild {
        Rebuild::Fatal(Box::new(error))
    }
}

impl From<WalError> for Rebuild {
    fn from(error: WalError) -> Rebuild {
        Rebuild::Fatal(Box::new(error.into()))
    }
}

/// Refuses the two starts that would certify counter values this replica may have used: a log
/// that is missing although files beside it show the replica ran before (its previous log, a
/// damaged copy) — it would start empty in its old epoch — unless `--new-epoch` says the log
/// was lost; and `--new-epoch` while the log holds anything (checked here too, before a salvage
/// could change the files).
fn check_log_presence(durability: &Durability) -> Result<(), NodeError> {
    let log = &durability.log;
    let length = std::fs::metadata(log).map(|metadata| metadata.len()).ok();
    if durability.new_epoch {
        if length.is_some_and(|length| length > wal::HEADER_LEN as u64) {
            return Err(NodeError::Config(format!(
                "the write-ahead log {} holds this replica's history, but --new-epoch says its \
                 log was lost; start the replica without --new-epoch: it restarts from its log",
                log.display()
            )));
        }
        return Ok(());
    }
    if length.is_none() {
        let previous = wal::previous_path(log);
        let evidence = if previous.exists() {
            Some(previous)
        } else {
            salvage::damaged_copies(log).into_iter().next()
        };
        if let Some(evidence) = evidence {
            return Err(NodeError::Config(format!(
                "the write-ahead log {} is missing, but {} shows this replica ran before: \
                 started empty it would reuse USIG counter values; if the log is lost, start the \
                 replica with --new-epoch",
                log.display(),
                evidence.display()
            )));
        }
    }
    Ok(())
}

fn remove_if_present(path: &std::path::Path) -> Result<(), NodeError> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            Err(NodeError::Wal(WalError::Io {
                path: path.to_path_buf(),
                action: "remove (--no-previous-log)",
                error,
            }))
        }
        _ => Ok(()),
    }
}

impl Builder {
    /// The replica, and, with `durability`, the log it goes on with (see the module's doc).
    pub(crate) fn build(
        &self,
        durability: Option<&Durability>,
    ) -> Result<(NodeReplica, Option<WalStart>), NodeError> {
        let Some(durability) = durability else {
            return Ok((self.fresh()?, None));
        };
        let owner = crate::wal_owner(&durability.log, &self.cluster, &self.secrets, self.me)?;
        check_log_presence(durability)?;
        if !durability.keep_previous_log {
            remove_if_present(&wal::previous_path(&durability.log))?;
        }
        for salvages in 0..=SALVAGES_MAX {
            let (error, damage) = match self.rebuild(durability, owner) {
                Ok((replica, start)) => return Ok((replica, Some(start))),
                Err(Rebuild::Fatal(error)) => return Err(*error),
                Err(Rebuild::Damaged { error, damage }) => (*error, damage),
            };
            if !durability.salvage || salvages == SALVAGES_MAX {
                return Err(error);
            }
            let damage = if salvages + 1 == SALVAGES_MAX {
                Damage::Everything
            } else {
                damage
            };
            warn!(%error, ?damage, "the write-ahead log is damaged; salvaging it");
            let salvaged =
                salvage::salvage(&durability.log, owner, damage, driver::wall_clock_ms())?;
            warn!(
                kept = ?salvaged.kept,
                damaged_copy = %salvaged.damaged_copy.display(),
                epoch_at_least = salvaged.epoch_at_least,
                "salvaged the write-ahead log: the replica rejoins in a new USIG epoch and \
                 fetches what it lacks"
            );
        }
        unreachable!("the last attempt returns")
    }

    /// One attempt: open the log, restore its snapshot, replay its records.
    fn rebuild(
        &self,
        durability: &Durability,
        owner: WalOwner,
    ) -> Result<(NodeReplica, WalStart), Rebuild> {
        let recovery = match wal::recover(&durability.log, owner) {
            Ok(recovery) => recovery,
            // Opening reads only the header and the snapshot: corruption there is the snapshot's.
            Err(error @ WalError::Corrupt { .. }) => {
                return Err(Rebuild::Damaged {
                    error: Box::new(error.into()),
                    damage: Damage::Snapshot,
                })
            }
            Err(error) => return Err(error.into()),
        };
        let (mut replica, restored, mut timers, clock_ms) = match &recovery.snapshot {
            Some(snapshot) => {
                // The snapshot matched its digest, so whatever fails to restore it is not damage
                // (a changed `[store]` limit, another executable, a bug): fatal, never salvaged.
                let replica = self.restored_from(snapshot)?;
                info!(
                    generation = snapshot.generation,
                    last_executed = replica.last_executed().0,
                    "restored from a snapshot"
                );
                let restored = Restored {
                    generation: snapshot.generation,
                    bytes: snapshot.core.len() as u64,
                };
                let timers = timers_of_codes(&snapshot.timers);
                (replica, Some(restored), timers, snapshot.clock_ms)
            }
            None => (self.fresh()?, None, BTreeMap::new(), 0),
        };
        let mut log = recovery.log;
        let replayed =
            replay_log(&mut replica, &mut timers, &mut log, clock_ms).map_err(|failure| {
                match failure.damage {
                    Some(damage) => Rebuild::Damaged {
                        error: Box::new((*failure.error).into()),
                        damage,
                    },
                    None => (*failure.error).into(),
                }
            })?;
        Ok((
            replica,
            WalStart {
                log,
                restored,
                timers,
                replayed,
                snapshot_after_log_bytes: durability.snapshot_after_log_bytes,
                new_epoch: durability.new_epoch,
                keep_previous: durability.keep_previous_log,
            },
        ))
    }

    fn authenticator(&self) -> Box<NodeAuthenticator> {
        Box::new(NodeAuthenticator::new(
            self.me,
            self.clients.clone(),
            self.cache.clone(),
        ))
    }

    /// A replica restored from `snapshot`, its USIG continuing exactly where the snapshot's
    /// replica stopped: everything it certified after that is in the log, and replay certifies
    /// it again.
    fn restored_from(&self, snapshot: &Snapshot) -> Result<NodeReplica, NodeError> {
        let counter = tessera_core::minbft::saved_usig_counter(&snapshot.core)?;
        let epoch = tessera_core::minbft::saved_usig_epoch(&snapshot.core)?;
        let usig = self.metrics.metered_usig(build_usig_at(
            &self.cluster,
            &self.secrets,
            self.me,
            epoch,
            counter,
        )?);
        let started = std::time::Instant::now();
        let replica = Replica::restore(
            self.me,
            self.cluster.protocol.clone(),
            usig,
            self.authenticator(),
            Envelope::new(key_value_store(&self.cluster.store)),
            &snapshot.core,
        )?;
        info!(
            bytes = snapshot.core.len(),
            seconds = started.elapsed().as_secs_f64(),
            "decoded the snapshot"
        );
        Ok(replica)
    }

    /// An empty replica.
    fn fresh(&self) -> Result<NodeReplica, NodeError> {
        let (usig, spoke_before) = build_fresh_usig(&self.cluster, &self.secrets, self.me)?;
        let mut replica = Replica::new(
            self.me,
            self.cluster.protocol.clone(),
            self.metrics.metered_usig(usig),
            self.authenticator(),
            Envelope::new(key_value_store(&self.cluster.store)),
        )?;
        if spoke_before {
            // The USIG certified messages this empty core knows nothing of (the replica ran
            // before and kept no log): continuing its counter would leave peers waiting on
            // values nobody can show them. Speak in a new epoch instead; the group orders its
            // INSTALL and this replica fetches the state (docs/PROTOCOL.md §8).
            let epoch = replica
                .start_epoch(0, driver::wall_clock_ms())
                .map_err(|error| {
                    NodeError::Config(format!(
                        "the USIG cannot start a new epoch ({error}); an empty replica whose \
                         USIG already spoke cannot rejoin without one"
                    ))
                })?;
            info!(
                epoch,
                "the USIG spoke before this start: rejoining in a new epoch"
            );
        }
        Ok(replica)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::{generate_cluster, ClusterSpec};
    use crate::wal::{Mark, Record, RecordRef};
    use tessera_types::cluster::UsigKind;
    use tessera_types::ProtocolConfig;

    fn builder() -> Builder {
        let spec = ClusterSpec {
            protocol: ProtocolConfig::default(),
            usig: UsigKind::Hmac,
            host: "127.0.0.1".into(),
            base_port: 29900,
            clients: 1,
        };
        let files = generate_cluster(&spec, &mut rand::rngs::OsRng).unwrap();
        let me = ReplicaId(1);
        let secrets = files.replicas[1].clone();
        Builder {
            clients: Arc::new(ClientKeys::load(&files.cluster, &secrets).unwrap()),
            cluster: files.cluster,
            secrets,
            me,
            metrics: Arc::new(ReplicaMetrics::new(me, Arc::default())),
            cache: Arc::new(VerifiedCache::new(16)),
        }
    }

    fn owner_of(builder: &Builder, durability: &Durability) -> WalOwner {
        crate::wal_owner(
            &durability.log,
            &builder.cluster,
            &builder.secrets,
            builder.me,
        )
        .unwrap()
    }

    fn durability(log: std::path::PathBuf) -> Durability {
        Durability {
            log,
            snapshot_after_log_bytes: 0,
            new_epoch: false,
            keep_previous_log: true,
            salvage: true,
        }
    }

    /// Writes a log the way the driver does: a start and a timer firing, each committed with
    /// the mark the replica really reaches, except that the last mark claims `last_executed`.
    fn write_log(builder: &Builder, durability: &Durability, last_executed: u64) {
        let owner = owner_of(builder, durability);
        let mut wal = wal::recover(&durability.log, owner)
            .unwrap()
            .log
            .into_wal()
            .unwrap();
        let mut replica = builder.fresh().unwrap();
        replica.start(0, 1_700_000_000_000);
        wal.append(&RecordRef::Start {
            now_ms: 0,
            wall_ms: 1_700_000_000_000,
        });
        wal.commit(Mark::of(&replica.status())).unwrap();
        replica.handle_timer(500, 1_700_000_000_500, tessera_core::Timer::Heartbeat);
        wal.append(&RecordRef::Timer {
            now_ms: 500,
            wall_ms: 1_700_000_000_500,
            timer: 2,
        });
        let mut mark = Mark::of(&replica.status());
        mark.last_executed = last_executed;
        wal.commit(mark).unwrap();
    }

    fn records(builder: &Builder, durability: &Durability) -> Vec<Record> {
        let owner = owner_of(builder, durability);
        let mut reader = wal::recover(&durability.log, owner).unwrap().log;
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        records
    }

    #[test]
    fn a_log_that_replays_is_not_salvaged() {
        let directory = tempfile::tempdir().unwrap();
        let builder = builder();
        let durability = durability(directory.path().join("replica-1.wal"));
        write_log(&builder, &durability, 0);
        let (replica, start) = builder.build(Some(&durability)).unwrap();
        assert_eq!(start.unwrap().replayed.marks, 2);
        assert_eq!(replica.epoch(), 0);
        assert_eq!(std::fs::read_dir(directory.path()).unwrap().count(), 1);
    }

    fn wall_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    #[test]
    fn a_record_that_fails_its_check_is_salvaged_to_the_commits_before_and_a_new_epoch() {
        let directory = tempfile::tempdir().unwrap();
        let builder = builder();
        let durability = durability(directory.path().join("replica-1.wal"));
        write_log(&builder, &durability, 0);
        // A byte inside the timer record (the third record), which the last mark follows.
        let owner = owner_of(&builder, &durability);
        let mut reader = wal::recover(&durability.log, owner).unwrap().log;
        reader.next_record().unwrap();
        reader.next_record().unwrap();
        let timer_at = reader.offset();
        drop(reader);
        let mut bytes = std::fs::read(&durability.log).unwrap();
        bytes[timer_at as usize + 14] ^= 0x10;
        std::fs::write(&durability.log, &bytes).unwrap();

        let before = wall_now();
        let (replica, start) = builder.build(Some(&durability)).unwrap();
        // Kept: the start and its mark; then the salvage's StartEpoch, replayed.
        assert_eq!(start.unwrap().replayed.records, 3);
        assert!(replica.epoch() >= before, "epoch {}", replica.epoch());
        let kept = records(&builder, &durability);
        assert!(matches!(kept[0], Record::Start { now_ms: 0, .. }));
        assert!(matches!(kept[1], Record::Mark(_)));
        assert!(matches!(kept[2], Record::StartEpoch { at_least, .. } if at_least >= before));
        assert_eq!(salvage::damaged_copies(&durability.log).len(), 1);

        // With salvage off, the same damage is refused and left alone.
        let refusing = Durability {
            salvage: false,
            ..self::durability(directory.path().join("other.wal"))
        };
        std::fs::write(&refusing.log, &bytes).unwrap();
        let error = builder.build(Some(&refusing)).err().expect("refused");
        assert!(error.to_string().contains("is corrupt"), "{error}");
        assert_eq!(std::fs::read(&refusing.log).unwrap(), bytes);
    }

    #[test]
    fn a_replay_that_diverges_is_refused_not_salvaged() {
        let directory = tempfile::tempdir().unwrap();
        let builder = builder();
        let durability = durability(directory.path().join("replica-1.wal"));
        // The second commit's mark says a request was executed: replay cannot reach that. Every
        // record passed its check, so this is not damage but non-determinism or a bug: a
        // salvage would throw away acknowledged history on every replica.
        write_log(&builder, &durability, 1);
        let before = std::fs::read(&durability.log).unwrap();
        let error = builder.build(Some(&durability)).err().expect("refused");
        assert!(
            error.to_string().contains("replaying write-ahead log"),
            "{error}"
        );
        assert_eq!(std::fs::read(&durability.log).unwrap(), before);
        assert!(salvage::damaged_copies(&durability.log).is_empty());
    }

    #[test]
    fn a_missing_log_beside_traces_of_an_earlier_one_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let builder = builder();
        let durability = durability(directory.path().join("replica-1.wal"));
        std::fs::write(wal::previous_path(&durability.log), b"an older log").unwrap();
        let error = builder.build(Some(&durability)).err().expect("refused");
        assert!(error.to_string().contains("--new-epoch"), "{error}");
        assert!(!durability.log.exists());
        // With --new-epoch it starts (empty; the driver moves it to a new epoch).
        let lost = Durability {
            new_epoch: true,
            ..durability.clone()
        };
        assert!(builder.build(Some(&lost)).is_ok());
        // --new-epoch is refused, before any salvage, once the log holds something.
        write_log(&builder, &durability, 0);
        let error = builder.build(Some(&lost)).err().expect("refused");
        assert!(
            error.to_string().contains("holds this replica's history"),
            "{error}"
        );
    }
}
