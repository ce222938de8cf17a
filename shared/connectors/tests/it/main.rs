//! Integration tests: the real connectors against the project's simulators (Entra ID,
//! Dataverse, F&O) started in-process, with schemas from the shipped table maps.

mod batch;
mod coalesce;
mod dataverse;
mod entra;
mod faults;
mod fno;
mod harness;
