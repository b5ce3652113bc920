//! The spec's OCI hooks, run on the host by the shim as runc runs them: they name host
//! binaries and expect the host's view (Docker's `libnetwork-setkey` prestart hook moves the
//! container's veth into `/proc/<pid>/ns/net` of the pid in the state it is given). The guest
//! never sees them (the agent drops them from its spec).
//!
//! Which run, and when (runtime-spec `config.md#posix-platform-hooks`):
//! - `prestart` and `createRuntime`: after the container was created, before Create returns;
//!   a failure fails the create;
//! - `poststart`: after Start; a failure is logged;
//! - `poststop`: after Delete; a failure is logged;
//! - `createContainer` and `startContainer` run in the container's namespaces, which are in
//!   the guest, where the host's binaries do not exist: skipped, with a log line.
//!
//! The pid in the state is the one the shim reports for the pod (the VMM's), which lives in
//! the pod's network namespace. The spec comes from containerd, not from the guest.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{Error, Result};

/// A hook without its own `timeout` may run this long.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The points at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `prestart`, then `createRuntime`.
    Created,
    Started,
    Stopped,
}

/// What a hook is told about the container (the runtime-spec's state).
#[derive(Debug, Clone)]
pub struct State<'a> {
    pub id: &'a str,
    pub bundle: &'a str,
    pub pid: u32,
}

fn names(stage: Stage) -> &'static [&'static str] {
    match stage {
        Stage::Created => &["prestart", "createRuntime"],
        Stage::Started => &["poststart"],
        Stage::Stopped => &["poststop"],
    }
}

/// Runs `spec`'s hooks for `stage`, in order. For [`Stage::Created`] the first failure is
/// returned, naming the hook; for the others failures are logged.
pub async fn run(spec: &Value, stage: Stage, state: &State<'_>) -> Result<()> {
    let status = match stage {
        Stage::Created => "created",
        Stage::Started => "running",
        Stage::Stopped => "stopped",
    };
    let state_json = json!({
        "ociVersion": spec["ociVersion"].as_str().unwrap_or("1.0.2"),
        "id": state.id,
        "status": status,
        "pid": state.pid,
        "bundle": state.bundle,
        "annotations": spec["annotations"].clone(),
    })
    .to_string();
    for in_guest in ["createContainer", "startContainer"] {
        if stage == Stage::Created
            && spec["hooks"][in_guest]
                .as_array()
                .is_some_and(|h| !h.is_empty())
        {
            log::warn!(
                "container {}: skipping its {in_guest} hooks: they run in the container's \
                 namespaces, which are in the pod VM, where host binaries do not exist",
                state.id
            );
        }
    }
    for name in names(stage) {
        for hook in spec["hooks"][*name].as_array().into_iter().flatten() {
            let ran = run_one(hook, &state_json).await;
            match (ran, stage) {
                (Ok(()), _) => {}
                (Err(e), Stage::Created) => {
                    return Err(Error::InvalidArgument(format!(
                        "container {}: {name} hook: {e}",
                        state.id
                    )))
                }
                (Err(e), _) => log::warn!("container {}: {name} hook: {e}", state.id),
            }
        }
    }
    Ok(())
}

/// Runs one hook with the state on its stdin; `Err` says what went wrong, with its stderr.
async fn run_one(hook: &Value, state_json: &str) -> std::result::Result<(), String> {
    let path = hook["path"]
        .as_str()
        .filter(|p| p.starts_with('/'))
        .ok_or_else(|| format!("{hook}: the path must be absolute"))?;
    let args: Vec<&str> = hook["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let timeout = hook["timeout"]
        .as_u64()
        .filter(|t| *t > 0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs);
    log::info!("running hook {path} {args:?}");
    let mut cmd = tokio::process::Command::new(path);
    if let Some((arg0, rest)) = args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for kv in hook["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let (code, stderr) = crate::child::run(cmd, path, state_json.as_bytes(), timeout).await?;
    if code == 0 {
        Ok(())
    } else {
        Err(format!(
            "{path} failed (exit status {code}): {}",
            stderr.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State<'static> {
        State {
            id: "c1",
            bundle: "/b",
            pid: 4242,
        }
    }

    #[tokio::test]
    async fn hooks_get_the_state_in_order_and_a_failed_prestart_fails_the_create() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        let sh = |script: String| json!({"path": "/bin/sh", "args": ["sh", "-c", script]});
        let spec = json!({
            "ociVersion": "1.0.2",
            "annotations": {"a": "b"},
            "hooks": {
                "prestart": [sh(format!("echo prestart $(cat) >> {}", log.display()))],
                "createRuntime": [sh(format!("echo createRuntime >> {}", log.display()))],
                "poststart": [sh("exit 1".into())],
            }
        });
        run(&spec, Stage::Created, &state()).await.unwrap();
        let seen = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert_eq!(lines.len(), 2, "{seen}");
        let st: Value = serde_json::from_str(lines[0].strip_prefix("prestart ").unwrap()).unwrap();
        assert_eq!(
            (st["id"].as_str(), st["pid"].as_u64()),
            (Some("c1"), Some(4242))
        );
        assert_eq!(st["status"], "created");
        assert_eq!(st["annotations"]["a"], "b");
        assert_eq!(lines[1], "createRuntime");
        // poststart failures are only logged.
        run(&spec, Stage::Started, &state()).await.unwrap();

        let failing = json!({"hooks": {"prestart": [sh("echo no-network >&2; exit 7".into())]}});
        let e = run(&failing, Stage::Created, &state())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("prestart") && e.contains("no-network"), "{e}");
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_and_named() {
        let spec = json!({"hooks": {"createRuntime": [
            {"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}
        ]}});
        let t0 = std::time::Instant::now();
        let e = run(&spec, Stage::Created, &state())
            .await
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(
            e.contains("/bin/sleep") && e.contains("did not finish"),
            "{e}"
        );
        let relative = json!({"hooks": {"prestart": [{"path": "sleep"}]}});
        let e = run(&relative, Stage::Created, &state())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
    }
}
