//! The sync engine: ingest, worker step and in-memory adapters over the core ports.
