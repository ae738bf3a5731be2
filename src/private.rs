//! Files and directories the daemon creates: private to the service user whatever the umask,
//! because they hold every event a stranger could read otherwise (the database and its WAL,
//! the file sink's archive, the instance lock). Only what this module creates is set; a
//! file or directory that already exists keeps the mode the operator gave it.
//!
//! Also the one way the operator's files (configuration, rules, secrets) are read:
//! [`read_regular`], which a FIFO, a device or a huge file cannot stall or exhaust.
//!
//! Files are `0600`, or `0640` in a directory the operator has opened to a group (group read
//! and search on it, e.g. `chgrp adm /var/lib/hookroute && chmod 0750 …`), so that group can run
//! the command-line tools. New directories are `0700`.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// A new directory's mode.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents as `0700`.
///
/// # Errors
/// The directory cannot be created.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    // The umask may have taken bits the mode asked for; set it exactly.
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// The mode of a new file at `path`: `0640` when its directory grants its group read and
/// search, else `0600`.
pub fn file_mode(path: &Path) -> u32 {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let shared = std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o050 == 0o050);
    if shared { 0o640 } else { 0o600 }
}

/// Opens `path` with `options`, creating it (and its directory) private if it does not exist.
///
/// # Errors
/// As [`OpenOptions::open`] and [`create_dir`].
pub fn open(path: &Path, options: &OpenOptions) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    let mode = file_mode(path);
    let mut create = options.clone();
    create.create_new(true).mode(mode);
    match create.open(path) {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(mode))?;
            Ok(file)
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => options.open(path),
        Err(err) => Err(err),
    }
}

/// Creates an empty private file at `path` unless something is there already.
///
/// # Errors
/// As [`open`].
pub fn touch(path: &Path) -> io::Result<()> {
    open(path, OpenOptions::new().write(true)).map(drop)
}

/// Reads the regular file at `path` as UTF-8 text of at most `limit` bytes.
///
/// A configuration is read while the daemon runs (a reload): a `rules_file` replaced by a FIFO
/// once froze it (the open waits for a writer, the read for an end), and `/dev/zero` read until
/// memory ran out. So the file is opened without waiting (`O_NONBLOCK`, which a regular file
/// ignores), and anything but a regular file, or a file past `limit`, is refused by name.
///
/// # Errors
/// The file cannot be opened or read, is not a regular file, is larger than `limit`, or is
/// not UTF-8; the error says which.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<String> {
    use std::io::Read as _;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a device or a directory cannot be read as one)",
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes, more than any configuration needs"),
        )
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn private_whatever_the_umask_and_group_readable_when_the_directory_is() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/data");
        let file = dir.join("hookroute.db");
        touch(&file).unwrap();
        assert_eq!((mode(&dir), mode(&file)), (0o700, 0o600));

        // An existing file keeps its mode; one in a group-opened directory is 0640.
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        touch(&file).unwrap();
        assert_eq!(mode(&file), 0o644);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o750)).unwrap();
        let shared = dir.join("events.jsonl");
        open(&shared, OpenOptions::new().append(true)).unwrap();
        assert_eq!(mode(&shared), 0o640);
    }
}
