//! The command's stdout. A closed pipe ends the output quietly (`info | head -1` is not an error); any other
//! failure to write (a full disk under `eval --json - > results.json`) is kept, and fails the command once it
//! is done, so that a lost report never exits 0.

use std::io::{ErrorKind, Write};
use std::sync::Mutex;

use anyhow::{bail, Result};

/// The first failed write to stdout other than a closed pipe.
static FAILED: Mutex<Option<std::io::Error>> = Mutex::new(None);

/// Takes the outcome of a write to stdout.
pub fn note(result: std::io::Result<()>) {
    match result {
        Err(err) if err.kind() != ErrorKind::BrokenPipe => {
            FAILED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get_or_insert(err);
        }
        _ => {}
    }
}

/// Flushes stdout, then fails with the first write to it that failed, if one did.
pub fn check() -> Result<()> {
    note(std::io::stdout().flush());
    match FAILED.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
        Some(err) => bail!("stdout: cannot write: {err}"),
        None => Ok(()),
    }
}
