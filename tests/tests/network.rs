//! Pod networking's bad input, through `ctr run --with-ns network:<path>` (the way CRI hands a
//! pod its netns): a missing netns, a netns with nothing to carry, a netlink step that fails.
//! Each netns here is created by the test and removed again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::Command;

use cocoon_tests::containerd::{Containerd, IMAGE, RUNTIME};
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
}

/// A network namespace made by this test, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("cocoon-{tag}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name]);
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    fn run(&self, args: &[&str]) {
        let mut a = vec!["ip", "netns", "exec", &self.0];
        a.extend_from_slice(args);
        sh(&a);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_in(c: &Containerd, id: &str, netns: &str, cmd: &[&str]) -> std::process::Output {
    let ns = format!("network:{netns}");
    let mut a = vec![
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--with-ns",
        &ns,
        IMAGE,
        id,
    ];
    a.extend_from_slice(cmd);
    c.ctr(&a)
}

#[tokio::test]
async fn bad_network_namespaces_fail_clearly_or_give_lo_only() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    let c = Containerd::start();
    c.import_test_image();

    // A netns path that does not exist: the error names it.
    let missing = "/var/run/netns/cocoon-no-such-netns";
    let out = run_in(&c, "missing", missing, &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(missing),
        "the error should name {missing}: {}",
        text(&out.stderr)
    );

    // A netns with no addressed interface: a pod with `lo` only, and lo is up.
    let empty = Netns::new("empty");
    let out = run_in(&c, "lo-only", &empty.path(), &["ip", "-o", "link"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let links: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        .collect();
    assert_eq!(links, ["lo"], "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("UP"),
        "lo is up: {}",
        text(&out.stdout)
    );

    // A netlink step that fails (the interface already has an ingress qdisc): the error names
    // the interface, and the pod is not started half-wired.
    let busy = Netns::new("busy");
    busy.run(&[
        "ip", "link", "add", "busy0", "type", "veth", "peer", "name", "busy1",
    ]);
    busy.run(&["ip", "addr", "add", "10.232.0.2/24", "dev", "busy0"]);
    busy.run(&["ip", "link", "set", "busy0", "up"]);
    busy.run(&["tc", "qdisc", "add", "dev", "busy0", "ingress"]);
    let out = run_in(&c, "busy", &busy.path(), &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("busy0"),
        "the error should name busy0: {}",
        text(&out.stderr)
    );
    // Nothing of the attempt is left in the netns: no tap.
    let links = Command::new("ip")
        .args(["netns", "exec", &busy.0, "ip", "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !text(&links.stdout).contains("_cocoon"),
        "{}",
        text(&links.stdout)
    );
    c.assert_clean();
}
