//! The agent's channel over virtio-serial (`vsock = "serial"`, issue #30 item 1): a pod whose
//! agent is reached through a yamux session on a virtio-serial port has no vsock device and no
//! vhost-device-vsock, and its calls, exec and stdio cross it while another stream of the pod
//! stalls. `make test` also runs the ctr, restart and lean-pod suites (a late share plug
//! included) on it. Real containerd, real VMs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::io::Write;
use std::process::Stdio;

use cocoon_tests::containerd::{containerd_bin, Containerd};
use cocoon_tests::leaks::{pids_named, processes_mentioning};
use cocoon_tests::{gate, Need};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ctr task exec` of `cmd` in the pod, with its stdout and stderr piped to the test.
fn exec_child(c: &Containerd, exec_id: &str, cmd: &str, stdin: Stdio) -> std::process::Child {
    std::process::Command::new(containerd_bin("ctr"))
        .arg("--address")
        .arg(&c.address)
        .args(["task", "exec", "--exec-id", exec_id, "serial", cmd])
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_pod_on_the_serial_channel_has_no_vsock_and_its_streams_do_not_wait_on_each_other() {
    let Some(_gate) = gate(&[Need::selected_guest()]).await else {
        return;
    };
    // The only test of this binary: the setting reaches the cocoon.toml of this containerd.
    std::env::set_var("COCOON_TEST_VSOCK", "serial");
    let c = Containerd::start();
    c.import_test_image();
    c.run_detached("serial", &["sleep", "600"]);
    let vm = pids_named(&c.cocoon_state, "qemu-system-x86_64");
    assert_eq!(vm.len(), 1);
    let procs = processes_mentioning(&c.cocoon_state);
    assert!(
        !procs.iter().any(|p| p.contains("vhost-device-vsock")),
        "the serial channel needs no vhost-device-vsock: {procs:#?}"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", vm[0]))
        .unwrap()
        .replace('\0', " ");
    assert!(cmdline.contains("virtserialport"), "{cmdline}");
    assert!(!cmdline.contains("vsock-pci"), "{cmdline}");

    // A process whose output nobody reads fills its stream's window; exec and stdin to
    // another process of the pod still go through.
    let mut stalled = exec_child(&c, "flood", "yes", Stdio::null());
    std::thread::sleep(std::time::Duration::from_secs(2));
    let input: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut cat = exec_child(&c, "cat", "cat", Stdio::piped());
    let mut stdin = cat.stdin.take().unwrap();
    let feed = {
        let input = input.clone();
        std::thread::spawn(move || {
            stdin.write_all(&input).unwrap();
        })
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(cat.wait_with_output());
    });
    let out = done_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("stdin and stdout of one process waited on another process's stalled stream")
        .unwrap();
    feed.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        out.stdout == input,
        "1 MiB of stdin did not come back intact"
    );
    let _ = stalled.kill();
    let _ = stalled.wait();

    c.kill_and_remove("serial");
    c.assert_clean();
}
