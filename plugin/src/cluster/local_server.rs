//! [`LocalNatsServer`]: a real `nats-server -js` as a child process, on a free loopback port
//! with its storage in a given directory: what the tests and the bench run against.
//!
//! The binary is Debian's `nats-server` package (`apt-get install -y nats-server`, 2.9);
//! `.ci/run` installs it when missing. Set `LEAF_NATS_SERVER` to use another binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ClusterError;

/// Environment variable naming the `nats-server` binary (default: `nats-server` on `PATH`).
pub const NATS_SERVER_ENV: &str = "LEAF_NATS_SERVER";

/// How to install the server, named in every "not found" error.
pub const INSTALL_HINT: &str = "install it with `apt-get install -y nats-server` (Debian/Ubuntu), or set LEAF_NATS_SERVER to its path";

/// Longest wait for a started server to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `nats-server -js` (killed when dropped).
#[derive(Debug)]
pub struct LocalNatsServer {
    child: Option<Child>,
    port: u16,
    store_dir: PathBuf,
    log: PathBuf,
}

fn binary() -> String {
    std::env::var(NATS_SERVER_ENV).unwrap_or_else(|_| "nats-server".to_string())
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| ClusterError::Server(format!("no free loopback port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::Server(format!("no free loopback port: {e}")))
}

impl LocalNatsServer {
    /// Starts a server with JetStream on a free loopback port, storing under `store_dir`.
    pub fn start(store_dir: &Path) -> Result<Self, ClusterError> {
        let mut s = LocalNatsServer {
            child: None,
            port: free_port()?,
            store_dir: store_dir.to_path_buf(),
            log: store_dir.join("nats-server.log"),
        };
        s.spawn()?;
        Ok(s)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills the server (SIGKILL: nothing is flushed that JetStream has not already synced)
    /// and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and storage (stopping it first if it runs).
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), ClusterError> {
        std::fs::create_dir_all(&self.store_dir).map_err(|e| {
            ClusterError::Server(format!("cannot create {}: {e}", self.store_dir.display()))
        })?;
        let log = std::fs::File::create(&self.log).map_err(|e| {
            ClusterError::Server(format!("cannot create {}: {e}", self.log.display()))
        })?;
        let log2 = log
            .try_clone()
            .map_err(|e| ClusterError::Server(format!("log file: {e}")))?;
        let bin = binary();
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    ClusterError::Server(format!("`{bin}` was not found: {INSTALL_HINT}"))
                } else {
                    ClusterError::Server(format!("cannot start `{bin}`: {e}"))
                }
            })?;
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains("Server is ready") {
                return Ok(());
            }
            if !self.is_running() || t0.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(ClusterError::Server(format!(
                    "did not become ready on port {}; its log:\n{text}",
                    self.port
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LocalNatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
