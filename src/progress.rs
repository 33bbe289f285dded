//! Progress bars on stderr, hidden when stderr is not a terminal or when `--quiet` is given.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

fn visible(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// A spinner with a message, for work of unknown length.
pub fn spinner(quiet: bool, msg: String) -> ProgressBar {
    let pb = if visible(quiet) {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    };
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// A bar over `len` items named `unit`, with rate and ETA.
pub fn bar(quiet: bool, len: u64, unit: &str) -> ProgressBar {
    if !visible(quiet) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let tmpl = format!("{{msg:>10}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    pb.set_style(
        ProgressStyle::with_template(&tmpl).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "),
    );
    pb
}

/// Whether stderr may carry colour escapes: a terminal, and NO_COLOR unset
/// (<https://no-color.org>).
pub fn color_ok() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
