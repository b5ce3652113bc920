//! Where the pod runs the spec's OCI hooks on the host (`crate::hooks`): after a create (a
//! failure undoes the container in the guest and fails the create), after a start, after a
//! delete. The pid they are given is the one the pod reports.

use cocoon_protocol::agent as ag;
use serde_json::Value;

use super::{GuestLink, Pod};
use crate::hooks::{self, Stage, State};
use crate::Result;

/// What of a spec the later hooks need: `ociVersion`, `annotations` and `hooks`; `Null` when
/// the spec has no hooks, which is the common case.
pub(super) fn kept(spec: &Value) -> Value {
    let any = spec["hooks"].as_object().is_some_and(|h| {
        h.values()
            .any(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    });
    if !any {
        return Value::Null;
    }
    serde_json::json!({
        "ociVersion": spec["ociVersion"],
        "annotations": spec["annotations"],
        "hooks": spec["hooks"],
    })
}

impl Pod {
    /// `prestart` and `createRuntime` from a container's [`kept`] hooks, for the container the
    /// guest just created; on failure the guest's container is removed again and the error
    /// returned.
    pub(super) async fn created_hooks(
        &self,
        guest: &GuestLink,
        kept: &Value,
        id: &str,
        bundle: &str,
        pid: u32,
    ) -> Result<()> {
        if kept.is_null() {
            return Ok(());
        }
        let state = State {
            id,
            bundle,
            pid: self.reported_pid(pid),
        };
        let ran = hooks::run(kept, Stage::Created, &state).await;
        if ran.is_err() {
            let rreq = ag::RemoveContainerRequest {
                container_id: id.to_owned(),
                ..Default::default()
            };
            let removed = guest
                .call("remove", guest.agent.remove_container(guest.ctx(), &rreq))
                .await;
            if let Err(e) = removed {
                log::warn!("removing {id} in the guest after its hook failed: {e}");
            }
        }
        ran
    }

    /// `poststart` or `poststop` hooks kept from a container's spec; failures are logged.
    pub(super) async fn later_hooks(
        &self,
        kept: &Value,
        stage: Stage,
        id: &str,
        bundle: &str,
        pid: u32,
    ) {
        if kept.is_null() {
            return;
        }
        let state = State {
            id,
            bundle,
            pid: self.reported_pid(pid),
        };
        let _ = hooks::run(kept, stage, &state).await;
    }
}
