//! `instance-agent images list|pull|rm|login|logout|logins`: images and
//! registry credentials through the `ImageService` API. A registry password
//! is read from stdin (`--password-stdin`), never taken as an argument
//! (which any user can read in `ps`).

use std::io::Read;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::progress::PullDisplay;
use super::{format, output, states};
use crate::api::proto::{self, image_service_client::ImageServiceClient};

/// `images` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List the images on the instance: references, size, last use, the
    /// jobs that need each, whether the agent pulled it; and pulls in progress.
    List,
    /// Pull an image ahead of the jobs that need it (progress on stderr;
    /// `--json`: one progress message per line).
    Pull {
        /// The image reference (`registry:5000/team/env:1`, `repo@sha256:...`).
        image: String,
    },
    /// Remove an image reference (refused while a job needs it).
    Rm {
        /// A reference or an image id.
        image: String,
    },
    /// Store the credential the agent pulls from REGISTRY with (root-only file).
    Login {
        /// The registry host (and port), optionally with a path prefix
        /// (`registry.example:5000/team`); `docker.io` for Docker Hub.
        registry: String,
        /// The user name.
        #[arg(short = 'u', long)]
        username: String,
        /// Read the password or token from stdin (required: never give it
        /// as an argument).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete the credential of REGISTRY.
    Logout {
        /// The registry (and path prefix), as logged in.
        registry: String,
    },
    /// List the registries the agent has credentials for (never the secrets).
    Logins,
}

/// Runs an `images` subcommand; `pull` exits 1 when the pull fails.
pub async fn run(command: ImagesCommand, channel: Channel, json: bool) -> anyhow::Result<ExitCode> {
    let mut images = ImageServiceClient::new(channel);
    match command {
        ImagesCommand::List => {
            let list = images
                .list_images(proto::ListImagesRequest {})
                .await?
                .into_inner();
            output::reply(json, &list, render_list)?;
        }
        ImagesCommand::Pull { image } => {
            let mut stream = images
                .pull_image(proto::PullImageRequest {
                    image: image.clone(),
                })
                .await?
                .into_inner();
            let mut display = (!json).then(PullDisplay::new);
            let mut last = None;
            while let Some(message) = stream.next().await {
                match message {
                    Ok(progress) => {
                        if json {
                            output::json_line(&mut std::io::stdout(), &progress)?;
                        } else if let Some(display) = display.as_mut() {
                            display.show(&progress);
                        }
                        last = Some(progress);
                    }
                    Err(status) => {
                        if let Some(display) = display {
                            display.finish(&format!("failed: {}", status.message()));
                        }
                        return Err(status.into());
                    }
                }
            }
            let Some(done) = last.filter(|p| p.phase() == proto::PullPhase::Done) else {
                bail!("the pull of {image} ended without an outcome");
            };
            if let Some(display) = display {
                display.finish(&format!("pulled {} as {}", done.image, done.digest));
            }
        }
        ImagesCommand::Rm { image } => {
            let removed = images
                .remove_image(proto::RemoveImageRequest { image })
                .await?
                .into_inner();
            output::reply(json, &removed, |r| {
                let mut out = String::new();
                for item in &r.removed {
                    out.push_str(&format!("removed {item}\n"));
                }
                out.push_str(&format!("freed {}\n", format::bytes(r.freed_bytes)));
                out
            })?;
        }
        ImagesCommand::Login {
            registry,
            username,
            password_stdin,
        } => {
            if !password_stdin {
                bail!(
                    "give the password on stdin with --password-stdin \
                     (an argument would be visible to every user in `ps`)"
                );
            }
            let mut secret = String::new();
            std::io::stdin()
                .take(64 << 10)
                .read_to_string(&mut secret)
                .context("reading the password from stdin")?;
            let secret = secret.trim().to_owned();
            if secret.is_empty() {
                bail!("stdin held no password");
            }
            let credential = images
                .set_registry_credential(proto::SetRegistryCredentialRequest {
                    registry,
                    username,
                    secret,
                })
                .await?
                .into_inner();
            output::reply(json, &credential, |c| {
                format!("logged in to {} as {}\n", c.registry, c.username)
            })?;
        }
        ImagesCommand::Logout { registry } => {
            let deleted = images
                .delete_registry_credential(proto::DeleteRegistryCredentialRequest {
                    registry: registry.clone(),
                })
                .await?
                .into_inner();
            output::reply(json, &deleted, |d| {
                if d.deleted {
                    format!("logged out of {registry}\n")
                } else {
                    format!("no credential for {registry}\n")
                }
            })?;
        }
        ImagesCommand::Logins => {
            let list = images
                .list_registry_credentials(proto::ListRegistryCredentialsRequest {})
                .await?
                .into_inner();
            output::reply(json, &list, |list| {
                let mut out = format!("{:<40} {:<24} SET\n", "REGISTRY", "USERNAME");
                for c in &list.credentials {
                    out.push_str(&format!(
                        "{:<40} {:<24} {}\n",
                        c.registry,
                        c.username,
                        format::age(c.updated_at.as_ref())
                    ));
                }
                out
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render_list(list: &proto::ListImagesResponse) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<50} {:>10} {:<14} {:<6} {:<5} JOBS",
        "REFERENCE", "SIZE", "LAST USED", "PULLED", "KEPT"
    );
    for image in &list.images {
        let reference = image
            .references
            .first()
            .cloned()
            .unwrap_or_else(|| format!("<none> {}", short_id(&image.id)));
        let last_used = if image.last_used.is_some() {
            format::age(image.last_used.as_ref())
        } else {
            "-".to_owned()
        };
        let _ = writeln!(
            out,
            "{:<50} {:>10} {:<14} {:<6} {:<5} {}",
            reference,
            format::bytes(image.size_bytes),
            last_used,
            if image.pulled_by_agent { "agent" } else { "-" },
            if image.kept { "yes" } else { "-" },
            image.used_by_jobs.join(",")
        );
        for more in image.references.iter().skip(1) {
            let _ = writeln!(out, "  also {more}");
        }
    }
    if !list.pulls.is_empty() {
        let _ = writeln!(out, "pulls");
        for pull in &list.pulls {
            let _ = writeln!(out, "  {}", pull_line(pull));
        }
    }
    out
}

fn short_id(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

/// One pull in a line: image, phase, bytes, layers, reason, who waits.
pub fn pull_line(pull: &proto::PullProgress) -> String {
    let mut line = format!(
        "{} {} {} of {}, {}/{} layers",
        pull.image,
        states::pull_phase(pull.phase()),
        format::bytes(pull.bytes_done),
        format::bytes(pull.bytes_total),
        pull.layers_done,
        pull.layers_total
    );
    if !pull.reason.is_empty() {
        line.push_str(&format!(" ({})", pull.reason));
    }
    if !pull.needed_by.is_empty() {
        line.push_str(&format!(" for {}", pull.needed_by.join(", ")));
    }
    line
}
