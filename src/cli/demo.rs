//! `wemoe-engine demo`: the whole job (merge, adapt, eval of every method) on the bundled suite. The suite
//! is not in the repository yet, so for now the command says so and succeeds without writing anything.

use std::path::Path;

use anyhow::Result;

pub fn run(json: Option<&Path>) -> Result<()> {
    say!("suite not built yet: the bundled multi-task suite (assets/suite) and the demo land together");
    if let Some(path) = json {
        say!("no results, so {} was not written", path.display());
    }
    Ok(())
}
