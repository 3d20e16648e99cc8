//! The hop that hands sqlx a TLS stream it did not open (why: [`super::tls`]).
//!
//! sqlx only uses connections it opens itself, to a TCP host or a Unix socket path. So the TLS
//! stream is made first; then a Unix socket is bound in a directory only this service's user can
//! enter, sqlx is pointed at it with TLS off, and the first peer to connect, checked to be this
//! very process (`SO_PEERCRED`), is joined to the TLS stream by a task that copies both ways until
//! either side ends. The socket file is removed as soon as it has been accepted, so nothing else
//! can reach the stream, which matters most with a client certificate: the TLS session behind it is
//! already the service's identity.
//!
//! A dropped future leaves nothing behind: before the accept, the socket file is removed by a guard
//! and the TLS stream closes with the future; after it, the copying task sees sqlx's end close and
//! closes the server's, and the server's end closing closes sqlx's.
//!
//! The hop costs two local copies per message; loadtest/archive.md#db-tls measures it against pgbench
//! over TLS. No crate offers "connect sqlx over this stream", so this is written here.

use std::{
    io,
    path::PathBuf,
    sync::atomic::{AtomicU16, Ordering},
    time::Duration,
};

use sqlx::{
    Connection,
    postgres::{PgConnectOptions, PgConnection, PgSslMode},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

/// How long a server that sqlx has left gets to take the close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A private directory for the sockets, removed with it.
#[derive(Debug)]
pub(super) struct RelayDir {
    path: PathBuf,
    next: AtomicU16,
}

impl RelayDir {
    pub(super) fn create() -> io::Result<RelayDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "todo-service-db-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(RelayDir {
            path,
            next: AtomicU16::new(1),
        })
    }
}

impl Drop for RelayDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes a socket file when the attempt ends, however it ends.
struct Unlink(PathBuf);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Logs sqlx in over `upstream` (already past the TLS handshake).
pub(super) async fn connect_over<S>(
    dir: &RelayDir,
    options: &PgConnectOptions,
    upstream: S,
) -> Result<PgConnection, sqlx::Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // sqlx names the socket `<dir>/.s.PGSQL.<port>`: the port only tells attempts apart.
    let slot = dir.next.fetch_add(1, Ordering::Relaxed);
    let path = dir.path.join(format!(".s.PGSQL.{slot}"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let unlink = Unlink(path);
    let options = options
        .clone()
        .socket(&dir.path)
        .port(slot)
        .ssl_mode(PgSslMode::Disable);
    let login = PgConnection::connect_with(&options);
    tokio::pin!(login);
    let local = tokio::select! {
        accepted = listener.accept() => accepted?.0,
        // sqlx gave up before reaching the socket; its error says why.
        done = &mut login => return done,
    };
    drop(unlink);
    drop(listener);
    let ours = local.peer_cred().ok().and_then(|c| c.pid()) == Some(std::process::id() as i32);
    if !ours {
        return Err(sqlx::Error::Io(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "another process connected to the database relay socket",
        )));
    }
    tokio::spawn(pump(local, upstream));
    login.await
}

/// Copies both ways until either side ends, then ends the other.
async fn pump<S>(mut local: UnixStream, upstream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let (mut local_read, mut local_write) = local.split();
    tokio::select! {
        _ = tokio::io::copy(&mut local_read, &mut up_write) => {
            // sqlx closed: tell the server (TLS close_notify, then FIN), briefly.
            let _ = tokio::time::timeout(CLOSE_GRACE, up_write.shutdown()).await;
        }
        _ = tokio::io::copy(&mut up_read, &mut local_write) => {
            let _ = local_write.shutdown().await;
        }
    }
}
