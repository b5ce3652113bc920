//! Cocoon's cold-start phases, read back from containerd's log for `make bench`.

use std::collections::BTreeMap;

use cocoon_shim::phase::{Phase, PhaseLine};
use serde_json::Value;

/// Cocoon's phases per cold run, from the shim's phase lines in containerd's log (the shim
/// writes them with `cocoon_shim::phase::PhaseLine`, and this reads them back with the same
/// type) and containerd's timestamps; the runs are the containers `<prefix>-0..runs`.
pub fn phases(log: &str, prefix: &str, runs: usize) -> Value {
    let ts = |line: &str| -> Option<f64> {
        let t = line.split("time=\"").nth(1)?.split('"').next()?;
        // 2026-11-27T22:28:34.298072964Z -> seconds of the day
        let clock = t.split('T').nth(1)?.trim_end_matches('Z');
        let mut it = clock.split(':');
        let (h, m, s): (f64, f64, f64) = (
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        );
        Some((h * 3600.0 + m * 60.0 + s) * 1000.0)
    };
    // (phase line, containerd's time of it in ms of the day)
    let lines: Vec<(PhaseLine, f64)> = log
        .lines()
        .filter_map(|l| Some((PhaseLine::find(l)?, ts(l)?)))
        .collect();
    let mut cols: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..runs {
        let id = format!("{prefix}-{i}");
        let at = |want: fn(&Phase) -> bool| {
            lines.iter().find(|(p, _)| {
                p.process.container_id == id && p.process.is_init() && want(&p.phase)
            })
        };
        let (Some(begin), Some(booted), Some(created), Some(started), Some(exited), Some(deleted)) = (
            at(|p| *p == Phase::CreateBegin),
            at(|p| matches!(p, Phase::Booted { .. })),
            at(|p| *p == Phase::Created),
            at(|p| *p == Phase::Started),
            at(|p| *p == Phase::Exited),
            at(|p| *p == Phase::Deleted),
        ) else {
            continue;
        };
        let Phase::Booted {
            vmm_started,
            agent_ready,
        } = booted.0.phase
        else {
            continue;
        };
        let (vmm, agent) = (
            vmm_started.as_secs_f64() * 1000.0,
            agent_ready.as_secs_f64() * 1000.0,
        );
        let (b, c, s, e, d) = (begin.1, created.1, started.1, exited.1, deleted.1);
        cols.entry("1 vmm launch (helpers + qemu + QMP; + restore from the template)")
            .or_default()
            .push(vmm);
        cols.entry("2 guest to agent ready (kernel boot, or resume)")
            .or_default()
            .push(agent - vmm);
        cols.entry("3 container create (rootfs, stdio, runner)")
            .or_default()
            .push((c - b) - agent);
        cols.entry("4 start").or_default().push(s - c);
        cols.entry("5 run to exit (`true`)")
            .or_default()
            .push(e - s);
        cols.entry("6 delete + VM teardown")
            .or_default()
            .push(d - e);
    }
    crate::stats::summaries(cols)
}
