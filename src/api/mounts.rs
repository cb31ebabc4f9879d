//! `MountService`: converts requests to [`MountSpec`]s and statuses to
//! `MountInfo`, calls [`crate::mounts::MountService`], and maps its errors.
//! Replies carry the auth mode only, never a secret.

use std::path::PathBuf;

use tonic::{Request, Response, Status};

use super::proto::{self, mount_service_server::MountService as MountRpc};
use super::timestamp;
use crate::mounts::spec::{ManagedIdentity, NO_GID, Owner, SecretSource};
use crate::mounts::{Auth, MountError, MountService, MountSpec, MountState, MountStatus, Origin};
use crate::secret::Secret;

/// The mount service.
pub struct MountApi {
    mounts: MountService,
}

impl MountApi {
    /// Serves `mounts`.
    pub fn new(mounts: MountService) -> Self {
        Self { mounts }
    }
}

#[tonic::async_trait]
impl MountRpc for MountApi {
    async fn mount(
        &self,
        request: Request<proto::MountRequest>,
    ) -> Result<Response<proto::MountInfo>, Status> {
        let request = request.into_inner();
        if request.owner_gid.is_some() && request.owner_uid.is_none() {
            return Err(Status::invalid_argument(
                "owner_gid: given without owner_uid (the owner is a uid, its group optional)",
            ));
        }
        let spec = spec_from_proto(request);
        let status = self.mounts.mount(spec).await.map_err(error_to_status)?;
        Ok(Response::new(info_to_proto(&status)))
    }

    async fn unmount(
        &self,
        request: Request<proto::UnmountRequest>,
    ) -> Result<Response<proto::MountInfo>, Status> {
        let name = request.into_inner().name;
        let status = self.mounts.unmount(&name).await.map_err(error_to_status)?;
        Ok(Response::new(info_to_proto(&status)))
    }

    async fn list_mounts(
        &self,
        _: Request<proto::ListMountsRequest>,
    ) -> Result<Response<proto::ListMountsResponse>, Status> {
        Ok(Response::new(proto::ListMountsResponse {
            mounts: self.mounts.list().iter().map(info_to_proto).collect(),
        }))
    }
}

fn spec_from_proto(r: proto::MountRequest) -> MountSpec {
    use proto::mount_request::Auth as A;
    let auth = match r.auth {
        Some(A::AccountKey(key)) => Auth::AccountKey(SecretSource::Given(Secret::from_text(&key))),
        Some(A::SasToken(sas)) => Auth::SasToken(SecretSource::Given(Secret::from_text(&sas))),
        Some(A::ManagedIdentity(id)) => Auth::ManagedIdentity(ManagedIdentity {
            client_id: id.client_id,
            resource_id: id.resource_id,
            object_id: id.object_id,
        }),
        None => Auth::ManagedIdentity(ManagedIdentity::default()),
    };
    MountSpec {
        name: r.name,
        account: r.account,
        container: r.container,
        mount_path: PathBuf::from(r.mount_path),
        auth,
        read_only: r.read_only,
        cache_dir: PathBuf::from(r.cache_dir),
        cache_max_bytes: r.cache_max_bytes,
        endpoint: r.endpoint,
        subdirectory: r.subdirectory,
        origin: Origin::Api,
        owner: r.owner_uid.map(|uid| Owner {
            uid,
            gid: r.owner_gid.unwrap_or(NO_GID),
        }),
    }
}

fn state_to_proto(state: MountState) -> proto::MountState {
    match state {
        MountState::Mounting => proto::MountState::Mounting,
        MountState::Mounted => proto::MountState::Mounted,
        MountState::Stale => proto::MountState::Stale,
        MountState::Remounting => proto::MountState::Remounting,
        MountState::Failed => proto::MountState::Failed,
        MountState::Unmounted => proto::MountState::Unmounted,
    }
}

/// A mount's status as the API shows it (also used for `MountEvent`).
pub fn info_to_proto(s: &MountStatus) -> proto::MountInfo {
    proto::MountInfo {
        name: s.name.clone(),
        mount_path: s.mount_path.display().to_string(),
        account: s.account.clone(),
        container: s.container.clone(),
        auth_mode: s.auth_mode.to_owned(),
        state: state_to_proto(s.state) as i32,
        message: s.message.clone(),
        remount_count: s.remount_count,
        last_checked: s.last_checked.map(timestamp),
        read_only: s.read_only,
        cache_dir: s.cache_dir.display().to_string(),
        cache_max_bytes: s.cache_max_bytes,
        pid: s.pid.unwrap_or(0),
        origin: s.origin.name().to_owned(),
        owner_uid: s.owner.uid,
        owner_gid: s.owner.gid,
    }
}

fn error_to_status(error: MountError) -> Status {
    let message = error.to_string();
    match error {
        MountError::Invalid { .. } => Status::invalid_argument(message),
        MountError::InUse { .. } => Status::already_exists(message),
        MountError::NotFound(_) => Status::not_found(message),
        MountError::Blobfuse2 { .. } | MountError::CacheDir { .. } => {
            Status::failed_precondition(message)
        }
        MountError::Timeout { .. } => Status::deadline_exceeded(message),
        MountError::Io { .. } | MountError::Spawn { .. } | MountError::Unmount { .. } => {
            Status::internal(message)
        }
        MountError::Store { source, .. } => match source {
            crate::store::StoreError::NoSpace { .. } => Status::resource_exhausted(message),
            crate::store::StoreError::Storage { .. } => Status::internal(message),
        },
        MountError::Cancelled(_) => Status::aborted(message),
        MountError::Unanswered { .. } => Status::unavailable(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_auth_means_the_system_assigned_identity() {
        let spec = spec_from_proto(proto::MountRequest {
            name: "data".into(),
            auth: None,
            ..Default::default()
        });
        assert_eq!(spec.auth, Auth::ManagedIdentity(ManagedIdentity::default()));
        assert_eq!(spec.auth.mode(), "msi");
    }

    #[test]
    fn managed_identity_ids_are_kept() {
        use proto::mount_request::Auth as A;
        let spec = spec_from_proto(proto::MountRequest {
            auth: Some(A::ManagedIdentity(proto::ManagedIdentity {
                client_id: String::new(),
                resource_id: "/subscriptions/s/rg/id".into(),
                object_id: "oid".into(),
            })),
            ..Default::default()
        });
        assert_eq!(
            spec.auth,
            Auth::ManagedIdentity(ManagedIdentity {
                client_id: String::new(),
                resource_id: "/subscriptions/s/rg/id".into(),
                object_id: "oid".into(),
            })
        );
    }
}
