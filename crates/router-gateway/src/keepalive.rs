//! A client connection's timeouts between requests. hyper has one timer for an HTTP/1.1
//! connection, its header read timeout, and runs it from the moment a response ends: a
//! kept-alive connection that idles longer than the head may take is closed. Clients keep
//! idle connections for much longer (reqwest and Go 90 s, .NET a minute or two) and reuse
//! them; one that sends a request on a connection just as the server closes it gets a broken
//! connection, not an answer. So the two are told apart here:
//!
//! - [`Phase`] follows where a connection is: waiting for its first request's head, idle
//!   between requests, reading a head (from its first byte), or serving.
//! - [`PhaseTimer`] is the connection's hyper timer. hyper asks it for a sleep whenever it
//!   starts waiting for a head; that sleep ends at the deadline of the phase the connection
//!   is in when it is polled: `head` after the connection opened or the head's first byte
//!   came, `idle` after the last response ended.
//! - [`Watched`] wraps the connection's stream and marks the first byte that arrives after
//!   an idle spell.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Waiting for the connection's first request head (since the connection opened).
const FIRST: u8 = 0;
/// Between requests: the last response has ended, no byte of the next head has come.
const IDLE: u8 = 1;
/// Reading a head whose first byte came after an idle spell.
const HEAD: u8 = 2;
/// A request is being served.
const BUSY: u8 = 3;

/// Where one connection is, and since when (milliseconds since it opened).
#[derive(Debug)]
pub(crate) struct Phase {
    opened: Instant,
    stage: AtomicU8,
    since_ms: AtomicU64,
    head: Duration,
    idle: Duration,
}

impl Phase {
    /// A connection opened now, whose heads must arrive within `head` of their first byte
    /// (the first within `head` of opening) and which may idle `idle` between requests.
    pub(crate) fn new(head: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            opened: Instant::now(),
            stage: AtomicU8::new(FIRST),
            since_ms: AtomicU64::new(0),
            head,
            idle,
        })
    }

    fn enter(&self, stage: u8) {
        let since = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.since_ms.store(since, Ordering::Relaxed);
        self.stage.store(stage, Ordering::Release);
    }

    /// A request's head has been read: it is being served.
    pub(crate) fn serving(&self) {
        self.stage.store(BUSY, Ordering::Release);
    }

    /// Idle between requests (kept alive, nothing of a next request read).
    pub(crate) fn is_idle(&self) -> bool {
        self.stage.load(Ordering::Acquire) == IDLE
    }

    /// hyper starts waiting for a head: the first on a new connection, else the one after
    /// a response that has just ended.
    fn waiting_for_head(&self) {
        if self.stage.load(Ordering::Acquire) != FIRST {
            self.enter(IDLE);
        }
    }

    /// Bytes came in.
    fn read_some(&self) {
        if self.is_idle() {
            self.enter(HEAD);
        }
    }

    /// When the wait for a head ends, as the phase stands.
    fn deadline(&self) -> Instant {
        let since = self.opened + Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        match self.stage.load(Ordering::Acquire) {
            IDLE => since + self.idle,
            _ => since + self.head,
        }
    }
}

/// A connection's hyper timer: its sleeps end at the deadline of the connection's phase.
#[derive(Debug, Clone)]
pub(crate) struct PhaseTimer(pub(crate) Arc<Phase>);

impl hyper::rt::Timer for PhaseTimer {
    /// A sleep for a set time, as hyper-util's timer gives it (nothing hyper's HTTP/1.1
    /// server does asks for one today).
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        hyper_util::rt::TokioTimer::new().sleep(duration)
    }

    /// hyper asks for this sleep when it starts waiting for a request head (the only timer
    /// an HTTP/1.1 server connection runs); its own deadline, its header read timeout from
    /// now, is replaced by the phase's.
    fn sleep_until(&self, _deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.0.waiting_for_head();
        Box::pin(PhaseSleep {
            phase: Arc::clone(&self.0),
            sleep: Box::pin(tokio::time::sleep_until(self.0.deadline())),
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        *sleep = self.sleep_until(new_deadline);
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }
}

/// The wait for a head: ends at the phase's deadline, read again at every poll (hyper polls
/// it each time bytes arrive and no whole head is in yet).
struct PhaseSleep {
    phase: Arc<Phase>,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for PhaseSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let deadline = self.phase.deadline();
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            match self.sleep.as_mut().poll(cx) {
                // The phase may have moved on since the sleep was set: look again.
                Poll::Ready(()) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl hyper::rt::Sleep for PhaseSleep {}

/// A connection's stream, marking its phase when bytes come in.
pub(crate) struct Watched<S> {
    inner: S,
    phase: Arc<Phase>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, phase: Arc<Phase>) -> Self {
        Self { inner, phase }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.phase.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    const HEAD: Duration = Duration::from_secs(1);
    const IDLE: Duration = Duration::from_secs(60);

    /// Whether the sleep has ended by now (polled once, as hyper does on a wake-up).
    fn ended(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> bool {
        let waker = std::task::Waker::noop();
        sleep
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_has_the_head_timeout_from_the_connections_start() {
        let phase = Phase::new(HEAD, IDLE);
        let timer = PhaseTimer(Arc::clone(&phase));
        tokio::time::advance(Duration::from_millis(400)).await;
        let mut sleep = timer.sleep_until(std::time::Instant::now());
        phase.read_some();
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!ended(&mut sleep));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(
            ended(&mut sleep),
            "a first head has 1 s from the connection's start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn between_requests_a_connection_idles_then_its_head_has_the_head_timeout() {
        let phase = Phase::new(HEAD, IDLE);
        let timer = PhaseTimer(Arc::clone(&phase));
        let first = timer.sleep_until(std::time::Instant::now());
        drop(first);
        phase.serving();
        tokio::time::advance(Duration::from_secs(5)).await;
        // The response has ended: hyper waits for the next head.
        let mut sleep = timer.sleep_until(std::time::Instant::now());
        assert!(phase.is_idle());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!ended(&mut sleep), "idling is not a slow head");
        phase.read_some();
        assert!(!phase.is_idle());
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(!ended(&mut sleep));
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(ended(&mut sleep), "a head has 1 s from its first byte");

        // Idle past the idle timeout: the wait ends.
        phase.serving();
        let mut sleep = timer.sleep_until(std::time::Instant::now());
        tokio::time::advance(Duration::from_millis(59_990)).await;
        assert!(!ended(&mut sleep));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(ended(&mut sleep));
    }
}
