//! [`Fields`]: a record's values by field name, kept as one vector sorted by name.
//!
//! A record carries a few dozen fields, is built once and read many times, and is walked in
//! name order by the hash and the map (see [`crate::hash`]). A sorted vector does all of that
//! with one allocation per record and no tree nodes: lookups are a binary search, walks are a
//! slice iteration, and a record built from a map's sorted names is one vector, pushed in order.
//! Insertion and removal shift the tail, which is cheap at record sizes.
//!
//! It reads like a `BTreeMap<SmolStr, Value>`: iteration in name order, `insert` replacing an
//! existing value (and returning it), collecting keeps the last value of a repeated name, and it
//! serialises as a JSON object.

use std::fmt;
use std::slice;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;

use crate::value::Value;

/// Field values by field name, in name order (byte order of the names, as `str` compares).
#[derive(Clone, Default, PartialEq)]
pub struct Fields(Vec<(SmolStr, Value)>);

impl Fields {
    /// No fields.
    pub const fn new() -> Self {
        Fields(Vec::new())
    }

    /// No fields, with room for `capacity` of them.
    pub fn with_capacity(capacity: usize) -> Self {
        Fields(Vec::with_capacity(capacity))
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0
            .binary_search_by(|(n, _)| crate::hash::compare_names(n, name))
    }

    /// The value of `name`, `None` when there is no such field.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    /// The value of `name` to change in place.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Value> {
        self.position(name).ok().map(|i| &mut self.0[i].1)
    }

    /// True when the record carries `name` (null or not).
    pub fn contains_key(&self, name: &str) -> bool {
        self.position(name).is_ok()
    }

    /// Sets `name` to `value`; returns the value it replaces, if any.
    pub fn insert(&mut self, name: impl Into<SmolStr>, value: Value) -> Option<Value> {
        let name = name.into();
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// Removes `name`; returns its value, if it was there.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        self.position(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the fields for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&SmolStr, &mut Value) -> bool) {
        self.0.retain_mut(|(n, v)| keep(n, v));
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(name, value)` in name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    /// `(name, value)` in name order, values changeable.
    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&SmolStr, &mut Value)> {
        self.0.iter_mut().map(|(n, v)| (&*n, v))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &SmolStr> + ExactSizeIterator {
        self.0.iter().map(|(n, _)| n)
    }

    /// The values, in name order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &Value> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }

    /// The values, in name order, changeable.
    pub fn values_mut(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = &mut Value> + ExactSizeIterator {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// The `(name, value)` pairs as a slice, in name order.
    pub fn as_slice(&self) -> &[(SmolStr, Value)] {
        &self.0
    }

    /// Fields from pairs already sorted by name without repeats, as a plan's field list is.
    /// Debug builds check the order.
    pub(crate) fn from_sorted(pairs: Vec<(SmolStr, Value)>) -> Self {
        debug_assert!(
            pairs.windows(2).all(|w| w[0].0 < w[1].0),
            "Fields::from_sorted needs names sorted and distinct"
        );
        Fields(pairs)
    }
}

/// Iterator over `(name, value)` in name order.
#[derive(Debug, Clone)]
pub struct Iter<'a>(slice::Iter<'a, (SmolStr, Value)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a SmolStr, &'a Value);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(n, v)| (n, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(n, v)| (n, v))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a SmolStr, &'a Value);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for Fields {
    type Item = (SmolStr, Value);
    type IntoIter = std::vec::IntoIter<(SmolStr, Value)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Into<SmolStr>> FromIterator<(K, Value)> for Fields {
    /// Like collecting a `BTreeMap`: sorted by name, the last value of a repeated name kept.
    fn from_iter<I: IntoIterator<Item = (K, Value)>>(iter: I) -> Self {
        let mut pairs: Vec<(SmolStr, Value)> =
            iter.into_iter().map(|(k, v)| (k.into(), v)).collect();
        // Stable: among equal names the input order stays, so the last one can be kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(SmolStr, Value)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match out.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => out.push(pair),
            }
        }
        Fields(out)
    }
}

impl<K: Into<SmolStr>> Extend<(K, Value)> for Fields {
    fn extend<I: IntoIterator<Item = (K, Value)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Into<SmolStr>, const N: usize> From<[(K, Value); N]> for Fields {
    fn from(pairs: [(K, Value); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name.as_str(), value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of field values by field name")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Fields, A::Error> {
                let mut pairs: Vec<(SmolStr, Value)> =
                    Vec::with_capacity(access.size_hint().unwrap_or(0));
                while let Some((name, value)) = access.next_entry::<SmolStr, Value>()? {
                    pairs.push((name, value));
                }
                Ok(pairs.into_iter().collect())
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn reads_like_a_sorted_map() {
        let mut f = Fields::new();
        assert_eq!(f.insert("name", text("a")), None);
        assert_eq!(f.insert("accountnumber", text("1")), None);
        assert_eq!(f.insert("zip", Value::Null), None);
        assert_eq!(f.insert("name", text("b")), Some(text("a")));
        let names: Vec<&str> = f.keys().map(SmolStr::as_str).collect();
        assert_eq!(names, ["accountnumber", "name", "zip"]);
        assert_eq!(f.get("name"), Some(&text("b")));
        assert_eq!(f.get("missing"), None);
        assert!(f.contains_key("zip"));
        assert_eq!(f.remove("accountnumber"), Some(text("1")));
        assert_eq!(f.remove("accountnumber"), None);
        assert_eq!(f.len(), 2);
        if let Some(v) = f.get_mut("zip") {
            *v = text("z");
        }
        assert_eq!(f.get("zip"), Some(&text("z")));
    }

    #[test]
    fn collecting_sorts_and_keeps_the_last_value_of_a_repeated_name() {
        let f: Fields = [("b", text("1")), ("a", text("2")), ("b", text("3"))].into();
        let pairs: Vec<(&str, &Value)> = f.iter().map(|(n, v)| (n.as_str(), v)).collect();
        assert_eq!(pairs, [("a", &text("2")), ("b", &text("3"))]);
        // The same as a BTreeMap built from the same pairs.
        let tree: std::collections::BTreeMap<&str, Value> =
            [("b", text("1")), ("a", text("2")), ("b", text("3"))].into();
        assert!(tree.iter().map(|(n, v)| (*n, v)).eq(pairs.into_iter()));
    }

    #[test]
    fn serialises_as_an_object_and_reads_back_sorted() {
        let f: Fields = [("b", text("x")), ("a", Value::Integer(1))].into();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(
            json,
            r#"{"a":{"type":"integer","value":1},"b":{"type":"text","value":"x"}}"#
        );
        let unsorted = r#"{"b":{"type":"text","value":"x"},"a":{"type":"integer","value":1}}"#;
        assert_eq!(serde_json::from_str::<Fields>(unsorted).unwrap(), f);
        assert!(serde_json::from_str::<Fields>("[1]").is_err());
    }
}
