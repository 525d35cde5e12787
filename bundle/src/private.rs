//! Private files and directories.
//!
//! Evidence holds the secrets of the captured process (a core has its
//! memory: passwords, TLS keys; `context.json` its environment), and the
//! agent's and collector's state says what was seen. Everything they write is
//! readable by the running user only: directories 0700, files 0600 (the
//! collector's complete blobs 0400). Modes are set explicitly, whatever the
//! umask; new files are created with `O_EXCL | O_NOFOLLOW`.
//!
//! [`secure_dir`] is the start-up check of a directory given in the
//! configuration (the agent's capture and spool directories, the
//! collector's data directory): it refuses a symbolic link, a directory
//! writable by group or others, or one owned by another user, and tightens
//! a directory that is merely readable by others (e.g. 0755 from an older
//! version) to 0700.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Mode of every directory written.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file written.
pub const FILE_MODE: u32 = 0o600;

/// Sets the process umask to 077 (a second line of defence: modes are set
/// explicitly everywhere).
pub fn set_private_umask() {
    // SAFETY: umask only changes the process's file mode creation mask.
    unsafe { libc::umask(0o077) };
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn refused(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {what}", path.display()),
    )
}

/// Checks, tightens or creates a directory that holds evidence or state.
///
/// - missing: created 0700 (and its missing parents, 0700);
/// - a symbolic link, not a directory, owned by another user than the
///   effective one, or writable by group or others: refused;
/// - readable or searchable by others, else fine: tightened to 0700 (with a
///   log line);
/// - an existing parent that is a symbolic link owned by another user than
///   root or the running one, or a directory writable by group or others
///   without the sticky bit (anyone could swap what is under it): refused.
///
/// The error message names the offending path and what is wrong with it.
pub fn secure_dir(path: &Path) -> io::Result<()> {
    let abs = std::path::absolute(path)?;
    let me = euid();
    // Parents that exist, from the root down.
    let mut prefix = PathBuf::new();
    let comps: Vec<Component> = abs.components().collect();
    let Some((_, parents)) = comps.split_last() else {
        return Err(refused(path, "not a directory path"));
    };
    let mut missing_from = None;
    for (i, c) in parents.iter().enumerate() {
        prefix.push(c);
        let lmeta = match fs::symlink_metadata(&prefix) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                prefix.pop();
                missing_from = Some(i);
                break;
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", prefix.display()),
                ))
            }
        };
        if lmeta.file_type().is_symlink() && lmeta.uid() != 0 && lmeta.uid() != me {
            return Err(refused(
                &prefix,
                format_args!(
                    "is a symbolic link owned by uid {} (neither root nor the running user, uid {me}); refusing to follow it",
                    lmeta.uid()
                ),
            ));
        }
        let meta = fs::metadata(&prefix)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", prefix.display())))?;
        if !meta.is_dir() {
            return Err(refused(&prefix, "is not a directory"));
        }
        let mode = meta.mode();
        if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
            return Err(refused(
                &prefix,
                format_args!(
                    "is writable by group or others without the sticky bit (mode {:04o}): anyone could replace {}",
                    mode & 0o7777,
                    path.display()
                ),
            ));
        }
    }
    if let Some(i) = missing_from {
        // Create the missing parents, then the directory.
        for c in &parents[i..] {
            prefix.push(c);
            make_dir(&prefix)?;
        }
        return make_dir(&abs);
    }
    match fs::symlink_metadata(&abs) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&abs),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", abs.display()))),
        Ok(m) if m.file_type().is_symlink() => Err(refused(
            path,
            "is a symbolic link; refusing to follow it (name the real directory)",
        )),
        Ok(_) => check_existing(&abs),
    }
}

/// `mkdir 0700`, explicit chmod; an existing directory (a race, or a parent
/// made by another thread) is checked like one found at start.
fn make_dir(path: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => check_existing(path),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("creating {}: {e}", path.display()),
        )),
    }
}

/// Checks an existing directory (opened without following a link, so the
/// checks and the chmod are on the same inode).
fn check_existing(path: &Path) -> io::Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let dir = match dir {
        Ok(d) => d,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(refused(
                path,
                "is a symbolic link; refusing to follow it (name the real directory)",
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
            return Err(refused(path, "is not a directory"))
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let meta = dir.metadata()?;
    let me = euid();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me {
        return Err(refused(
            path,
            format_args!(
                "is owned by uid {}, not the running user (uid {me}); chown it or choose another directory",
                meta.uid()
            ),
        ));
    }
    if mode & 0o022 != 0 {
        return Err(refused(
            path,
            format_args!(
                "is writable by group or others (mode {mode:04o}); chmod 0700 it or choose another directory"
            ),
        ));
    }
    if mode & 0o7777 != DIR_MODE {
        // fchmod on the descriptor checked above.
        dir.set_permissions(fs::Permissions::from_mode(DIR_MODE))
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        tracing::warn!(
            path = %path.display(),
            from = format!("{mode:04o}"),
            "tightened a private directory to 0700"
        );
    }
    Ok(())
}

/// Creates a new directory (must not exist) 0700.
pub fn create_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(DIR_MODE).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Creates the missing directories on the way to `path` (and `path`) 0700;
/// existing ones are left as they are (e.g. the parent of an output file
/// named by the operator, such as /var/log).
pub fn create_missing_dirs(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_missing_dirs(parent)?;
    }
    match create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

fn new_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    o
}

/// Creates a new file 0600 (`O_CREAT | O_EXCL | O_NOFOLLOW`): fails if
/// anything, a link included, is already there.
pub fn create_new(path: &Path) -> io::Result<File> {
    let f = new_file_options().open(path)?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Like [`create_new`], also readable (for files read back after writing).
pub fn create_new_rw(path: &Path) -> io::Result<File> {
    let f = new_file_options().read(true).open(path)?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// [`create_new`] after removing what is at `path` (a temporary file a
/// crashed run left; the link itself if it is one).
pub fn replace_new(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    create_new(path)
}

/// Opens a file for appending (created 0600 when missing; `O_NOFOLLOW`). An
/// existing regular file of the running user is tightened to 0600; one of
/// another user is refused. Other kinds (a FIFO, /dev/stdout) are left as
/// they are.
pub fn open_append(path: &Path) -> io::Result<File> {
    open_private(path, OpenOptions::new().append(true).create(true))
}

/// Opens (creating 0600 when missing) a file for reading and writing
/// without truncating it, e.g. a lock file; like [`open_append`] otherwise.
pub fn open_rw(path: &Path) -> io::Result<File> {
    open_private(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
}

/// Opens with `o`, never through a symbolic link, creating 0600, and
/// tightens an existing file of ours to 0600.
fn open_private(path: &Path, o: &mut OpenOptions) -> io::Result<File> {
    let f = o
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| nofollow_error(path, e))?;
    tighten_file(path, &f)?;
    Ok(f)
}

fn nofollow_error(path: &Path, e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        refused(path, "is a symbolic link; refusing to follow it")
    } else {
        e
    }
}

fn tighten_file(path: &Path, f: &File) -> io::Result<()> {
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Ok(());
    }
    let me = euid();
    if meta.uid() != me {
        return Err(refused(
            path,
            format_args!(
                "is owned by uid {}, not the running user (uid {me})",
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & !FILE_MODE != 0 {
        f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
        tracing::warn!(
            path = %path.display(),
            from = format!("{mode:04o}"),
            "tightened a private file to 0600"
        );
    }
    Ok(())
}

/// Writes `data` to `path` atomically: a new 0600 temporary file next to it
/// (`NAME.tmp`), fsync, rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let r = (|| {
        let mut f = replace_new(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn chmod(p: &Path, m: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn missing_dirs_are_created_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        secure_dir(&d).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&t.path().join(p)), 0o700, "{p}");
        }
        // Idempotent.
        secure_dir(&d).unwrap();
    }

    #[test]
    fn a_symlink_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = secure_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link") && e.contains("link"), "{e}");
        // A file under it is not created through the link either.
        assert!(create_new(&link).is_err());
        assert!(open_append(&link)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
    }

    #[test]
    fn group_or_world_writable_dirs_are_refused() {
        let t = tempfile::tempdir().unwrap();
        for m in [0o770, 0o777, 0o702] {
            let d = t.path().join(format!("d{m:o}"));
            fs::create_dir(&d).unwrap();
            chmod(&d, m);
            let e = secure_dir(&d).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            let e = e.to_string();
            assert!(e.contains("writable by group or others"), "{e}");
            assert!(e.contains(&d.display().to_string()), "{e}");
            assert_eq!(mode(&d), m, "left as it was");
        }
        // A missing dir under a world-writable parent without the sticky bit
        // (owned by someone else) would be refused; under a sticky one
        // (/tmp) it is fine: the temp dir itself proves the latter.
    }

    #[test]
    fn a_dir_of_another_user_is_refused() {
        if euid() != 0 {
            return; // needs chown
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("other");
        create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let e = secure_dir(&d).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        // And a symlinked parent owned by that user is refused.
        let real = t.path().join("real");
        create_dir(&real).unwrap();
        let link = t.path().join("planted");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
        let e = secure_dir(&link.join("capture")).unwrap_err().to_string();
        assert!(
            e.contains("planted") && e.contains("symbolic link owned by uid 65534"),
            "{e}"
        );
    }

    #[test]
    fn a_0755_dir_is_tightened() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("old");
        fs::create_dir(&d).unwrap();
        chmod(&d, 0o755);
        secure_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn a_file_is_not_a_dir() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        assert!(secure_dir(&f)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
        assert!(secure_dir(&f.join("sub"))
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    /// The umask is process-wide (other tests' temp dirs would be 0777
    /// under umask 0): the checks run in a child process running only
    /// [`umask_0_child`].
    #[test]
    fn new_files_and_dirs_are_private_even_with_umask_0() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "private::tests::umask_0_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("VIGIL_UMASK_0_CHILD", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("umask 0 checks done"), "{text}");
    }

    #[test]
    fn umask_0_child() {
        if std::env::var_os("VIGIL_UMASK_0_CHILD").is_none() {
            return;
        }
        // SAFETY: only this test runs in this process.
        let old = unsafe { libc::umask(0) };
        let t = tempfile::tempdir().unwrap();
        // tempfile's own dir is 0777 under umask 0 (secure_dir would
        // rightly refuse it as a parent).
        chmod(t.path(), 0o700);
        let p = t.path();
        create_new(&p.join("new")).unwrap();
        create_new_rw(&p.join("rw")).unwrap();
        replace_new(&p.join("new")).unwrap();
        open_append(&p.join("append")).unwrap();
        open_rw(&p.join("lock")).unwrap();
        write_atomic(&p.join("atomic.json"), b"{}").unwrap();
        create_dir(&p.join("dir")).unwrap();
        create_missing_dirs(&p.join("m1/m2")).unwrap();
        secure_dir(&p.join("s1/s2")).unwrap();
        unsafe { libc::umask(old) };
        for f in ["new", "rw", "append", "lock", "atomic.json"] {
            assert_eq!(mode(&p.join(f)), 0o600, "{f}");
        }
        assert!(!p.join("atomic.json.tmp").exists());
        for d in ["dir", "m1", "m1/m2", "s1", "s1/s2"] {
            assert_eq!(mode(&p.join(d)), 0o700, "{d}");
        }
        // create_new never reuses what is there.
        assert_eq!(
            create_new(&p.join("new")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        println!("umask 0 checks done");
    }

    #[test]
    fn an_existing_loose_file_is_tightened_on_open() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("events.jsonl");
        fs::write(&f, b"old\n").unwrap();
        chmod(&f, 0o644);
        let mut h = open_append(&f).unwrap();
        h.write_all(b"new\n").unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(fs::read(&f).unwrap(), b"old\nnew\n");
        chmod(&f, 0o666);
        open_rw(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
