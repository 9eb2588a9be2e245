//! Crafted frames sent from inside a test namespace (an AF_PACKET socket on one of its
//! interfaces): the attacker of the security tests. Frames go only to the namespace's own
//! veth, i.e. to the test's own balancer.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context as _, Result, bail};

/// An AF_PACKET socket bound to one interface of the calling thread's namespace.
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
}

impl RawSender {
    /// Opens a sender on `iface` (in the calling thread's namespace).
    pub fn open(iface: &str) -> Result<RawSender> {
        let c = std::ffi::CString::new(iface)?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Straight to the driver: a crafted frame needs no queueing discipline, and a flood
        // sent through one spends its time in the qdisc's lock rather than on the balancer.
        set_option(
            &fd,
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &(1 as libc::c_int),
        )
        .context("PACKET_QDISC_BYPASS")?;
        Ok(RawSender { fd, ifindex })
    }

    /// Sends one whole Ethernet frame. A plain `io::Error` (a full ring is routine in a flood,
    /// and an `anyhow` error would capture a backtrace per frame under `RUST_BACKTRACE`).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid buffer and address of the sizes passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sets socket option `name` at `level` to `value`.
fn set_option<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> std::io::Result<()> {
    // SAFETY: a valid value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A MAC address as `ip link` prints it.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("not a MAC address: {s:?}"))
}

/// Every frame that arrives on one interface of the calling thread's namespace (an
/// AF_PACKET capture): what reached a client, in the security tests.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Opens a capture on `iface` whose reads give up after `timeout`.
    pub fn open(iface: &str, timeout: std::time::Duration) -> Result<Capture> {
        let c = std::ffi::CString::new(iface)?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as i32) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = all;
        sa.sll_ifindex = ifindex;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid address of the size passed.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } != 0
        {
            bail!("bind: {}", std::io::Error::last_os_error());
        }
        set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv).context("SO_RCVTIMEO")?;
        Ok(Capture { fd })
    }

    /// The next frame (`None` when none came within the timeout).
    pub fn next(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: a valid buffer of the size passed.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        (n > 0).then_some(n as usize)
    }
}
