//! `MemoryStore`: links, idempotency claims and journals in memory, with revision conditions
//! and atomic commits, as [`dualwrite_core::ports::StateStore`] requires.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use dualwrite_core::ports::{
    ConflictRecord, ErrorRecord, EventClaim, IdempotencyStore, JournalStore, Link, LinkStore,
    MAX_COMMIT_OPS, MapState, ParkedEvent, StoreError, StoreOp,
};
use dualwrite_core::{IntegrationKey, Side};

use super::lock;

#[derive(Debug, Clone)]
enum Claim {
    Done,
    InProgress { until: DateTime<Utc> },
}

#[derive(Debug, Default)]
struct Inner {
    links: BTreeMap<(String, IntegrationKey), Link>,
    claims: HashMap<String, Claim>,
    conflicts: Vec<ConflictRecord>,
    errors: Vec<ErrorRecord>,
    parked: Vec<ParkedEvent>,
    map_states: BTreeMap<String, MapState>,
    deleted: BTreeMap<(String, IntegrationKey), DateTime<Utc>>,
}

/// A [`StateStore`](dualwrite_core::ports::StateStore) in memory. Safe for concurrent use;
/// every commit is checked and applied under one lock, so it is atomic.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every link, ordered by map and key (for tests and status output).
    pub fn links(&self) -> Vec<Link> {
        lock(&self.inner).links.values().cloned().collect()
    }
}

fn stored_revision(inner: &Inner, map: &str, key: &IntegrationKey) -> u64 {
    inner
        .links
        .get(&(map.to_string(), key.clone()))
        .map_or(0, |l| l.revision)
}

#[async_trait]
impl LinkStore for MemoryStore {
    async fn link(&self, map: &str, key: &IntegrationKey) -> Result<Option<Link>, StoreError> {
        Ok(lock(&self.inner)
            .links
            .get(&(map.to_string(), key.clone()))
            .cloned())
    }

    async fn link_by_id(
        &self,
        map: &str,
        side: Side,
        id: &str,
    ) -> Result<Option<Link>, StoreError> {
        let inner = lock(&self.inner);
        Ok(inner
            .links
            .values()
            .find(|l| l.map == map && l.id(side).is_some_and(|i| i.eq_ignore_ascii_case(id)))
            .cloned())
    }

    async fn deleted_at(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(lock(&self.inner)
            .deleted
            .get(&(map.to_string(), key.clone()))
            .copied())
    }

    async fn commit(&self, ops: Vec<StoreOp>) -> Result<(), StoreError> {
        if ops.len() > MAX_COMMIT_OPS {
            return Err(StoreError::TooLarge {
                max: MAX_COMMIT_OPS,
                got: ops.len(),
            });
        }
        let mut inner = lock(&self.inner);
        // Check every condition before applying anything: all or nothing.
        for op in &ops {
            let (map, key, expected) = match op {
                StoreOp::PutLink {
                    link,
                    expected_revision,
                } => (link.map.as_str(), &link.key, *expected_revision),
                StoreOp::DeleteLink {
                    map,
                    key,
                    expected_revision,
                } => (map.as_str(), key, *expected_revision),
                _ => continue,
            };
            if stored_revision(&inner, map, key) != expected {
                return Err(StoreError::Conflict {
                    map: map.to_string(),
                    key: key.to_string(),
                    expected,
                });
            }
        }
        for op in ops {
            match op {
                StoreOp::PutLink {
                    mut link,
                    expected_revision,
                } => {
                    link.revision = expected_revision + 1;
                    inner
                        .links
                        .insert((link.map.clone().into(), link.key.clone()), link);
                }
                StoreOp::DeleteLink { map, key, .. } => {
                    inner.links.remove(&(map, key));
                }
                StoreOp::CompleteEvent { event_id } => {
                    inner.claims.insert(event_id, Claim::Done);
                }
                StoreOp::RecordConflict(c) => {
                    inner.conflicts.retain(|x| x.id != c.id);
                    inner.conflicts.push(c);
                }
                StoreOp::RecordError(e) => inner.errors.push(e),
                StoreOp::Park(p) => {
                    let dup = inner.parked.iter().any(|x| {
                        x.waiting_map == p.waiting_map
                            && x.waiting_key == p.waiting_key
                            && x.event.event_id == p.event.event_id
                    });
                    if !dup {
                        inner.parked.push(p);
                    }
                }
                StoreOp::Unpark {
                    waiting_map,
                    waiting_key,
                    event_id,
                } => inner.parked.retain(|x| {
                    !(x.waiting_map == waiting_map
                        && x.waiting_key == waiting_key
                        && x.event.event_id == event_id)
                }),
                StoreOp::PutMapState(s) => {
                    inner.map_states.insert(s.map.clone(), s);
                }
                StoreOp::RememberDeleted { map, key, at } => {
                    inner.deleted.insert((map, key), at);
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for MemoryStore {
    async fn claim_event(
        &self,
        event_id: &str,
        now: DateTime<Utc>,
        lease: Duration,
    ) -> Result<EventClaim, StoreError> {
        let mut inner = lock(&self.inner);
        match inner.claims.get(event_id) {
            Some(Claim::Done) => return Ok(EventClaim::AlreadyDone),
            Some(Claim::InProgress { until }) if *until > now => return Ok(EventClaim::InProgress),
            _ => {}
        }
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
        inner
            .claims
            .insert(event_id.to_string(), Claim::InProgress { until });
        Ok(EventClaim::Claimed)
    }

    async fn release_event(&self, event_id: &str) -> Result<(), StoreError> {
        let mut inner = lock(&self.inner);
        if matches!(inner.claims.get(event_id), Some(Claim::InProgress { .. })) {
            inner.claims.remove(event_id);
        }
        Ok(())
    }
}

#[async_trait]
impl JournalStore for MemoryStore {
    async fn map_state(&self, map: &str) -> Result<Option<MapState>, StoreError> {
        Ok(lock(&self.inner).map_states.get(map).cloned())
    }

    async fn map_states(&self) -> Result<Vec<MapState>, StoreError> {
        Ok(lock(&self.inner).map_states.values().cloned().collect())
    }

    async fn conflict(&self, id: &str) -> Result<Option<ConflictRecord>, StoreError> {
        Ok(lock(&self.inner)
            .conflicts
            .iter()
            .find(|c| c.id == id)
            .cloned())
    }

    async fn conflicts(
        &self,
        open_only: bool,
        limit: usize,
    ) -> Result<Vec<ConflictRecord>, StoreError> {
        let inner = lock(&self.inner);
        Ok(inner
            .conflicts
            .iter()
            .rev()
            .filter(|c| !open_only || c.open)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn errors(&self, limit: usize) -> Result<Vec<ErrorRecord>, StoreError> {
        Ok(lock(&self.inner)
            .errors
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect())
    }

    async fn parked_for(
        &self,
        map: &str,
        key: &IntegrationKey,
    ) -> Result<Vec<ParkedEvent>, StoreError> {
        let inner = lock(&self.inner);
        Ok(inner
            .parked
            .iter()
            .filter(|p| p.waiting_map == map && &p.waiting_key == key)
            .cloned()
            .collect())
    }

    async fn parked(&self, offset: usize, limit: usize) -> Result<Vec<ParkedEvent>, StoreError> {
        Ok(lock(&self.inner)
            .parked
            .iter()
            .skip(offset)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn parked_count(&self) -> Result<u64, StoreError> {
        Ok(lock(&self.inner).parked.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualwrite_core::ports::SideState;

    fn link(rev: u64) -> Link {
        Link {
            map: "m".into(),
            key: IntegrationKey("K".into()),
            crm_id: Some("c1".into()),
            erp_id: None,
            crm: SideState::default(),
            erp: SideState::default(),
            revision: rev,
            open_conflict: None,
            pending: None,
            provisional: false,
            updated_at: DateTime::UNIX_EPOCH,
        }
    }

    #[tokio::test]
    async fn a_failed_revision_condition_applies_nothing() {
        let store = MemoryStore::new();
        store
            .commit(vec![StoreOp::PutLink {
                link: link(0),
                expected_revision: 0,
            }])
            .await
            .unwrap();
        let stale = vec![
            StoreOp::CompleteEvent {
                event_id: "e1".into(),
            },
            StoreOp::PutLink {
                link: link(0),
                expected_revision: 0,
            },
        ];
        assert!(matches!(
            store.commit(stale).await,
            Err(StoreError::Conflict { .. })
        ));
        let now = DateTime::UNIX_EPOCH;
        assert_eq!(
            store
                .claim_event("e1", now, Duration::from_secs(1))
                .await
                .unwrap(),
            EventClaim::Claimed
        );
        let stored = store
            .link("m", &IntegrationKey("K".into()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.revision, 1);
        assert!(
            store
                .link_by_id("m", Side::Crm, "C1")
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn claims_are_exclusive_until_the_lease_runs_out() {
        let store = MemoryStore::new();
        let t0 = DateTime::UNIX_EPOCH;
        let lease = Duration::from_secs(10);
        assert_eq!(
            store.claim_event("e", t0, lease).await.unwrap(),
            EventClaim::Claimed
        );
        assert_eq!(
            store.claim_event("e", t0, lease).await.unwrap(),
            EventClaim::InProgress
        );
        let later = t0 + chrono::Duration::seconds(11);
        assert_eq!(
            store.claim_event("e", later, lease).await.unwrap(),
            EventClaim::Claimed
        );
        store
            .commit(vec![StoreOp::CompleteEvent {
                event_id: "e".into(),
            }])
            .await
            .unwrap();
        assert_eq!(
            store.claim_event("e", later, lease).await.unwrap(),
            EventClaim::AlreadyDone
        );
    }
}
