//! The container's seccomp filter for its exec processes.
//!
//! libcontainer 0.7 builds an exec (tenant) process's spec anew from the container's bundle and
//! keeps only its namespaces, cgroup path and personality: `linux.seccomp` is dropped, so an
//! exec ran unconfined while the container's init was filtered (`kubectl exec` escaped the
//! pod's seccomp profile). runc applies the container's filter to every exec; so does this
//! executor, which libcontainer calls in the exec process after it joined the container's
//! namespaces and dropped capabilities, just before `execve`.
//!
//! A seccomp filter needs `no_new_privs` or CAP_SYS_ADMIN. runc loads it before dropping
//! capabilities where `noNewPrivileges` is off; here capabilities are already gone, so a
//! process without CAP_SYS_ADMIN gets `no_new_privs` to be filtered at all: an exec's setuid
//! programs then don't raise privileges. Confinement first: the filter is the boundary.

use libcontainer::oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, Spec};
use libcontainer::workload::{default, Executor, ExecutorError, ExecutorValidationError};

/// The default executor with the container's filter loaded first.
#[derive(Clone)]
pub struct SeccompExecutor {
    seccomp: LinuxSeccomp,
}

impl SeccompExecutor {
    /// The executor for an exec into a container whose (guest) spec is `spec`; `None` when
    /// the container has no filter, or an error for a filter an exec can't honour.
    pub fn for_container(spec: &Spec) -> Result<Option<SeccompExecutor>, String> {
        let Some(seccomp) = spec.linux().as_ref().and_then(|l| l.seccomp().clone()) else {
            return Ok(None);
        };
        if uses_notify(&seccomp) {
            // The listener fd of a notify filter goes to the container's seccomp agent at
            // create; an exec has nobody to hand a new one to, and a notify filter without a
            // listener blocks the process.
            return Err(
                "the container's seccomp profile uses SCMP_ACT_NOTIFY, which an exec \
                        process can't be given a listener for"
                    .into(),
            );
        }
        Ok(Some(SeccompExecutor { seccomp }))
    }
}

fn uses_notify(s: &LinuxSeccomp) -> bool {
    s.default_action() == LinuxSeccompAction::ScmpActNotify
        || s.syscalls()
            .iter()
            .flatten()
            .any(|c| c.action() == LinuxSeccompAction::ScmpActNotify)
}

impl Executor for SeccompExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        load(&self.seccomp)?;
        default::get_executor().exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        default::get_executor().validate(spec)
    }
}

/// Loads the filter: as the process stands if it may (CAP_SYS_ADMIN, or `no_new_privs`
/// already set), else with `no_new_privs` set first.
fn load(seccomp: &LinuxSeccomp) -> Result<(), ExecutorError> {
    let first = libcontainer::seccomp::initialize_seccomp(seccomp);
    if first.is_ok() {
        return Ok(());
    }
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| ExecutorError::Other(format!("set no_new_privs for seccomp: {e}")))?;
    libcontainer::seccomp::initialize_seccomp(seccomp)
        .map(|_| ())
        .map_err(|e| ExecutorError::Other(format!("load the container's seccomp filter: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_containers_filter_is_kept_for_its_execs_and_notify_is_refused() {
        let none = spec(serde_json::json!({"ociVersion": "1.0.2", "linux": {}}));
        assert!(SeccompExecutor::for_container(&none).unwrap().is_none());
        let filtered = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}]
            }}}),
        );
        let ex = SeccompExecutor::for_container(&filtered).unwrap().unwrap();
        assert_eq!(
            ex.seccomp.syscalls().as_ref().unwrap()[0].names(),
            &["sethostname".to_owned()]
        );
        let notify = spec(
            serde_json::json!({"ociVersion": "1.0.2", "linux": {"seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mount"], "action": "SCMP_ACT_NOTIFY"}]
            }}}),
        );
        let e = SeccompExecutor::for_container(&notify).err().unwrap();
        assert!(e.contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}
