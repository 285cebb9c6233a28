//! The accept loop: each connection's first request head checked (`head`), then served by
//! hyper with a header timeout, every connection watched so that a stop lets requests in flight
//! and responses being written finish before the workers are joined.

use crate::routes::App;
use crate::{Result, ServeError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

impl App {
    /// Serves until `shutdown` resolves, then lets the workers finish their queue.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        let router = self.router();
        let header_timeout = self.state.header_timeout;
        // Each connection is watched: at shutdown, idle ones close and requests in flight
        // finish before this returns.
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut connections = tokio::task::JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            while connections.try_join_next().is_some() {}
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors, or a connection reset while queued: keep serving.
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => {
                    self.state.stopping.store(true, Ordering::SeqCst);
                    break;
                }
            };
            let _ = stream.set_nodelay(true);
            let inner = hyper_util::service::TowerToHyperService::new(router.clone());
            // Counted in `answered` from its first request to its end.
            let answered = Arc::clone(&self.state.answered);
            let counted = Arc::new(AtomicBool::new(false));
            let mark = Arc::clone(&counted);
            let service = hyper::service::service_fn(move |request| {
                if !mark.swap(true, Ordering::SeqCst) {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                hyper::service::Service::call(&inner, request)
            });
            let answered = Answered {
                count: Arc::clone(&self.state.answered),
                counted,
            };
            let watcher = graceful.watcher();
            connections.spawn(async move {
                // Counted down when this task ends, however it ends (aborted at a stop too).
                let _answered = answered;
                let mut stream = stream;
                // The first head is checked here so a malformed one gets a JSON error; its
                // timer is the header timeout, as hyper's is for later requests.
                let read = match crate::head::read_first(&mut stream, header_timeout).await {
                    crate::head::Head::Ready(read) => read,
                    crate::head::Head::Refused | crate::head::Head::Gone => return,
                };
                // The header timer starts when a request's head is awaited, bytes or not, so a
                // silent client is dropped as well as a trickling one.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(
                        TokioIo::new(crate::head::Replay::new(read, stream)),
                        service,
                    );
                // A failed connection (reset, timed out) concerns that client only.
                let _ = watcher.watch(connection).await;
            });
        }
        drop(listener);
        // Requests in flight finish, and so do the responses being written: a connection that
        // has sent a request closes once its response is out (graceful shutdown closes idle
        // keep-alive ones at once), and a client that reads slowly is given up to the header
        // timeout once no request is left in flight. Connections that never sent a whole
        // request head are not waited for once everything else has been quiet for 2 s.
        let (in_flight, answered) = (
            Arc::clone(&self.state.in_flight),
            Arc::clone(&self.state.answered),
        );
        let idle = async move {
            let tick = Duration::from_millis(50);
            let (mut quiet_for, mut writing_for) = (Duration::ZERO, Duration::ZERO);
            while quiet_for < Duration::from_secs(2) && writing_for < header_timeout {
                tokio::time::sleep(tick).await;
                if in_flight.load(Ordering::SeqCst) > 0 {
                    (quiet_for, writing_for) = (Duration::ZERO, Duration::ZERO);
                } else if answered.load(Ordering::SeqCst) > 0 {
                    (quiet_for, writing_for) = (Duration::ZERO, writing_for + tick);
                } else {
                    quiet_for += tick;
                }
            }
        };
        tokio::select! {
            () = graceful.shutdown() => {}
            () = idle => {}
        }
        // Connections still open now (a reader slower than the limit, headers never finished)
        // are closed, so their tasks let go of the state and the workers can be joined.
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        drop(router);
        let mut state = self.state;
        for _ in 0..100 {
            match Arc::try_unwrap(state) {
                Ok(state) => {
                    return tokio::task::spawn_blocking(move || state.pool.shutdown())
                        .await
                        .map_err(|e| ServeError::Internal(e.to_string()));
                }
                Err(shared) => {
                    state = shared;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Ok(())
    }
}

/// Counts a connection that has sent a request down when its task ends.
struct Answered {
    count: Arc<AtomicUsize>,
    counted: Arc<AtomicBool>,
}

impl Drop for Answered {
    fn drop(&mut self) {
        if self.counted.load(Ordering::SeqCst) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
