//! Streaming bodies for the proxy: frames pass through as they come, never collected whole. A request
//! body can be teed to mirrors without slowing the real request, and a response body carries the
//! request's deadline and records the request's metrics when it ends.
use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http_body_util::{BodyExt as _, Empty, Full, combinators::UnsyncBoxBody};
use hyper::{
    StatusCode,
    body::{Body, Bytes, Frame, Incoming, SizeHint},
};
use tokio::{sync::mpsc, time::Sleep};

use super::metrics::{L7Metrics, RuleLabels};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn incoming(body: Incoming) -> ProxyBody {
    body.map_err(|e| -> BoxError { Box::new(e) }).boxed_unsync()
}

/// Frames do not implement Clone; data and trailers are what a body carries.
fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        return Some(Frame::data(data.clone()));
    }
    frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
}

struct MirrorTx {
    tx: mpsc::Sender<Frame<Bytes>>,
    aborted: Arc<AtomicBool>,
}

/// A request body that also hands each frame to mirrors. A mirror that cannot keep up (its buffer is
/// full) is cut off, never waited for: mirroring is fire-and-forget and must not slow the request.
pub struct TeeBody {
    inner: Incoming,
    mirrors: Vec<MirrorTx>,
    finished: bool,
}

/// A mirror's copy of the request body. It ends with an error, not a clean end, when the copy is
/// incomplete, so the mirror backend never takes a truncated body for the whole.
pub struct MirrorBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    aborted: Arc<AtomicBool>,
    hint: SizeHint,
}

impl TeeBody {
    pub fn new(inner: Incoming) -> Self {
        Self {
            inner,
            mirrors: Vec::new(),
            finished: false,
        }
    }

    /// A new mirror copy, buffering at most `frames` frames ahead of the mirror's connection.
    pub fn mirror(&mut self, frames: usize) -> MirrorBody {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let aborted = Arc::new(AtomicBool::new(false));
        self.mirrors.push(MirrorTx {
            tx,
            aborted: aborted.clone(),
        });
        MirrorBody {
            rx,
            aborted,
            hint: self.inner.size_hint(),
        }
    }

    fn abort_mirrors(&mut self) {
        for m in self.mirrors.drain(..) {
            m.aborted.store(true, Ordering::Release);
        }
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // Dropped before its end (the backend answered without reading it all, or the client went
        // away): the mirrors did not get the whole body.
        if !self.finished && !self.inner.is_end_stream() {
            self.abort_mirrors();
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finished = true;
                // Dropping the senders ends the mirrors' bodies cleanly.
                this.mirrors.clear();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.abort_mirrors();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.mirrors.retain(|m| {
                    let sent = copy_frame(&frame).is_none_or(|copy| m.tx.try_send(copy).is_ok());
                    if !sent {
                        m.aborted.store(true, Ordering::Release);
                    }
                    sent
                });
                Poll::Ready(Some(Ok(frame)))
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

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) if self.aborted.load(Ordering::Acquire) => Poll::Ready(Some(Err(
                "mirror copy of the request body is incomplete".into(),
            ))),
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        // A request without a body (a GET) has a mirror copy without one: nothing to wait for.
        self.hint.exact() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

/// Records a request's metrics once, when its response is over (or abandoned).
pub struct Done {
    pub metrics: L7Metrics,
    pub labels: RuleLabels,
    pub status: StatusCode,
    pub start: Instant,
}

impl Done {
    pub fn record(self) {
        self.metrics
            .observe(&self.labels, self.status, self.start.elapsed());
    }
}

/// A backend's response body on its way to the client: ends with an error when the request's deadline
/// passes mid-body (the timeout covers the whole response, as the spec's `timeouts.request` asks),
/// and records the request's metrics when it ends.
pub struct ResponseBody {
    inner: Incoming,
    deadline: Option<Pin<Box<Sleep>>>,
    done: Option<Done>,
}

impl ResponseBody {
    pub fn new(inner: Incoming, deadline: Option<tokio::time::Instant>, done: Done) -> Self {
        Self {
            inner,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            done: Some(done),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done.record();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            if let Some(done) = this.done.take() {
                done.record();
            }
            return Poll::Ready(Some(Err(
                "request timeout while streaming the response".into()
            )));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(done) = this.done.take()
        {
            done.record();
        }
        polled.map(|f| f.map(|r| r.map_err(|e| -> BoxError { Box::new(e) })))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
