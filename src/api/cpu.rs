//! CPU-heavy request work (rendering, tokenizing, checking uploads, large
//! JSON) runs on the blocking pool, a bounded number at a time, so the async
//! workers keep answering (`/health` among them). A piece of work holds its
//! place until it returns, even when its client has gone: otherwise clients
//! that connect and leave could start unbounded work. Work that can stop
//! early sees a flag set when its client goes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::error::ApiError;

#[derive(Clone)]
pub struct CpuWork(Arc<Semaphore>);

impl CpuWork {
    /// At most `places` pieces of work at once.
    pub fn new(places: usize) -> Self {
        Self(Arc::new(Semaphore::new(places.max(1))))
    }

    /// Runs `work` on the blocking pool once a place is free; its flag is
    /// set if the caller's future is dropped meanwhile. A panic is a 500.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&AtomicBool) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let place =
            self.0.clone().acquire_owned().await.map_err(|_| ApiError::unavailable("the server is shutting down"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let _gone = SetOnDrop(stop.clone());
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _place = place;
            span.in_scope(|| work(&stop))
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "request work panicked");
            ApiError::internal("internal error while preparing the request")
        })?
    }
}

/// Sets its flag when dropped (a handler's future going with its client).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn work_whose_client_left_keeps_its_place_and_is_told_to_stop() {
        let cpu = CpuWork::new(1);
        let (told, released) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (told_in, released_in) = (told.clone(), released.clone());
        let first = tokio::spawn({
            let cpu = cpu.clone();
            async move {
                cpu.run(move |stop| {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    told_in.store(stop.load(Ordering::Relaxed), Ordering::Relaxed);
                    // Still working after the client left: the place stays taken.
                    std::thread::sleep(Duration::from_millis(300));
                    released_in.store(true, Ordering::Relaxed);
                    Ok(())
                })
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        first.abort(); // the client goes
        let second = cpu.run(move |_| Ok(released.load(Ordering::Relaxed))).await;
        assert_eq!(second, Ok(true), "the second work started only once the first one returned");
        assert!(told.load(Ordering::Relaxed), "the first work was told its client left");
    }
}
