//! The `dualwrite` command line.

fn main() {}
