//! What the program prints for its operator: lines on standard output (results, tables,
//! the address it serves on) and standard error (why it failed). Logs go through `tracing`.

use std::io::Write as _;

/// A line on standard output.
pub(crate) fn say(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A line on standard error.
pub(crate) fn say_err(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
