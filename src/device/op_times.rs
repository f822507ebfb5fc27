//! Where a command's time goes, operation by operation: with `WEMOE_OP_TIMES=1` in the environment each
//! backend operation is timed (wall time, its threads included), and [`report`] tabulates them; the command
//! line prints that table to stderr when it exits. Without the variable an operation costs one check of a
//! flag read once.
//!
//! Operations that multiply matrices also count their products' floating-point operations (two per
//! multiply-add, from their shapes: [`flops`](super::flops)); the table gives their rates and, last, the
//! products' total and rate over the run: how near the device's peak the command ran. The merges of expert
//! weights and the element-wise work are not counted, so the rate compares with a dense GEMM's.
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

/// What was timed of one operation.
#[derive(Clone, Debug, PartialEq)]
pub struct OpRow {
    /// The backend operation.
    pub name: &'static str,
    /// Its wall time in all, seconds.
    pub seconds: f64,
    /// How often it ran.
    pub calls: u64,
    /// The floating-point operations of its products in all (0 for an operation that multiplies no matrices).
    pub flops: f64,
}

/// Per operation, in order of first call.
static TIMES: Mutex<Vec<OpRow>> = Mutex::new(Vec::new());

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
    flops: f64,
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
            return OpTimer { name, start: None, queue: None, flops: 0.0 };
        }
        let outermost = DEPTH.with(|depth| {
            depth.set(depth.get() + 1);
            depth.get() == 1
        });
        if outermost {
            queue.inspect(|q| q.wait());
        }
        OpTimer { name, start: outermost.then(Instant::now), queue, flops: 0.0 }
    }

    /// Records the floating-point operations of this call's products (see [`flops`](super::flops)).
    pub(crate) fn count(&mut self, flops: f64) {
        self.flops = flops;
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
        match times.iter_mut().find(|row| row.name == self.name) {
            Some(row) => {
                row.seconds += seconds;
                row.calls += 1;
                row.flops += self.flops;
            }
            None => times.push(OpRow { name: self.name, seconds, calls: 1, flops: self.flops }),
        }
    }
}

/// The operations timed so far, the longest first: name, calls, total and mean time, share of the total, and
/// for products their rate; then the products' total. `None` when timing is off or nothing ran.
pub fn report() -> Option<String> {
    table(rows())
}

/// [`report`], then forgets what was timed: one table for each of several runs in one program.
pub fn take_report() -> Option<String> {
    table(take_rows())
}

/// The operations timed so far, in order of first call.
pub fn rows() -> Vec<OpRow> {
    TIMES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// [`rows`], then forgets them.
pub fn take_rows() -> Vec<OpRow> {
    std::mem::take(&mut *TIMES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// [`report`]'s table of `rows`.
fn table(mut rows: Vec<OpRow>) -> Option<String> {
    if rows.is_empty() {
        return None;
    }
    rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let total: f64 = rows.iter().map(|r| r.seconds).sum();
    let rate = |flops: f64, seconds: f64| if seconds > 0.0 { flops / seconds / 1e9 } else { 0.0 };
    let mut out = format!(
        "{:<28} {:>8} {:>10} {:>10} {:>6} {:>9}\n",
        "backend operation", "calls", "total s", "mean ms", "share", "GFLOP/s"
    );
    for row in &rows {
        out += &format!(
            "{:<28} {:>8} {:>10.3} {:>10.3} {:>5.1}%",
            row.name,
            row.calls,
            row.seconds,
            1e3 * row.seconds / row.calls as f64,
            100.0 * row.seconds / total
        );
        if row.flops > 0.0 {
            out += &format!(" {:>9}", three_figures(rate(row.flops, row.seconds)));
        }
        out.push('\n');
    }
    out += &format!("{:<28} {:>8} {total:>10.3}\n", "all", rows.iter().map(|r| r.calls).sum::<u64>());
    let products: Vec<&OpRow> = rows.iter().filter(|r| r.flops > 0.0).collect();
    if !products.is_empty() {
        let (flops, seconds): (f64, f64) =
            (products.iter().map(|r| r.flops).sum(), products.iter().map(|r| r.seconds).sum());
        out += &format!(
            "products: {} GFLOP in {seconds:.3} s ({:.1}% of the time), {} GFLOP/s\n",
            three_figures(flops / 1e9),
            100.0 * seconds / total,
            three_figures(rate(flops, seconds))
        );
    }
    Some(out)
}

/// `v` to at least three significant figures and one decimal (580.5, 57.8, 4.40, 0.00420): a small model's
/// products still show.
fn three_figures(v: f64) -> String {
    let decimals = if v > 0.0 { (2 - v.log10().floor() as i32).clamp(1, 9) as usize } else { 1 };
    format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table orders operations by time, with each one's mean and share and the totals.
    #[test]
    fn table_lists_the_longest_first_with_means_and_shares() {
        assert_eq!(table(Vec::new()), None);
        let row = |name, seconds, calls, flops| OpRow { name, seconds, calls, flops };
        let text = table(vec![row("fast", 0.5, 2, 0.0), row("slow", 1.5, 1, 0.0)]).expect("rows");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("slow") && lines[2].starts_with("fast"), "{text}");
        assert!(lines[2].contains(" 2 ") && lines[2].contains("250.000") && lines[2].contains("25.0%"), "{text}");
        assert!(lines[3].starts_with("all") && lines[3].contains(" 3 ") && lines[3].contains("2.000"), "{text}");
        assert_eq!(lines.len(), 4, "no products line without products: {text}");
    }

    /// Products get their rate, and a last line sums them; other operations leave the column empty.
    #[test]
    fn products_show_their_rate_and_their_total() {
        let row = |name, seconds, calls, flops| OpRow { name, seconds, calls, flops };
        let text = table(vec![row("linear", 2.0, 4, 300e9), row("add", 1.0, 4, 0.0), row("attention", 0.5, 1, 20e9)])
            .expect("rows");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].ends_with("GFLOP/s"), "{text}");
        assert!(lines[1].starts_with("linear") && lines[1].ends_with(" 150.0"), "{text}");
        assert!(lines[2].starts_with("add") && lines[2].ends_with('%'), "{text}");
        assert!(lines[3].starts_with("attention") && lines[3].ends_with(" 40.0"), "{text}");
        assert_eq!(lines[5], "products: 320.0 GFLOP in 2.500 s (71.4% of the time), 128.0 GFLOP/s", "{text}");
        let text = table(vec![row("linear", 0.002, 1, 8.4e6)]).expect("rows");
        assert!(text.lines().nth(1).is_some_and(|l| l.ends_with(" 4.20")), "{text}");
        assert!(text.ends_with("products: 0.00840 GFLOP in 0.002 s (100.0% of the time), 4.20 GFLOP/s\n"), "{text}");
    }
}
