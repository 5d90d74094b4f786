//! Progress bars for long commands (`format --preallocate`, `chaos`), on stderr and only on a
//! terminal: when stderr is a file or a pipe (a service, a test, a script) nothing is drawn.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` bytes.
pub fn bytes(len: u64, what: &str) -> ProgressBar {
    bar(len, what, "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
}

/// A bar of `len` milliseconds of a timed run.
pub fn millis(len: u64, what: &str) -> ProgressBar {
    bar(len, what, "{msg} [{bar:40}] {elapsed}/{duration}")
}

fn bar(len: u64, what: &str, template: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}
