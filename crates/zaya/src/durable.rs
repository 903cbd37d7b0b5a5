//! Files that survive a crash or a power loss. A rename makes a new file visible
//! atomically, but without an fsync of the file first the rename can reach the disk before
//! the data (a power loss then leaves a complete-looking, empty file), and without an fsync
//! of the directory the rename itself can be lost. Checkpoints and exports go through here.

use std::path::Path;

use crate::error::{Result, ZayaError};

/// Flushes a file's data and metadata to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ZayaError::io(path, e))
}

/// Flushes a directory's entries (renames, new files) to the disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    // Directories open read-only on Unix and can be fsynced; elsewhere this is a no-op.
    #[cfg(unix)]
    {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| ZayaError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames `from` to `to` after syncing `from`, then syncs the directory of `to`.
pub fn rename_synced(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        sync_dir(from)?;
    } else {
        sync_file(from)?;
    }
    std::fs::rename(from, to).map_err(|e| ZayaError::io(to, e))?;
    sync_dir(parent(to))
}

/// Writes a file so that a crash or power loss leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).map_err(|e| ZayaError::io(&tmp, e))?;
    rename_synced(&tmp, path)
}

/// Whether a directory entry is a temporary left by an interrupted write: ours
/// (`.tmp-…`, `….tmp`, `….tmp-write`) or the safetensors writer's (`.tmpXXXXXX`).
pub fn is_stale_temp(name: &str) -> bool {
    name.starts_with(".tmp") || name.ends_with(".tmp") || name.ends_with(".tmp-write")
}

/// Removes the temporaries an interrupted write left in `dir` (files or directories);
/// returns how many. A missing `dir` has none.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ZayaError::io(dir, e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| ZayaError::io(dir, e))?;
        let name = entry.file_name();
        if !is_stale_temp(&name.to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| ZayaError::io(&path, e))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_are_recognised_and_removed() {
        let dir = std::env::temp_dir().join(format!("zaya-durable-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join(".tmp-step-00000004")).unwrap();
        for f in [
            ".tmpAb12Cd",
            ".model.safetensors.tmp",
            "latest.tmp-write",
            "keep.json",
        ] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        assert_eq!(remove_stale_temps(&dir).unwrap(), 4);
        let left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["keep.json"]);
        assert_eq!(remove_stale_temps(&dir.join("missing")).unwrap(), 0);
        write_atomic(&dir.join("keep.json"), b"new").unwrap();
        assert_eq!(std::fs::read(dir.join("keep.json")).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
