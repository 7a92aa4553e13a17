//! The waiting line's accounting. Every submitted request holds one place
//! among the `max_waiting` until the engine admits it or its client leaves,
//! whichever comes first; leaving frees the place at once, not when the
//! engine next looks at its queue.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::mpsc;

use super::request::{Event, GenerationRequest};

const WAITING: u8 = 0;
const ADMITTED: u8 = 1;
const GONE: u8 = 2;

/// One request's place in line, shared by the engine and the client side.
pub struct Ticket {
    state: AtomicU8,
    cancelled: AtomicBool,
    waiting: Arc<AtomicUsize>,
}

impl Ticket {
    /// Leaves the line (once): true if it was still waiting.
    fn leave(&self, to: u8) -> bool {
        let left = self.state.compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if left {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        left
    }

    /// The engine takes the request: false if its client already left.
    pub(super) fn admit(&self) -> bool {
        self.leave(ADMITTED)
    }

    /// Ends the request wherever it is: its place in line is freed now, and
    /// the engine drops its sequence before the next step.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.leave(GONE);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }
}

/// A request on its way to the engine.
pub(super) struct Queued {
    pub request: GenerationRequest,
    pub events: mpsc::UnboundedSender<Event>,
    pub ticket: Arc<Ticket>,
    pub arrived: Instant,
}

impl Queued {
    /// Its client has gone (stream dropped or cancelled).
    pub fn is_abandoned(&self) -> bool {
        self.ticket.is_cancelled() || self.events.is_closed()
    }
}

/// The engine's side of the line: places are taken all-or-nothing.
#[derive(Clone)]
pub(super) struct Line {
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the server is overloaded: {0} requests are already waiting")]
    Overloaded(usize),
    #[error("{asked} prompts in one request are more than the {max} that may wait at once")]
    TooMany { asked: usize, max: usize },
    #[error("the engine has stopped")]
    Stopped,
}

impl Line {
    pub fn new(max_waiting: usize) -> Self {
        Self { waiting: Arc::new(AtomicUsize::new(0)), max_waiting }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Takes `n` places, or none.
    pub fn take(&self, n: usize) -> Result<Vec<Arc<Ticket>>, SubmitError> {
        if n > self.max_waiting {
            return Err(SubmitError::TooMany { asked: n, max: self.max_waiting });
        }
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w + n <= self.max_waiting).then_some(w + n))
            .map_err(|_| SubmitError::Overloaded(self.max_waiting))?;
        Ok((0..n)
            .map(|_| {
                Arc::new(Ticket {
                    state: AtomicU8::new(WAITING),
                    cancelled: AtomicBool::new(false),
                    waiting: self.waiting.clone(),
                })
            })
            .collect())
    }
}

/// The events of one submitted request. Dropping it ends the request: a
/// waiting one leaves the line at once, a running one is dropped before the
/// engine's next step.
pub struct EventStream {
    events: mpsc::UnboundedReceiver<Event>,
    ticket: Arc<Ticket>,
}

impl EventStream {
    pub(super) fn new(events: mpsc::UnboundedReceiver<Event>, ticket: Arc<Ticket>) -> Self {
        Self { events, ticket }
    }

    pub async fn recv(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// A handle that can end the request from elsewhere (a watchdog).
    pub fn ticket(&self) -> Arc<Ticket> {
        self.ticket.clone()
    }
}

impl futures::Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.ticket.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_taken_all_or_nothing_and_freed_once() {
        let line = Line::new(3);
        let two = line.take(2).expect("two fit");
        assert_eq!(line.take(2).err(), Some(SubmitError::Overloaded(3)));
        assert_eq!(line.take(4).err(), Some(SubmitError::TooMany { asked: 4, max: 3 }));
        assert_eq!(line.waiting(), 2);
        assert!(two[0].admit());
        two[0].cancel(); // already admitted: no second release
        assert_eq!(line.waiting(), 1);
        two[1].cancel();
        assert!(!two[1].admit(), "a cancelled request is not admitted");
        assert_eq!(line.waiting(), 0);
        assert_eq!(line.take(3).map(|t| t.len()), Ok(3));
    }
}
