//! Simulated OpenAI and Azure OpenAI endpoints: real HTTP servers on 127.0.0.1, for tests, the
//! demo and the benchmarks.
//!
//! Each endpoint speaks one dialect (paths, auth headers it checks, error bodies, SSE), answers
//! after a latency model (time to first token plus time per token, with jitter, changeable
//! while running), enforces a quota the way Azure does (the estimated cost charged at admission
//! over short windows; 429 with `retry-after`, `retry-after-ms` and `x-ratelimit-*` headers),
//! can be told to fail ([`Fault`]: error statuses, resets, stalls, truncated streams, malformed
//! JSON, error events), and counts what it served ([`Counters`]) and remembers what it received
//! ([`RecordedRequest`]). Everything random is drawn from a generator seeded with the
//! simulator's seed, the endpoint's name and the request's number.
//!
//! Time is tokio's: under `tokio::time::pause()` a test runs a minute of simulated latency in
//! no time.
//!
//! # Examples
//!
//! ```
//! use std::time::Duration;
//! use upstream_sim::{EndpointConfig, Fault, Sim, SimDialect, Times};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let sim = Sim::start(0, [
//!     EndpointConfig::new("openai", SimDialect::OpenAi).with_api_key("sk-test"),
//!     EndpointConfig::new("azure", SimDialect::Azure).with_api_key("az-test"),
//! ])
//! .await?;
//! let openai = &sim.endpoints()[0];
//! assert!(openai.openai_base_url().starts_with("http://127.0.0.1:"));
//! openai.inject(Fault::rate_limited(Duration::from_secs(2)), Times::Next(1));
//! # Ok(()) }
//! ```

mod config;
mod entra;
mod faults;
mod limiter;
pub mod redis_server;
mod server;
mod state;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::{
    EndpointConfig, HeaderMode, LatencyModel, Limits, OutputModel, SimConfig, SimDialect,
    WindowKind,
};
pub use entra::{TokenIssuer, TokenIssuerConfig};
pub use faults::{Fault, Spill, Times, WaitForm};
pub use state::{Counters, RecordedRequest};

use faults::Injected;
use state::EndpointState;

/// A running simulator: its endpoints, each listening on its own port until the `Sim` is
/// dropped.
#[derive(Debug)]
pub struct Sim {
    endpoints: Vec<SimEndpoint>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sim {
    /// Starts every endpoint of `config`.
    ///
    /// # Errors
    ///
    /// When a port cannot be bound.
    pub async fn spawn(config: SimConfig) -> io::Result<Self> {
        Self::start(config.seed, config.endpoints).await
    }

    /// Starts `endpoints` with `seed`.
    ///
    /// # Errors
    ///
    /// When a port cannot be bound.
    pub async fn start(
        seed: u64,
        endpoints: impl IntoIterator<Item = EndpointConfig>,
    ) -> io::Result<Self> {
        let origin = Instant::now();
        let mut sim = Self {
            endpoints: Vec::new(),
            tasks: Vec::new(),
        };
        for config in endpoints {
            let listener = TcpListener::bind(("127.0.0.1", config.port)).await?;
            let addr = listener.local_addr()?;
            let state = Arc::new(EndpointState::new(config, seed, origin));
            sim.tasks
                .push(tokio::spawn(serve(listener, Arc::clone(&state))));
            sim.endpoints.push(SimEndpoint { state, addr });
        }
        Ok(sim)
    }

    /// The endpoints, in the order they were configured.
    pub fn endpoints(&self) -> &[SimEndpoint] {
        &self.endpoints
    }

    /// The endpoint named `name`.
    pub fn endpoint(&self, name: &str) -> Option<&SimEndpoint> {
        self.endpoints.iter().find(|e| e.name() == name)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<EndpointState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Small SSE events must leave at once, not after a delayed ACK.
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| server::answer(Arc::clone(&state), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A handle to one simulated endpoint: its address, and knobs to change how it behaves.
/// Cheap to clone.
#[derive(Clone)]
pub struct SimEndpoint {
    state: Arc<EndpointState>,
    addr: SocketAddr,
}

impl SimEndpoint {
    /// The configured name.
    pub fn name(&self) -> String {
        self.state.config().name
    }

    /// The dialect.
    pub fn dialect(&self) -> SimDialect {
        self.state.config().dialect
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the Azure resource endpoint, or the server root.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/v1`: the base URL an OpenAI client uses.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The latency model in force.
    pub fn latency(&self) -> LatencyModel {
        self.state.config().latency
    }

    /// Changes the latency model for requests that arrive from now on.
    pub fn set_latency(&self, latency: LatencyModel) {
        self.state.set_latency(latency);
    }

    /// Changes the key requests must carry (`None`: any request is let in), for requests that
    /// arrive from now on: a key revoked (or rotated) upstream, then restored.
    pub fn set_api_key(&self, key: Option<&str>) {
        self.state.set_api_key(key.map(str::to_owned));
    }

    /// Changes the model (OpenAI) or deployment (Azure) names served (empty: any name), for
    /// requests that arrive from now on: a deployment deleted, or created late.
    pub fn set_models(&self, models: &[&str]) {
        self.state
            .set_models(models.iter().map(|m| (*m).to_owned()).collect());
    }

    /// The quota in force.
    pub fn limits(&self) -> Limits {
        self.state.limits()
    }

    /// Changes the quota.
    pub fn set_limits(&self, limits: Limits) {
        self.state.set_limits(limits);
    }

    /// Starts the quota windows again from now, with full budgets: lines a measurement up with
    /// the windows (a benchmark that starts its load at a window edge measures whole windows).
    pub fn restart_windows(&self) {
        self.state.limiter().restart(tokio::time::Instant::now());
    }

    /// Injects `fault` for `times`. Faults apply in the order injected; the first that applies
    /// to a request wins.
    pub fn inject(&self, fault: Fault, times: Times) {
        self.state.faults().push(Injected { fault, times });
    }

    /// Makes its deployments full, spilling requests over as Azure does (`Some`), or not
    /// (`None`).
    pub fn spill(&self, spill: Option<faults::Spill>) {
        self.state.set_spill(spill);
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.state.faults().clear();
    }

    /// What it has served and refused.
    pub fn counters(&self) -> Counters {
        self.state.snapshot()
    }

    /// How many calls each request tag reached it: requests whose body carries
    /// `"metadata": {"call_tag": TAG}` (a field routers pass through), counted by tag, so
    /// that a test can tell how often one client request was tried upstream.
    pub fn call_tallies(&self) -> std::collections::HashMap<String, u32> {
        self.state.tallies()
    }

    /// The last requests it received (up to 256), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.recorded()
    }

    /// The last request it received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.state.recorded().pop()
    }
}

impl std::fmt::Debug for SimEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEndpoint")
            .field("name", &self.name())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
