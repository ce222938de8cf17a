//! A JSON tree that borrows from the request body: what the receivers read payloads into.
//!
//! A RemoteExecutionContext is a few kilobytes of small objects (`{"key":…,"value":…}` for
//! every attribute, twice with a post image). Read into `serde_json::Value`, every object is a
//! map with an allocated key per entry and every string an allocated copy; here an object is
//! one vector of entries and a string without escapes points into the body. Lookups scan the
//! entries (objects hold a handful of keys); as with `serde_json::Map`, the last of duplicate
//! keys wins. Numbers keep their text (`serde_json::Number` with `arbitrary_precision`), so
//! money converts to exact decimals.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

/// A JSON value borrowing its strings from the parsed text where it can.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number, as written.
    Number(Number),
    /// A string (borrowed unless it had escapes).
    String(Cow<'a, str>),
    /// An array.
    Array(Vec<Json<'a>>),
    /// An object.
    Object(Obj<'a>),
}

/// A JSON object: its entries in document order.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Obj<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Obj<'a> {
    /// The value of `key` (the last one when the key repeats).
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// True when the object has `key`.
    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    /// An object of `entries` (tests).
    #[cfg(test)]
    pub(crate) fn from_entries(entries: Vec<(&'a str, Json<'a>)>) -> Self {
        Obj(entries
            .into_iter()
            .map(|(k, v)| (Cow::Borrowed(k), v))
            .collect())
    }
}

impl Json<'_> {
    /// The string, when this is one.
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}

/// The JSON text (object keys in sorted order, as `serde_json::Value` writes them).
impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// Parses `body` as JSON, borrowing from it.
pub(crate) fn from_slice(body: &[u8]) -> serde_json::Result<Json<'_>> {
    serde_json::from_slice(body)
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

/// What serde_json hands a visitor for a number when numbers keep their text
/// (`arbitrary_precision`): a one-entry map under this key, the number's text as value.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Number::from_f64(v)
            .map(Json::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Json::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some(first) = map.next_key_seed(KeySeed)? else {
            return Ok(Json::Object(Obj::default()));
        };
        if first == NUMBER_TOKEN {
            let text: String = map.next_value()?;
            return text
                .parse::<Number>()
                .map(Json::Number)
                .map_err(de::Error::custom);
        }
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
        entries.push((first, map.next_value()?));
        while let Some(key) = map.next_key_seed(KeySeed)? {
            entries.push((key, map.next_value()?));
        }
        Ok(Json::Object(Obj(entries)))
    }
}

/// An object key, borrowed when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(t) => s.serialize_str(t),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(obj) => obj.serialize(s),
        }
    }
}

/// Written with keys sorted and the last of duplicate keys kept, as `serde_json::Value` does.
impl Serialize for Obj<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut keys: Vec<&str> = self.0.iter().map(|(k, _)| k.as_ref()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut map = s.serialize_map(Some(keys.len()))?;
        for key in keys {
            if let Some(value) = self.get(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_borrows_plain_strings() {
        let text =
            br#"{"a":null,"b":[true,false],"c":"plain","d":"esc\"aped","e":{"k":1},"n":-12.50}"#;
        let Json::Object(o) = from_slice(text).unwrap() else {
            panic!("an object")
        };
        assert_eq!(o.get("a"), Some(&Json::Null));
        assert_eq!(
            o.get("b"),
            Some(&Json::Array(vec![Json::Bool(true), Json::Bool(false)]))
        );
        assert!(matches!(
            o.get("c"),
            Some(Json::String(Cow::Borrowed("plain")))
        ));
        assert_eq!(o.get("d").and_then(Json::as_str), Some("esc\"aped"));
        assert!(matches!(o.get("e"), Some(Json::Object(inner)) if inner.contains_key("k")));
        // The number keeps its text: trailing zero and all.
        assert_eq!(
            o.get("n").map(ToString::to_string).as_deref(),
            Some("-12.50")
        );
        assert!(!o.contains_key("z"));
    }

    #[test]
    fn big_numbers_stay_exact_and_the_last_duplicate_key_wins() {
        let Json::Object(o) = from_slice(br#"{"m":922337203685477.5807,"k":1,"k":2}"#).unwrap()
        else {
            panic!("an object")
        };
        assert_eq!(
            o.get("m").map(ToString::to_string).as_deref(),
            Some("922337203685477.5807")
        );
        assert_eq!(o.get("k").map(ToString::to_string).as_deref(), Some("2"));
    }

    #[test]
    fn writes_the_same_text_as_serde_json_values() {
        let text = r#"{"z":[1,"two",{"y":null,"x":3.10}],"a":"b\n","a2":true}"#;
        let ours = from_slice(text.as_bytes()).unwrap().to_string();
        let theirs = serde_json::from_str::<serde_json::Value>(text)
            .unwrap()
            .to_string();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn malformed_text_is_an_error() {
        assert!(from_slice(b"{\"a\":").is_err());
        assert!(from_slice(b"[1,]").is_err());
    }
}
