//! Authorization: the one table that classifies every RPC of the contract by
//! its full method name, and the rule that decides, from a caller's role,
//! whether it may call it.
//!
//! - **admin** (root, `control_plane.uids`, a verified control-plane
//!   certificate) may call everything;
//! - **operator** (members of `operator.group`) may call every read RPC,
//!   `ReclaimSpace` only with `dry_run = true`, and `CancelJob` when
//!   `operator.allow_cancel_job` is set;
//! - the standard health and reflection services are reads;
//! - any other method path (not served here) is admin-only: an unknown
//!   path fails closed, so a route added without a row in [`METHODS`] is
//!   never open to operators by accident.
//!
//! A unit test walks the compiled descriptor set, so an RPC added to
//! `proto/` without a row here fails the build's tests.

use tonic::Status;

/// What a caller may do. Set per connection from its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The control plane and root: every RPC.
    Admin,
    /// Members of the operator group: reads and dry runs.
    Operator,
}

impl Role {
    /// The role's name as messages and the audit log show it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }
}

/// How an RPC is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads state; any role.
    Read,
    /// Changes state; admin only.
    Mutate,
    /// `CancelJob`: admin, or operator when `operator.allow_cancel_job`.
    CancelJob,
    /// `ReclaimSpace`: admin, or operator with `dry_run = true`.
    ReclaimSpace,
    /// `PostponeIdleShutdown`: admin and operator (the user at the
    /// terminal postpones the stop the login message announces; who asked
    /// is recorded).
    Postpone,
}

impl Access {
    /// Whether a call is audited (everything that may change state).
    pub fn is_mutating(self) -> bool {
        !matches!(self, Access::Read)
    }
}

/// One RPC of the contract.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    /// Full method name, e.g. `/instance_agent.v1.JobService/SubmitJob`.
    pub path: &'static str,
    /// Its class.
    pub access: Access,
    /// Whether the server streams its reply (counts against
    /// `limits.max_streams_per_peer`).
    pub streaming: bool,
}

const fn read(path: &'static str) -> Method {
    Method {
        path,
        access: Access::Read,
        streaming: false,
    }
}

const fn stream(path: &'static str) -> Method {
    Method {
        path,
        access: Access::Read,
        streaming: true,
    }
}

const fn mutate_stream(path: &'static str) -> Method {
    Method {
        path,
        access: Access::Mutate,
        streaming: true,
    }
}

const fn mutate(path: &'static str, access: Access) -> Method {
    Method {
        path,
        access,
        streaming: false,
    }
}

/// Every RPC of `instance_agent.v1`, by full method name.
pub const METHODS: &[Method] = &[
    read("/instance_agent.v1.AgentService/GetStatus"),
    stream("/instance_agent.v1.AgentService/WatchEvents"),
    mutate("/instance_agent.v1.JobService/SubmitJob", Access::Mutate),
    read("/instance_agent.v1.JobService/GetJob"),
    read("/instance_agent.v1.JobService/ListJobs"),
    mutate("/instance_agent.v1.JobService/CancelJob", Access::CancelJob),
    stream("/instance_agent.v1.JobService/StreamJobLogs"),
    mutate("/instance_agent.v1.AppService/DeployApp", Access::Mutate),
    read("/instance_agent.v1.AppService/GetApp"),
    read("/instance_agent.v1.AppService/ListApps"),
    mutate("/instance_agent.v1.AppService/RemoveApp", Access::Mutate),
    mutate("/instance_agent.v1.AppService/RestartApp", Access::Mutate),
    stream("/instance_agent.v1.AppService/StreamAppLogs"),
    read("/instance_agent.v1.DiskService/GetDiskUsage"),
    stream("/instance_agent.v1.DiskService/WatchDiskAlerts"),
    mutate(
        "/instance_agent.v1.DiskService/ReclaimSpace",
        Access::ReclaimSpace,
    ),
    // A read: sizes of directories below a path (the walk is bounded and
    // one at a time, by the disk guard).
    stream("/instance_agent.v1.DiskService/TopDirectories"),
    mutate(
        "/instance_agent.v1.DiskService/AddWatchedPath",
        Access::Mutate,
    ),
    mutate(
        "/instance_agent.v1.DiskService/RemoveWatchedPath",
        Access::Mutate,
    ),
    mutate(
        "/instance_agent.v1.SetupService/RunSetupScript",
        Access::Mutate,
    ),
    read("/instance_agent.v1.SetupService/GetSetupRun"),
    read("/instance_agent.v1.SetupService/ListSetupRuns"),
    stream("/instance_agent.v1.SetupService/StreamSetupLogs"),
    mutate("/instance_agent.v1.MountService/Mount", Access::Mutate),
    mutate("/instance_agent.v1.MountService/Unmount", Access::Mutate),
    read("/instance_agent.v1.MountService/ListMounts"),
    // Pulls change the disk and the images on it: admin, streamed progress.
    mutate_stream("/instance_agent.v1.ImageService/PullImage"),
    read("/instance_agent.v1.ImageService/ListImages"),
    mutate(
        "/instance_agent.v1.ImageService/RemoveImage",
        Access::Mutate,
    ),
    mutate(
        "/instance_agent.v1.ImageService/SetRegistryCredential",
        Access::Mutate,
    ),
    mutate(
        "/instance_agent.v1.ImageService/DeleteRegistryCredential",
        Access::Mutate,
    ),
    // Registries and user names only, never a secret.
    read("/instance_agent.v1.ImageService/ListRegistryCredentials"),
    read("/instance_agent.v1.AccessService/GetSshPolicy"),
    mutate(
        "/instance_agent.v1.AccessService/SetSshPolicy",
        Access::Mutate,
    ),
    read("/instance_agent.v1.AccessService/ListSessions"),
    read("/instance_agent.v1.LifecycleService/GetActivity"),
    stream("/instance_agent.v1.LifecycleService/WatchActivity"),
    mutate(
        "/instance_agent.v1.LifecycleService/SetIdleShutdown",
        Access::Mutate,
    ),
    mutate(
        "/instance_agent.v1.LifecycleService/PostponeIdleShutdown",
        Access::Postpone,
    ),
];

/// The methods served besides those of the contract: the standard health
/// and reflection services, reads for every role.
pub const INFRASTRUCTURE_METHODS: [&str; 5] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The streaming methods among [`INFRASTRUCTURE_METHODS`]: they count
/// against `limits.max_streams_per_peer` like the contract's streams.
pub const INFRASTRUCTURE_STREAMS: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Whether `path` is a streaming RPC (of the contract, health or reflection).
pub fn is_stream(path: &str) -> bool {
    lookup(path).map_or_else(|| INFRASTRUCTURE_STREAMS.contains(&path), |m| m.streaming)
}

/// The row of a method of the contract; `None` for anything else (health,
/// reflection, unknown paths).
pub fn lookup(path: &str) -> Option<&'static Method> {
    METHODS.iter().find(|m| m.path == path)
}

/// The outcome of checking a call before its body is read.
#[derive(Debug)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Allowed only if the request's `dry_run` is true (operator calling
    /// `ReclaimSpace`); the caller must decode the body and call
    /// [`dry_run_required`] when it is not.
    AllowIfDryRun,
    /// Refused, with the PERMISSION_DENIED status to answer.
    Deny(Status),
}

/// Decides whether `role` may call `path`.
pub fn authorize(role: Role, path: &str, allow_cancel_job: bool) -> Decision {
    let Some(method) = lookup(path) else {
        return match role {
            Role::Admin => Decision::Allow,
            Role::Operator if INFRASTRUCTURE_METHODS.contains(&path) => Decision::Allow,
            Role::Operator => Decision::Deny(denied(
                role,
                path,
                "it is not a method of this agent (unknown methods need admin)",
            )),
        };
    };
    match (role, method.access) {
        (Role::Admin, _) | (Role::Operator, Access::Read | Access::Postpone) => Decision::Allow,
        (Role::Operator, Access::CancelJob) if allow_cancel_job => Decision::Allow,
        (Role::Operator, Access::ReclaimSpace) => Decision::AllowIfDryRun,
        (Role::Operator, Access::Mutate | Access::CancelJob) => Decision::Deny(denied(
            role,
            path,
            if method.access == Access::CancelJob {
                "it needs admin, or operator.allow_cancel_job = true"
            } else {
                "it needs admin (root, a uid in control_plane.uids, or a control-plane certificate)"
            },
        )),
    }
}

/// The refusal of a non-dry-run `ReclaimSpace` by an operator.
pub fn dry_run_required(role: Role, path: &str) -> Status {
    denied(
        role,
        path,
        "operators may only run it with dry_run = true; a real reclaim needs admin",
    )
}

fn denied(role: Role, path: &str, why: &str) -> Status {
    Status::permission_denied(format!("role {} may not call {path}: {why}", role.name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every RPC in the compiled contract, as (full name, server streaming).
    fn contract_methods() -> Vec<(String, bool)> {
        let set = prost_types::FileDescriptorSet::decode(crate::api::proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set decodes");
        let mut out = Vec::new();
        for file in set.file {
            let package = file.package().to_owned();
            for service in &file.service {
                for method in &service.method {
                    out.push((
                        format!("/{package}.{}/{}", service.name(), method.name()),
                        method.server_streaming(),
                    ));
                }
            }
        }
        out
    }

    #[test]
    fn every_rpc_of_the_contract_is_classified() {
        let methods = contract_methods();
        assert!(
            methods.len() >= 17,
            "descriptor set looks empty: {methods:?}"
        );
        for (path, streaming) in &methods {
            let row = lookup(path).unwrap_or_else(|| {
                panic!("{path} is not in api::auth::METHODS: classify it (read or mutating)")
            });
            assert_eq!(
                row.streaming, *streaming,
                "{path}: the table's streaming flag disagrees with the proto"
            );
            // Streams are reads, but for the ones listed here, each a decision.
            const MUTATING_STREAMS: &[&str] = &["/instance_agent.v1.ImageService/PullImage"];
            if *streaming && !MUTATING_STREAMS.contains(&path.as_str()) {
                assert_eq!(row.access, Access::Read, "{path}: streams are reads");
            }
        }
        for row in METHODS {
            assert!(
                methods.iter().any(|(p, _)| p == row.path),
                "{} is in the table but not in the contract",
                row.path
            );
        }
    }

    #[test]
    fn reads_follow_the_naming_rule() {
        // The rule: Get*/List*/Stream*/Watch* are reads, and so are the
        // reads named otherwise, listed here so that each is a decision.
        const OTHER_READS: &[&str] = &["TopDirectories"];
        for row in METHODS {
            let name = row.path.rsplit('/').next().expect("method name");
            let read_name = ["Get", "List", "Stream", "Watch"]
                .iter()
                .any(|prefix| name.starts_with(prefix))
                || OTHER_READS.contains(&name);
            assert_eq!(
                read_name,
                row.access == Access::Read,
                "{}: classification does not match its name",
                row.path
            );
        }
    }

    #[test]
    fn operators_read_and_admins_do_everything() {
        for row in METHODS {
            assert!(matches!(
                authorize(Role::Admin, row.path, false),
                Decision::Allow
            ));
            let operator = authorize(Role::Operator, row.path, false);
            match row.access {
                Access::Read | Access::Postpone => {
                    assert!(matches!(operator, Decision::Allow), "{}", row.path)
                }
                Access::ReclaimSpace => {
                    assert!(matches!(operator, Decision::AllowIfDryRun), "{}", row.path)
                }
                Access::Mutate | Access::CancelJob => match operator {
                    Decision::Deny(status) => {
                        assert_eq!(status.code(), tonic::Code::PermissionDenied);
                        assert!(status.message().contains("operator"), "{status:?}");
                        assert!(status.message().contains(row.path), "{status:?}");
                    }
                    other => panic!("{}: {other:?}", row.path),
                },
            }
        }
    }

    #[test]
    fn cancel_job_can_be_granted_to_operators() {
        let cancel = "/instance_agent.v1.JobService/CancelJob";
        assert!(matches!(
            authorize(Role::Operator, cancel, true),
            Decision::Allow
        ));
        let submit = "/instance_agent.v1.JobService/SubmitJob";
        assert!(matches!(
            authorize(Role::Operator, submit, true),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn health_and_reflection_are_reads() {
        for path in INFRASTRUCTURE_METHODS {
            assert!(lookup(path).is_none());
            assert!(matches!(
                authorize(Role::Operator, path, false),
                Decision::Allow
            ));
        }
    }

    #[test]
    fn unknown_methods_fail_closed_for_operators() {
        for path in [
            "/instance_agent.v1.JobService/DeleteEverything",
            "/instance_agent.v2.JobService/SubmitJob",
            "/grpc.health.v1.Health/Set",
            "/other.Service/Method",
            "",
            "/",
        ] {
            match authorize(Role::Operator, path, true) {
                Decision::Deny(status) => {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied);
                    assert!(status.message().contains("role operator"), "{status:?}");
                    assert!(status.message().contains("unknown methods need admin"));
                }
                other => panic!("{path:?}: {other:?}"),
            }
            // Admin gets through to the router, which answers UNIMPLEMENTED.
            assert!(matches!(
                authorize(Role::Admin, path, false),
                Decision::Allow
            ));
        }
    }
}
