//! File and pipe provenance: which files hold content that came from the
//! network or out of a decoder, who wrote them, and which processes carry
//! such content on their standard input.
//!
//! Content has an [`Origin`] when its writer is a downloader, a process
//! that connected out shortly before, a decoder (`base64 -d`, `xxd -r`, an
//! interpreter one-liner that decodes), or a process whose standard input
//! is a pipe fed by one of those (`curl URL | tee f`, `curl URL | gunzip >
//! f`): such a process is *tainted*. Processes are joined by the pipe
//! itself (its inode, reported for fds 0-2 at exec), not by names or
//! timing, and either end may exec first.
//!
//! A file gets a provenance entry when such a writer opens it for writing,
//! and when such a program starts with its standard output redirected to
//! it (`curl URL > f`: the shell opened `f` before the exec). Another
//! writer's truncating open ends the entry (an open without truncation,
//! like `touch` or an append, leaves the fetched content there). A rename carries it to the new path.
//! Everything here is bounded (LRU maps); nothing is read from disk.

use std::hash::{BuildHasher, Hash};
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;

use super::classify::{is_decoder, is_downloader};
use crate::model::event::{Event, Exec, Payload, Stdio};
use crate::model::{EnrichedEvent, Image, PerImage};

/// A file: (device, inode).
pub type FileId = (u32, u64);

/// Where a file's or a process's content came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Fetched over the network.
    Network,
    /// Decoded from an encoded form (base64, hex, an encrypted blob).
    Decoded,
}

impl Origin {
    /// "fetched it over the network" / "decoded it".
    pub fn verb(self) -> &'static str {
        match self {
            Origin::Network => "fetched it over the network",
            Origin::Decoded => "decoded it",
        }
    }
}

/// Who wrote a file and how it got its content.
#[derive(Clone, Debug)]
pub struct Provenance {
    /// Writer pid.
    pub pid: u32,
    /// The writer's image.
    pub writer: Arc<Image>,
    /// Path written ("" when only the inode is known), kept current across
    /// renames.
    pub path: String,
    /// Where its content came from.
    pub origin: Origin,
    /// A finding was already raised for this file.
    pub reported: bool,
}

/// A process whose standard input carries content of some origin.
#[derive(Clone, Debug)]
pub struct Taint {
    /// Where the content came from.
    pub origin: Origin,
    /// The process at the start of the chain.
    pub source_pid: u32,
    /// Its image.
    pub source: Arc<Image>,
}

/// Two processes joined by one pipe, the writer carrying content of an
/// origin: found at whichever of the two execs came second.
#[derive(Clone, Debug)]
pub struct PipeJoin {
    /// The reading process.
    pub reader_pid: u32,
    /// What it reads.
    pub taint: Taint,
}

const SLOTS: usize = 1024;

/// A process reading a pipe whose writer is not known yet.
#[derive(Clone, Copy, Debug)]
struct Reader {
    pid: u32,
    /// Its standard output, when a file.
    out_file: Option<FileId>,
    /// Its standard output, when a pipe (inode).
    out_pipe: Option<u64>,
}

/// The provenance state (bounded).
pub struct ProvenanceState {
    files: LruCache<FileId, Provenance>,
    /// Path hash -> file.
    paths: LruCache<u64, FileId>,
    tainted: LruCache<u32, Taint>,
    /// Pipe inode -> the tainted process writing into it.
    pipe_writers: LruCache<u64, Taint>,
    /// Pipe inode -> a process reading it that exec'd before any writer
    /// was known.
    pipe_readers: LruCache<u64, Reader>,
    /// Per pid slot: the last file the process opened for writing (a shell
    /// opens a redirection's target just before it execs the program).
    last_open: Vec<Option<Arc<Event>>>,
    hasher: std::collections::hash_map::RandomState,
    /// The origin of what a program writes by what it is (a downloader, a
    /// decoder), for the images seen last: a writer writes many files.
    programs: PerImage<Option<Origin>>,
}

impl Default for ProvenanceState {
    fn default() -> Self {
        Self::new()
    }
}

impl ProvenanceState {
    /// Empty, with the default bounds.
    pub fn new() -> Self {
        let n = |x: usize| NonZeroUsize::new(x).expect("non-zero");
        Self {
            files: LruCache::new(n(16_384)),
            paths: LruCache::new(n(16_384)),
            tainted: LruCache::new(n(4_096)),
            pipe_writers: LruCache::new(n(4_096)),
            pipe_readers: LruCache::new(n(4_096)),
            last_open: vec![None; SLOTS],
            hasher: Default::default(),
            programs: PerImage::new(256),
        }
    }

    fn path_key(&self, path: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        path.hash(&mut h);
        std::hash::Hasher::finish(&h)
    }

    /// The provenance of a file, if it has one.
    pub fn file(&mut self, id: FileId) -> Option<&mut Provenance> {
        self.files.get_mut(&id)
    }

    /// The provenance of a file, if it has one (no LRU promotion).
    pub fn peek_file(&self, id: FileId) -> Option<&Provenance> {
        self.files.peek(&id)
    }

    /// The provenance of the file now at `path`, if it has one.
    pub fn at_path(&mut self, path: &str) -> Option<&mut Provenance> {
        let key = self.path_key(path);
        let id = *self.paths.peek(&key)?;
        let p = self.files.get_mut(&id)?;
        (p.path == path).then_some(p)
    }

    /// What `pid`'s standard input carries, if anything.
    pub fn taint(&self, pid: u32) -> Option<&Taint> {
        self.tainted.peek(&pid)
    }

    fn record(&mut self, id: FileId, p: Provenance) {
        if !p.path.is_empty() {
            let key = self.path_key(&p.path);
            self.paths.put(key, id);
        }
        self.files.put(id, p);
    }

    fn forget(&mut self, id: FileId) {
        if let Some(old) = self.files.pop(&id) {
            let key = self.path_key(&old.path);
            self.paths.pop(&key);
        }
    }

    /// The origin of what `pid` (running `image`) writes, if any:
    /// `connected` tells whether it connected out shortly before.
    fn writer_origin(&mut self, pid: u32, image: &Arc<Image>, connected: bool) -> Option<Taint> {
        let program = self.programs.get(image, |image, origin| {
            *origin = if is_downloader(&image.exe) {
                Some(Origin::Network)
            } else if is_decoder(&image.exe, &image.argv) {
                Some(Origin::Decoded)
            } else {
                None
            };
        });
        let own = if connected {
            Some(Origin::Network)
        } else {
            *program
        };
        match own {
            Some(origin) => Some(Taint {
                origin,
                source_pid: pid,
                source: Arc::clone(image),
            }),
            None => self.tainted.peek(&pid).cloned(),
        }
    }

    /// A file opened for writing.
    pub fn on_write(
        &mut self,
        ev: &EnrichedEvent,
        id: FileId,
        path: &str,
        truncates: bool,
        connected: bool,
    ) {
        let pid = ev.event.pid;
        self.last_open[pid as usize % SLOTS] = Some(Arc::clone(&ev.event));
        match self.writer_origin(pid, &ev.process.image, connected) {
            // Another writer that replaces the content (a truncating open)
            // ends what the file's provenance was; one that only opens it
            // (`touch`, an append) does not make fetched content clean.
            None => {
                if truncates && self.files.contains(&id) {
                    self.forget(id);
                }
            }
            Some(t) => self.record(
                id,
                Provenance {
                    pid,
                    writer: Arc::clone(&ev.process.image),
                    path: path.to_string(),
                    origin: t.origin,
                    reported: false,
                },
            ),
        }
    }

    /// A file renamed: its provenance follows it.
    pub fn on_rename(&mut self, old_path: &str, new_path: &str) {
        let key = self.path_key(old_path);
        let Some(id) = self.paths.pop(&key) else {
            return;
        };
        if let Some(p) = self.files.get_mut(&id) {
            p.path = new_path.to_string();
            let key = self.path_key(new_path);
            self.paths.put(key, id);
        }
    }

    /// The path `pid` last opened for writing, if it was `id`.
    fn last_path(&self, pid: u32, id: FileId) -> String {
        match self.last_open[pid as usize % SLOTS].as_deref() {
            Some(Event {
                pid: p,
                payload: Payload::FileOpen(f),
                ..
            }) if *p == pid && (f.dev, f.ino) == id => f.path.clone(),
            _ => String::new(),
        }
    }

    /// A process exec'd: the image's own origin (downloader, decoder) or
    /// the one its input pipe carries taints it; a redirected standard
    /// output gets the origin; a pipe joins its two ends (and a chain of
    /// pipes, `curl | gunzip | sh`, whichever order they exec in). Returns
    /// the joins this exec completed.
    pub fn on_exec(&mut self, ev: &EnrichedEvent, x: &Exec, connected: bool) -> Vec<PipeJoin> {
        let pid = ev.event.pid;
        // A new image starts clean; what it reads decides below.
        self.tainted.pop(&pid);
        let mut joins = Vec::new();
        let pipe = |fd: usize| {
            (x.stdio[fd] == Stdio::Pipe)
                .then(|| x.stdio_ids.file(fd))
                .flatten()
                .map(|(_, ino)| ino)
        };
        let (stdin_pipe, out_pipe) = (pipe(0), pipe(1));
        let out_file = (x.stdio[1] == Stdio::File)
            .then(|| x.stdio_ids.file(1))
            .flatten();
        let me = Reader {
            pid,
            out_file,
            out_pipe,
        };
        if let Some(t) = self.writer_origin(pid, &ev.process.image, connected) {
            self.taint_reader(me, t, &mut joins);
        } else if let Some(t) = stdin_pipe.and_then(|i| self.pipe_writers.peek(&i).cloned()) {
            if t.source_pid != pid {
                joins.push(PipeJoin {
                    reader_pid: pid,
                    taint: t.clone(),
                });
                self.taint_reader(me, t, &mut joins);
            }
        } else if let Some(ino) = stdin_pipe {
            self.pipe_readers.put(ino, me);
        }
        joins
    }

    /// `r` carries content of `t`'s origin: its redirected output gets the
    /// origin, and so does whatever reads its output pipe (now, or when
    /// that reader execs), down a chain of at most 8 pipes.
    fn taint_reader(&mut self, r: Reader, t: Taint, joins: &mut Vec<PipeJoin>) {
        let mut next = Some(r);
        for _ in 0..8 {
            let Some(r) = next.take() else { break };
            if let Some(id) = r.out_file {
                let path = self.last_path(r.pid, id);
                self.record(
                    id,
                    Provenance {
                        pid: r.pid,
                        writer: Arc::clone(&t.source),
                        path,
                        origin: t.origin,
                        reported: false,
                    },
                );
            }
            self.tainted.put(r.pid, t.clone());
            if let Some(ino) = r.out_pipe {
                self.pipe_writers.put(ino, t.clone());
                if let Some(reader) = self.pipe_readers.pop(&ino) {
                    if reader.pid != r.pid {
                        joins.push(PipeJoin {
                            reader_pid: reader.pid,
                            taint: t.clone(),
                        });
                        next = Some(reader);
                    }
                }
            }
        }
    }

    /// A process exited.
    pub fn on_exit(&mut self, pid: u32) {
        self.tainted.pop(&pid);
        if let Some(Some(e)) = self.last_open.get(pid as usize % SLOTS) {
            if e.pid == pid {
                self.last_open[pid as usize % SLOTS] = None;
            }
        }
    }
}
