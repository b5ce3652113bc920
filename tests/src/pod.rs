//! A pod VM booted for container tests and driven through the agent API: the sandbox, busybox
//! rootfs dirs on its share, the host ends of a process's stdio, and request helpers.

use cocoon_protocol::agent::StdioStreams;
use cocoon_shim::sandbox::{Sandbox, StdioKind};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use vmm_driver::vsock::BoxedStream;

use crate::config::{backend_config, test_hypervisor};
use crate::gate::{Gate, Need};
use crate::leaks::assert_no_leaks;
use crate::oci::busybox_rootfs;

/// A booted pod VM for container tests; holds the test's [`Gate`], and so its turn on the VM
/// lock, for its lifetime.
#[derive(Debug)]
pub struct Pod {
    pub sb: Sandbox,
    pub state: tempfile::TempDir,
    _gate: Gate,
}

/// The host ends of one process's stdio.
#[derive(Debug, Default)]
pub struct Io {
    pub stdin: Option<BoxedStream>,
    pub stdout: Option<JoinHandle<Vec<u8>>>,
    pub stderr: Option<JoinHandle<Vec<u8>>>,
}

fn drain(mut s: BoxedStream) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    })
}

impl Io {
    pub async fn output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let out = match self.stdout.take() {
            Some(h) => h.await.unwrap(),
            None => vec![],
        };
        let err = match self.stderr.take() {
            Some(h) => h.await.unwrap(),
            None => vec![],
        };
        (out, err)
    }
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(std::time::Duration::from_secs(30))
}

impl Pod {
    /// Boots a pod VM with the selected hypervisor, named `name`, under `gate`: the pass of a
    /// test that needs [`Need::selected_guest`].
    pub async fn boot(gate: Gate, name: &str) -> Pod {
        let need = Need::Guest(test_hypervisor());
        assert!(
            gate.needs().contains(&need),
            "Pod::boot({name}): the test's gate was not passed with {need:?}"
        );
        let state = tempfile::tempdir().unwrap();
        let cfg = backend_config(state.path());
        let sb = Sandbox::boot(&cfg, &vmm_driver::VmSpec::from_config(&cfg, name))
            .await
            .unwrap();
        Pod {
            sb,
            state,
            _gate: gate,
        }
    }

    /// Lays out a busybox rootfs for `cid` and mounts it where the shim would (a bind onto
    /// itself below the host-only dir, so the guest sees it writable under a read-only share);
    /// returns its share-relative path.
    pub fn rootfs(&self, cid: &str) -> String {
        let dir = self.sb.host_dir().join(cid).join("rootfs");
        busybox_rootfs(&dir);
        // Once per id: a container created again reuses its mount, as the shim's would be.
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()));
        if !mounted {
            let none: Option<&str> = None;
            nix::mount::mount(Some(&dir), &dir, none, nix::mount::MsFlags::MS_BIND, none).unwrap();
        }
        format!("{cid}/rootfs")
    }

    /// Opens the streams `stdio` asks for, before the call that claims them.
    pub async fn io(&self, cid: &str, eid: &str, stdio: &StdioStreams) -> Io {
        let mut io = Io::default();
        if stdio.stdin {
            io.stdin = Some(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stdin)
                    .await
                    .unwrap(),
            );
        }
        if stdio.stdout {
            io.stdout = Some(drain(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stdout)
                    .await
                    .unwrap(),
            ));
        }
        if stdio.stderr && !stdio.terminal {
            io.stderr = Some(drain(
                self.sb
                    .open_stdio(cid, eid, StdioKind::Stderr)
                    .await
                    .unwrap(),
            ));
        }
        io
    }

    /// Stops the VM after removing the test's rootfs dirs, then checks nothing is left.
    pub async fn shutdown(self) {
        if let Ok(entries) = std::fs::read_dir(self.sb.host_dir()) {
            // Container dirs only: the driver's own files (the agent key) go with the VM.
            for e in entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            {
                let rootfs = e.path().join("rootfs");
                let _ = nix::mount::umount2(
                    &rootfs,
                    nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
                );
                std::fs::remove_dir_all(e.path()).unwrap();
            }
        }
        self.sb.shutdown().await.unwrap();
        assert_no_leaks(self.state.path());
    }
}

pub fn streams(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> StdioStreams {
    StdioStreams {
        stdin,
        stdout,
        stderr,
        terminal,
        ..Default::default()
    }
}
