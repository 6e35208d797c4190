//! The server's life: start (keys, router, listener), reload on SIGHUP, and a graceful
//! shutdown on Ctrl-C or SIGTERM that lets requests in flight finish.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::console::say;
use crate::problem::{Context as _, Problem};
use crate::routes::{AppState, app};

/// Serves until Ctrl-C or SIGTERM, then lets in-flight requests finish. `path` is the file
/// `config` came from, reloaded on SIGHUP.
pub(crate) async fn serve(config: Config, path: Option<PathBuf>) -> Result<(), Problem> {
    use axum::serve::ListenerExt as _;
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
    let listener = listener.tap_io(|tcp| {
        // Every SSE event leaves at once, not after a delayed ACK.
        let _ = tcp.set_nodelay(true);
    });
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
    axum::serve(listener, app(state, config.server.body_limit_bytes))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
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
