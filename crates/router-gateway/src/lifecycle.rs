//! The server's life: start (keys, router, listener, TLS), reload on SIGHUP, and a graceful
//! shutdown on Ctrl-C or SIGTERM that lets requests in flight finish within a grace period.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::console::say;
use crate::keepalive::{Phase, PhaseTimer, Watched};
use crate::problem::{Context as _, Problem};
use crate::routes::{AppState, BodyLimits, app};
use crate::tls::Tls;

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
        status: crate::status::Board::default(),
        status_access: ArcSwap::from_pointee(config.status_access()?),
    });
    tokio::spawn(sample_forever(Arc::clone(&state)));
    let tls = match &config.server.tls {
        Some(files) => Some(Arc::new(Tls::load(files)?)),
        None => None,
    };
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    say(&format!(
        "openai-router: serving {} model group(s) on {scheme}://{address}/v1",
        state.router.models().len()
    ));
    #[cfg(unix)]
    if let Some(path) = path {
        tokio::spawn(reload_on_hangup(Arc::clone(&state), tls.clone(), path));
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
        idle_timeout: Duration::from_millis(server.idle_timeout_ms.max(1)),
        max_header_bytes: server.max_header_bytes.max(8192),
        max_connections: server.max_connections.max(1),
        drain_grace: Duration::from_millis(server.drain_grace_ms),
    };
    serve_connections(listener, tls, app(state, body), edge, shutdown()).await;
    Ok(())
}

/// Samples the router's counters for the status page every
/// [`SAMPLE_EVERY`](crate::status::SAMPLE_EVERY) while the server runs.
async fn sample_forever(state: Arc<AppState>) {
    let mut every = tokio::time::interval(state.status.every());
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        state
            .status
            .sample(&state.router, state.metrics.throttled());
    }
}

/// What a client's connection may take: its TLS handshake and each request head within
/// `header_read_timeout` (the first from the connection's start, the next from their first
/// byte), `idle_timeout` between requests, a head of at most `max_header_bytes`, a place
/// among `max_connections`, and `drain_grace` to finish once the server stops.
#[derive(Debug, Clone, Copy)]
struct Edge {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
    drain_grace: Duration,
}

/// Accepts connections (at most `edge.max_connections` served at once: the next waits
/// accepted, the rest in the listen backlog, and the connections idle between requests are
/// closed to make room for it) and serves `app` on each over HTTP/1.1, behind TLS when `tls` is
/// given, a request's head allowed `edge.header_read_timeout` (a client that sends it slower
/// is disconnected) and `edge.max_header_bytes` (431 past it), a kept-alive connection
/// `edge.idle_timeout` between requests. When `stop` completes, no
/// connection is accepted any more (the listener is closed), each open one finishes the
/// request it is serving (a stream to its end), and the function returns when all have
/// closed or `edge.drain_grace` has passed, whichever comes first.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<Tls>>,
    app: axum::Router,
    edge: Edge,
    stop: impl std::future::Future<Output = ()>,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(edge.max_connections));
    let (closing, _) = tokio::sync::watch::channel(());
    // Every place taken and a client waiting: the idle connections close.
    let (crowded, _) = tokio::sync::watch::channel(());
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
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
        // With every place taken, this one connection waits accepted (the rest in the
        // backlog) while the idle ones are asked to make room.
        let place = if let Ok(place) = Arc::clone(&places).try_acquire_owned() {
            place
        } else {
            crowded.send_replace(());
            tokio::select! {
                () = &mut stop => break,
                place = Arc::clone(&places).acquire_owned() => match place {
                    Ok(place) => place,
                    Err(_) => break,
                },
            }
        };
        // Every SSE event leaves at once, not after a delayed ACK.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let signals = Signals {
            closed: closing.subscribe(),
            crowded: crowded.subscribe(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, peer, app, edge, signals).await,
                Some(tls) => {
                    let handshake = tls.acceptor().accept(stream);
                    match tokio::time::timeout(edge.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, app, edge, signals).await,
                        Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake too slow; connection closed"),
                    }
                }
            }
            drop(place);
        });
    }
    drop(listener);
    // Every connection finishes what it serves, then closes.
    let _ = closing.send(());
    if tokio::time::timeout(edge.drain_grace, closing.closed())
        .await
        .is_err()
    {
        let open = edge.max_connections - places.available_permits();
        tracing::warn!(
            open,
            grace_ms = edge.drain_grace.as_millis(),
            "connections still open after the drain grace period; exiting"
        );
    }
}

/// What a connection hears from the accept loop: the server is stopping (`closed`), or every
/// place is taken and a client waits (`crowded`).
struct Signals {
    closed: tokio::sync::watch::Receiver<()>,
    crowded: tokio::sync::watch::Receiver<()>,
}

/// Serves one connection from `peer` until it ends; once `signals.closed` changes, until the
/// request it is serving has been answered; when `signals.crowded` changes while it idles
/// between requests, at once.
async fn serve_connection<S>(
    stream: S,
    peer: std::net::SocketAddr,
    app: axum::Router,
    edge: Edge,
    mut signals: Signals,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;
    let phase = Phase::new(edge.header_read_timeout, edge.idle_timeout);
    let serving = Arc::clone(&phase);
    // Who is calling, for the routes served to loopback clients only.
    let app = app.map_request(
        move |mut request: axum::extract::Request<hyper::body::Incoming>| {
            serving.serving();
            request.extensions_mut().insert(crate::routes::Peer(peer));
            request
        },
    );
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(PhaseTimer(Arc::clone(&phase)))
        .header_read_timeout(edge.header_read_timeout)
        .max_buf_size(edge.max_header_bytes)
        .serve_connection(
            TokioIo::new(Watched::new(stream, Arc::clone(&phase))),
            TowerToHyperService::new(app),
        );
    let mut connection = std::pin::pin!(connection);
    let mut crowding = true;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::trace!(%error, "connection ended");
                }
                return;
            }
            _ = signals.closed.changed() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                return;
            }
            heard = signals.crowded.changed(), if crowding => {
                if heard.is_err() {
                    crowding = false;
                } else if phase.is_idle() {
                    tracing::debug!(%peer, "idle connection closed: every place is taken and a client waits");
                    return;
                }
            }
        }
    }
}

/// Reloads `path` on SIGHUP; a bad file is refused and the old configuration stays.
#[cfg(unix)]
async fn reload_on_hangup(state: Arc<AppState>, tls: Option<Arc<Tls>>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match reload(&state, tls.as_deref(), &path) {
            Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "reload refused; the old configuration stays");
            }
        }
    }
}

/// Reads `path` and swaps in its router configuration, keys and certificate, or none of
/// them. The listener's address and whether it speaks TLS stay as they were at start.
fn reload(state: &AppState, tls: Option<&Tls>, path: &Path) -> Result<(), Problem> {
    let config = Config::load(path)?;
    let keys = config.keys()?;
    let header = config.affinity_header()?;
    let access = config.status_access()?;
    let builder = config.builder()?;
    let certificate = match (tls, &config.server.tls) {
        (Some(tls), Some(files)) => Some((tls, Tls::reread(files)?)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            tracing::warn!(
                "server.tls was added or removed: that takes a restart; the listener stays as it was"
            );
            None
        }
    };
    state.router.reconfigure(builder)?;
    if let Some((tls, next)) = certificate {
        tls.install(next);
    }
    state.keys.store(Arc::new(keys));
    state.affinity_header.store(Arc::new(header));
    state.status_access.store(Arc::new(access));
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
