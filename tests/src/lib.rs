//! Cross-crate tests of dualwrite: the end-to-end tests live in `tests/tests/` (the engine
//! with the shipped maps over the embedded SQLite store and queue); this library is empty.
