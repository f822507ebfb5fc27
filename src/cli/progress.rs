//! Progress on stderr: bars on a terminal; where stderr is a file or a pipe (a log, a batch job), the bar's line
//! once a minute ([`LogLines`]); nothing with `--quiet`.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// Seconds between progress lines when stderr is not a terminal, unless `WEMOE_PROGRESS_SECONDS` says otherwise.
const LOG_INTERVAL_SECONDS: u64 = 60;

/// Where a bar draws: stderr's terminal, a log's lines ([`LogLines`]), or nowhere with `quiet`.
pub fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet {
        ProgressDrawTarget::hidden()
    } else if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        // Drawn at most once a second; LogLines keeps one draw a minute.
        let lines = LogLines::new(log_interval(), Box::new(std::io::stderr()));
        ProgressDrawTarget::term_like_with_hz(Box::new(lines), 1)
    }
}

/// The interval between progress lines in a log: `WEMOE_PROGRESS_SECONDS` (0: every draw) or a minute; read once,
/// with a note when it is not a whole number of seconds.
fn log_interval() -> Duration {
    static INTERVAL: OnceLock<Duration> = OnceLock::new();
    *INTERVAL.get_or_init(|| {
        let seconds = match std::env::var("WEMOE_PROGRESS_SECONDS") {
            Err(_) => LOG_INTERVAL_SECONDS,
            Ok(v) => v.trim().parse().unwrap_or_else(|_| {
                eprintln!(
                    "note: WEMOE_PROGRESS_SECONDS='{v}' is not a whole number of seconds; progress lines come every \
                     {LOG_INTERVAL_SECONDS} s"
                );
                LOG_INTERVAL_SECONDS
            }),
        };
        Duration::from_secs(seconds)
    })
}

/// A bar's draws as plain lines, one per `interval` at most, the first `interval` after the first bar began: a log
/// of a long run says how far it got, and a short run's log stays as it was. The clock is the process's, not the
/// bar's, so that a command of many short bars (`eval` over many tasks) still reports. Cursor moves and clears,
/// which redraw a bar in place on a terminal, only reset the line being drawn.
pub struct LogLines {
    interval: Duration,
    /// The draw so far, since the last clear.
    line: Mutex<String>,
    out: Mutex<Box<dyn Write + Send>>,
}

/// When the last progress line was written, or the first bar made.
fn last_line() -> &'static Mutex<Instant> {
    static LAST_LINE: OnceLock<Mutex<Instant>> = OnceLock::new();
    LAST_LINE.get_or_init(|| Mutex::new(Instant::now()))
}

fn locked<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LogLines {
    /// Lines to `out`.
    pub fn new(interval: Duration, out: Box<dyn Write + Send>) -> Self {
        last_line();
        LogLines { interval, line: Mutex::new(String::new()), out: Mutex::new(out) }
    }
}

impl std::fmt::Debug for LogLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLines").field("interval", &self.interval).finish_non_exhaustive()
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        // Wide enough that a bar's line is never wrapped; the filler after it is trimmed.
        200
    }

    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }

    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }

    fn write_str(&self, s: &str) -> std::io::Result<()> {
        let mut line = locked(&self.line);
        match s.rfind('\r') {
            Some(at) => *line = s[at + 1..].to_string(),
            None => line.push_str(s),
        }
        Ok(())
    }

    fn clear_line(&self) -> std::io::Result<()> {
        locked(&self.line).clear();
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        let drawn = std::mem::take(&mut *locked(&self.line));
        let drawn = drawn.trim();
        let mut last = locked(last_line());
        if drawn.is_empty() || last.elapsed() < self.interval {
            return Ok(());
        }
        *last = Instant::now();
        let mut out = locked(&self.out);
        writeln!(out, "{drawn}")?;
        out.flush()
    }
}

/// A bar counting `total` images, labelled `what`.
pub fn images(what: &str, total: usize, quiet: bool) -> ProgressBar {
    counted(what, total, "images", quiet)
}

/// A bar counting `total` optimisation steps, labelled `what`, with the last loss as its message.
pub fn steps(what: &str, total: u64, quiet: bool) -> ProgressBar {
    let template = "{prefix:>12} [{bar:30}] {pos}/{len} steps, loss {msg}, {per_sec}, eta {eta}";
    ProgressBar::with_draw_target(Some(total), target(quiet))
        .with_style(ProgressStyle::with_template(template).expect("the template is valid").progress_chars("=> "))
        .with_prefix(what.to_string())
        // Until the first step reports one.
        .with_message("-")
}

/// The end of a run of steps, for its closing line: the last step's loss, or that its checkpoint already held
/// every step (a resumed run with none left to take).
pub fn last_loss(last: Option<f64>) -> String {
    last.map_or_else(|| "every step from its checkpoint".into(), |loss| format!("last loss {loss:.4}"))
}

/// A bar counting `total` things called `unit`, labelled `what`.
pub fn counted(what: &str, total: usize, unit: &str, quiet: bool) -> ProgressBar {
    let template = format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}}");
    let style = ProgressStyle::with_template(&template).expect("the template is valid").progress_chars("=> ");
    ProgressBar::with_draw_target(Some(total as u64), target(quiet)).with_style(style).with_prefix(what.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A log shared with the test that reads it.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl Write for Log {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            locked(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The lines an adaptation's bar leaves in a log with `interval` between lines.
    fn adapt_log(interval: Duration) -> String {
        let log = Log::default();
        let bar = steps("adapt", 3, true);
        bar.set_draw_target(ProgressDrawTarget::term_like(Box::new(LogLines::new(interval, Box::new(log.clone())))));
        for (step, loss) in [(1, 3.25), (2, 3.125), (3, 3.0)] {
            bar.set_position(step);
            bar.set_message(format!("{loss:.4}"));
        }
        bar.finish_and_clear();
        let text = String::from_utf8(locked(&log.0).clone()).unwrap();
        text
    }

    #[test]
    fn a_log_gets_the_bars_lines_without_cursor_moves_or_padding() {
        let log = adapt_log(Duration::ZERO);
        let lines: Vec<&str> = log.lines().collect();
        // Each draw is a line of its own: the step, then its loss.
        assert!(lines.iter().any(|l| l.starts_with("adapt [") && l.contains("] 2/3 steps, loss 3.1250, ")), "{log}");
        assert!(lines.iter().any(|l| l.contains("] 3/3 steps, loss 3.0000, ")), "{log}");
        assert!(lines.iter().all(|l| l == &l.trim() && !l.contains(['\r', '\x1b'])), "{log:?}");
    }

    #[test]
    fn a_log_gets_no_line_before_the_interval() {
        assert_eq!(adapt_log(Duration::from_secs(3600)), "");
    }
}
