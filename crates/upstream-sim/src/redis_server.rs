//! A throwaway `redis-server` on a free loopback port, persistence off, stopped on drop:
//! for the tests and benchmarks of the shared state store. It never skips: a missing
//! `redis-server` is an error that names the package to install.

use std::io;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running `redis-server` (killed on drop).
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

fn binary() -> io::Result<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file());
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "redis-server is needed: apt-get install redis-server (cargo xtask ci installs it)",
        )
    })
}

impl RedisServer {
    /// Starts one on a free port.
    ///
    /// # Errors
    ///
    /// When `redis-server` is not installed or does not start within 5 s.
    pub async fn start() -> io::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = Self { port, child: None };
        server.restart().await?;
        Ok(server)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (after [`stop`](Self::stop)).
    ///
    /// # Errors
    ///
    /// When it does not start within 5 s.
    pub async fn restart(&mut self) -> io::Result<()> {
        let child = Command::new(binary()?)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        // Readiness: the port accepts connections (bounded: 5 s).
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis-server did not start on port {}", self.port),
        ))
    }

    /// Stops it (kills the process).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}
