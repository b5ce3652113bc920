//! Log lines on the serial console, stamped with guest uptime so they line up with the
//! kernel's own messages in `console.log`.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};
use nix::time::{clock_gettime, ClockId};

struct Console;

static LOGGER: Console = Console;

/// Uptime in milliseconds (CLOCK_BOOTTIME, the clock the kernel log uses).
pub fn uptime_ms() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            let ms = t.tv_sec() * 1000 + t.tv_nsec() / 1_000_000;
            u64::try_from(ms).unwrap_or(0)
        })
        .unwrap_or(0)
}

impl Log for Console {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ms = uptime_ms();
        let line = format!(
            "[{:5}.{:03}] cocoon-agent {}: {}\n",
            ms / 1000,
            ms % 1000,
            r.level(),
            r.args()
        );
        // One write per line so lines from different tasks don't interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the console logger at `level` (from `cocoon.log=` on the kernel command line).
pub fn init(level: &str) {
    let filter = match level {
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => LevelFilter::Info,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(filter);
    }
}
