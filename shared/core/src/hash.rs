//! Stable hashes of a record's mapped fields, stored with each link for echo suppression.
//!
//! The hash covers field names and typed values in name order, so it does not depend on the
//! order a source lists fields in; decimals are normalised (`1.50` = `1.5`); a missing field, a
//! null field and empty text hash the same. Neither system stores empty text as a value of its
//! own — Dataverse saves "" as null, F&O has no null text (an empty field is "") — so a null
//! written to F&O comes back as "", and a "" written to Dataverse comes back as null: hashing
//! them apart would take each such echo for a new change and send it back, forever.
//!
//! It sits on the per-record path several times per change, so it allocates nothing in steady
//! state: the names are hashed once per field list (see `names_hash`), the values are encoded
//! into a reused per-thread buffer (every variable-length part ends in a byte that UTF-8 never
//! contains, so the encoding is unambiguous) and hashed once with XXH3-128, and a record's
//! values are read by walking its name-ordered fields alongside the sorted names rather than
//! by one map search per name.

use std::cell::Cell;
use std::cmp::Ordering;

use chrono::Datelike;
use smol_str::SmolStr;
use xxhash_rust::xxh3::xxh3_128;

use crate::ports::FieldsHash;
use crate::record::Record;
use crate::value::Value;

/// Ends a field name (UTF-8 never contains 0xff).
const END_NAME: u8 = 0xff;
/// Ends a field's value (UTF-8 never contains 0xfe).
const END_VALUE: u8 = 0xfe;
/// Ends a text inside a value made of several texts (UTF-8 never contains 0xfd).
const END_TEXT: u8 = 0xfd;

thread_local! {
    /// The encoding buffer, kept between calls so hashing does not allocate.
    static BUFFER: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Hashes the values of `fields` (need not be sorted, may repeat) in `record`.
pub fn hash_fields<'a>(record: &Record, fields: impl IntoIterator<Item = &'a str>) -> FieldsHash {
    let mut names: Vec<&str> = fields.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    hash_sorted_fields(record, &names, names_hash(&names))
}

/// The part of a field hash that covers the names: a hash of `names` (sorted, without
/// duplicates). Computed once per field list, so hashing a record reads only its values.
pub(crate) fn names_hash<S: AsRef<str>>(names: &[S]) -> u128 {
    let mut buf = Vec::with_capacity(names.iter().map(|n| n.as_ref().len() + 1).sum());
    for name in names {
        buf.extend_from_slice(name.as_ref().as_bytes());
        buf.push(END_NAME);
    }
    xxh3_128(&buf)
}

/// [`hash_fields`] for `names` already sorted and without duplicates (as
/// [`crate::map::apply::mapped_fields`] returns them), `names_hash` being [`names_hash`] of
/// them: the same hash, without sorting.
pub(crate) fn hash_sorted_fields<S: AsRef<str>>(
    record: &Record,
    names: &[S],
    names_hash: u128,
) -> FieldsHash {
    let mut fields = SortedFields::new(record);
    hash_sorted_with(names, names_hash, |_, name| fields.seek(name.as_ref()))
}

/// Hashes `names` (sorted, without duplicates; `names_hash` is [`names_hash`] of them) with
/// `value_of` giving each name's value from its position in `names` and the name (`None`
/// hashes as null). `value_of` is called once per name, in name order.
///
/// The names enter through `names_hash`; the values follow in name order, each
/// self-delimiting (fixed size for its type tag, or text ended by a byte UTF-8 never
/// contains), so the position of each value names its field.
pub(crate) fn hash_sorted_with<'v, S: AsRef<str>>(
    names: &[S],
    names_hash: u128,
    mut value_of: impl FnMut(usize, &S) -> Option<&'v Value>,
) -> FieldsHash {
    debug_assert!(
        names.windows(2).all(|w| w[0].as_ref() < w[1].as_ref()),
        "hash_sorted_with needs sorted, distinct names"
    );
    let mut buf = BUFFER.take();
    buf.clear();
    // Room for the usual value sizes, so the encoding rarely grows the buffer.
    buf.reserve(16 + names.len() * 24);
    buf.extend_from_slice(&names_hash.to_le_bytes());
    for (index, name) in names.iter().enumerate() {
        encode_value(&mut buf, value_of(index, name).unwrap_or(&Value::Null));
        buf.push(END_VALUE);
    }
    let hash = FieldsHash(xxh3_128(&buf));
    BUFFER.set(buf);
    hash
}

/// A record's fields read in name order: [`SortedFields::seek`] answers names asked in
/// increasing order by advancing through the record once.
#[derive(Debug)]
pub(crate) struct SortedFields<'r> {
    /// The fields not yet passed, in name order.
    rest: &'r [(SmolStr, Value)],
}

impl<'r> SortedFields<'r> {
    /// A reader at the record's first field.
    pub(crate) fn new(record: &'r Record) -> Self {
        SortedFields {
            rest: record.fields.as_slice(),
        }
    }

    /// The value of field `name`, `None` when the record does not carry it. Each name must be
    /// greater than the one asked before (skipping names is fine).
    #[inline]
    pub(crate) fn seek(&mut self, name: &str) -> Option<&'r Value> {
        while let Some(((field, value), rest)) = self.rest.split_first() {
            match compare_names(field, name) {
                Ordering::Less => self.rest = rest,
                Ordering::Equal => {
                    self.rest = rest;
                    return Some(value);
                }
                Ordering::Greater => return None,
            }
        }
        None
    }
}

/// `a.cmp(b)` for field names, eight bytes at a time: field names are short and share long
/// prefixes (`msdyn_`, `address1_`), and this runs a few hundred times per change, where a
/// `memcmp` call per comparison costs more than the comparison. Words of the common length
/// compare as big-endian integers (which order like their bytes), the last partial word as the
/// overlapping last eight bytes (byte by byte below eight); then the shorter name is first.
#[inline]
pub(crate) fn compare_names(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let common = a.len().min(b.len());
    let mut at = 0;
    while at + 8 <= common {
        let order = word(a, at).cmp(&word(b, at));
        if order != Ordering::Equal {
            return order;
        }
        at += 8;
    }
    if at < common && common >= 8 {
        // The last eight bytes of the common length: the bytes before `at` are equal, so the
        // overlapping word orders like the bytes after them.
        let order = word(a, common - 8).cmp(&word(b, common - 8));
        if order != Ordering::Equal {
            return order;
        }
        at = common;
    }
    while at < common {
        let order = a[at].cmp(&b[at]);
        if order != Ordering::Equal {
            return order;
        }
        at += 1;
    }
    a.len().cmp(&b.len())
}

/// The eight bytes of `bytes` at `at` as a big-endian word (a fixed-size load, no call).
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Whether two values hash alike (null and empty text are one, enum symbols compare without
/// case, decimals by numeric value): the same value as far as the echo hashes can tell.
pub(crate) fn same_value(a: &Value, b: &Value) -> bool {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    encode_value(&mut x, a);
    encode_value(&mut y, b);
    x == y
}

#[inline]
fn encode_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        // Null and empty text are one "no value" (see `Value::is_empty`).
        Value::Null => buf.push(0),
        Value::Text(s) if s.is_empty() => buf.push(0),
        Value::Text(s) => {
            buf.push(1);
            buf.extend_from_slice(s.as_bytes());
        }
        Value::Integer(i) => {
            buf.push(2);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        Value::Decimal(d) => {
            // Normalised, the (mantissa, scale) pair is unique per numeric value (-0 is 0).
            let d = d.normalize();
            buf.push(3);
            buf.extend_from_slice(&d.mantissa().to_le_bytes());
            buf.extend_from_slice(&d.scale().to_le_bytes());
        }
        Value::Boolean(b) => buf.extend_from_slice(&[4, u8::from(*b)]),
        Value::Date(d) => {
            buf.push(5);
            buf.extend_from_slice(&d.num_days_from_ce().to_le_bytes());
        }
        Value::DateTime(t) => {
            buf.push(6);
            buf.extend_from_slice(&t.timestamp_micros().to_le_bytes());
        }
        Value::Choice(i) => {
            buf.push(7);
            buf.extend_from_slice(&i.to_le_bytes());
        }
        Value::Enum(s) => {
            // Enum symbols compare without case.
            buf.push(8);
            push_lowercase(buf, s);
        }
        Value::Lookup(l) => {
            buf.push(9);
            buf.extend_from_slice(l.entity_set.as_bytes());
            buf.push(END_TEXT);
            // A lookup is the same reference whether written by key or by id. Hash the id when
            // known (GUIDs compare without case): Dataverse returns lookups by id, and the
            // engine writes them with the linked row's id, so dualwrite's own write and its echo
            // hash alike. Only a reference known by key alone hashes its key.
            match (&l.id, &l.key) {
                (Some(id), _) => {
                    buf.push(2);
                    push_lowercase(buf, id);
                }
                (None, Some(k)) => {
                    buf.push(1);
                    for (field, value) in &k.0 {
                        buf.extend_from_slice(field.as_bytes());
                        buf.push(END_TEXT);
                        buf.extend_from_slice(value.as_bytes());
                        buf.push(END_TEXT);
                    }
                }
                (None, None) => buf.push(0),
            }
        }
    }
}

/// Appends `s` with ASCII letters in lower case.
fn push_lowercase(buf: &mut Vec<u8>, s: &str) {
    let start = buf.len();
    buf.extend_from_slice(s.as_bytes());
    buf[start..].make_ascii_lowercase();
}

#[cfg(test)]
mod tests {
    /// [`tests::the_hash_function_is_pinned`]'s expected value.
    const PINNED: u128 = 0x9eb8_d54a_670c_8682_950e_6384_a74c_fb02;
    use super::*;
    use crate::record::RecordKey;
    use crate::value::LookupRef;
    use rust_decimal::Decimal;
    use std::str::FromStr;
    use std::sync::Arc;

    #[test]
    fn field_order_and_decimal_scale_do_not_matter() {
        let a = Record::new("accounts")
            .with("name", Value::Text("Contoso".into()))
            .with(
                "creditlimit",
                Value::Decimal(Decimal::from_str("1.50").unwrap()),
            );
        let b = Record::new("accounts")
            .with(
                "creditlimit",
                Value::Decimal(Decimal::from_str("1.5").unwrap()),
            )
            .with("name", Value::Text("Contoso".into()));
        assert_eq!(
            hash_fields(&a, ["name", "creditlimit"]),
            hash_fields(&b, ["creditlimit", "name"])
        );
    }

    #[test]
    fn a_changed_value_changes_the_hash() {
        let a = Record::new("accounts").with("name", Value::Text("Contoso".into()));
        let b = Record::new("accounts").with("name", Value::Text("Contoso Ltd".into()));
        assert_ne!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
    }

    #[test]
    fn missing_null_and_empty_text_are_the_same_but_not_a_blank() {
        let a = Record::new("accounts");
        let b = Record::new("accounts").with("name", Value::Null);
        let c = Record::new("accounts").with("name", Value::Text(String::new().into()));
        let d = Record::new("accounts").with("name", Value::Text(" ".into()));
        assert_eq!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
        assert_eq!(hash_fields(&a, ["name"]), hash_fields(&c, ["name"]));
        assert_ne!(hash_fields(&a, ["name"]), hash_fields(&d, ["name"]));
        // Empty text is null in a field of any position, not only alone.
        let e = |v: Value| {
            let r = Record::new("accounts")
                .with("a", Value::Integer(1))
                .with("name", v)
                .with("z", Value::Text("x".into()));
            hash_fields(&r, ["a", "name", "z"])
        };
        assert_eq!(e(Value::Null), e(Value::Text("".into())));
        assert_ne!(e(Value::Null), e(Value::Text("0".into())));
    }

    #[test]
    fn fields_outside_the_list_are_ignored() {
        let a = Record::new("accounts")
            .with("name", Value::Text("A".into()))
            .with("x", Value::Integer(1));
        let b = Record::new("accounts")
            .with("name", Value::Text("A".into()))
            .with("x", Value::Integer(2));
        assert_eq!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
    }

    #[test]
    fn the_sorted_path_hashes_like_hash_fields() {
        let r = Record::new("accounts")
            .with("a", Value::Integer(1))
            .with("c", Value::Enum("Yes".into()))
            .with("e", Value::Text("x".into()));
        let names = ["a", "b", "c", "d", "e", "f"];
        assert_eq!(
            hash_sorted_fields(&r, &names, names_hash(&names)),
            hash_fields(&r, ["f", "e", "d", "c", "b", "a", "a"])
        );
        // Same values (1, null), other names: the names are covered.
        assert_ne!(hash_fields(&r, ["a", "b"]), hash_fields(&r, ["a", "d"]));
    }

    #[test]
    fn values_of_one_meaning_hash_the_same_and_others_differ() {
        let one = |v: Value| hash_fields(&Record::new("t").with("f", v), ["f"]);
        let dec = |s: &str| Value::Decimal(Decimal::from_str(s).unwrap());
        assert_eq!(one(dec("0")), one(dec("-0.00")));
        assert_ne!(one(dec("1.5")), one(dec("15")));
        assert_eq!(
            one(Value::Enum("Yes".into())),
            one(Value::Enum("YES".into()))
        );
        assert_ne!(
            one(Value::Enum("Yes".into())),
            one(Value::Text("yes".into()))
        );
        assert_ne!(one(Value::Integer(7)), one(Value::Choice(7)));
        let date = |d: u32| Value::Date(chrono::NaiveDate::from_ymd_opt(2026, 1, d).unwrap());
        assert_ne!(one(date(1)), one(date(2)));
        let lookup = |id: Option<&str>, key: Option<&str>| {
            Value::Lookup(Arc::new(LookupRef {
                entity_set: "currencies".into(),
                id: id.map(str::to_owned),
                key: key.map(|k| RecordKey::new([("isocurrencycode", k)])),
            }))
        };
        assert_eq!(
            one(lookup(Some("ABC-1"), None)),
            one(lookup(Some("abc-1"), None))
        );
        // Written with id and key, read back with the id only: the same reference.
        assert_eq!(
            one(lookup(Some("X"), Some("USD"))),
            one(lookup(Some("x"), None))
        );
        assert_ne!(
            one(lookup(None, Some("USD"))),
            one(lookup(None, Some("EUR")))
        );
        assert_ne!(
            one(lookup(Some("USD"), None)),
            one(lookup(None, Some("USD")))
        );
    }

    #[test]
    fn text_boundaries_cannot_be_shifted_between_names_and_values() {
        let a = Record::new("t")
            .with("a", Value::Text("bc".into()))
            .with("ab", Value::Null);
        let b = Record::new("t")
            .with("a", Value::Null)
            .with("ab", Value::Text("c".into()));
        assert_ne!(hash_fields(&a, ["a", "ab"]), hash_fields(&b, ["a", "ab"]));
    }

    /// A record whose hash is pinned below: hashes are stored with links, so a change of the
    /// function must be deliberate (and migrated), never a side effect.
    fn pinned_record() -> (Record, [&'static str; 8]) {
        let record = Record::new("accounts")
            .with("accountnumber", Value::Text("US-001".into()))
            .with(
                "name",
                Value::Text("Contoso Pharmaceuticals (sample)".into()),
            )
            .with(
                "creditlimit",
                Value::Decimal(Decimal::from_str("1500.50").unwrap()),
            )
            .with("customertypecode", Value::Choice(3))
            .with("msdyn_creditonhold", Value::Enum("No".into()))
            .with(
                "modifiedon",
                Value::DateTime(
                    chrono::DateTime::parse_from_rfc3339("2026-11-01T08:00:00Z").unwrap(),
                ),
            )
            .with(
                "transactioncurrencyid",
                Value::Lookup(Arc::new(LookupRef {
                    entity_set: "transactioncurrencies".into(),
                    id: Some("6E5A3B1C-0000-0000-0000-000000000001".into()),
                    key: None,
                })),
            );
        let names = [
            "accountnumber",
            "creditlimit",
            "customertypecode",
            "modifiedon",
            "msdyn_creditonhold",
            "name",
            "telephone1",
            "transactioncurrencyid",
        ];
        (record, names)
    }

    #[test]
    fn the_hash_function_is_pinned() {
        let (record, names) = pinned_record();
        let hash = hash_fields(&record, names);
        assert_eq!(hash, FieldsHash(PINNED));
    }

    proptest::proptest! {
        #[test]
        fn different_values_hash_differently(a in ".{0,40}", b in ".{0,40}", i in proptest::num::i64::ANY) {
            let one = |v: Value| hash_fields(&Record::new("t").with("f", v), ["f"]);
            proptest::prop_assert_eq!(one(Value::Text(a.as_str().into())), one(Value::Text(a.as_str().into())));
            if a != b {
                proptest::prop_assert_ne!(one(Value::Text(a.as_str().into())), one(Value::Text(b.as_str().into())));
            }
            proptest::prop_assert_ne!(one(Value::Integer(i)), one(Value::Integer(i.wrapping_add(1))));
            proptest::prop_assert_ne!(one(Value::Integer(i)), one(Value::Null));
        }

        #[test]
        fn name_comparison_orders_like_str_for_any_text(a in ".{0,24}", b in ".{0,24}") {
            proptest::prop_assert_eq!(compare_names(&a, &b), a.cmp(&b));
            let prefixed = format!("{a}{b}");
            proptest::prop_assert_eq!(compare_names(&a, &prefixed), a.cmp(&prefixed));
        }
    }

    #[test]
    fn name_comparison_orders_like_str() {
        let names = [
            "",
            "a",
            "ab",
            "abcdefgh",
            "abcdefghi",
            "abcdefgg",
            "address1_city",
            "address1_line1",
            "address2_city",
            "msdyn_company",
            "msdyn_companyz",
            "Z",
            "é",
            "e",
        ];
        for a in names {
            for b in names {
                assert_eq!(compare_names(a, b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
