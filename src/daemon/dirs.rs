//! What the daemon keeps on disk for itself: its directories and the
//! instance id it generated once.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use super::DaemonError;
use crate::config::Config;

/// Creates `path` and its parents with `mode` (existing ones are kept as
/// they are); `what` names it in the error.
pub(super) fn prepare_dir(what: &'static str, path: &Path, mode: u32) -> Result<(), DaemonError> {
    let err = |source| DaemonError::Directory {
        what,
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(err)?;
    Ok(())
}

/// The instance id from config, else the one kept in the state dir, else a
/// new one that is kept there from now on.
pub(super) fn instance_id(config: &Config) -> Result<String, DaemonError> {
    if !config.agent.instance_id.is_empty() {
        return Ok(config.agent.instance_id.clone());
    }
    let path = config.agent.state_dir.join("instance-id");
    let err = |source| DaemonError::Directory {
        what: "instance id file",
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        Ok(_) | Err(_) => {
            let id = uuid::Uuid::new_v4().simple().to_string();
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
            std::fs::rename(&tmp, &path).map_err(err)?;
            Ok(id)
        }
    }
}
