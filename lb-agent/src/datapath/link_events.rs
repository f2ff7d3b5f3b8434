//! Link events of this network namespace (rtnetlink RTM_NEWLINK and
//! RTM_DELLINK, the RTMGRP_LINK group), so a new pod device gets its
//! program when the CNI creates it, before the pod can send its first
//! packet, rather than on the next poll.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

/// A netlink socket subscribed to link changes. The messages are not
/// parsed: any of them means "look at the devices again", which is cheap
/// and also right when the kernel dropped events (ENOBUFS).
pub struct LinkEvents {
    fd: OwnedFd,
}

impl LinkEvents {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscalls on a socket this function owns.
        unsafe {
            let fd = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = libc::RTMGRP_LINK as u32;
            let bound = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if bound != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(LinkEvents { fd })
        }
    }

    /// Wait up to `timeout` for link events and drain them. Ok(true): some
    /// arrived (or were dropped by the kernel); Ok(false): none came.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        if ready == 0 {
            return Ok(false);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: recv into a buffer we own, non-blocking.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                continue;
            }
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(true),
                // The kernel dropped events: a rescan covers them.
                Some(libc::ENOBUFS) | Some(libc::EINTR) => continue,
                _ if n == 0 => Ok(true),
                _ => Err(e),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs CAP_NET_ADMIN for a veth pair; the privileged suite (CI is
    /// root) runs it, in a network namespace of its own.
    #[test]
    fn a_new_device_is_an_event() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (run by the privileged suite)");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare only this thread's network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let events = LinkEvents::open().expect("netlink socket");
            assert!(
                !events.wait(Duration::from_millis(50)).unwrap(),
                "no event in a quiet namespace"
            );
            let added = std::process::Command::new("ip")
                .args([
                    "link", "add", "lbtest0", "type", "veth", "peer", "name", "lbtest1",
                ])
                .status()
                .expect("ip");
            assert!(added.success());
            assert!(
                events.wait(Duration::from_secs(2)).unwrap(),
                "RTM_NEWLINK for the new device"
            );
        })
        .join()
        .unwrap();
    }
}
