//! Transfer progress: a progress bar when stderr is a terminal, plain lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Time between two plain progress lines.
const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// Progress of one stage-in or stage-out.
pub struct Progress {
    label: &'static str,
    files_total: u64,
    bytes_total: u64,
    files_done: AtomicU64,
    bytes_done: AtomicU64,
    bar: Option<ProgressBar>,
    last_line: Mutex<Instant>,
}

impl Progress {
    pub fn new(label: &'static str, files_total: u64, bytes_total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(bytes_total);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(label);
            bar
        });
        Progress {
            label,
            files_total,
            bytes_total,
            files_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bar,
            last_line: Mutex::new(Instant::now()),
        }
    }

    pub fn add_bytes(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// Takes back bytes of a transfer that will be retried.
    pub fn remove_bytes(&self, bytes: u64) {
        self.bytes_done.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_position(self.bytes_done.load(Ordering::Relaxed));
        }
    }

    pub fn file_done(&self) {
        let done = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.bar {
            Some(bar) => bar.set_message(format!("{done}/{} files", self.files_total)),
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= LINE_INTERVAL {
                    *last = Instant::now();
                    drop(last);
                    self.print_line();
                }
            }
        }
    }

    fn print_line(&self) {
        eprintln!(
            "jobwrap: {}: {}/{} files, {}/{} bytes",
            self.label,
            self.files_done.load(Ordering::Relaxed),
            self.files_total,
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_total
        );
    }

    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => self.print_line(),
        }
    }
}
