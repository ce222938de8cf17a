//! Stable hashes of a record's mapped fields, stored with each link for echo suppression.
//!
//! The hash covers field names and typed values in name order, so it does not depend on the
//! order a source lists fields in; decimals are normalised (`1.50` = `1.5`); a missing field and
//! a null field hash the same.

use xxhash_rust::xxh3::Xxh3;

use crate::ports::FieldsHash;
use crate::record::Record;
use crate::value::Value;

/// Hashes the values of `fields` (need not be sorted) in `record`.
pub fn hash_fields<'a>(record: &Record, fields: impl IntoIterator<Item = &'a str>) -> FieldsHash {
    let mut names: Vec<&str> = fields.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let mut h = Xxh3::new();
    for name in names {
        h.update(name.as_bytes());
        h.update(&[0xff]);
        hash_value(&mut h, record.get(name).unwrap_or(&Value::Null));
        h.update(&[0xfe]);
    }
    FieldsHash(h.digest128())
}

fn hash_value(h: &mut Xxh3, v: &Value) {
    match v {
        Value::Null => h.update(&[0]),
        Value::Text(s) => {
            h.update(&[1]);
            h.update(s.as_bytes());
        }
        Value::Integer(i) => {
            h.update(&[2]);
            h.update(&i.to_le_bytes());
        }
        Value::Decimal(d) => {
            h.update(&[3]);
            h.update(d.normalize().to_string().as_bytes());
        }
        Value::Boolean(b) => h.update(&[4, u8::from(*b)]),
        Value::Date(d) => {
            h.update(&[5]);
            h.update(d.to_string().as_bytes());
        }
        Value::DateTime(t) => {
            h.update(&[6]);
            h.update(&t.timestamp_micros().to_le_bytes());
        }
        Value::Choice(i) => {
            h.update(&[7]);
            h.update(&i.to_le_bytes());
        }
        Value::Enum(s) => {
            h.update(&[8]);
            h.update(s.to_ascii_lowercase().as_bytes());
        }
        Value::Lookup(l) => {
            h.update(&[9]);
            h.update(l.entity_set.as_bytes());
            h.update(&[0]);
            // A lookup is the same reference whether written by key or by id: hash the key
            // when present (what dualwrite writes), else the id.
            match (&l.key, &l.id) {
                (Some(k), _) => h.update(k.to_string().as_bytes()),
                (None, Some(id)) => h.update(id.to_ascii_lowercase().as_bytes()),
                (None, None) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    #[test]
    fn field_order_and_decimal_scale_do_not_matter() {
        let a = Record::new("accounts")
            .with("name", Value::Text("Contoso".into()))
            .with("creditlimit", Value::Decimal(Decimal::from_str("1.50").unwrap()));
        let b = Record::new("accounts")
            .with("creditlimit", Value::Decimal(Decimal::from_str("1.5").unwrap()))
            .with("name", Value::Text("Contoso".into()));
        assert_eq!(hash_fields(&a, ["name", "creditlimit"]), hash_fields(&b, ["creditlimit", "name"]));
    }

    #[test]
    fn a_changed_value_changes_the_hash() {
        let a = Record::new("accounts").with("name", Value::Text("Contoso".into()));
        let b = Record::new("accounts").with("name", Value::Text("Contoso Ltd".into()));
        assert_ne!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
    }

    #[test]
    fn missing_and_null_are_the_same_but_not_empty_text() {
        let a = Record::new("accounts");
        let b = Record::new("accounts").with("name", Value::Null);
        let c = Record::new("accounts").with("name", Value::Text(String::new()));
        assert_eq!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
        assert_ne!(hash_fields(&a, ["name"]), hash_fields(&c, ["name"]));
    }

    #[test]
    fn fields_outside_the_list_are_ignored() {
        let a = Record::new("accounts").with("name", Value::Text("A".into())).with("x", Value::Integer(1));
        let b = Record::new("accounts").with("name", Value::Text("A".into())).with("x", Value::Integer(2));
        assert_eq!(hash_fields(&a, ["name"]), hash_fields(&b, ["name"]));
    }
}
