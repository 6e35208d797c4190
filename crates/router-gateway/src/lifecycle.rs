//! The server's life: start (keys, router, listener), reload on SIGHUP, and a graceful
//! shutdown on Ctrl-C or SIGTERM that lets requests in flight finish.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::console::say;
use crate::problem::{Context as _, Problem};
use crate::routes::{AppState, BodyLimits, app};

/// Serves until Ctrl-C or SIGTERM, then lets in-flight requests finish. `path` is the file
/// `config` came from, reloaded on SIGHUP.
pub(crate) async fn serve(config: Config, path: Option<PathBuf>) -> Result<(), Problem> {
    let keys = config.keys()?;
    if keys.is_empty() {
        tracing::warn!(
            "no gateway keys configured: the gateway is open to anyone who can reach it"
        );
    }
    let router = config.router().await?;
    let state = Arc::new(AppState {
        router,
        metrics: Arc::default(),
        keys: ArcSwap::from_pointee(keys),
        affinity_header: ArcSwap::from_pointee(config.affinity_header()?),
    });
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    say(&format!(
        "openai-router: serving {} model group(s) on http://{address}/v1",
        state.router.models().len()
    ));
    #[cfg(unix)]
    if let Some(path) = path {
        tokio::spawn(reload_on_hangup(Arc::clone(&state), path));
    }
    #[cfg(not(unix))]
    let _ = path;
    let server = &config.server;
    let body = BodyLimits {
        bytes: server.body_limit_bytes,
        within: Duration::from_millis(server.body_read_timeout_ms),
    };
    let edge = Edge {
        header_read_timeout: Duration::from_millis(server.header_read_timeout_ms.max(1)),
        max_header_bytes: server.max_header_bytes.max(8192),
        max_connections: server.max_connections.max(1),
    };
    serve_connections(listener, app(state, body), edge, shutdown()).await;
    Ok(())
}

/// What a client's connection may take: its request head within `header_read_timeout` and
/// `max_header_bytes`, and a place among `max_connections`.
#[derive(Debug, Clone, Copy)]
struct Edge {
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
}

/// Accepts connections (at most `edge.max_connections` at once: the rest wait in the
/// listen backlog) and serves `app` on each over HTTP/1.1, a request's head allowed
/// `edge.header_read_timeout` (a client that sends it slower is disconnected) and
/// `edge.max_header_bytes` (431 past it). When `stop` completes, no connection is accepted
/// any more, each open one finishes the request it is serving (a stream to its end), and the
/// function returns when all have closed.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    edge: Edge,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let places = Arc::new(tokio::sync::Semaphore::new(edge.max_connections));
    let (closing, _) = tokio::sync::watch::channel(());
    let mut stop = std::pin::pin!(stop);
    loop {
        let place = tokio::select! {
            () = &mut stop => break,
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
        };
        let (stream, _) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Every SSE event leaves at once, not after a delayed ACK.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut closed = closing.subscribe();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(edge.header_read_timeout)
                .max_buf_size(edge.max_header_bytes)
                .serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::trace!(%error, "connection ended");
                    }
                }
                _ = closed.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(place);
        });
    }
    drop(listener);
    // Every connection finishes what it serves, then closes.
    let _ = closing.send(());
    closing.closed().await;
}

/// Reloads `path` on SIGHUP; a bad file is refused and the old configuration stays.
#[cfg(unix)]
async fn reload_on_hangup(state: Arc<AppState>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match reload(&state, &path) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "reload refused; the old configuration stays");
            }
        }
    }
}

/// Reads `path` and swaps in its router configuration and keys, or neither.
fn reload(state: &AppState, path: &Path) -> Result<(), Problem> {
    let config = Config::load(path)?;
    let keys = config.keys()?;
    let header = config.affinity_header()?;
    state.router.reconfigure(config.builder()?)?;
    state.keys.store(Arc::new(keys));
    state.affinity_header.store(Arc::new(header));
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down; letting in-flight requests finish");
}
