//! Files that hold secrets (DKIM private keys, SRS secrets): refused when other users can read
//! them, and written so that they never are, not even for a moment.

use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be read.
    #[error("{}: cannot read: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Group or others may read or write it.
    #[error("{}: is accessible by group or others (mode {mode:04o}); refusing it: run chmod 600 {}", path.display(), path.display())]
    Insecure {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Refuses `path` unless only its owner may read and write it.
pub fn check_private_file(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o066 != 0 {
        return Err(SecretFileError::Insecure {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Reads a secret file after [`check_private_file`].
pub fn read_private_file(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    check_private_file(path)?;
    std::fs::read(path).map_err(|source| SecretFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` with mode 0600: created under a temporary name with that mode
/// from the start, synced, then renamed into place.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_files_are_private_and_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private_file(&path, b"tops3cr3t\n").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private_file(&path).unwrap(), b"tops3cr3t\n");
        // Overwriting keeps the mode and replaces the contents.
        write_private_file(&path, b"new").unwrap();
        assert_eq!(read_private_file(&path).unwrap(), b"new");
    }

    #[test]
    fn group_or_world_readable_files_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.private");
        std::fs::write(&path, b"x").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = check_private_file(&path).unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with(&path.display().to_string()), "{text}");
            assert!(text.contains(&format!("{mode:04o}")), "{text}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            check_private_file(&path).unwrap();
        }
        let missing = dir.path().join("missing");
        assert!(matches!(
            check_private_file(&missing),
            Err(SecretFileError::Unreadable { .. })
        ));
    }
}
