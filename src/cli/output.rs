//! "Print JSON or render", the same way in every command: with `--json` a
//! reply is printed as the protobuf JSON mapping (pretty, one document), and
//! each message of a stream as one compact line; otherwise the command's
//! human rendering is printed.

use std::io::Write;

use serde::Serialize;

/// Prints `reply` on stdout: pretty JSON with `--json`, else what `render`
/// makes of it (which ends its own lines).
pub fn reply<T: Serialize>(
    json: bool,
    reply: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(reply)?);
    } else {
        print!("{}", render(reply));
    }
    Ok(())
}

/// Writes one message of a stream as one compact JSON line (`--json` of
/// `-f`, `--watch` and log streams), so that each line parses on its own.
pub fn json_line<T: Serialize>(out: &mut impl Write, message: &T) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string(message)?)?;
    Ok(())
}
