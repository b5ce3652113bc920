//! Pods started from a VM template (`vm.template = "auto"`, issue #16), through a private
//! containerd: each pod restored from the same saved guest must still be its own machine
//! (its own randomness, the host's clock), a template made from other inputs is never used,
//! a broken one is made again, and `"off"` boots the kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Points the instance's shims at a private template dir with `mode`, plus `extra` top-level
/// keys. Shims read the config at each pod's start.
fn configure(c: &Containerd, templates: &Path, mode: &str, extra: &str) {
    let base = std::fs::read_to_string(&c.cocoon_config).unwrap();
    let base: String = base
        .lines()
        .take_while(|l| !l.starts_with("template_dir") && !l.starts_with('['))
        .filter(|l| !l.starts_with("kernel_params") && !l.starts_with("vm."))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &c.cocoon_config,
        format!(
            "{base}{extra}template_dir = \"{}\"\n[vm]\ntemplate = \"{mode}\"\n",
            templates.display()
        ),
    )
    .unwrap();
}

/// A private containerd whose shims keep their templates in its own temp dir, with `mode`.
fn start(mode: &str) -> (Containerd, PathBuf) {
    let c = Containerd::start();
    c.import_test_image();
    let templates = c.dir.path().join("templates");
    configure(&c, &templates, mode, "");
    (c, templates)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What one pod reports: 16 bytes of /dev/urandom, a kernel random UUID, its wall clock.
struct Report {
    random: String,
    uuid: String,
    clock: u64,
    host_before: u64,
    host_after: u64,
}

fn run_pod(c: &Containerd, id: &str) -> Report {
    let host_before = unix_now();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        id,
        "sh",
        "-c",
        "date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
         cat /proc/sys/kernel/random/uuid",
    ]);
    let host_after = unix_now();
    assert!(
        out.status.success(),
        "pod {id} failed: {}\ncontainerd log:\n{}",
        text(&out.stderr),
        c.log()
    );
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 3, "pod {id} printed {stdout:?}");
    Report {
        clock: lines[0].parse().unwrap(),
        random: lines[1].to_owned(),
        uuid: lines[2].to_owned(),
        host_before,
        host_after,
    }
}

/// Directories holding a complete template.
fn templates_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return vec![];
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("meta.json").is_file())
        .collect();
    v.sort();
    v
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test]
async fn pods_from_one_template_have_their_own_randomness_and_the_hosts_clock() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, templates) = start("auto");

    let first = run_pod(&c, "tpl-a");
    let made = templates_in(&templates);
    assert_eq!(made.len(), 1, "one template made: {made:?}\n{}", c.log());
    // The template's clock stands still while it is saved; let the host's move on so that a
    // pod without the host's time would show the template's.
    std::thread::sleep(Duration::from_secs(3));
    let second = run_pod(&c, "tpl-b");
    let log = c.log();
    assert_eq!(count(&log, "made VM template"), 1, "{log}");
    assert_eq!(count(&log, "restored from template"), 2, "{log}");
    // The template's RAM was kept with its zero pages as holes, and each pod got a copy of
    // the rest (`template_ram.rs`).
    assert_eq!(count(&log, "the zero pages are holes"), 1, "{log}");
    assert_eq!(count(&log, "MiB of RAM copied"), 2, "{log}");
    assert!(!log.contains("booting the kernel instead"), "{log}");

    assert_ne!(first.random, second.random, "same /dev/urandom bytes");
    assert_ne!(first.uuid, second.uuid, "same kernel random UUID");
    for (name, r) in [("first", &first), ("second", &second)] {
        assert!(
            r.clock + 1 >= r.host_before && r.clock <= r.host_after + 1,
            "{name} pod's clock {} is not the host's ({}..={})",
            r.clock,
            r.host_before,
            r.host_after
        );
    }
    // Nothing of the pods is left; the template stays for the next one.
    c.assert_clean();
    assert_eq!(templates_in(&templates), made);
}

#[tokio::test]
async fn a_template_of_other_inputs_is_not_used_and_a_broken_one_is_made_again() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, templates) = start("auto");
    run_pod(&c, "inputs-a");
    let first = templates_in(&templates);
    assert_eq!(first.len(), 1);

    // Another guest kernel command line is another machine: its own template.
    configure(
        &c,
        &templates,
        "auto",
        "kernel_params = \"cocoon.test=1\"\n",
    );
    run_pod(&c, "inputs-b");
    let both = templates_in(&templates);
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(count(&c.log(), "made VM template"), 2);

    // A state QEMU refuses: the pod still starts (from the kernel) and says why, and the
    // template is made again for the next pod.
    configure(&c, &templates, "auto", "");
    let state = first[0].join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    for b in bytes.iter_mut().skip(64).take(4096) {
        *b = 0xa5;
    }
    std::fs::write(&state, &bytes).unwrap();
    run_pod(&c, "inputs-c");
    let log = c.log();
    assert_eq!(count(&log, "booting the kernel instead"), 1, "{log}");
    run_pod(&c, "inputs-d");
    let log = c.log();
    assert_eq!(count(&log, "made VM template"), 3, "{log}");
    assert_eq!(count(&log, "booting the kernel instead"), 1, "{log}");

    // A truncated state is seen before QEMU starts: made again at once.
    let state = first[0].join("state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    run_pod(&c, "inputs-e");
    let log = c.log();
    assert_eq!(count(&log, "made VM template"), 4, "{log}");
    assert_eq!(count(&log, "booting the kernel instead"), 1, "{log}");
    c.assert_clean();
}

#[tokio::test]
async fn with_the_template_off_pods_boot_the_kernel() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let (c, templates) = start("off");
    let r = run_pod(&c, "off-a");
    assert!(r.clock + 1 >= r.host_before && r.clock <= r.host_after + 1);
    let log = c.log();
    assert!(!log.contains("restored from template"), "{log}");
    assert!(
        !templates.exists(),
        "no template dir with template = \"off\""
    );
    c.assert_clean();
}
