//! HAProxy's agent-check protocol: on each connection, write one line computed from the
//! service's [`TrafficState`] at that moment, then close.
//!
//! The service's owner changes the state through a [`TrafficHandle`] (a `watch` sender, so the
//! state has one writer); the responder only reads it. HAProxy may send a line of its own
//! (`agent-send`); it is read and dropped, the answer does not depend on it.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::state::{TrafficError, TrafficState};

/// The writing side of a service's traffic state.
#[derive(Debug)]
pub struct TrafficHandle {
    tx: watch::Sender<TrafficState>,
}

impl TrafficHandle {
    /// A handle holding `initial`.
    pub fn new(initial: TrafficState) -> Self {
        TrafficHandle {
            tx: watch::Sender::new(initial),
        }
    }

    /// The current state.
    pub fn get(&self) -> TrafficState {
        self.tx.borrow().clone()
    }

    /// Replaces the state with `f(state)`.
    pub fn update(&self, f: impl FnOnce(TrafficState) -> TrafficState) {
        self.tx.send_modify(|s| *s = f(s.clone()));
    }

    /// Sets the target weight in percent.
    pub fn set_weight(&self, percent: u32) -> Result<(), TrafficError> {
        let next = self.get().with_weight(percent)?;
        self.tx.send_replace(next);
        Ok(())
    }

    fn subscribe(&self) -> watch::Receiver<TrafficState> {
        self.tx.subscribe()
    }
}

/// A running agent-check responder.
#[derive(Debug)]
pub struct AgentCheckResponder {
    addr: SocketAddr,
}

impl AgentCheckResponder {
    /// Serves the agent-check protocol on `listener` from `handle`'s state, as a task on
    /// `tracker` that ends on `shutdown`.
    pub fn spawn(
        service: String,
        listener: TcpListener,
        handle: &TrafficHandle,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let state = handle.subscribe();
        tracing::info!(service = %service, %addr, "agent-check responder listening");
        tracker.spawn(serve(service, listener, state, shutdown));
        Ok(AgentCheckResponder { addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn serve(
    service: String,
    listener: TcpListener,
    state: watch::Receiver<TrafficState>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(service = %service, error = %e, "agent-check accept failed");
                continue;
            }
        };
        // One short write on a fresh socket: answered inline, so no task outlives the loop.
        // Whatever HAProxy sent (`agent-send`) is read and dropped before closing, so the close
        // is a FIN, not a reset that could discard the answer.
        let line = state.borrow().answer(Instant::now());
        let written = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            stream.write_all(line.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 256];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
        if let Ok(Err(e)) | Err(e) = written.map_err(std::io::Error::other) {
            tracing::debug!(service = %service, error = %e, "agent-check answer not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ask(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_each_connection_with_the_current_state() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let handle = TrafficHandle::new(TrafficState::new(None));
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let r =
            AgentCheckResponder::spawn("web".into(), listener, &handle, &tracker, token.clone())
                .unwrap();
        assert_eq!(ask(r.local_addr()).await, "up ready 100%\n");
        handle.set_weight(10).unwrap();
        assert_eq!(ask(r.local_addr()).await, "up ready 10%\n");
        handle.update(TrafficState::drain);
        assert_eq!(ask(r.local_addr()).await, "drain\n");
        assert!(handle.set_weight(300).is_err());
        // HAProxy's `agent-send` line is read and dropped; the answer still arrives.
        let mut s = tokio::net::TcpStream::connect(r.local_addr())
            .await
            .unwrap();
        s.write_all(b"hello from haproxy\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "drain\n");
        token.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
