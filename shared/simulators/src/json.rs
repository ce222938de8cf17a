//! JSON written straight to bytes, for the bodies the simulators send and answer many times a
//! second: helpers that append text, strings and values to a `Vec<u8>`, and [`Object`], which
//! writes an object entry by entry. They write exactly what `serde_json` writes for the same
//! data; callers give an object's keys in byte order where a `Value` object would have sorted
//! them.

use serde::Serialize;

/// Appends text that is already JSON.
pub(crate) fn raw(out: &mut Vec<u8>, json: &str) {
    out.extend_from_slice(json.as_bytes());
}

/// Appends `s` as a JSON string, escaped as `serde_json` escapes it.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        value(out, s);
    }
}

/// Appends `v` serialised by `serde_json`.
pub(crate) fn value(out: &mut Vec<u8>, v: &(impl Serialize + ?Sized)) {
    // Writing a `Value` or a string into a `Vec` cannot fail: there is no I/O, and every
    // object key of a `Value` is a string.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Appends `v` as `serde_json` writes it, with the common scalars written directly.
pub(crate) fn any(out: &mut Vec<u8>, v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Null => raw(out, "null"),
        Value::Bool(true) => raw(out, "true"),
        Value::Bool(false) => raw(out, "false"),
        Value::String(s) => string(out, s),
        Value::Number(_) | Value::Array(_) | Value::Object(_) => value(out, v),
    }
}

/// `s` as a JSON string (for names written into many bodies: computed once, appended raw).
pub(crate) fn json_string(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    string(&mut out, s);
    String::from_utf8(out).unwrap_or_default()
}

/// Writes a JSON object entry by entry; the caller gives the keys in the order they must appear.
pub(crate) struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Object { out, empty: true }
    }

    /// Writes the key of the next entry; the caller writes its value into the returned buffer.
    pub fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        string(self.out, key);
        self.out.push(b':');
        self.out
    }

    /// Writes an entry whose value is a `serde_json::Value`.
    pub fn value_entry(&mut self, key: &str, v: &serde_json::Value) {
        let out = self.key(key);
        any(out, v);
    }

    /// Writes an entry whose value `serde_json` serialises.
    pub fn entry(&mut self, key: &str, v: &(impl Serialize + ?Sized)) {
        let out = self.key(key);
        value(out, v);
    }

    /// Closes the object.
    pub fn end(self) {
        self.out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_escape_as_serde_json_does() {
        for s in [
            "plain",
            "quote \" back \\ slash",
            "tab\tnew\nline\u{1}",
            "ünïcödé /",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
            assert_eq!(json_string(s).as_bytes(), serde_json::to_vec(s).unwrap());
        }
    }

    #[test]
    fn values_read_as_serde_json_writes_them() {
        let v: serde_json::Value = serde_json::from_str(
            r#"[null, true, false, "s\"", 1, -2.50, 1e400, 0.1000000000000000000001, [], {}, {"b": [1], "a": null}]"#,
        )
        .unwrap();
        for item in v.as_array().unwrap() {
            let mut out = Vec::new();
            any(&mut out, item);
            assert_eq!(out, serde_json::to_vec(item).unwrap(), "{item}");
        }
    }

    #[test]
    fn objects_read_as_serde_json_writes_them() {
        let mut out = Vec::new();
        let mut o = Object::new(&mut out);
        o.entry("a", &json!([1, "x", null]));
        o.entry("b\"", "q");
        raw(o.key("c"), "true");
        o.end();
        assert_eq!(
            out,
            serde_json::to_vec(&json!({"a": [1, "x", null], "b\"": "q", "c": true})).unwrap()
        );
        let mut out = Vec::new();
        Object::new(&mut out).end();
        assert_eq!(out, b"{}");
    }
}
