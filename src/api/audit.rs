//! The audit log: one line (tracing target `audit`) per call of a mutating
//! RPC, saying who called, what (the method and its key fields, e.g. the job
//! id), and the result (the gRPC status code), refusals included.
//!
//! Key fields are picked one by one from the decoded request and reply;
//! anything that may hold a secret (env values, script content and
//! arguments, account keys, SAS tokens) is never picked, so it cannot leak.
//! SSH keys are shown by their fingerprints only.

use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use prost::Message;
use tonic::Code;

use super::peer::Peer;
use super::proto;

/// Longest value shown for one field; longer ones are cut.
const MAX_FIELD_CHARS: usize = 200;
/// Reply bytes kept to read key fields from (ids are near the start).
const MAX_REPLY_BYTES: usize = 64 << 10;

/// The payload of a single uncompressed gRPC frame, if `body` is one.
pub fn grpc_message(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    rest.get(4..4 + len)
}

fn shown(value: &str) -> String {
    let cut: String = value.chars().take(MAX_FIELD_CHARS).collect();
    if cut.len() < value.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// The key fields of a request, by method. Never includes a secret.
pub fn request_fields(path: &str, message: &[u8]) -> Vec<(&'static str, String)> {
    let method = path.rsplit('/').next().unwrap_or_default();
    let mut fields = Vec::new();
    match method {
        "SubmitJob" => {
            if let Ok(req) = proto::SubmitJobRequest::decode(message) {
                let spec = req.spec.unwrap_or_default();
                if !spec.id.is_empty() {
                    fields.push(("job_id", shown(&spec.id)));
                }
                fields.push(("image", shown(&spec.image)));
                fields.push(("env_entries", spec.env.len().to_string()));
                fields.push(("mounts", spec.mounts.len().to_string()));
                // Whether a job credential came, never what it is.
                if spec.registry_auth.is_some() {
                    fields.push(("registry_auth", "set".into()));
                }
            }
        }
        "DeployApp" => {
            if let Ok(req) = proto::DeployAppRequest::decode(message) {
                let spec = req.spec.unwrap_or_default();
                fields.push(("app", shown(&spec.name)));
                fields.push(("image", shown(&spec.image)));
                fields.push(("env_entries", spec.env.len().to_string()));
                fields.push(("ports", spec.ports.len().to_string()));
            }
        }
        "RemoveApp" | "RestartApp" => {
            if let Ok(req) = proto::GetAppRequest::decode(message) {
                fields.push(("app", shown(&req.name)));
            }
        }
        "CancelJob" => {
            if let Ok(req) = proto::CancelJobRequest::decode(message) {
                fields.push(("job_id", shown(&req.id)));
            }
        }
        "ReclaimSpace" => {
            if let Ok(req) = proto::ReclaimSpaceRequest::decode(message) {
                fields.push(("dry_run", req.dry_run.to_string()));
                fields.push(("path", shown(&req.path)));
                if req.unknown_containers {
                    fields.push(("unknown_containers", "true".into()));
                }
            }
        }
        "RunSetupScript" => {
            if let Ok(req) = proto::RunSetupScriptRequest::decode(message) {
                use proto::run_setup_script_request::Source;
                fields.push(("kind", format!("{:?}", req.kind())));
                let source = match &req.source {
                    Some(Source::Script(script)) => format!("inline, {} bytes", script.len()),
                    Some(Source::Path(path)) => shown(path),
                    None => "none".into(),
                };
                fields.push(("source", source));
                fields.push(("args", req.args.len().to_string()));
                if !req.run_as.is_empty() {
                    fields.push(("run_as", shown(&req.run_as)));
                }
                if !req.idempotency_key.is_empty() {
                    fields.push(("idempotency_key", shown(&req.idempotency_key)));
                }
            }
        }
        "Mount" => {
            if let Ok(req) = proto::MountRequest::decode(message) {
                use proto::mount_request::Auth;
                fields.push(("name", shown(&req.name)));
                fields.push(("account", shown(&req.account)));
                fields.push(("container", shown(&req.container)));
                fields.push(("mount_path", shown(&req.mount_path)));
                let auth = match req.auth {
                    Some(Auth::AccountKey(_)) => "key",
                    Some(Auth::SasToken(_)) => "sas",
                    Some(Auth::ManagedIdentity(_)) | None => "msi",
                };
                fields.push(("auth", auth.into()));
            }
        }
        "AddWatchedPath" => {
            if let Ok(req) = proto::AddWatchedPathRequest::decode(message) {
                fields.push(("path", shown(&req.path)));
                fields.push(("reason", shown(&req.reason)));
            }
        }
        "RemoveWatchedPath" => {
            if let Ok(req) = proto::RemoveWatchedPathRequest::decode(message) {
                fields.push(("path", shown(&req.path)));
            }
        }
        "SetIdleShutdown" => {
            if let Ok(req) = proto::SetIdleShutdownRequest::decode(message) {
                let p = req.policy.unwrap_or_default();
                fields.push(("enabled", p.enabled.to_string()));
                fields.push(("idle_timeout_seconds", p.idle_timeout_seconds.to_string()));
            }
        }
        "PostponeIdleShutdown" => {
            if let Ok(req) = proto::PostponeIdleShutdownRequest::decode(message) {
                fields.push(("duration_seconds", req.duration_seconds.to_string()));
                fields.push(("reason", shown(&req.reason)));
            }
        }
        "Unmount" => {
            if let Ok(req) = proto::UnmountRequest::decode(message) {
                fields.push(("name", shown(&req.name)));
            }
        }
        "PullImage" => {
            if let Ok(req) = proto::PullImageRequest::decode(message) {
                fields.push(("image", shown(&req.image)));
            }
        }
        "RemoveImage" => {
            if let Ok(req) = proto::RemoveImageRequest::decode(message) {
                fields.push(("image", shown(&req.image)));
            }
        }
        "SetRegistryCredential" => {
            // The registry and the user; never the secret.
            if let Ok(req) = proto::SetRegistryCredentialRequest::decode(message) {
                fields.push(("registry", shown(&req.registry)));
                fields.push(("username", shown(&req.username)));
            }
        }
        "DeleteRegistryCredential" => {
            if let Ok(req) = proto::DeleteRegistryCredentialRequest::decode(message) {
                fields.push(("registry", shown(&req.registry)));
            }
        }
        "SetSshPolicy" => {
            if let Ok(req) = proto::SetSshPolicyRequest::decode(message) {
                let policy = req.policy.unwrap_or_default();
                fields.push(("enabled", policy.enabled.to_string()));
                fields.push(("port", policy.port.to_string()));
                fields.push(("user", shown(&policy.user)));
                // Fingerprints only: never the key lines themselves.
                let fingerprints: Vec<String> = policy
                    .authorized_keys
                    .iter()
                    .map(|line| crate::access::keys::fingerprint_or_invalid(line))
                    .collect();
                fields.push(("keys", fingerprints.len().to_string()));
                if !fingerprints.is_empty() {
                    fields.push(("fingerprints", shown(&fingerprints.join(","))));
                }
                fields.push((
                    "password_authentication",
                    policy.password_authentication.to_string(),
                ));
                fields.push((
                    "allow_tcp_forwarding",
                    policy.allow_tcp_forwarding.to_string(),
                ));
                fields.push(("terminate_sessions", req.terminate_sessions.to_string()));
            }
        }
        _ => {}
    }
    fields
}

/// Key fields only the reply knows (an id the agent chose).
pub fn reply_fields(path: &str, message: &[u8]) -> Vec<(&'static str, String)> {
    let method = path.rsplit('/').next().unwrap_or_default();
    match method {
        "SubmitJob" => proto::Job::decode(message)
            .map(|job| vec![("job_id", shown(&job.id))])
            .unwrap_or_default(),
        "RunSetupScript" => proto::SetupRun::decode(message)
            .map(|run| vec![("run_id", shown(&run.id))])
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// One audited call. Logged once: when its status is known, or when it is
/// dropped without one (the client went away first).
#[derive(Debug)]
pub struct AuditRecord {
    peer: Peer,
    path: String,
    fields: Vec<(&'static str, String)>,
    reply: BytesMut,
    logged: bool,
}

impl AuditRecord {
    /// Starts the record of a call.
    pub fn new(peer: &Peer, path: &str) -> Self {
        Self {
            peer: peer.clone(),
            path: path.to_owned(),
            fields: Vec::new(),
            reply: BytesMut::new(),
            logged: false,
        }
    }

    /// Adds the request's key fields.
    pub fn set_request(&mut self, message: &[u8]) {
        self.fields = request_fields(&self.path, message);
    }

    /// Keeps the start of the reply, to read an id from it.
    pub fn observe_reply(&mut self, data: &Bytes) {
        let room = MAX_REPLY_BYTES.saturating_sub(self.reply.len());
        self.reply.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Logs the call with its result.
    pub fn finish(mut self, code: Code) {
        self.log(&format!("{code:?}"));
    }

    fn log(&mut self, result: &str) {
        if self.logged {
            return;
        }
        self.logged = true;
        if let Some(message) = grpc_message(&self.reply) {
            for (key, value) in reply_fields(&self.path, message) {
                if !self.fields.iter().any(|(k, _)| *k == key) {
                    self.fields.push((key, value));
                }
            }
        }
        let mut what = String::new();
        for (key, value) in &self.fields {
            let _ = write!(what, " {key}={value}");
        }
        tracing::info!(
            target: "audit",
            who = %self.peer.who,
            role = self.peer.role.name(),
            rpc = %self.path,
            fields = %what.trim_start(),
            result,
            "audit: {} by {} ({}):{} -> {result}",
            self.path,
            self.peer.who,
            self.peer.role.name(),
            what,
        );
    }
}

impl Drop for AuditRecord {
    fn drop(&mut self) {
        self.log("Aborted (the client went away before the reply)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn frames_are_unwrapped() {
        let req = proto::CancelJobRequest { id: "j1".into() };
        let framed = frame(&req);
        assert_eq!(grpc_message(&framed), Some(&req.encode_to_vec()[..]));
        let mut compressed = framed.clone();
        compressed[0] = 1;
        assert_eq!(grpc_message(&compressed), None);
        assert_eq!(grpc_message(&framed[..framed.len() - 1]), None);
        assert_eq!(grpc_message(&[]), None);
    }

    #[test]
    fn secrets_never_become_fields() {
        let mount = proto::MountRequest {
            name: "data".into(),
            account: "acct".into(),
            container: "c".into(),
            mount_path: "/mnt/data".into(),
            auth: Some(proto::mount_request::Auth::AccountKey(
                "S3CRET-ACCOUNT-KEY".into(),
            )),
            ..Default::default()
        };
        let fields = request_fields(
            "/instance_agent.v1.MountService/Mount",
            &mount.encode_to_vec(),
        );
        let shown = format!("{fields:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("\"key\""), "{shown}");

        let mut spec = proto::JobSpec {
            id: "job-1".into(),
            image: "busybox".into(),
            ..Default::default()
        };
        spec.env.insert("TOKEN".into(), "S3CRET-ENV-VALUE".into());
        spec.registry_auth = Some(proto::RegistryAuth {
            username: "robot".into(),
            password: "S3CRET-REGISTRY-TOKEN".into(),
        });
        let submit = proto::SubmitJobRequest { spec: Some(spec) };
        let fields = request_fields(
            "/instance_agent.v1.JobService/SubmitJob",
            &submit.encode_to_vec(),
        );
        let shown = format!("{fields:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("job-1"), "{shown}");
        assert!(shown.contains("registry_auth"), "{shown}");

        let login = proto::SetRegistryCredentialRequest {
            registry: "registry.example:5000".into(),
            username: "robot".into(),
            secret: "S3CRET-REGISTRY-PASSWORD".into(),
        };
        let fields = request_fields(
            "/instance_agent.v1.ImageService/SetRegistryCredential",
            &login.encode_to_vec(),
        );
        let shown = format!("{fields:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(shown.contains("registry.example:5000"), "{shown}");

        let script = proto::RunSetupScriptRequest {
            source: Some(proto::run_setup_script_request::Source::Script(
                "echo S3CRET-SCRIPT".into(),
            )),
            args: vec!["S3CRET-ARG".into()],
            ..Default::default()
        };
        let fields = request_fields(
            "/instance_agent.v1.SetupService/RunSetupScript",
            &script.encode_to_vec(),
        );
        let shown = format!("{fields:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");

        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIC8ol+J/mG3vQbhy512jQo3QxQgNbIeZ9eaPJNPwIEDS alice@laptop";
        let ssh = proto::SetSshPolicyRequest {
            policy: Some(proto::SshPolicy {
                enabled: true,
                user: "azureuser".into(),
                authorized_keys: vec![key.into(), "ssh-ed25519 S3CRET-NOT-A-KEY".into()],
                ..Default::default()
            }),
            terminate_sessions: false,
        };
        let fields = request_fields(
            "/instance_agent.v1.AccessService/SetSshPolicy",
            &ssh.encode_to_vec(),
        );
        let shown = format!("{fields:?}");
        assert!(
            !shown.contains("AAAAC3Nza") && !shown.contains("alice@laptop"),
            "{shown}"
        );
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert!(
            shown.contains("SHA256:qQEZdaiI4cPVnhmfa02UVEeqa1aI6kSxm/auEuqKi58,invalid"),
            "{shown}"
        );
    }

    #[test]
    fn reply_ids_are_read() {
        let job = proto::Job {
            id: "generated".into(),
            ..Default::default()
        };
        let fields = reply_fields(
            "/instance_agent.v1.JobService/SubmitJob",
            &job.encode_to_vec(),
        );
        assert_eq!(fields, vec![("job_id", "\"generated\"".to_string())]);
    }
}
