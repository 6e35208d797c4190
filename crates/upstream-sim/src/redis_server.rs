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

/// A throwaway Redis Cluster on loopback: `masters` `redis-server`s in cluster mode (no
/// replicas, persistence off), their slots assigned by `redis-cli --cluster create`; killed
/// and their folder removed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    /// The nodes' ports on 127.0.0.1 (each also uses its port + 10000 for the cluster bus).
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
}

/// A free port whose cluster-bus port (+10000) is free too.
fn free_cluster_port() -> io::Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port pair for a cluster node",
    ))
}

impl RedisCluster {
    /// Starts `masters` nodes (at least 3, as Redis requires) and joins them into a cluster.
    ///
    /// # Errors
    ///
    /// When `redis-server` or `redis-cli` is missing, a node does not start, or the cluster is
    /// not ready within 15 s.
    pub async fn start(masters: usize) -> io::Result<Self> {
        let server = binary()?;
        let cli = server.with_file_name("redis-cli");
        if !cli.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "redis-cli is needed beside redis-server: apt-get install redis-tools",
            ));
        }
        let dir = std::env::temp_dir().join(format!(
            "openai-router-redis-cluster-{}-{}",
            std::process::id(),
            free_cluster_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Self {
            ports: Vec::new(),
            children: Vec::new(),
            dir,
        };
        for _ in 0..masters.max(3) {
            let port = free_cluster_port()?;
            let child = Command::new(&server)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(cluster.dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&cluster.dir)
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            cluster.children.push(child);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            let mut up = false;
            for _ in 0..250 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    up = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !up {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("cluster node on port {port} did not start"),
                ));
            }
        }
        let created = Command::new(&cli)
            .arg("--cluster")
            .arg("create")
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await?;
        if !created.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stderr)
            )));
        }
        // Ready when every node says its state is ok (the slots are agreed on).
        for _ in 0..150 {
            let mut ok = true;
            for &port in &cluster.ports {
                let info = Command::new(&cli)
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()
                    .await?;
                ok &= String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok");
            }
            if ok {
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the cluster's state did not become ok within 15 s",
        ))
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// How many keys each node holds (`DBSIZE`), in the order of [`ports`](Self::ports).
    ///
    /// # Errors
    ///
    /// When `redis-cli` fails or answers something else than a number.
    pub async fn keys_per_node(&self) -> io::Result<Vec<u64>> {
        let cli = binary()?.with_file_name("redis-cli");
        let mut counts = Vec::new();
        for &port in &self.ports {
            let out = Command::new(&cli)
                .args(["-p", &port.to_string(), "dbsize"])
                .output()
                .await?;
            let text = String::from_utf8_lossy(&out.stdout);
            counts.push(text.trim().parse().map_err(|_| {
                io::Error::other(format!("dbsize on port {port} answered {text:?}"))
            })?);
        }
        Ok(counts)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
