//! The links of referenced records (a company, a currency, the customer of an order) kept for
//! a moment, so that the lookups of a stream of events do not read the same few links from the
//! store for every event.
//!
//! What may be kept: linked (not provisional) links, read to resolve a lookup, the company of a
//! row or the company gate, for at most [`REFERENCE_TTL`]. A link that this engine commits or
//! deletes is forgotten at once; one changed by another process is seen within the TTL. A
//! referenced pair's ids do not change while it is linked, so what a stale entry could get
//! wrong is only a link removed in that window, the same race as a reference removed just after
//! it was read. The pair an event is about is never read from here: its link is always read
//! from the store, as the echo and revision rules need.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};
use dualwrite_core::ports::Link;
use dualwrite_core::{IntegrationKey, SmolStr};

/// How long a referenced link is used without reading it again.
pub(crate) const REFERENCE_TTL: TimeDelta = TimeDelta::milliseconds(1_000);

/// Above this many entries the cache starts over (it holds reference data: a few hundred
/// companies, currencies, groups and customers under load).
const MAX_ENTRIES: usize = 16_384;

/// One kept link and when it was read.
#[derive(Debug, Clone)]
struct Kept {
    link: Link,
    read_at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct Maps {
    /// (map, integration key) → link.
    by_key: HashMap<(SmolStr, IntegrationKey), Kept>,
    /// (map, Dataverse id) → integration key of the link kept in `by_key`.
    by_crm_id: HashMap<(SmolStr, SmolStr), IntegrationKey>,
}

/// The cache; safe to share between worker tasks.
#[derive(Debug, Default)]
pub(crate) struct ReferenceLinks {
    maps: Mutex<Maps>,
}

impl ReferenceLinks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kept link of `map`/`key`, if read less than [`REFERENCE_TTL`] before `now`.
    pub(crate) fn by_key(
        &self,
        map: &str,
        key: &IntegrationKey,
        now: DateTime<Utc>,
    ) -> Option<Link> {
        let maps = self.lock();
        let kept = maps.by_key.get(&(SmolStr::new(map), key.clone()))?;
        fresh(kept, now).then(|| kept.link.clone())
    }

    /// The kept link of `map` whose Dataverse id is `id`, if fresh.
    pub(crate) fn by_crm_id(&self, map: &str, id: &str, now: DateTime<Utc>) -> Option<Link> {
        let maps = self.lock();
        let map = SmolStr::new(map);
        let key = maps.by_crm_id.get(&(map.clone(), SmolStr::new(id)))?;
        let kept = maps.by_key.get(&(map, key.clone()))?;
        (fresh(kept, now) && kept.link.crm_id.as_deref() == Some(id)).then(|| kept.link.clone())
    }

    /// Keeps `link` (read from the store at `now`); provisional links are not kept.
    pub(crate) fn keep(&self, link: &Link, now: DateTime<Utc>) {
        if link.provisional {
            return;
        }
        let mut maps = self.lock();
        if maps.by_key.len() >= MAX_ENTRIES {
            *maps = Maps::default();
        }
        if let Some(id) = &link.crm_id {
            maps.by_crm_id
                .insert((link.map.clone(), id.clone()), link.key.clone());
        }
        maps.by_key.insert(
            (link.map.clone(), link.key.clone()),
            Kept {
                link: link.clone(),
                read_at: now,
            },
        );
    }

    /// Forgets the link of `map`/`key` (this engine changed or deleted it).
    pub(crate) fn forget(&self, map: &str, key: &IntegrationKey) {
        let mut maps = self.lock();
        let map = SmolStr::new(map);
        if let Some(kept) = maps.by_key.remove(&(map.clone(), key.clone()))
            && let Some(id) = kept.link.crm_id
        {
            maps.by_crm_id.remove(&(map, id));
        }
    }
}

fn fresh(kept: &Kept, now: DateTime<Utc>) -> bool {
    now >= kept.read_at && now - kept.read_at < REFERENCE_TTL
}

#[cfg(test)]
mod tests {
    use dualwrite_core::ports::SideState;

    use super::*;

    fn link(map: &str, key: &str, crm_id: Option<&str>) -> Link {
        Link {
            map: map.into(),
            key: IntegrationKey(key.into()),
            crm_id: crm_id.map(Into::into),
            erp_id: Some(format!("Code='{key}'").into()),
            crm: SideState::default(),
            erp: SideState::default(),
            revision: 1,
            open_conflict: None,
            pending: None,
            provisional: false,
            updated_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::milliseconds(ms)
    }

    #[test]
    fn a_kept_link_is_found_by_key_and_crm_id_until_the_ttl_passes() {
        let cache = ReferenceLinks::default();
        let usd = link("currencies", "USD", Some("g-usd"));
        cache.keep(&usd, at(0));
        assert_eq!(
            cache.by_key("currencies", &usd.key, at(999)),
            Some(usd.clone())
        );
        assert_eq!(
            cache.by_crm_id("currencies", "g-usd", at(999)),
            Some(usd.clone())
        );
        assert_eq!(cache.by_key("currencies", &usd.key, at(1_000)), None);
        assert_eq!(cache.by_crm_id("currencies", "g-usd", at(1_000)), None);
        // Another map, another id: not found.
        assert_eq!(cache.by_key("companies", &usd.key, at(1)), None);
        assert_eq!(cache.by_crm_id("currencies", "g-eur", at(1)), None);
        // A clock going back does not make an entry fresh for ever.
        assert_eq!(cache.by_key("currencies", &usd.key, at(-5)), None);
    }

    #[test]
    fn a_forgotten_link_is_read_again_and_provisional_links_are_never_kept() {
        let cache = ReferenceLinks::default();
        let usd = link("currencies", "USD", Some("g-usd"));
        cache.keep(&usd, at(0));
        cache.forget("currencies", &usd.key);
        assert_eq!(cache.by_key("currencies", &usd.key, at(1)), None);
        assert_eq!(cache.by_crm_id("currencies", "g-usd", at(1)), None);

        let mut new_pair = link("currencies", "EUR", Some("g-eur"));
        new_pair.provisional = true;
        cache.keep(&new_pair, at(0));
        assert_eq!(cache.by_key("currencies", &new_pair.key, at(1)), None);
    }

    #[test]
    fn an_id_now_held_by_another_link_is_not_answered_from_the_old_one() {
        let cache = ReferenceLinks::default();
        cache.keep(&link("companies", "USMF", Some("g-1")), at(0));
        // USMF re-linked to another Dataverse row: the old id must not find it.
        let relinked = link("companies", "USMF", Some("g-2"));
        cache.keep(&relinked, at(1));
        assert_eq!(cache.by_crm_id("companies", "g-1", at(2)), None);
        assert_eq!(cache.by_crm_id("companies", "g-2", at(2)), Some(relinked));
    }
}
