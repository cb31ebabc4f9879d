//! `AccessService`: converts the SSH policy and its status between proto
//! and [`crate::access`], passes who called (for the audit line), and maps
//! the domain's errors in one exhaustive match.

use tonic::{Request, Response, Status};

use super::proto::{self, access_service_server::AccessService as AccessRpc};
use super::timestamp;
use crate::access::host::UnitState;
use crate::access::{
    AccessError, AccessService, ListenerKind, PolicyView, SetOptions, SshPolicy, SshSession,
};

/// The access service.
pub struct AccessApi {
    access: AccessService,
}

impl AccessApi {
    /// Serves `access`.
    pub fn new(access: AccessService) -> Self {
        Self { access }
    }
}

#[tonic::async_trait]
impl AccessRpc for AccessApi {
    async fn get_ssh_policy(
        &self,
        _: Request<proto::GetSshPolicyRequest>,
    ) -> Result<Response<proto::SshPolicyStatus>, Status> {
        Ok(Response::new(status_to_proto(&self.access.get().await)))
    }

    async fn set_ssh_policy(
        &self,
        request: Request<proto::SetSshPolicyRequest>,
    ) -> Result<Response<proto::SshPolicyStatus>, Status> {
        let requested_by = super::peer::caller(&request);
        let request = request.into_inner();
        let options = SetOptions {
            terminate_sessions: request.terminate_sessions,
            requested_by,
        };
        let view = self
            .access
            .set(
                policy_from_proto(request.policy.unwrap_or_default()),
                options,
            )
            .await
            .map_err(error_to_status)?;
        Ok(Response::new(status_to_proto(&view)))
    }

    async fn list_sessions(
        &self,
        _: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: self
                .access
                .sessions()
                .await
                .iter()
                .map(session_to_proto)
                .collect(),
        }))
    }
}

fn policy_from_proto(p: proto::SshPolicy) -> SshPolicy {
    SshPolicy {
        enabled: p.enabled,
        port: p.port,
        user: p.user,
        authorized_keys: p.authorized_keys,
        password_authentication: p.password_authentication,
        allow_tcp_forwarding: p.allow_tcp_forwarding,
    }
}

fn policy_to_proto(p: &SshPolicy) -> proto::SshPolicy {
    proto::SshPolicy {
        enabled: p.enabled,
        port: p.effective_port(),
        user: p.user.clone(),
        authorized_keys: p.authorized_keys.clone(),
        password_authentication: p.password_authentication,
        allow_tcp_forwarding: p.allow_tcp_forwarding,
    }
}

fn unit_to_proto(name: &str, state: &UnitState) -> proto::SshUnitState {
    proto::SshUnitState {
        name: name.to_owned(),
        exists: state.exists,
        active: state.active,
        masked: state.masked,
        enabled: state.enabled,
    }
}

fn status_to_proto(view: &PolicyView) -> proto::SshPolicyStatus {
    let effective = match &view.effective {
        Ok(e) => proto::SshEffectiveSettings {
            ports: e.ports().into_iter().map(u32::from).collect(),
            password_authentication: e.is_yes("passwordauthentication"),
            kbd_interactive_authentication: e.is_yes("kbdinteractiveauthentication"),
            pubkey_authentication: e.is_yes("pubkeyauthentication"),
            authorized_keys_file: e.get("authorizedkeysfile").to_owned(),
            allow_tcp_forwarding: e.get("allowtcpforwarding").to_owned(),
            error: String::new(),
        },
        Err(error) => proto::SshEffectiveSettings {
            error: error.clone(),
            ..Default::default()
        },
    };
    let listener = match view.listener {
        None => proto::SshListener::Unspecified,
        Some(ListenerKind::Service) => proto::SshListener::Service,
        Some(ListenerKind::Socket) => proto::SshListener::Socket,
    };
    proto::SshPolicyStatus {
        managed: view.policy.is_some(),
        policy: view.policy.as_ref().map(policy_to_proto),
        keys: view
            .keys
            .iter()
            .enumerate()
            .map(|(index, key)| proto::AuthorizedKeyInfo {
                index: index as u32,
                r#type: key.key_type.clone(),
                fingerprint: key.fingerprint.clone(),
                comment: key.comment.clone(),
                options: key.options.clone(),
            })
            .collect(),
        listener: listener as i32,
        units: view
            .units
            .iter()
            .map(|(name, state)| unit_to_proto(name, state))
            .collect(),
        effective: Some(effective),
        agrees: view.agrees(),
        differences: view.differences.clone(),
        drift: view.drift.clone(),
        applied_at: view.applied_at.map(timestamp),
        applied_by: view.applied_by.clone(),
        last_error: view.last_error.clone(),
        sshd_version: view.sshd_version.clone(),
    }
}

fn session_to_proto(s: &SshSession) -> proto::SshSession {
    proto::SshSession {
        user: s.user.clone(),
        from_address: s.from.clone(),
        since: Some(timestamp(s.since)),
        pid: s.pid,
        tty: s.tty.clone(),
        source: s.source.to_owned(),
    }
}

fn error_to_status(error: AccessError) -> Status {
    let message = error.to_string();
    match error {
        AccessError::Invalid { .. } => Status::invalid_argument(message),
        AccessError::NotAllowed { .. }
        | AccessError::UnknownUser { .. }
        | AccessError::SshdConfig(_)
        | AccessError::ConfigCheck(_)
        | AccessError::Host { .. }
        | AccessError::RolledBack { .. } => Status::failed_precondition(message),
        AccessError::RollbackFailed { .. } => Status::internal(message),
        AccessError::Store(source) => match source {
            crate::store::StoreError::NoSpace { .. } => Status::resource_exhausted(message),
            crate::store::StoreError::Storage { .. } => Status::internal(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_survives_the_round_trip_with_its_port_filled_in() {
        let wire = proto::SshPolicy {
            enabled: true,
            port: 0,
            user: "azureuser".into(),
            authorized_keys: vec!["ssh-ed25519 AAAA x".into()],
            password_authentication: false,
            allow_tcp_forwarding: true,
        };
        let back = policy_to_proto(&policy_from_proto(wire.clone()));
        assert_eq!(back, proto::SshPolicy { port: 22, ..wire });
    }

    #[test]
    fn refusals_and_rollbacks_have_their_codes() {
        let invalid = error_to_status(AccessError::Invalid {
            field: "authorized_keys[1]".into(),
            problem: "line 2 of the keys: the line is empty".into(),
        });
        assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
        assert!(invalid.message().starts_with("authorized_keys[1]: line 2"));
        let rolled = error_to_status(AccessError::RolledBack { cause: "x".into() });
        assert_eq!(rolled.code(), tonic::Code::FailedPrecondition);
        assert!(rolled.message().contains("rolled back"));
        let failed = error_to_status(AccessError::RollbackFailed {
            cause: "x".into(),
            rollback: "y".into(),
        });
        assert_eq!(failed.code(), tonic::Code::Internal);
    }
}
