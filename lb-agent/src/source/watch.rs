//! inotify on the manifests directory, so a change is picked up at once
//! instead of at the next poll. The poll stays as a fallback (directories
//! swapped by symlink, as ConfigMap volumes do, or inotify unavailable).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use tokio::io::unix::AsyncFd;

pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> io::Result<Self> {
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_DELETE
            | libc::IN_CREATE
            | libc::IN_ATTRIB;
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd stays open and is the same descriptor for as
        // long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(DirWatch { fd })
    }

    /// Wait until something in the directory changed, and drain the events.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                let n = unsafe {
                    libc::read(
                        self.fd.get_ref().as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() != io::ErrorKind::WouldBlock {
                    return Err(err);
                }
                break;
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}
