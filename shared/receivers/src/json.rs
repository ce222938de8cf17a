//! A JSON tree that borrows from the request body: what the receivers read payloads into.
//!
//! A RemoteExecutionContext is a few kilobytes of small objects (`{"key":…,"value":…}` for
//! every attribute, twice with a post image). Read into `serde_json::Value`, every object is a
//! map with an allocated key per entry and every string an allocated copy; here an object is
//! one vector of entries and a string without escapes points into the body. Lookups scan the
//! entries (objects hold a handful of keys); as with `serde_json::Map`, the last of duplicate
//! keys wins. Numbers keep their text (`serde_json::Number` with `arbitrary_precision`), so
//! money converts to exact decimals. [`from_slice`] is a parser of its own; the tree's serde
//! `Deserialize` is kept as the reference the tests compare it with.

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

/// Parses `body` as JSON (RFC 8259, as strict as `serde_json`), borrowing from it.
///
/// A parser of its own rather than `serde_json`'s deserializer: every event's payloads pass
/// through here, and going through serde's visitor (and its map protocol for each number kept
/// as text) cost about twice as much. `serde_json` stays the reference: the tests parse the
/// same texts both ways and compare the trees and the refusals.
pub(crate) fn from_slice(body: &[u8]) -> Result<Json<'_>, JsonError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| JsonError::at(body, e.valid_up_to(), "invalid UTF-8"))?;
    let mut p = Parser {
        text,
        bytes: body,
        at: 0,
        depth: 0,
    };
    p.skip_ws();
    let value = p.value()?;
    p.skip_ws();
    if p.at < body.len() {
        return Err(p.error("trailing characters"));
    }
    Ok(value)
}

/// Why a text is not JSON, and where (1-based line and column, as `serde_json` reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonError {
    what: &'static str,
    line: usize,
    column: usize,
}

impl JsonError {
    fn at(bytes: &[u8], at: usize, what: &'static str) -> Self {
        let before = &bytes[..at.min(bytes.len())];
        let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
        let column = 1 + before.iter().rev().take_while(|&&b| b != b'\n').count();
        JsonError { what, line, column }
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.what, self.line, self.column
        )
    }
}

impl std::error::Error for JsonError {}

/// Nesting this deep is refused (`serde_json`'s limit), so that a hostile body cannot
/// exhaust the stack.
const MAX_DEPTH: usize = 128;

struct Parser<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    depth: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &'static str) -> JsonError {
        JsonError::at(self.bytes, self.at, what)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn value(&mut self) -> Result<Json<'a>, JsonError> {
        match self.peek() {
            None => Err(self.error("EOF while parsing a value")),
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("expected value")),
        }
    }

    fn nested(
        &mut self,
        parse: fn(&mut Self) -> Result<Json<'a>, JsonError>,
    ) -> Result<Json<'a>, JsonError> {
        self.depth += 1;
        if self.depth >= MAX_DEPTH {
            return Err(self.error("recursion limit exceeded"));
        }
        let value = parse(self);
        self.depth -= 1;
        value
    }

    fn literal(&mut self, word: &'static str, value: Json<'a>) -> Result<Json<'a>, JsonError> {
        let end = self.at + word.len();
        if self.bytes.get(self.at..end) == Some(word.as_bytes()) {
            self.at = end;
            Ok(value)
        } else {
            // Point at the first byte that differs, as serde_json does.
            let same = self.bytes[self.at..]
                .iter()
                .zip(word.as_bytes())
                .take_while(|(a, b)| a == b)
                .count();
            self.at += same;
            Err(self.error(if self.at >= self.bytes.len() {
                "EOF while parsing a value"
            } else {
                "expected ident"
            }))
        }
    }

    fn object(&mut self) -> Result<Json<'a>, JsonError> {
        self.at += 1; // '{'
        let mut entries = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(Obj(entries)));
        }
        loop {
            match self.peek() {
                Some(b'"') => {}
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("key must be a string")),
            }
            let key = self.string()?;
            self.skip_ws();
            match self.peek() {
                Some(b':') => self.at += 1,
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `:`")),
            }
            self.skip_ws();
            let value = self.value()?;
            entries.push((key, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    self.skip_ws();
                }
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(Obj(entries)));
                }
                None => return Err(self.error("EOF while parsing an object")),
                Some(_) => return Err(self.error("expected `,` or `}`")),
            }
        }
    }

    fn array(&mut self) -> Result<Json<'a>, JsonError> {
        self.at += 1; // '['
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        return Err(self.error("trailing comma"));
                    }
                }
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                None => return Err(self.error("EOF while parsing a list")),
                Some(_) => return Err(self.error("expected `,` or `]`")),
            }
        }
    }

    /// A string at `"`: borrowed from the text unless it has escapes.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.at += 1; // '"'
        let start = self.at;
        loop {
            match self.peek() {
                None => return Err(self.error("EOF while parsing a string")),
                Some(b'"') => {
                    let s = &self.text[start..self.at];
                    self.at += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(0..=0x1f) => {
                    return Err(self.error(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ));
                }
                Some(_) => self.at += 1,
            }
        }
        // Escapes: decode into an owned string from here on.
        let mut out = String::with_capacity(self.at - start + 16);
        out.push_str(&self.text[start..self.at]);
        loop {
            let run = self.at;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            out.push_str(&self.text[run..self.at]);
            match self.peek() {
                None => return Err(self.error("EOF while parsing a string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.at += 1;
                    self.escape(&mut out)?;
                }
                Some(_) => {
                    return Err(self.error(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ));
                }
            }
        }
    }

    /// The escape after a `\\`, appended to `out`.
    fn escape(&mut self, out: &mut String) -> Result<(), JsonError> {
        let Some(b) = self.peek() else {
            return Err(self.error("EOF while parsing a string"));
        };
        self.at += 1;
        let c = match b {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let first = self.hex4()?;
                match first {
                    0xD800..=0xDBFF => {
                        if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                            return Err(self.error("unexpected end of hex escape"));
                        }
                        self.at += 2;
                        let second = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&second) {
                            return Err(self.error("lone leading surrogate in hex escape"));
                        }
                        let code = 0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00);
                        char::from_u32(code)
                            .ok_or_else(|| self.error("invalid unicode code point"))?
                    }
                    0xDC00..=0xDFFF => {
                        return Err(self.error("lone leading surrogate in hex escape"));
                    }
                    _ => char::from_u32(first)
                        .ok_or_else(|| self.error("invalid unicode code point"))?,
                }
            }
            _ => {
                self.at -= 1;
                return Err(self.error("invalid escape"));
            }
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut v = 0;
        for _ in 0..4 {
            let Some(b) = self.peek() else {
                return Err(self.error("EOF while parsing a string"));
            };
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => return Err(self.error("invalid escape")),
            };
            v = v * 16 + u32::from(d);
            self.at += 1;
        }
        Ok(v)
    }

    /// A number, kept as written.
    fn number(&mut self) -> Result<Json<'a>, JsonError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            None => return Err(self.error("EOF while parsing a value")),
            Some(_) => return Err(self.error("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.required_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.required_digits()?;
        }
        self.text[start..self.at]
            .parse::<Number>()
            .map(Json::Number)
            .map_err(|_| JsonError::at(self.bytes, start, "number out of range"))
    }

    /// One digit or more (after a `.` or an exponent's `e`).
    fn required_digits(&mut self) -> Result<(), JsonError> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                self.digits();
                Ok(())
            }
            None => Err(self.error("EOF while parsing a value")),
            Some(_) => Err(self.error("invalid number")),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }
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

    /// The reference: the same tree read through `serde_json`'s deserializer.
    fn reference(text: &[u8]) -> Result<Json<'_>, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// Both parsers agree on `text`: the same tree, or both refuse it.
    fn agree(text: &[u8]) {
        match (from_slice(text), reference(text)) {
            (Ok(ours), Ok(theirs)) => {
                assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(text))
            }
            (Err(_), Err(_)) => {}
            (ours, theirs) => panic!(
                "parsers disagree on {:?}: ours {ours:?}, serde_json {theirs:?}",
                String::from_utf8_lossy(text)
            ),
        }
    }

    const FIXTURES: [&str; 6] = [
        include_str!("../tests/fixtures/dataverse-webhook-account-create.json"),
        include_str!("../tests/fixtures/dataverse-webhook-account-delete.json"),
        include_str!("../tests/fixtures/dataverse-webhook-contact-update.json"),
        include_str!("../tests/fixtures/dataverse-webhook-msg-size-exceeded.json"),
        include_str!("../tests/fixtures/fno-business-event-sales-invoice-posted.json"),
        include_str!("../tests/fixtures/fno-data-event-customersv3-update.json"),
    ];

    #[test]
    fn the_vendor_payloads_read_the_same_as_through_serde_json() {
        for text in FIXTURES {
            assert!(from_slice(text.as_bytes()).is_ok());
            agree(text.as_bytes());
        }
    }

    #[test]
    fn every_cut_and_every_corrupted_byte_of_a_payload_is_judged_like_serde_json() {
        let text = FIXTURES[0].as_bytes();
        for end in 0..text.len() {
            agree(&text[..end]);
        }
        for at in (0..text.len()).step_by(7) {
            for b in [
                b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b'0', b'-', b'.', b'e', b'x',
                b' ', 0x01, 0xff,
            ] {
                let mut bad = text.to_vec();
                bad[at] = b;
                agree(&bad);
            }
        }
    }

    #[test]
    fn escapes_numbers_and_limits_are_judged_like_serde_json() {
        let cases: &[&str] = &[
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9\u20AC\ud83d\ude00""#,
            r#""\ud83d""#,
            r#""\ude00""#,
            r#""\ud83d\u0041""#,
            r#""\x""#,
            r#""\u12""#,
            "\"tab\tinside\"",
            "\"nl\ninside\"",
            "0",
            "-0",
            "01",
            "-",
            "1.",
            ".5",
            "1e",
            "1e+",
            "1E-7",
            "-12.50e3",
            "1.5e999",
            "123456789012345678901234567890",
            "-9223372036854775809",
            "18446744073709551616",
            "true",
            "tru",
            "nul",
            "falsey",
            "[]",
            "{}",
            "[ ]",
            "{ }",
            "[1 2]",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{1:2}",
            "[1,]",
            "  [1]  ",
            "[1] x",
            "",
            "   ",
            "\u{feff}[1]",
            "{\"k\":1,\"k\":2}",
            "[\"\u{e9}\u{1F600}\"]",
        ];
        for case in cases {
            agree(case.as_bytes());
        }
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        agree(deep(127).as_bytes());
        agree(deep(128).as_bytes());
        agree(deep(129).as_bytes());
        agree(deep(10_000).as_bytes());
        agree(b"\"\xff\"");
    }

    #[test]
    fn errors_say_what_and_where() {
        let e = from_slice(b"{\n  \"a\": tru\n}").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(
            from_slice(b"[1] x")
                .unwrap_err()
                .to_string()
                .starts_with("trailing characters")
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn any_json_document_reads_the_same_as_through_serde_json(value in arb_json()) {
            agree(value.to_string().as_bytes());
            agree(serde_json::to_string_pretty(&value).unwrap().as_bytes());
        }

        #[test]
        fn any_bytes_are_judged_like_serde_json(bytes in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::sample::select(b"{}[]\",:\\ -0123456789.eEtrufalsn".to_vec()),
                proptest::num::u8::ANY,
            ],
            0..64,
        )) {
            agree(&bytes);
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            (-1.0e12f64..1.0e12).prop_map(|f| serde_json::json!(f)),
            "-?(0|[1-9][0-9]{0,29})(\\.[0-9]{1,10})?"
                .prop_map(|t| serde_json::Value::Number(t.parse().unwrap())),
            any::<String>().prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                proptest::collection::vec((any::<String>(), inner), 0..8).prop_map(|entries| {
                    serde_json::Value::Object(entries.into_iter().collect())
                }),
            ]
        })
    }
}
