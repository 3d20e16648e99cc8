//! Lingering close: what a client is still sending is read and discarded before its socket
//! closes, so the answer already sent can be read.
//!
//! When the service answers before it has read the whole request (a `413` for a body over
//! `MAX_BODY_BYTES` is decided from `Content-Length` alone), hyper closes the connection. Bytes
//! that then arrive at the closed socket make the kernel send a reset, which discards the answer
//! from the client's receive buffer: a client that sends its whole body before reading (no
//! `Expect: 100-continue`: Python's urllib and many HTTP libraries) gets a broken pipe instead of
//! the `413` problem. nginx's "lingering close" is the cure: after the answer, keep reading and
//! discarding for a bounded time. Neither hyper nor axum offers it and no maintained crate does,
//! so it is written here: [`Listener`] wraps each accepted socket, and when hyper drops a
//! connection whose client has not finished sending, a small task takes the socket over and
//! drains it within [`LINGER_TIME`], [`LINGER_IDLE`] between reads and [`LINGER_BYTES`] in all.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// Longest a closed connection is drained (nginx: `lingering_time`, 30 s; shorter here because
/// each lingering socket holds a file descriptor).
pub const LINGER_TIME: Duration = Duration::from_secs(5);
/// Longest wait for the client's next bytes (nginx: `lingering_timeout`).
pub const LINGER_IDLE: Duration = Duration::from_secs(2);
/// Most bytes discarded: a little over the largest `MAX_BODY_BYTES` (64 MiB).
pub const LINGER_BYTES: usize = 80 * 1024 * 1024;

/// Accepts TCP connections whose close lingers (see the module doc).
pub struct Listener(pub TcpListener);

impl axum::serve::Listener for Listener {
    type Io = Lingering;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Lingering, SocketAddr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (
            Lingering {
                stream: Some(stream),
                client_done: false,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// An accepted connection; see the module doc.
pub struct Lingering {
    stream: Option<TcpStream>,
    /// The client closed its side: nothing more can arrive, so there is nothing to drain.
    client_done: bool,
}

impl Lingering {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is only taken when the connection is dropped"),
        )
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.stream().poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            self.client_done = true;
        }
        polled
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.client_done {
            return;
        }
        // Outside a runtime (a test dropping a connection by hand) the socket just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(drain(stream));
        }
    }
}

/// Sends our FIN (if hyper has not), then discards what the client still sends, within bounds.
async fn drain(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    let mut discarded = 0;
    while discarded < LINGER_BYTES {
        let wait = deadline.min(Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(n)) => discarded += n,
        }
    }
}
