//! Programs known by their content, not their name: a copy of the
//! system's shell, downloader or interpreter under another name (or in a
//! memfd) is still that program to the rules and to the kernel's freeze.
//!
//! At start the system's copies of those programs are found by name in the
//! system's binary directories and remembered by size. An exec whose file
//! has one of those sizes (read through `/proc/PID/exe`, so the file the
//! kernel really ran) is hashed and compared; the answer is cached per
//! (device, inode), so a program is looked at once however often it runs.
//! Part of the state stage: it reads files, the detection stage does not.

use std::collections::HashMap;
use std::io::Read;
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use sha2::{Digest, Sha256};

/// Directories the system's own programs live in.
const BIN_DIRS: &[&str] = &["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"];

/// Programs whose identity the rules care about.
const PROGRAMS: &[&str] = &[
    "sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "csh", "tcsh", "fish", "curl", "wget", "nc",
    "ncat", "netcat", "socat", "python3", "perl", "ruby", "php", "node",
];

/// Largest file hashed (a program bigger than this is not compared).
const HASH_MAX_BYTES: u64 = 64 << 20;

struct Known {
    /// Canonical path of the system's program.
    path: Arc<str>,
    /// Its SHA-256, computed the first time a same-sized file shows up.
    hash: Option<Option<[u8; 32]>>,
}

/// The system's programs by size, and what each executed file turned out
/// to be.
pub struct Identities {
    by_size: HashMap<u64, Vec<Known>>,
    seen: LruCache<FileId, Option<Arc<str>>>,
}

/// One executable file, as a new file could not share it: an inode number
/// is recycled at once, its times and size are not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileId {
    dev: u32,
    ino: u64,
    size: u64,
    ctime_ns: i64,
    mtime_ns: i64,
}

/// A `stat` device number in the kernel's encoding (`MAJOR << 20 |
/// MINOR`), as the exec record carries it.
pub fn kernel_dev(st_dev: u64) -> u32 {
    (libc::major(st_dev) << 20) | libc::minor(st_dev)
}

impl Identities {
    /// Finds the system's copies of [`PROGRAMS`].
    pub fn scan() -> Self {
        let mut by_size: HashMap<u64, Vec<Known>> = HashMap::new();
        let mut paths = std::collections::HashSet::new();
        for dir in BIN_DIRS {
            for name in PROGRAMS {
                let Ok(real) = std::fs::canonicalize(format!("{dir}/{name}")) else {
                    continue;
                };
                let Ok(meta) = std::fs::metadata(&real) else {
                    continue;
                };
                let path: Arc<str> = real.to_string_lossy().into();
                if meta.is_file() && paths.insert(path.clone()) {
                    by_size
                        .entry(meta.len())
                        .or_default()
                        .push(Known { path, hash: None });
                }
            }
        }
        Self {
            by_size,
            seen: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        }
    }

    /// Sizes of the system's copies of `names` (the kernel freezes a
    /// server's child whose program has one of them, whatever its name).
    pub fn sizes_of(&self, names: &[String]) -> Vec<u64> {
        let mut out: Vec<u64> = self
            .by_size
            .iter()
            .filter(|(_, ks)| ks.iter().any(|k| names.iter().any(|n| n == base(&k.path))))
            .map(|(s, _)| *s)
            .collect();
        out.sort_unstable();
        out
    }

    /// The system program `pid`'s executable (`exe`, inode `(dev, ino)` in
    /// the kernel's device encoding) is a copy of, when it runs under
    /// another name or from elsewhere than that program's own file.
    ///
    /// Read through `/proc/PID/exe`, which must still be that inode: a
    /// process that exec'd again since (`env` running `python3`) or exited
    /// (its pid reused) shows another program, whose verdict is neither
    /// given nor remembered for this one. Verdicts are remembered per file
    /// (inode, size, times), so a recycled inode is judged afresh.
    ///
    /// `size` is the file's size as the kernel saw it at exec (0: unknown):
    /// a file of no system program's size is no copy, and costs no /proc
    /// read.
    pub fn copy_of(
        &mut self,
        pid: u32,
        exe: &str,
        dev: u32,
        ino: u64,
        size: u64,
    ) -> Option<Arc<str>> {
        use std::os::unix::fs::MetadataExt;
        if self.by_size.is_empty() || (size != 0 && !self.by_size.contains_key(&size)) {
            return None;
        }
        let path = format!("/proc/{pid}/exe");
        let meta = std::fs::metadata(&path).ok()?;
        // The inode number alone: a stacking filesystem (overlayfs) may
        // show its own device where the kernel's record has another.
        if meta.ino() != ino {
            return None;
        }
        let id = FileId {
            dev,
            ino,
            size: meta.len(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        };
        if let Some(v) = self.seen.get(&id) {
            return v.clone();
        }
        let found = self.compare(&path, id.size);
        // The system's own file run as itself is no copy; a link to it
        // under another name (busybox-style) is judged by its name.
        let found = found.filter(|orig| &**orig != exe);
        self.seen.put(id, found.clone());
        found
    }

    fn compare(&mut self, exe: &str, size: u64) -> Option<Arc<str>> {
        let known = self.by_size.get_mut(&size)?;
        let mine = hash_file(exe)?;
        for k in known.iter_mut() {
            let h = *k.hash.get_or_insert_with(|| hash_file(&k.path));
            if h == Some(mine) {
                return Some(k.path.clone());
            }
        }
        None
    }
}

fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn hash_file(path: &str) -> Option<[u8; 32]> {
    let f = std::fs::File::open(path).ok()?;
    let mut r = f.take(HASH_MAX_BYTES);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_copy_of_a_system_shell_is_that_shell() {
        let mut ids = Identities::scan();
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("worker");
        std::fs::copy(&sh, &copy).unwrap();
        let mut child = std::process::Command::new(&copy)
            .arg("-c")
            .arg("sleep 2")
            .spawn()
            .unwrap();
        let meta = std::fs::metadata(&copy).unwrap();
        use std::os::unix::fs::MetadataExt;
        // The exec record names the copy, but by the time it is handled
        // the process runs something else (it exec'd again, or its pid was
        // reused): no verdict, and none remembered for the copy.
        let mut later = std::process::Command::new(&sh)
            .arg("-c")
            .arg("sleep 2")
            .spawn()
            .unwrap();
        let got = ids.copy_of(
            later.id(),
            &copy.to_string_lossy(),
            kernel_dev(meta.dev()),
            meta.ino(),
            meta.len(),
        );
        later.kill().unwrap();
        later.wait().unwrap();
        assert_eq!(got, None);
        let got = ids.copy_of(
            child.id(),
            &copy.to_string_lossy(),
            kernel_dev(meta.dev()),
            meta.ino(),
            meta.len(),
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(got.as_deref(), Some(&*sh.to_string_lossy()));
        assert!(ids
            .sizes_of(&["sh".to_string(), "dash".to_string(), "bash".to_string()])
            .contains(&meta.len()));
        // Near misses: the shell itself, and another program of its own.
        let mut me = std::process::Command::new(&sh)
            .arg("-c")
            .arg("sleep 2")
            .spawn()
            .unwrap();
        let m = std::fs::metadata(&sh).unwrap();
        let got = ids.copy_of(
            me.id(),
            &sh.to_string_lossy(),
            kernel_dev(m.dev()),
            m.ino(),
            m.len(),
        );
        me.kill().unwrap();
        me.wait().unwrap();
        assert_eq!(got, None);
        let mut other = std::process::Command::new("/bin/sleep")
            .arg("2")
            .spawn()
            .unwrap();
        let m = std::fs::metadata("/bin/sleep").unwrap();
        let got = ids.copy_of(
            other.id(),
            "/bin/sleep",
            kernel_dev(m.dev()),
            m.ino(),
            m.len(),
        );
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(got, None);
    }
}
