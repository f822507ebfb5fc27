//! Progress bars on stderr: shown on a terminal, hidden with `--quiet` or when stderr is redirected.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar counting `total` images, labelled `what`.
pub fn images(what: &str, total: usize, quiet: bool) -> ProgressBar {
    counted(what, total, "images", quiet)
}

/// A bar counting `total` optimisation steps, labelled `what`, with the last loss as its message.
pub fn steps(what: &str, total: u64, quiet: bool) -> ProgressBar {
    let target = if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(Some(total), target);
    let template = "{prefix:>12} [{bar:30}] {pos}/{len} steps, loss {msg}, {per_sec}, eta {eta}";
    bar.set_style(ProgressStyle::with_template(template).expect("the template is valid").progress_chars("=> "));
    bar.set_prefix(what.to_string());
    bar
}

/// The end of a run of steps, for its closing line: the last step's loss, or that its checkpoint already held
/// every step (a resumed run with none left to take).
pub fn last_loss(last: Option<f64>) -> String {
    last.map_or_else(|| "every step from its checkpoint".into(), |loss| format!("last loss {loss:.4}"))
}

/// A bar counting `total` things called `unit`, labelled `what`.
pub fn counted(what: &str, total: usize, unit: &str, quiet: bool) -> ProgressBar {
    let target = if quiet { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() };
    let bar = ProgressBar::with_draw_target(Some(total as u64), target);
    let template = format!("{{prefix:>12}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{per_sec}}, eta {{eta}}");
    let style = ProgressStyle::with_template(&template).expect("the template is valid").progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}
