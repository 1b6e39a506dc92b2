//! Connections: the accept loop, with limits on what a client may hold.
//!
//! - A client has [`ConnLimits::header_timeout`] to send a request's head, counted
//!   from when the connection opens or its previous response ends (hyper's header
//!   read timer), and as long again for the body ([`crate::routes`]): slowloris
//!   clients are closed.
//! - A connection with no request in flight and no bytes moving for
//!   [`ConnLimits::idle_timeout`] is closed (idle keep-alive, or a client that
//!   connects and says nothing).
//! - At most [`ConnLimits::max_connections`] are held, and fewer than the process's
//!   open-file limit allows (a margin is kept for model files, the log and the
//!   runtime). At the cap a new connection takes the place of the connection idle the
//!   longest; when every connection has a request in flight, the new one is answered
//!   503 in the OpenAI error shape and closed. The server stays reachable (`/health`)
//!   under idle floods.
//! - On shutdown the listener closes, idle connections close at once, requests in
//!   flight get [`ConnLimits::shutdown_grace`] to finish; then they are cancelled
//!   (each still writes its SSOT record) and every connection is closed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use futures_util::StreamExt as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower::ServiceExt as _;

/// File descriptors kept free of connections for everything else the process opens.
const FD_RESERVE: usize = 32;

/// The connection limits (see the module docs and [`crate::ServerBuilder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_connections: 512,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl ConnLimits {
    /// The cap in force: the configured one, kept below the open-file limit.
    pub(crate) fn effective_max(&self) -> usize {
        let by_files = open_file_limit().map_or(usize::MAX, |n| n.saturating_sub(FD_RESERVE));
        self.max_connections.min(by_files).max(1)
    }
}

/// The process's soft limit on open files, from `/proc/self/limits` (Linux); `None`
/// elsewhere or when unlimited.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One connection's state, shared by its task, its I/O and its requests.
#[derive(Debug)]
struct Conn {
    /// Milliseconds since the registry's epoch of the last byte read or written.
    last_activity: AtomicU64,
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Asks the connection to close (its place is taken by a new one).
    close: Notify,
    /// Set when it was asked to close: it no longer counts against the cap.
    closing: std::sync::atomic::AtomicBool,
}

/// The open connections.
#[derive(Debug)]
struct Registry {
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Open connections not already asked to close.
    fn len(&self) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| !c.closing.load(Ordering::SeqCst))
            .count()
    }

    fn add(&self) -> (u64, Arc<Conn>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            last_activity: AtomicU64::new(self.now_ms()),
            in_flight: AtomicUsize::new(0),
            close: Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::clone(&conn));
        (id, conn)
    }

    fn remove(&self, id: u64) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Asks the connection without a request in flight that has been quiet the
    /// longest to close; `false` when every connection has a request in flight.
    fn evict_idle(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = conns
            .iter()
            .filter(|(_, c)| {
                c.in_flight.load(Ordering::SeqCst) == 0 && !c.closing.load(Ordering::SeqCst)
            })
            .min_by_key(|(_, c)| c.last_activity.load(Ordering::SeqCst));
        match oldest {
            Some((id, c)) => {
                tracing::debug!(
                    conn = id,
                    "at the connection cap: closing an idle connection"
                );
                c.closing.store(true, Ordering::SeqCst);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, with `limits`; `abort`
/// is called when the shutdown grace runs out with requests still in flight.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    abort: impl Fn() + Send + 'static,
) {
    let registry = Arc::new(Registry {
        epoch: Instant::now(),
        next: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
    });
    let cap = limits.effective_max();
    tracing::debug!(cap, "connection cap");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if registry.len() >= cap && !registry.evict_idle() {
                        tasks.spawn(refuse(stream));
                        continue;
                    }
                    let (id, conn) = registry.add();
                    let (router, registry, stop) =
                        (router.clone(), Arc::clone(&registry), stop_rx.clone());
                    tasks.spawn(async move {
                        serve_connection(stream, router, &limits, &registry, &conn, stop).await;
                        registry.remove(id);
                    });
                }
                Err(e) => {
                    // Out of file descriptors (or another transient error): make room
                    // and try again shortly, never spin.
                    tracing::debug!(error = %e, "accepting a connection failed");
                    registry.evict_idle();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(limits.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = tasks.len(),
            "shutdown grace over: cancelling the requests in flight"
        );
        abort();
        // The cancelled requests answer (their records are written by the workers);
        // then whatever is left is closed.
        let drain = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        tasks.shutdown().await;
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    let body = crate::ApiError::unavailable(
        "the server holds as many connections as it may, each with a request in flight; retry shortly",
        "too_many_connections",
        1,
    )
    .body();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Serves one connection until it ends, goes idle, is asked to close, or the server
/// shuts down.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: &ConnLimits,
    registry: &Arc<Registry>,
    conn: &Arc<Conn>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Tracked {
        inner: stream,
        conn: Arc::clone(conn),
        registry: Arc::clone(registry),
    });
    let service = {
        let conn = Arc::clone(conn);
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let guard = InFlight::new(Arc::clone(&conn));
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(Body::new)).await?;
                // The request is in flight until its body has been sent.
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    let stream = body.into_data_stream().map(move |chunk| {
                        let _held = &guard;
                        chunk
                    });
                    Body::from_stream(stream)
                }))
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .serve_connection(io, service);
    let mut connection = std::pin::pin!(connection);
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    let idle_ms = u64::try_from(limits.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut stopping = *stop.borrow();
    if stopping {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
            () = conn.close.notified() => {
                if conn.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                connection.as_mut().graceful_shutdown();
            }
            _ = ticker.tick() => {
                let quiet = registry
                    .now_ms()
                    .saturating_sub(conn.last_activity.load(Ordering::SeqCst));
                if conn.in_flight.load(Ordering::SeqCst) == 0 && quiet >= idle_ms {
                    tracing::debug!(quiet_ms = quiet, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// Counts a request in flight on its connection while alive.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A socket that notes when bytes last moved.
struct Tracked {
    inner: TcpStream,
    conn: Arc<Conn>,
    registry: Arc<Registry>,
}

impl Tracked {
    fn touch(&self) {
        self.conn
            .last_activity
            .store(self.registry.now_ms(), Ordering::SeqCst);
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
