//! Integration tests for the simulators.
