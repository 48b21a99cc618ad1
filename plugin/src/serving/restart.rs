//! Graceful re-exec of `leaf serve`: the bound on what swaps leak.
//!
//! Every engine mistral.rs 0.8.1 creates leaks an idle logger thread, and the process keeps
//! about 2 MiB more after each swap (measured; see the soak). Neither can be handed back from
//! inside the process: the thread never exits, and the engine's pipeline type cannot be reused
//! from outside the crate. So once [`ServerConfig::recycle_after_engines`] engines were created,
//! `leaf serve` restarts itself in place:
//!
//! 1. the HTTP server stops accepting and finishes the requests it has (new connections wait
//!    in the kernel's backlog of the listening socket, which stays open);
//! 2. the trainer and the server shut down as on Ctrl-C (in-flight requests finish, open
//!    groups are sealed);
//! 3. the process `exec`s its own binary with the same arguments and the listening socket's
//!    descriptor in `LEAF_LISTEN_FD`; the new image serves the store's current version (the one
//!    served before, since serving and the store never disagree) and accepts the waiting
//!    connections.
//!
//! The pid stays the same; counters start again; the online trainer starts again from the
//! current version (its optimizer state and any partial batch are lost).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use super::ServeError;
#[cfg(doc)]
use super::ServerConfig;

/// Environment variable carrying the inherited listening socket's descriptor.
pub const LISTEN_FD_ENV: &str = "LEAF_LISTEN_FD";
/// Environment variable counting the restarts of this process.
pub const RESTARTS_ENV: &str = "LEAF_RESTARTS";

fn io_err(what: &str, source: std::io::Error) -> ServeError {
    ServeError::Io {
        path: what.into(),
        source,
    }
}

/// The listening socket: the one inherited through `LEAF_LISTEN_FD` after a restart (its
/// address must be `listen`), else a new one bound to `listen`. Call it before starting
/// threads (it edits the environment).
pub fn listener(listen: SocketAddr) -> Result<TcpListener, ServeError> {
    let inherited = match std::env::var(LISTEN_FD_ENV) {
        Ok(v) => Some(v.parse::<RawFd>().map_err(|_| {
            ServeError::Config(format!("{LISTEN_FD_ENV}={v:?} is not a descriptor"))
        })?),
        Err(_) => None,
    };
    // Not inherited by anything this process starts later. (Called before the runtime
    // starts, while the process has one thread.)
    std::env::remove_var(LISTEN_FD_ENV);
    let l = match inherited {
        Some(fd) => {
            // SAFETY: the descriptor was handed over by the previous image of this process,
            // which kept it open for exactly this; nothing else in this process owns it.
            // `local_addr` below fails if it is not a socket.
            let l = unsafe { TcpListener::from_raw_fd(fd) };
            let addr = l
                .local_addr()
                .map_err(|e| io_err(&format!("{LISTEN_FD_ENV}={fd}"), e))?;
            if addr != listen && listen.port() != 0 {
                return Err(ServeError::Config(format!(
                    "the inherited socket listens on {addr}, not on {listen}"
                )));
            }
            set_cloexec(fd, true).map_err(|e| io_err("fcntl", e))?;
            l
        }
        None => TcpListener::bind(listen).map_err(|e| io_err(&listen.to_string(), e))?,
    };
    l.set_nonblocking(true)
        .map_err(|e| io_err(&listen.to_string(), e))?;
    Ok(l)
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor this process owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::FD_CLOEXEC
        } else {
            flags & !libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// How many times this process restarted itself.
pub fn restarts() -> u64 {
    std::env::var(RESTARTS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Replaces this process by a fresh image of its own binary, with the same arguments and
/// `listener` handed over. Returns only on failure.
pub fn exec_self(listener: &TcpListener) -> ServeError {
    use std::os::unix::process::CommandExt as _;
    let fd = listener.as_raw_fd();
    if let Err(e) = set_cloexec(fd, false) {
        return io_err("fcntl", e);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return io_err("/proc/self/exe", e),
    };
    let err = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(LISTEN_FD_ENV, fd.to_string())
        .env(RESTARTS_ENV, (restarts() + 1).to_string())
        .exec();
    let _ = set_cloexec(fd, true);
    io_err(&exe.display().to_string(), err)
}
