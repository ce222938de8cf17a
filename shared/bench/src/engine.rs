//! `bench engine`: the per-record cost of the core — apply the Customers V3 ↔ accounts map,
//! hash the mapped fields, decide — on generated F&O customer updates, all in memory.
//!
//! Each record goes through what the worker does between reading and writing: its mapped fields
//! located once ([`SideFieldsAt`]), the source hash, lookup requests built and answered from an
//! in-memory link table, and [`decide`](dualwrite_core::decision::decide) (which applies the
//! map, checks filter/staleness/echo/conflict and plans the write). Every decision is checked to
//! be the expected write, so a benchmark of a broken engine fails instead of reporting a fast
//! no-op.
//!
//! Each record is generated right before it is processed (warm, like a record a worker has just
//! parsed), and a run measures [`ROUNDS`] rounds; see [`EngineReport`] for which figures are
//! reported.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use dualwrite_core::decision::{Decision, DecisionInput, side_hash};
use dualwrite_core::event::Operation;
use dualwrite_core::map::apply::{
    LookupResolution, LookupTarget, ResolvedLookups, integration_key, lookup_requests_at,
    record_key,
};
use dualwrite_core::map::{FieldMapping, SideFieldsAt, TableMap};
use dualwrite_core::ports::{Link, SideState};
use dualwrite_core::record::{IntegrationKey, Record, Side, SourceVersion};
use dualwrite_core::value::{LookupRef, Value, ValueType};
use rust_decimal::Decimal;
use serde::Serialize;

/// The map the benchmark runs.
pub const MAP: &str = "customers-v3-accounts";

/// How many rounds of `records` records a run measures.
pub const ROUNDS: usize = 5;

/// The figures of one run.
///
/// A run measures [`ROUNDS`] rounds of `records` records each. On a shared machine other
/// tenants steal time in bursts that inflate a whole round; the figures per record are those of
/// the round with the lowest median (the cost of the code on an uncontended core), and every
/// round's median is reported beside them, with the median over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub bench: &'static str,
    pub map: &'static str,
    pub records: usize,
    pub rounds: usize,
    pub fields_per_record: usize,
    /// Median time per record of the best round.
    pub median_ns_per_record: u64,
    /// 99th percentile of the best round.
    pub p99_ns_per_record: u64,
    /// Mean of the best round.
    pub mean_ns_per_record: u64,
    /// Records one core processes per second at that mean.
    pub records_per_sec: u64,
    /// Each round's median, in order.
    pub round_medians_ns: Vec<u64>,
    /// Median over the records of all rounds.
    pub median_ns_all_rounds: u64,
    pub writes_planned: usize,
    pub target_median_ns: u64,
    pub target_met: bool,
}

/// One round's sorted samples (ns per record).
struct Round {
    samples: Vec<u64>,
}

impl Round {
    fn median(&self) -> u64 {
        self.samples[self.samples.len() / 2]
    }
}

/// Runs the benchmark: [`ROUNDS`] rounds over `records` generated records each (plus a warm-up
/// of a tenth of them before the first).
pub fn run(records: usize) -> Result<EngineReport, String> {
    let maps = dualwrite_maps::builtin_maps();
    let map = maps
        .iter()
        .find(|m| m.name == MAP)
        .ok_or_else(|| format!("map {MAP} is not shipped"))?;
    let by_name: FastMap<&str, &TableMap> = maps.iter().map(|m| (m.name.as_str(), m)).collect();
    let lookups = LookupTable::new(&maps);
    let base = Utc
        .with_ymd_and_hms(2026, 11, 1, 8, 0, 0)
        .single()
        .ok_or("bad base time")?;

    let records = records.max(1);
    let warmup = records / 10;
    let mut samples = Vec::with_capacity(records);
    let mut rounds: Vec<Round> = Vec::with_capacity(ROUNDS);
    let mut writes = 0usize;
    let mut fields_per_record = 0;
    for i in 0..warmup + records * ROUNDS {
        // Each record is generated right before it is processed, untimed: a worker processes a
        // record it has just parsed from a webhook or read from the other side, so its memory
        // is warm, as it is here.
        let case = Case::generate(map, i, base)?;
        fields_per_record = case.erp.fields.len();
        let t = Instant::now();
        let decision = process(map, &by_name, &lookups, &case, base);
        let elapsed = t.elapsed();
        match decision {
            Decision::Write(plan) if plan.writes.len() == 1 && plan.writes[0].side == Side::Crm => {
                writes += 1
            }
            other => {
                return Err(format!(
                    "record {i}: expected one write to Dataverse, the engine decided {other:?}"
                ));
            }
        }
        if i < warmup {
            continue;
        }
        samples.push(elapsed.as_nanos() as u64);
        if samples.len() == records {
            samples.sort_unstable();
            rounds.push(Round {
                samples: std::mem::replace(&mut samples, Vec::with_capacity(records)),
            });
        }
    }
    let best = rounds
        .iter()
        .min_by_key(|r| r.median())
        .ok_or("no round was measured")?;
    let n = best.samples.len();
    let median = best.median();
    let p99 = best.samples[(n * 99 / 100).min(n - 1)];
    let mean = best.samples.iter().sum::<u64>() / n as u64;
    let mut all: Vec<u64> = rounds
        .iter()
        .flat_map(|r| r.samples.iter().copied())
        .collect();
    all.sort_unstable();
    let target = 5_000;
    Ok(EngineReport {
        bench: "engine",
        map: MAP,
        records,
        rounds: rounds.len(),
        fields_per_record,
        median_ns_per_record: median,
        p99_ns_per_record: p99,
        mean_ns_per_record: mean,
        // Records one core processes per second at the mean time per record.
        records_per_sec: 1_000_000_000 / mean.max(1),
        round_medians_ns: rounds.iter().map(Round::median).collect(),
        median_ns_all_rounds: all[all.len() / 2],
        writes_planned: writes - warmup.min(writes),
        target_median_ns: target,
        target_met: median <= target,
    })
}

/// The timed work for one record: what the worker does between reading the record and writing
/// the other side. Not inlined, so a profiler shows its cost per record apart from the setup.
#[inline(never)]
fn process(
    map: &TableMap,
    by_name: &FastMap<&str, &TableMap>,
    lookups: &LookupTable,
    case: &Case,
    now: DateTime<Utc>,
) -> Decision {
    // As the worker does: the source fields located once, for the hash, the lookups and the
    // map.
    let source_fields = SideFieldsAt::new(map, Side::Erp, &case.erp);
    let source_hash = source_fields.hash(map, &case.erp);
    let requests = lookup_requests_at(map, Side::Erp, &case.erp, Some(&source_fields), |n| {
        by_name.get(n).copied()
    });
    let mut resolved = ResolvedLookups::with_capacity(requests.len());
    for r in &requests {
        resolved.insert(r.field_index, lookups.resolve(&r.target));
    }
    dualwrite_core::decision::decide(&DecisionInput {
        map,
        source: Side::Erp,
        operation: Operation::Upsert,
        event_id: &case.event_id,
        key: &case.key,
        record: &case.erp,
        link: Some(&case.link),
        other: Some(&case.crm),
        source_hash,
        source_fields: Some(&source_fields),
        lookups: &resolved,
        other_lookups: &ResolvedLookups::new(),
        now,
    })
}

/// One generated update: the F&O record, the linked Dataverse row, and the link.
struct Case {
    event_id: String,
    key: IntegrationKey,
    erp: Record,
    crm: Record,
    link: Link,
}

impl Case {
    fn generate(map: &TableMap, i: usize, base: DateTime<Utc>) -> Result<Case, String> {
        let account = format!("C{i:06}");
        let mut erp = Record::new(map.erp.entity.clone());
        erp.company = Some("usmf".into());
        for f in &map.fields {
            if let Some(field) = &f.erp {
                erp.fields
                    .insert(field.name.as_str(), erp_value(f, field.ty, i));
            }
        }
        erp.fields.insert(
            map.erp.key[0].as_str(),
            Value::Text(account.as_str().into()),
        );
        erp.version = Some(SourceVersion {
            modified_on: base + Duration::seconds(60),
            sequence: i as i64,
        });
        let key = integration_key(map, Side::Erp, &erp).map_err(|e| e.to_string())?;
        erp.id = Some(record_key(map, Side::Erp, &key).to_string().into());

        // The Dataverse row as dualwrite last wrote it: same key, older values.
        let mut crm = Record::new(map.crm.entity_set.clone());
        crm.company = Some("USMF".into());
        crm.id = Some(format!("00000000-0000-0000-0000-{i:012}").into());
        crm.fields
            .insert(map.crm.key[0].as_str(), Value::Text(account.into()));
        crm.fields.insert(
            "name",
            Value::Text(dualwrite_core::format_smolstr!("Old name {i}")),
        );
        crm.version = Some(SourceVersion {
            modified_on: base,
            sequence: i as i64,
        });
        crm.etag = Some(format!("W/\"{i}\""));

        let mut old_erp = erp.clone();
        old_erp.fields.insert(
            "OrganizationName",
            Value::Text(dualwrite_core::format_smolstr!("Old name {i}")),
        );
        let link = Link {
            map: map.name.clone().into(),
            key: key.clone(),
            crm_id: crm.id.clone(),
            erp_id: erp.id.clone(),
            crm: SideState {
                hash: Some(side_hash(map, Side::Crm, &crm)),
                version: crm.version,
            },
            erp: SideState {
                hash: Some(side_hash(map, Side::Erp, &old_erp)),
                version: Some(SourceVersion {
                    modified_on: base,
                    sequence: i as i64,
                }),
            },
            revision: 3,
            open_conflict: None,
            pending: None,
            provisional: false,
            updated_at: base,
        };
        Ok(Case {
            event_id: format!("bench-{i}"),
            key,
            erp,
            crm,
            link,
        })
    }
}

fn erp_value(f: &FieldMapping, ty: ValueType, i: usize) -> Value {
    if let Some(vm) = &f.value_map {
        return vm.pairs[i % vm.pairs.len()].0.clone();
    }
    if f.lookup.is_some() {
        return Value::Text(dualwrite_core::format_smolstr!("REF{}", i % 7));
    }
    match ty {
        ValueType::Text => Value::Text(dualwrite_core::format_smolstr!(
            "{} {i}",
            f.erp.as_ref().map_or("", |e| e.name.as_str())
        )),
        ValueType::Integer => Value::Integer(i as i64 % 1000),
        ValueType::Decimal => Value::Decimal(Decimal::new(i as i64 * 100 + 37, 2)),
        ValueType::Boolean => Value::Boolean(i.is_multiple_of(2)),
        ValueType::Date => Value::Date(
            chrono::NaiveDate::from_ymd_opt(2026, 1, 1 + (i % 28) as u32).unwrap_or_default(),
        ),
        ValueType::DateTime => Value::DateTime(
            Utc.timestamp_opt(1_700_000_000 + i as i64, 0)
                .unwrap()
                .fixed_offset(),
        ),
        ValueType::Choice => Value::Choice(1),
        ValueType::Enum => match f.erp.as_ref().map(|e| e.name.as_str()) {
            Some("PartyType") => Value::Enum("Organization".into()),
            _ => Value::Enum("Yes".into()),
        },
        ValueType::Lookup => Value::Null,
    }
}

/// Links of the referenced maps, as the store would hold them, answering lookups. Each link's
/// answer is built once, so resolving one costs the key's hash search and a clone of the
/// answer (the owned value the engine's resolver also returns), not its construction.
struct LookupTable {
    by_key: FastMap<IntegrationKey, LookupResolution>,
}

impl LookupTable {
    fn new(maps: &[TableMap]) -> Self {
        let mut by_key = FastMap::default();
        for m in maps {
            for r in 0..7 {
                let key = IntegrationKey::from_parts(
                    m.erp.company_specific.then_some("usmf"),
                    [format!("REF{r}").as_str()],
                );
                let reference = LookupRef {
                    entity_set: m.crm.entity_set.clone(),
                    id: Some(format!("{r:08}-0000-0000-0000-{:012}", m.name.len())),
                    key: None,
                };
                by_key.insert(
                    key,
                    LookupResolution::Resolved(Value::Lookup(Arc::new(reference))),
                );
            }
        }
        LookupTable { by_key }
    }

    fn resolve(&self, target: &LookupTarget) -> LookupResolution {
        if let LookupTarget::Keys(keys) = target
            && let Some(found) = keys.iter().find_map(|k| self.by_key.get(k))
        {
            return found.clone();
        }
        LookupResolution::Missing {
            map: "unknown".into(),
            key: IntegrationKey(Default::default()),
        }
    }
}

/// The bench's own in-memory tables (maps by name, links by key), standing in for the engine's
/// map index and the link store. They hash short trusted strings, so they use [`FxHasher`]
/// rather than SipHash, whose cost would otherwise be a good part of what is measured.
type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// The multiply-rotate hash of rustc's `FxHasher` (not DoS-resistant; fine for the bench's
/// own keys).
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in chunks.by_ref() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        self.add(u64::from_le_bytes(word) ^ rest.len() as u64);
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_plans_the_expected_write() {
        let report = run(50).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(report.records, 50);
        assert_eq!(report.rounds, ROUNDS);
        assert_eq!(report.writes_planned, 50 * ROUNDS);
        assert_eq!(report.round_medians_ns.len(), ROUNDS);
        // The figures are the best round's.
        assert_eq!(
            Some(&report.median_ns_per_record),
            report.round_medians_ns.iter().min()
        );
        assert_eq!(report.fields_per_record, 52);
        assert!(report.median_ns_per_record > 0);
        assert!(report.p99_ns_per_record >= report.median_ns_per_record);
    }

    #[test]
    fn lookups_resolve_known_keys_and_report_unknown_ones_missing() {
        let maps = dualwrite_maps::builtin_maps();
        let table = LookupTable::new(&maps);
        let known = IntegrationKey::from_parts(None, ["REF3"]);
        let found = table.resolve(&LookupTarget::Keys(known.into()));
        assert!(
            matches!(found, LookupResolution::Resolved(Value::Lookup(ref l)) if l.id.is_some()),
            "{found:?}"
        );
        let unknown = IntegrationKey::from_parts(None, ["NOPE"]);
        let missing = table.resolve(&LookupTarget::Keys(unknown.into()));
        assert!(
            matches!(missing, LookupResolution::Missing { .. }),
            "{missing:?}"
        );
    }
}
