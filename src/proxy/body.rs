//! Bodies that must keep moving, in both directions.
//!
//! A body may take as long as it needs in total (a `git push` of a large pack),
//! but it may not stop: a body that delivers nothing for `server.body_idle_timeout`
//! is ended with an error, so a trickling client or upstream cannot hold a
//! connection slot and an upstream connection indefinitely. A request body also
//! reports how it ended, so the upstream's response deadline can start when the
//! body is complete instead of when the request started, and a client's broken
//! body (a malformed chunk) is blamed on the client, not the upstream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::BoxError;

/// How a request body ended, as seen by the upstream request that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte was delivered.
    Complete,
    /// The client's body failed (malformed chunked framing, connection cut).
    Failed,
    /// Nothing arrived for the idle timeout.
    Idle,
}

/// The error a body ends with when it stopped moving.
#[derive(Debug, thiserror::Error)]
#[error("the body delivered nothing for the idle timeout")]
pub struct BodyIdle;

/// A body ended with an error when `idle` passes without a frame.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    end: Option<oneshot::Sender<BodyEnd>>,
}

impl<B> IdleBody<B> {
    /// Wraps `inner`; the receiver learns how it ended (a dropped sender means
    /// the body was abandoned before its end, e.g. the upstream answered early).
    pub fn with_end(inner: B, idle: Duration) -> (Self, oneshot::Receiver<BodyEnd>) {
        let (tx, rx) = oneshot::channel();
        let mut body = Self::new(inner, idle);
        body.end = Some(tx);
        (body, rx)
    }

    /// Wraps `inner` without reporting its end.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            end: None,
        }
    }

    fn signal(&mut self, end: BodyEnd) {
        if let Some(tx) = self.end.take() {
            let _ = tx.send(end);
        }
    }
}

impl<B> Body for IdleBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.idle;
                this.timer.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.signal(BodyEnd::Failed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.signal(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    this.signal(BodyEnd::Idle);
                    return Poll::Ready(Some(Err(BodyIdle.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Chunks = StreamBody<
        futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::convert::Infallible>>,
    >;

    fn stalled_after_one_chunk() -> Chunks {
        use futures_util::StreamExt;
        let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"a")))]);
        StreamBody::new(first.chain(futures_util::stream::pending()).boxed())
    }

    #[tokio::test]
    async fn a_stalled_body_ends_with_idle_and_says_so() {
        let idle = Duration::from_millis(200);
        let (mut body, end) = IdleBody::with_end(stalled_after_one_chunk(), idle);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.is::<BodyIdle>());
        assert!(started.elapsed() >= idle);
        assert_eq!(end.await.unwrap(), BodyEnd::Idle);
    }

    #[tokio::test]
    async fn a_moving_body_completes_however_long_it_takes() {
        use futures_util::StreamExt;
        // Ten chunks 60 ms apart: 600 ms in all, never 200 ms without one.
        let chunks = futures_util::stream::unfold(0u8, |n| async move {
            (n < 10).then_some(())?;
            tokio::time::sleep(Duration::from_millis(60)).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), n + 1))
        });
        let body: Chunks = StreamBody::new(chunks.boxed());
        let (body, end) = IdleBody::with_end(body, Duration::from_millis(200));
        let started = Instant::now();
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 10);
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert_eq!(end.await.unwrap(), BodyEnd::Complete);
    }
}

/// The bytes of request bodies held in memory, across all requests, so a
/// request the upstream rejects with 401 can be sent again with a refreshed
/// token (`server.retry_buffer_budget`). Per request the bound is
/// [`super::pipeline::RETRY_BODY_LIMIT`]; this one keeps HTTP/2, which multiplies
/// requests per connection, from multiplying the memory too. A request that
/// finds the budget spent is streamed and simply not retried.
pub struct RetryBudget {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

/// Bytes taken from a [`RetryBudget`], given back on drop.
pub struct Reserved {
    budget: std::sync::Arc<RetryBudget>,
    bytes: u64,
}

impl RetryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            limit,
            used: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Takes `bytes` if they fit in what is left.
    pub fn reserve(self: &std::sync::Arc<Self>, bytes: u64) -> Option<Reserved> {
        use std::sync::atomic::Ordering;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .ok()?;
        Some(Reserved {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

#[cfg(test)]
mod budget_tests {
    use super::RetryBudget;

    #[test]
    fn reservations_fit_the_budget_and_are_given_back() {
        let budget = RetryBudget::new(100);
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(41).is_none());
        let b = budget.reserve(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        assert!(budget.reserve(60).is_some());
        drop(b);
        assert_eq!(budget.used(), 0);
        assert!(RetryBudget::new(0).reserve(1).is_none());
    }
}
