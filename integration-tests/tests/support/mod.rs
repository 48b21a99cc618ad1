//! Helpers of the tests that spawn `leaf serve` as a process (soak, fault points): the
//! process itself, plain HTTP/1.1 calls and the process's RSS and thread count.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `leaf serve` process (the `leaf-test-serve` binary of this package, which runs the same
/// `serving::cli::run` as `leaf serve`).
pub struct ServeProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl ServeProcess {
    /// Starts `leaf serve --model model --listen ADDR` plus `args`, with `env` set, its
    /// stderr appended to `log`, and waits (up to a minute) until it answers.
    pub fn start(model: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let addr = free_addr();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leaf-test-serve"));
        cmd.arg("--model")
            .arg(model)
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env_remove("LEAF_FAULT_POINT")
            .env_remove("LEAF_ADMIN_TOKEN")
            .env_remove("LEAF_REWARD_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn leaf-test-serve");
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "leaf serve exited at start ({status}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if let Ok((200, _)) = call(addr, "GET", "/v1/leaf/status", "") {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "leaf serve did not answer within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ServeProcess { child, addr }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Ctrl-C (SIGINT), repeated every 2 s (one sent while the process restarts itself in
    /// place is not seen by its next image) for up to a minute; kills it if it does not exit.
    pub fn stop(mut self) -> Option<ExitStatus> {
        for _ in 0..30 {
            let _ = Command::new("kill")
                .args(["-INT", &self.pid().to_string()])
                .status();
            if let Some(s) = self.wait_exit(Duration::from_secs(2)) {
                return Some(s);
            }
        }
        let _ = self.child.kill();
        None
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 request with `Connection: close` (30 s timeouts); the status and the body.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Resident set size (MiB) and thread count of process `pid`, from `/proc`.
pub fn rss_and_threads(pid: u32) -> Option<(f64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")? as f64 / 1024.0, field("Threads:")?))
}
