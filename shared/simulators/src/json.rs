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
    if !needs_escape(s.as_bytes()) {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        value(out, s);
    }
}

/// True if `b` holds a byte that a JSON string escapes: a control character, `"` or `\\`.
/// Eight bytes at a time (SWAR): a lane's high bit is set where its byte is below 0x20 or
/// equals one of the two.
fn needs_escape(b: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(c);
        let x = u64::from_le_bytes(lanes);
        let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        if below_space
            | zero_in(x ^ (ONES * u64::from(b'"')))
            | zero_in(x ^ (ONES * u64::from(b'\\')))
            != 0
        {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&c| c < 0x20 || c == b'"' || c == b'\\')
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
            "del \u{7f} and more than eight bytes \u{1f}",
            "ünïcödé /",
        ] {
            let mut out = Vec::new();
            string(&mut out, s);
            assert_eq!(out, serde_json::to_vec(s).unwrap(), "{s:?}");
            assert_eq!(json_string(s).as_bytes(), serde_json::to_vec(s).unwrap());
        }
    }

    #[test]
    fn escapes_are_found_in_every_position() {
        for len in 0..20 {
            let plain = "a".repeat(len);
            assert!(!needs_escape(plain.as_bytes()));
            for at in 0..len {
                for c in [b'"', b'\\', 0x00, 0x1f, b'\n'] {
                    let mut s = plain.clone().into_bytes();
                    s[at] = c;
                    assert!(needs_escape(&s), "{len} {at} {c}");
                }
                for c in [b' ', b'~', 0x7f, b'/', b'!', b'#', b'[', b']'] {
                    let mut s = plain.clone().into_bytes();
                    s[at] = c;
                    assert!(!needs_escape(&s), "{len} {at} {c}");
                }
            }
        }
        assert!(!needs_escape(
            "ünïcödé €uro 😀 longer than eight".as_bytes()
        ));
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
