//! A streaming client that stops reading: hyper stops polling the response
//! body once the socket's buffers are full, so an event handed out and not
//! followed by a poll for the next one for `timeout` means the client
//! stalled. Its requests are then cancelled (the engine frees their
//! sequences); a slow engine never counts, since waiting on it is a pending
//! poll, not an unread event.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;

use crate::engine::Ticket;

pub struct Watched<S> {
    inner: Pin<Box<S>>,
    /// Milliseconds since `base` + 1 when an item was handed out and not
    /// yet followed by the next poll; 0 when nothing is owed.
    owed: Arc<AtomicU64>,
    base: Instant,
}

impl<S: Stream> Watched<S> {
    /// Wraps `inner`; a watchdog task cancels `tickets` if the reader stalls.
    pub fn new(inner: S, tickets: Vec<Arc<Ticket>>, timeout: Duration) -> Self {
        let owed = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let watched = Arc::downgrade(&owed);
        let check = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(check).await;
                let Some(owed) = watched.upgrade() else { return }; // the stream is gone
                let since = owed.load(Ordering::Acquire);
                if since == 0 {
                    continue;
                }
                let stalled = base.elapsed().saturating_sub(Duration::from_millis(since - 1));
                if stalled >= timeout {
                    tracing::warn!(
                        stalled_s = stalled.as_secs_f32(),
                        "the client stopped reading its stream; cancelling"
                    );
                    tickets.iter().for_each(|t| t.cancel());
                    return;
                }
            }
        });
        Self { inner: Box::pin(inner), owed, base }
    }
}

impl<S: Stream> Stream for Watched<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.owed.store(0, Ordering::Release);
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(_)) = &polled {
            let now = self.base.elapsed().as_millis() as u64 + 1;
            self.owed.store(now, Ordering::Release);
        }
        polled
    }
}
