//! `wemoe-engine demo`: the whole job on the bundled suite. Until the suite is built and committed
//! under `assets/suite`, it says so.

use std::path::{Path, PathBuf};

use anyhow::Result;

/// Where the bundled suite lives: `$WEMOE_SUITE`, else `assets/suite` in the working directory or
/// beside the crate's sources.
fn suite_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("WEMOE_SUITE") {
        return Some(PathBuf::from(dir));
    }
    [Path::new("assets/suite").to_path_buf(), Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/suite")]
        .into_iter()
        .find(|p| p.join("suite.json").exists())
}

pub fn run(json: Option<&Path>, _quiet: bool) -> Result<()> {
    match suite_dir() {
        Some(dir) if dir.join("suite.json").exists() => {
            anyhow::bail!("{}: this build cannot run the suite yet (merge and adapt are not in it)", dir.display())
        }
        _ => {
            println!("suite not built yet: assets/suite/suite.json is missing (the bundled multi-task suite and the demo land together)");
            if let Some(path) = json {
                println!("no results, so {} was not written", path.display());
            }
            Ok(())
        }
    }
}
