//! Partial outputs: what a command writes beside the path asked for (a file, or a model folder) and renames
//! into place once complete, the demo's scratch folder, and the output folder `adapt` or AdaMerging makes until
//! its first checkpoint ([`Partial::keep`] then). Each is registered while it exists, so that both a failed
//! command (the guard's drop) and an interrupted one (SIGINT, SIGTERM or SIGHUP, once the command line has
//! called [`remove_on_interrupt`]) leave nothing behind. Only SIGKILL or a power cut can leave one, under
//! its hidden name `.NAME.tmp-PID`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The partial outputs of this process that may exist now.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<PathBuf>> {
    // A thread that panicked while holding the lock left the list whole: every change to it is one call.
    PENDING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes `path`, a folder or a file; one that is not there is fine.
fn remove(path: &Path) {
    if std::fs::remove_dir_all(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
}

/// A partial output: removed when dropped, unless [`Partial::finish`] renamed it into place.
#[derive(Debug)]
pub struct Partial {
    path: PathBuf,
    finished: bool,
}

impl Partial {
    /// The partial output of `target`: `.NAME.tmp-PID` beside it, hidden and this process's own. Nothing is
    /// created; a stale one left by an earlier process of the same id is removed.
    pub fn beside(target: &Path) -> Self {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = target.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let mut list = pending();
        remove(&path);
        list.push(path.clone());
        Partial { path, finished: false }
    }

    /// Makes the folder `path` (its parent must exist), whose whole content is scratch, never renamed into
    /// place: removed when dropped. Made and registered under the list's lock, so that an interrupt finds it
    /// either not made yet or registered (made first and registered after, a Ctrl-C between the two left it).
    /// A folder that exists already is an error (`AlreadyExists`), and is not registered: it is not this one's.
    pub fn make_scratch(path: PathBuf) -> std::io::Result<Self> {
        let mut list = pending();
        std::fs::create_dir(&path)?;
        list.push(path.clone());
        Ok(Partial { path, finished: false })
    }

    /// Keeps it after all, where it is: no longer removed when dropped or on an interrupt (an output folder made
    /// by a run, once it holds a checkpoint worth resuming).
    pub fn keep(mut self) {
        pending().retain(|p| p != &self.path);
        self.finished = true;
    }

    /// Where to write.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the complete output to `target`. On an error it stays partial, and is removed when dropped.
    pub fn finish(mut self, target: &Path) -> std::io::Result<()> {
        // Under the lock, so that an interrupt either removes it before the rename or finds it finished.
        let mut list = pending();
        std::fs::rename(&self.path, target)?;
        list.retain(|p| p != &self.path);
        self.finished = true;
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.finished {
            let mut list = pending();
            remove(&self.path);
            list.retain(|p| p != &self.path);
        }
    }
}

/// From now on, SIGINT (Ctrl-C), SIGTERM or SIGHUP removes every partial output, says so on stderr and ends the
/// process with 128 + the signal's number, the status a shell gives a process the signal ended. Call it once,
/// first in `main`, as the command line does; a library user keeps its own signal handling.
pub fn remove_on_interrupt() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
        // Without the handlers, the signals keep their default: the process ends, its partial outputs stay.
        return;
    };
    std::thread::spawn(move || {
        let Some(signal) = signals.forever().next() else { return };
        // Held until the process ends: nothing is renamed into place or registered after this.
        let list = pending();
        list.iter().for_each(|path| remove(path));
        let name = match signal {
            SIGINT => "SIGINT",
            SIGTERM => "SIGTERM",
            _ => "SIGHUP",
        };
        let removed: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
        if removed.is_empty() {
            eprintln!("\ninterrupted by {name}");
        } else {
            eprintln!("\ninterrupted by {name}; removed the partial output {}", removed.join(", "));
        }
        std::process::exit(128 + signal);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(path: &Path) -> bool {
        pending().iter().any(|p| p == path)
    }

    #[test]
    fn a_dropped_partial_output_is_removed_and_a_finished_one_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("model");
        // A folder with a file in it, dropped unfinished (a command that failed half-way).
        let partial = Partial::beside(&target);
        let path = partial.path().to_path_buf();
        assert_eq!(path, tmp.path().join(format!(".model.tmp-{}", std::process::id())));
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("model.safetensors"), b"half").unwrap();
        assert!(registered(&path));
        drop(partial);
        assert!(!path.exists() && !registered(&path));
        assert!(!target.exists());

        // A file, finished: renamed into place and no longer registered, so nothing removes it later.
        let partial = Partial::beside(&target);
        std::fs::write(partial.path(), b"whole").unwrap();
        partial.finish(&target).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert!(!registered(&path));

        // A rename that fails (into a folder that does not exist) leaves it partial, removed when dropped.
        let partial = Partial::beside(&target);
        std::fs::write(partial.path(), b"whole").unwrap();
        let path = partial.path().to_path_buf();
        let err = partial.finish(&tmp.path().join("missing/model")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(!path.exists() && !registered(&path));
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
    }

    #[test]
    fn a_stale_partial_output_of_the_same_name_is_cleared_first() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out.safetensors");
        let stale = tmp.path().join(format!(".out.safetensors.tmp-{}", std::process::id()));
        std::fs::create_dir_all(stale.join("inner")).unwrap();
        let partial = Partial::beside(&target);
        assert!(!stale.exists());
        std::fs::write(partial.path(), b"new").unwrap();
        partial.finish(&target).unwrap();
    }

    #[test]
    fn a_scratch_folder_is_made_registered_and_removed_when_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = tmp.path().join("work");
        let partial = Partial::make_scratch(scratch.clone()).unwrap();
        assert!(scratch.is_dir() && registered(&scratch));
        std::fs::create_dir_all(scratch.join("models")).unwrap();
        // One that exists is not this one's: refused, not registered, left as it is.
        let err = Partial::make_scratch(scratch.clone()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        drop(partial);
        assert!(!scratch.exists() && !registered(&scratch));
        let mine = tmp.path().join("mine");
        std::fs::create_dir(&mine).unwrap();
        assert!(Partial::make_scratch(mine.clone()).is_err() && !registered(&mine) && mine.is_dir());
        // A missing parent: nothing made, nothing registered.
        let deep = tmp.path().join("missing/work");
        assert_eq!(Partial::make_scratch(deep.clone()).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert!(!registered(&deep));
    }
}
