//! The standard table maps, embedded in the binary.
