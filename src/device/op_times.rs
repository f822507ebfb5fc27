//! Where a command's time goes, operation by operation: with `WEMOE_OP_TIMES=1` in the environment each
//! backend operation is timed (wall time, its threads included), and [`report`] tabulates them; the command
//! line prints that table to stderr when it exits. Without the variable an operation costs one check of a
//! flag read once.
//!
//! An operation that runs others (the CUDA backend's `linear_act` runs `linear` when it has no fused kernel)
//! counts once, as itself, so the rows add up to the time spent in the backend; the rest of a command (loading,
//! writing, the tape's bookkeeping) is not in the table. On a GPU, whose operations return before their
//! kernels finish, each timed operation first waits for the work queued before it and then for its own: the
//! table then shows each operation's device time, and the command runs slower than untimed.

use std::cell::Cell;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The environment variable that turns timing on (any value but empty or `0`).
pub const ENV: &str = "WEMOE_OP_TIMES";

/// Per operation: (name, seconds, calls), in order of first call.
static TIMES: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());

/// Whether operations are timed in this process.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(ENV).is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// A device whose operations return before their work ends: what a timer waits for.
pub(crate) trait DeviceQueue {
    /// Waits for all work queued so far (errors are left for the next real wait to report).
    fn wait(&self);
}

thread_local! {
    /// Operations running on this thread: only the outermost is timed.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// Times one operation from its creation to its drop, when [`enabled`] and not inside another timed one.
pub(crate) struct OpTimer<'a> {
    name: &'static str,
    start: Option<Instant>,
    queue: Option<&'a dyn DeviceQueue>,
}

impl<'a> OpTimer<'a> {
    /// Starts timing operation `name` (a CPU backend's: its work is done when it returns).
    pub(crate) fn start(name: &'static str) -> Self {
        Self::start_on(name, None)
    }

    /// Starts timing operation `name` of a device whose work `queue` holds until it ends.
    pub(crate) fn start_queued(name: &'static str, queue: &'a dyn DeviceQueue) -> Self {
        Self::start_on(name, Some(queue))
    }

    fn start_on(name: &'static str, queue: Option<&'a dyn DeviceQueue>) -> Self {
        if !enabled() {
            return OpTimer { name, start: None, queue: None };
        }
        let outermost = DEPTH.with(|depth| {
            depth.set(depth.get() + 1);
            depth.get() == 1
        });
        if outermost {
            queue.inspect(|q| q.wait());
        }
        OpTimer { name, start: outermost.then(Instant::now), queue }
    }
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if !enabled() {
            return;
        }
        DEPTH.with(|depth| depth.set(depth.get() - 1));
        let Some(start) = self.start else { return };
        if let Some(queue) = self.queue {
            queue.wait();
        }
        let seconds = start.elapsed().as_secs_f64();
        // A poisoned lock only means another thread panicked while adding; the table is still whole.
        let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        match times.iter_mut().find(|(name, _, _)| *name == self.name) {
            Some(row) => {
                row.1 += seconds;
                row.2 += 1;
            }
            None => times.push((self.name, seconds, 1)),
        }
    }
}

/// The operations timed so far, the longest first: name, calls, total and mean time, share of the total.
/// `None` when timing is off or nothing ran.
pub fn report() -> Option<String> {
    table(TIMES.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// [`report`], then forgets what was timed: one table for each of several runs in one program.
pub fn take_report() -> Option<String> {
    table(std::mem::take(&mut *TIMES.lock().unwrap_or_else(|e| e.into_inner())))
}

/// [`report`]'s table of `rows` (name, seconds, calls).
fn table(mut rows: Vec<(&'static str, f64, u64)>) -> Option<String> {
    if rows.is_empty() {
        return None;
    }
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|r| r.1).sum();
    let mut out =
        format!("{:<28} {:>8} {:>10} {:>10} {:>6}\n", "backend operation", "calls", "total s", "mean ms", "share");
    for (name, seconds, calls) in &rows {
        out += &format!(
            "{name:<28} {calls:>8} {seconds:>10.3} {:>10.3} {:>5.1}%\n",
            1e3 * seconds / *calls as f64,
            100.0 * seconds / total
        );
    }
    out += &format!("{:<28} {:>8} {total:>10.3}\n", "all", rows.iter().map(|r| r.2).sum::<u64>());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table orders operations by time, with each one's mean and share and the totals.
    #[test]
    fn table_lists_the_longest_first_with_means_and_shares() {
        assert_eq!(table(Vec::new()), None);
        let text = table(vec![("fast", 0.5, 2), ("slow", 1.5, 1)]).expect("rows");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("slow") && lines[2].starts_with("fast"), "{text}");
        assert!(lines[2].contains(" 2 ") && lines[2].contains("250.000") && lines[2].contains("25.0%"), "{text}");
        assert!(lines[3].starts_with("all") && lines[3].contains(" 3 ") && lines[3].contains("2.000"), "{text}");
    }
}
