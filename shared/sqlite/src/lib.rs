//! Embedded SQLite state store and durable work queue.
