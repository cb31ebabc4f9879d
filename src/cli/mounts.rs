//! `instance-agent mounts list|mount|unmount`: file share mounts through the
//! `MountService` API. Secrets are read from a file (only its owner may
//! access it) or stdin, never taken as arguments (which any user can read
//! in `ps`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tonic::transport::Channel;

use super::{format, output, states};
use crate::api::proto::{self, mount_service_client::MountServiceClient};
use crate::secret::read_secret_file;

/// `mounts` subcommands.
#[derive(Debug, Subcommand)]
pub enum MountsCommand {
    /// List managed mounts and their health.
    List,
    /// Mount a blob container and supervise it.
    Mount(Box<MountArgs>),
    /// Unmount (lazily when busy), stop blobfuse2 and forget the mount.
    Unmount {
        /// The mount's name.
        name: String,
    },
}

/// `mounts mount` options.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Unique name ([A-Za-z0-9_.-], at most 64 characters); jobs refer to it.
    pub name: String,
    /// Storage account.
    #[arg(long)]
    pub account: String,
    /// Blob container.
    #[arg(long)]
    pub container: String,
    /// Where to mount (below mounts.allowed_roots).
    #[arg(long = "path", value_name = "PATH")]
    pub mount_path: PathBuf,
    /// File holding the account key ("-" for stdin).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["sas_token_file", "client_id", "resource_id", "object_id"])]
    pub account_key_file: Option<PathBuf>,
    /// File holding the SAS token ("-" for stdin).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["client_id", "resource_id", "object_id"])]
    pub sas_token_file: Option<PathBuf>,
    /// Managed identity: a user-assigned identity's client id. Without any
    /// secret or identity option, the system-assigned identity is used.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Managed identity: resource id.
    #[arg(long)]
    pub resource_id: Option<String>,
    /// Managed identity: object id.
    #[arg(long)]
    pub object_id: Option<String>,
    /// Mount read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Cache dir [default: <mounts.cache_root>/<name>].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Cache cap in bytes [default: mounts.default_cache_max_bytes].
    #[arg(long, value_name = "BYTES")]
    pub cache_max_bytes: Option<u64>,
    /// Blob endpoint [default: https://<account>.blob.core.windows.net].
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Mount only this virtual directory of the container.
    #[arg(long)]
    pub subdirectory: Option<String>,
    /// The uid the mount belongs to: blobfuse2 runs as it, and only it, root
    /// and jobs reach the mount (0: jobs only). Default: mounts.default_owner.
    #[arg(long, value_name = "UID")]
    pub owner_uid: Option<u32>,
    /// The owner's gid (default: the owner's primary group).
    #[arg(long, value_name = "GID", requires = "owner_uid")]
    pub owner_gid: Option<u32>,
}

/// Runs a `mounts` subcommand; `list` exits 1 when a mount is not mounted.
pub async fn run(command: MountsCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = MountServiceClient::new(channel);
    match command {
        MountsCommand::List => {
            let reply = client
                .list_mounts(proto::ListMountsRequest {})
                .await?
                .into_inner();
            output::reply(json, &reply, |reply| render_list(&reply.mounts))?;
            let unhealthy = reply
                .mounts
                .iter()
                .any(|m| m.state() != proto::MountState::Mounted);
            Ok(if unhealthy {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        MountsCommand::Mount(args) => {
            let request = request(*args)?;
            let info = client.mount(request).await?.into_inner();
            output::reply(json, &info, render_one)?;
            Ok(ExitCode::SUCCESS)
        }
        MountsCommand::Unmount { name } => {
            let info = client
                .unmount(proto::UnmountRequest { name })
                .await?
                .into_inner();
            output::reply(json, &info, render_one)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One mount in one line: name, state, path and message.
fn render_one(info: &proto::MountInfo) -> String {
    format!(
        "{} {} at {}{}\n",
        info.name,
        states::mount(info.state()),
        info.mount_path,
        if info.message.is_empty() {
            String::new()
        } else {
            format!(": {}", info.message)
        }
    )
}

/// Reads a key or token from `path` ("-" for stdin). A file goes through
/// the agent's own secret-file check: refused, naming the file and the fix,
/// when group or others may access it or it belongs to another user.
fn read_secret(path: &Path) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the secret from stdin")?;
        return Ok(text.trim().to_owned());
    }
    let secret = read_secret_file(path)?;
    let text = std::str::from_utf8(secret.expose())
        .map_err(|_| anyhow::anyhow!("secret file {} is not UTF-8 text", path.display()))?;
    Ok(text.trim().to_owned())
}

fn request(args: MountArgs) -> anyhow::Result<proto::MountRequest> {
    use proto::mount_request::Auth;
    let auth = if let Some(file) = &args.account_key_file {
        Some(Auth::AccountKey(read_secret(file)?))
    } else if let Some(file) = &args.sas_token_file {
        Some(Auth::SasToken(read_secret(file)?))
    } else if args.client_id.is_some() || args.resource_id.is_some() || args.object_id.is_some() {
        Some(Auth::ManagedIdentity(proto::ManagedIdentity {
            client_id: args.client_id.unwrap_or_default(),
            resource_id: args.resource_id.unwrap_or_default(),
            object_id: args.object_id.unwrap_or_default(),
        }))
    } else {
        None
    };
    Ok(proto::MountRequest {
        name: args.name,
        account: args.account,
        container: args.container,
        mount_path: args.mount_path.display().to_string(),
        auth,
        read_only: args.read_only,
        cache_dir: args
            .cache_dir
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        cache_max_bytes: args.cache_max_bytes.unwrap_or(0),
        endpoint: args.endpoint.unwrap_or_default(),
        subdirectory: args.subdirectory.unwrap_or_default(),
        owner_uid: args.owner_uid,
        owner_gid: args.owner_gid,
    })
}

fn render_list(mounts: &[proto::MountInfo]) -> String {
    use std::fmt::Write;
    if mounts.is_empty() {
        return "no mounts\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<10} {:<28} {:<24} {:<4} {:>8} {:<8} {:<12} MESSAGE",
        "NAME", "STATE", "PATH", "ACCOUNT/CONTAINER", "AUTH", "CACHE", "REPAIRS", "CHECKED"
    );
    for m in mounts {
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<28} {:<24} {:<4} {:>8} {:<8} {:<12} {}",
            m.name,
            states::mount(m.state()),
            m.mount_path,
            format!("{}/{}", m.account, m.container),
            m.auth_mode,
            format::bytes(m.cache_max_bytes),
            m.remount_count,
            format::age(m.last_checked.as_ref()),
            m.message
        );
    }
    out
}
