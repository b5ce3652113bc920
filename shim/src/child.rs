//! Running a short-lived host program from the shim (an OCI hook, `mkfs.erofs`) and getting
//! its exit status.
//!
//! The shim library reaps every child on SIGCHLD (`waitpid(-1)`, its subreaper duty) and
//! publishes the status to subscribers: if it wins the race, tokio's wait says ECHILD and the
//! status comes from there. The subscription is made before the spawn, so the status can't be
//! missed.

use std::time::Duration;

use containerd_shim::asynchronous::monitor::{
    monitor_subscribe, monitor_unsubscribe, Subscription,
};
use containerd_shim::monitor::{Subject, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `cmd` with `stdin` on its standard input and its stdout discarded, for at most
/// `timeout` (then it is killed); returns its exit code (128 + the signal if one ended it) and
/// its stderr. `Err` says what went wrong, naming `what`.
pub async fn run(
    mut cmd: tokio::process::Command,
    what: &str,
    stdin: &[u8],
    timeout: Duration,
) -> Result<(i32, String), String> {
    let mut exits = monitor_subscribe(Topic::Pid)
        .await
        .map_err(|e| format!("subscribe to child exits: {e}"))?;
    let ran = spawn_and_wait(&mut cmd, what, stdin, timeout, &mut exits).await;
    let _ = monitor_unsubscribe(exits.id).await;
    ran
}

async fn spawn_and_wait(
    cmd: &mut tokio::process::Command,
    what: &str,
    stdin: &[u8],
    timeout: Duration,
    exits: &mut Subscription,
) -> Result<(i32, String), String> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{what}: spawn: {e}"))?;
    let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
    if let Some(mut input) = child.stdin.take() {
        // A program that doesn't read its input is fine.
        let _ = input.write_all(stdin).await;
    }
    let mut stderr = child.stderr.take();
    let read_err = tokio::spawn(async move {
        let mut buf = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut buf).await;
        }
        String::from_utf8_lossy(&buf).into_owned()
    });
    let from_monitor = async {
        while let Some(ev) = exits.rx.recv().await {
            if matches!(ev.subject, Subject::Pid(p) if p == pid) {
                return Ok(ev.exit_code);
            }
        }
        Err(format!("{what}: its exit status was lost"))
    };
    let waited = tokio::time::timeout(timeout, async {
        match child.wait().await {
            Ok(s) => Ok(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))),
            // Reaped by the library first (ECHILD, however tokio words it).
            Err(e) => {
                log::debug!("{what}: wait: {e}; taking the status the shim's reaper saw");
                from_monitor.await
            }
        }
    })
    .await
    .map_err(|_| format!("{what} did not finish within {timeout:?}; killed"))??;
    let stderr = read_err.await.unwrap_or_default();
    Ok((waited, stderr))
}
