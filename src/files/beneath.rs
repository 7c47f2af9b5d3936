//! Opening what `zonegate files` serves without leaving its directory, even while someone
//! swaps files and directories for symlinks: a path is resolved (symlinks followed) and
//! checked to lie under the root, then opened relative to the root's descriptor by that
//! resolved path with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a symlink put in
//! the way of any part of it between the check and the open is refused, not followed.
//!
//! Where `openat2` is missing (Linux before 5.6, or a sandbox that filters it) the path is
//! walked one part at a time with `O_NOFOLLOW` instead: as safe, a system call per part.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};
use tracing::warn;

/// The served directory as one request sees it: its resolved path and a descriptor that
/// opens stay beneath ([`Share::now`]).
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    dir: OwnedFd,
    /// Its device and inode, to tell when the path names another directory.
    id: (u64, u64),
}

/// The shared directory as it was given (`--dir`), looked up again for each request: a disk
/// mounted there after the start, or a directory swapped in by a deploy (`site.new` renamed
/// to `site`, a symlink pointed elsewhere), is what is served. Held once at the start, the
/// directory under the mount point listed empty and the old site was served until a restart
/// (and its descriptor kept the mount busy).
#[derive(Debug)]
pub struct Share {
    given: PathBuf,
    last: std::sync::Mutex<std::sync::Arc<Root>>,
}

impl Share {
    /// Opens `dir` as the share. Fails if it is not a directory that can be opened.
    pub fn open(dir: &Path) -> io::Result<Share> {
        let given = std::path::absolute(dir)?;
        let root = Root::open(&given)?;
        Ok(Share {
            given,
            last: std::sync::Mutex::new(std::sync::Arc::new(root)),
        })
    }

    /// The directory as last looked up: its resolved path is what request paths are
    /// resolved under before [`Share::now`].
    pub fn last(&self) -> std::sync::Arc<Root> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The directory the given path names now: the one last looked up while it is the same
    /// (resolved path, device and inode), else opened anew. Blocking.
    pub fn now(&self) -> io::Result<std::sync::Arc<Root>> {
        let last = self.last();
        let path = std::fs::canonicalize(&self.given)?;
        let meta = std::fs::metadata(&path)?;
        if path == last.path && (meta.dev(), meta.ino()) == last.id {
            return Ok(last);
        }
        let root = std::sync::Arc::new(Root::open(&path)?);
        tracing::info!(dir = %self.given.display(), now = %root.path.display(), "the shared directory changed (a disk mounted, a directory swapped in): serving what it names now");
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = root.clone();
        Ok(root)
    }
}

/// Why a path is not served.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not found")]
    NotFound,
    /// Resolves (through a symlink) to somewhere outside the root.
    #[error("outside the shared directory")]
    Outside,
    /// Found but not opened: no permission, or a symlink swapped in after the check.
    #[error("cannot read: {0}")]
    Unreadable(io::Error),
}

/// An opened file or directory, with what `fstat` says of the opened handle itself.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: Metadata,
    /// Its resolved path (for the content type, and the listing's links).
    pub path: PathBuf,
}

/// How files and directories are opened for reading. Non-blocking, so a FIFO swapped in after
/// the `O_PATH` look cannot hold the thread in open(2); `O_NOCTTY`, so a terminal never becomes
/// the service's controlling one.
const READ: OFlags = OFlags::RDONLY
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY);

/// Set once `openat2` turned out to be missing: later opens go straight to the fallback.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// `probe` (an `O_PATH` handle) opened again for reading ([`READ`]), through
/// `/proc/self/fd`: the same inode, whatever its path names now.
fn reopen(probe: &File) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let link = format!("/proc/self/fd/{}", probe.as_raw_fd());
    Ok(rustix::fs::open(link.as_str(), READ, Mode::empty())?)
}

impl Root {
    /// Opens `dir` as the root. Fails if it is not a directory that can be opened.
    fn open(dir: &Path) -> io::Result<Root> {
        let path = std::fs::canonicalize(dir)?;
        let dir = rustix::fs::open(
            &path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&dir)?;
        Ok(Root {
            path,
            dir,
            id: (st.st_dev, st.st_ino),
        })
    }

    /// The root's resolved path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves `path` (under the root's path, from [`super::names::resolve`]) and opens what
    /// it names, if that lies under the root. Blocking: call from a blocking thread.
    pub fn open_beneath(&self, path: &Path) -> Result<Opened, Refused> {
        let real = std::fs::canonicalize(path).map_err(|_| Refused::NotFound)?;
        let rel = real
            .strip_prefix(&self.path)
            .map_err(|_| Refused::Outside)?;
        // Looked at through an `O_PATH` handle first, which opens nothing: opening a FIFO for
        // reading lets a blocked writer go (and our close then breaks its pipe), opening a
        // device node can act (a watchdog armed, a tape rewound). Only regular files and
        // directories are served; anything else goes back as the `O_PATH` handle, which the
        // caller refuses by its type and never reads.
        let probe = File::from(
            self.open_relative(rel, OFlags::PATH | OFlags::CLOEXEC)
                .map_err(Refused::Unreadable)?,
        );
        let seen = probe.metadata().map_err(Refused::Unreadable)?;
        if !seen.is_file() && !seen.is_dir() {
            return Ok(Opened {
                file: probe,
                meta: seen,
                path: real,
            });
        }
        // The inode just looked at, reopened for reading through its handle's /proc link:
        // nothing renamed into place meanwhile (a FIFO, a device node) is opened, which opening
        // by path again could do (refused after, once its open had acted). Without /proc, by
        // path, and what was opened is compared below.
        let file = match reopen(&probe) {
            Ok(fd) => File::from(fd),
            Err(_) => File::from(self.open_relative(rel, READ).map_err(Refused::Unreadable)?),
        };
        let meta = file.metadata().map_err(Refused::Unreadable)?;
        // Something else renamed into place between the two opens: refused, not served.
        if (meta.dev(), meta.ino()) != (seen.dev(), seen.ino()) {
            return Err(Refused::Unreadable(io::Error::other(
                "replaced while being opened",
            )));
        }
        Ok(Opened {
            file,
            meta,
            path: real,
        })
    }

    /// Opens `rel` (symlink-free when it was resolved) beneath the root with `flags`
    /// ([`READ`], or `O_PATH` to look first).
    fn open_relative(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            let resolve =
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.dir, rel, flags, Mode::empty(), resolve) {
                Err(rustix::io::Errno::NOSYS) => {
                    if !NO_OPENAT2.swap(true, Ordering::Relaxed) {
                        warn!("openat2 is not available (Linux before 5.6?): files are opened one path part at a time instead (slower, as safe)");
                    }
                }
                // A sandbox's filter (EPERM) refuses the call itself; anything else is the
                // answer.
                Err(rustix::io::Errno::PERM) => {}
                other => return Ok(other?),
            }
        }
        self.open_walk(rel, flags)
    }

    /// Without openat2: `rel` one part at a time from the root's descriptor, each opened with
    /// `O_NOFOLLOW` relative to the one before, so a symlink swapped in anywhere on the way
    /// fails the open (ELOOP, ENOTDIR) instead of being followed. Slower (a system call per
    /// part), as safe.
    fn open_walk(&self, rel: &Path, flags: OFlags) -> io::Result<OwnedFd> {
        use std::path::Component;
        let parts: Vec<&std::ffi::OsStr> = rel
            .components()
            .filter_map(|c| match c {
                Component::Normal(p) => Some(Ok(p)),
                Component::CurDir => None,
                _ => Some(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a plain relative path",
                ))),
            })
            .collect::<io::Result<_>>()?;
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(rustix::fs::openat(&self.dir, ".", flags, Mode::empty())?);
        };
        let mut at: Option<OwnedFd> = None;
        for dir in dirs {
            let base = at.as_ref().map_or(self.dir.as_fd(), |fd| fd.as_fd());
            at = Some(rustix::fs::openat(
                base,
                *dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?);
        }
        let base = at.as_ref().map_or(self.dir.as_fd(), |fd| fd.as_fd());
        Ok(rustix::fs::openat(
            base,
            *last,
            flags | OFlags::NOFOLLOW,
            Mode::empty(),
        )?)
    }
}

/// Calls `visit` with each name in the directory `dir` (an [`Opened`] directory, read from
/// the handle, not by path again) and a function telling whether that name is a directory
/// itself (a symlink is not one), called only for the names worth its cost, until `visit`
/// breaks. Blocking.
pub fn read_names(
    dir: &File,
    mut visit: impl FnMut(&[u8], &dyn Fn() -> bool) -> std::ops::ControlFlow<()>,
) -> io::Result<()> {
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let is_dir = || match entry.file_type() {
            FileType::Directory => true,
            // Some file systems do not say in the entry: ask, without following a symlink.
            FileType::Unknown => rustix::fs::statat(
                dir,
                entry.file_name(),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
            _ => false,
        };
        if visit(name, &is_dir).is_break() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn symlinks_out_are_refused_and_in_are_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), "f").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        std::os::unix::fs::symlink("d/f", dir.path().join("in")).unwrap();
        // An absolute symlink that stays inside is followed too.
        std::os::unix::fs::symlink(dir.path().join("d"), dir.path().join("abs")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        let p = |s: &str| root.path().join(s);
        assert!(matches!(
            root.open_beneath(&p("out/secret")),
            Err(Refused::Outside)
        ));
        assert!(matches!(
            root.open_beneath(&p("nothing")),
            Err(Refused::NotFound)
        ));
        let read = |s: &str| {
            let o = root.open_beneath(&p(s)).unwrap();
            std::io::read_to_string(o.file).unwrap()
        };
        assert_eq!(read("in"), "f");
        assert_eq!(read("abs/f"), "f");
        let top = root.open_beneath(root.path()).unwrap();
        assert!(top.meta.is_dir());
        let mut names = Vec::new();
        read_names(&top.file, |n, d| {
            names.push((n.to_vec(), d()));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        names.sort();
        let want: Vec<(Vec<u8>, bool)> = vec![
            (b"abs".to_vec(), false),
            (b"d".to_vec(), true),
            (b"in".to_vec(), false),
            (b"out".to_vec(), false),
        ];
        assert_eq!(names, want);
    }

    /// A FIFO in the share is looked at, never opened for reading: a writer waiting for a
    /// reader is not let go (and then broken) by a request for it.
    #[test]
    fn a_fifo_is_not_opened_for_reading() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let root = Root::open(dir.path()).unwrap();
        let opened = root.open_beneath(&root.path().join("pipe")).unwrap();
        assert!(opened.meta.file_type().is_fifo(), "{:?}", opened.meta);
        // A non-blocking write-open succeeds only while some reader has the FIFO open.
        let writer = rustix::fs::open(
            &fifo,
            OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        );
        assert_eq!(writer.unwrap_err(), rustix::io::Errno::NXIO);
        drop(opened);
        // Files and directories still open for reading.
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let f = root.open_beneath(&root.path().join("f")).unwrap();
        assert_eq!(std::io::read_to_string(f.file).unwrap(), "x");
        assert!(root.open_beneath(root.path()).unwrap().meta.is_dir());
    }

    /// The race openat2 closes: a directory of the path swapped for a symlink out after the
    /// path was checked. Opening the checked path then must fail, not follow the link.
    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_check_is_not_followed() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), "secret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), "inside").unwrap();
        let root = Root::open(dir.path()).unwrap();
        // What the check resolved, before the swap.
        let rel = Path::new("d/f");
        std::fs::rename(dir.path().join("d"), dir.path().join("d.old")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
        let flags = READ;
        // With openat2, and with the part-by-part walk used where it is missing.
        for opened in [root.open_relative(rel, flags), root.open_walk(rel, flags)] {
            assert!(
                opened.is_err(),
                "followed the swapped-in symlink: {:?}",
                opened.map(|fd| std::io::read_to_string(File::from(fd)))
            );
        }
        // The walk itself opens what is there when nothing was swapped.
        std::fs::remove_file(dir.path().join("d")).unwrap();
        std::fs::rename(dir.path().join("d.old"), dir.path().join("d")).unwrap();
        let fd = root.open_walk(rel, flags).unwrap();
        assert_eq!(std::io::read_to_string(File::from(fd)).unwrap(), "inside");
        let top = root.open_walk(Path::new(""), flags).unwrap();
        assert!(File::from(top).metadata().unwrap().is_dir());
    }
}
