//! GuestStats: the guest's memory and CPU as its kernel counts them, for `cocoon monitor`.

use cocoon_protocol::agent::GuestStatsResponse;

/// `/proc/stat` counts in USER_HZ, which the kernel's ABI fixes at 100 on x86.
const USEC_PER_TICK: u64 = 10_000;

/// Reads `/proc/meminfo` and `/proc/stat`; a field that can't be read is 0.
pub fn read() -> GuestStatsResponse {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let (busy, idle) = cpu_usec(&stat);
    GuestStatsResponse {
        mem_total_kib: meminfo_kib(&meminfo, "MemTotal"),
        mem_available_kib: meminfo_kib(&meminfo, "MemAvailable"),
        cpu_busy_usec: busy,
        cpu_idle_usec: idle,
        ..Default::default()
    }
}

fn meminfo_kib(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (busy, idle) from the aggregate `cpu` line: user nice system idle iowait irq softirq steal
/// (guest time is already inside user).
fn cpu_usec(stat: &str) -> (u64, u64) {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let idle = at(3) + at(4);
    (busy * USEC_PER_TICK, idle * USEC_PER_TICK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read() {
        let meminfo = "MemTotal:         230000 kB\nMemFree:  1 kB\nMemAvailable:     190000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), 230_000);
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), 190_000);
        assert_eq!(meminfo_kib(meminfo, "Nope"), 0);
        let stat = "cpu  10 1 5 100 4 2 3 0 0 0\ncpu0 10 1 5 100 4 2 3 0 0 0\n";
        assert_eq!(cpu_usec(stat), (21 * 10_000, 104 * 10_000));
    }
}
