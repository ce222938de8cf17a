//! Sync decisions: pure functions from (event, map, link, other side) to an action. STUB.
