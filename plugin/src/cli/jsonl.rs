//! The JSON Lines loop shared by the line-oriented subcommands.
//!
//! Every input line is handled on its own: a bad line is reported on stderr with its
//! 1-based line number and reason, the other lines are still processed, and the exit status
//! is non-zero if any line failed.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Opens `--input FILE`, or stdin when no file is given.
pub fn open_input(input: Option<&Path>) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match input {
        Some(path) => Box::new(BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        None => Box::new(BufReader::new(std::io::stdin())),
    })
}

/// Runs `handle` on each non-blank line and writes each result as one line of stdout.
pub fn for_each_line(
    input: Box<dyn BufRead>,
    mut handle: impl FnMut(&str) -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut failed = 0usize;
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("line {number}: cannot read: {e}");
                failed += 1;
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match handle(&line) {
            Ok(value) => {
                serde_json::to_writer(&mut out, &value)?;
                out.write_all(b"\n")?;
            }
            Err(e) => {
                eprintln!("line {number}: {e:#}");
                failed += 1;
            }
        }
    }
    out.flush()?;
    if failed > 0 {
        eprintln!("{failed} line(s) failed");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
