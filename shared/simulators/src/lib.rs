//! Faithful local simulators of Dataverse, F&O and Entra ID, for tests, demo and benchmarks.
