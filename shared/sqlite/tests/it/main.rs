//! Integration tests of dualwrite-sqlite: every guarantee of the store and queue ports, and the
//! crash test (kill the process at any instant: no accepted event lost, no state corrupted).

mod crash;
mod fixtures;
mod group_commit;
mod queue;
mod queue_contract;
mod store;
