//! An output folder written by one run at a time. `adapt` and AdaMerging write checkpoints and then a model into
//! their `--out` over minutes or hours; a second run given the same folder (a job started twice, a `--resume`
//! while the first still runs) would interleave its files with the first's, and leave a model from one run beside
//! a checkpoint and a `config.json` from the other. A run holds an exclusive advisory lock (`flock`) on the folder
//! itself while it lives: the kernel releases it when the run ends, however it ends, SIGKILL included, so nothing
//! stale is left to clear. A folder whose file system takes no locks (some network mounts) runs unguarded.

use std::fs::{File, TryLockError};
use std::io::ErrorKind;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::partial::Partial;

/// The claim of one run on its output folder, released when dropped.
#[derive(Debug)]
pub struct RunLock {
    // Held open for its lock; `None` where the folder cannot be locked.
    _folder: Option<File>,
}

impl RunLock {
    /// Claims the existing folder `dir` (given as option `flag`) for this run, or refuses in one line where
    /// another run holds it.
    pub fn claim(flag: &str, dir: &Path) -> Result<RunLock> {
        // Linux and macOS open a folder for reading; elsewhere, or where the open fails, the run goes unguarded.
        let Ok(folder) = File::open(dir) else { return Ok(RunLock { _folder: None }) };
        match folder.try_lock() {
            Ok(()) => Ok(RunLock { _folder: Some(folder) }),
            Err(TryLockError::WouldBlock) => bail!(
                "{flag} {}: another run is writing there now (adapt or AdaMerging, in another process); wait for it \
                 to end, or choose another {flag}",
                dir.display()
            ),
            // A file system without locks: the same as before there were any.
            Err(TryLockError::Error(_)) => Ok(RunLock { _folder: None }),
        }
    }

    /// Makes the folder `dir` where it does not exist yet (its parent must), then claims it: the claim and, where
    /// this call made the folder, its guard ([`Partial::make_scratch`]), which removes it again unless kept. A folder
    /// that another run made at the same moment is that run's: this one is refused by the claim, and leaves it.
    pub fn make_and_claim(flag: &str, dir: &Path) -> Result<(RunLock, Option<Partial>)> {
        let made = match Partial::make_scratch(dir.to_path_buf()) {
            Ok(partial) => Some(partial),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => None,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", dir.display())),
        };
        match Self::claim(flag, dir) {
            Ok(claim) => Ok((claim, made)),
            Err(refused) => {
                // Another run claimed it between this one's making it and claiming it: the folder is in its use.
                if let Some(made) = made {
                    made.keep();
                }
                Err(refused)
            }
        }
    }

    /// Whether a run holds `dir` now (a probe that takes no claim for longer than itself: `info` asks it).
    pub fn is_held(dir: &Path) -> bool {
        let Ok(folder) = File::open(dir) else { return false };
        matches!(folder.try_lock_shared(), Err(TryLockError::WouldBlock))
    }

    /// Refuses now where another run holds `dir`, for a command line that checks before its device opens; the
    /// run claims the folder itself later. A folder that does not exist yet is free.
    pub fn check_free(flag: &str, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            drop(Self::claim(flag, dir)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_folder_is_refused_to_another_claim_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let first = RunLock::claim("--out", tmp.path()).unwrap();
        assert!(first._folder.is_some(), "a local folder takes locks");
        // Two opens of one folder conflict even within a process, as a second process's would.
        let refused = RunLock::claim("--out", tmp.path()).unwrap_err().to_string();
        assert!(refused.contains("another run is writing there now"), "{refused}");
        assert!(refused.starts_with(&format!("--out {}:", tmp.path().display())), "{refused}");
        assert!(RunLock::check_free("--out", tmp.path()).is_err());
        assert!(RunLock::is_held(tmp.path()));
        drop(first);
        assert!(!RunLock::is_held(tmp.path()));
        RunLock::check_free("--out", tmp.path()).unwrap();
        let _again = RunLock::claim("--out", tmp.path()).unwrap();
        // A folder not made yet is free; the run claims it once made.
        RunLock::check_free("--out", &tmp.path().join("new")).unwrap();
    }

    #[test]
    fn a_folder_is_made_once_and_removed_only_by_the_run_that_made_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let (claim, made) = RunLock::make_and_claim("--out", &dir).unwrap();
        assert!(dir.is_dir() && made.is_some());
        // A second run finds it made and claimed: refused, and the folder stays.
        let refused = RunLock::make_and_claim("--out", &dir).unwrap_err().to_string();
        assert!(refused.contains("another run is writing there now"), "{refused}");
        assert!(dir.is_dir());
        // The run that made it fails before keeping it: the folder goes, and the claim with it.
        drop((claim, made));
        assert!(!dir.exists());
        // An existing folder is claimed, not made, so a failure leaves it.
        std::fs::create_dir(&dir).unwrap();
        let (_claim, made) = RunLock::make_and_claim("--out", &dir).unwrap();
        assert!(made.is_none());
        let missing = tmp.path().join("no/such/run");
        let err = format!("{:#}", RunLock::make_and_claim("--out", &missing).unwrap_err());
        assert!(err.starts_with(&format!("{}: cannot create", missing.display())), "{err}");
    }
}
