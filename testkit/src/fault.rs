//! A TCP proxy in front of a real server that loses one reply on purpose: the client's
//! first simple query containing a marker is forwarded to the server, the server's answer
//! is dropped, and the connection is cut — what a network partition right after a
//! COMMIT looks like to the client (the server committed; the client never heard).
//! Everything else passes through untouched, so a second connection works normally.
//!
//! It understands just enough of the PostgreSQL protocol to find message boundaries
//! from the client: untyped startup packets (an SSLRequest is answered by the server
//! itself), then typed messages. It never touches TLS: use it with plain sessions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy; dropping it stops accepting (connections in flight end with it).
pub struct LoseOneReply {
    port: u16,
    fired: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LoseOneReply {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream_port` there; the
    /// first query containing `marker` loses its reply.
    pub async fn start(upstream_port: u16, marker: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind")?;
        let port = listener.local_addr()?.port();
        let fired = Arc::new(AtomicBool::new(false));
        let marker = marker.as_bytes().to_vec();
        let task = tokio::spawn({
            let fired = fired.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let (fired, marker) = (fired.clone(), marker.clone());
                    tokio::spawn(async move {
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                            relay(client, server, fired, marker).await;
                        }
                    });
                }
            }
        });
        Ok(Self { port, fired, task })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// True once a reply was lost.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for LoseOneReply {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, fired: Arc<AtomicBool>, marker: Vec<u8>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set on this connection when its reply is to be lost.
    let cut = Arc::new(AtomicBool::new(false));
    let downstream = {
        let cut = cut.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if cut.load(Ordering::SeqCst) || client_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = client_write.shutdown().await;
        })
    };
    let mut startup_done = false;
    loop {
        // One message: untyped (length first) until the startup packet, typed after.
        let mut head = vec![0u8; if startup_done { 5 } else { 4 }];
        if client_read.read_exact(&mut head).await.is_err() {
            break;
        }
        let len_at = head.len() - 4;
        let len = u32::from_be_bytes([
            head[len_at],
            head[len_at + 1],
            head[len_at + 2],
            head[len_at + 3],
        ]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        if client_read.read_exact(&mut body).await.is_err() {
            break;
        }
        if !startup_done {
            // Protocol 3.0 startup (not an SSL/GSS request): typed messages follow.
            startup_done = body.get(..4) == Some(&196_608u32.to_be_bytes()[..]);
        }
        let lose = head.first() == Some(&b'Q')
            && startup_done
            && body.windows(marker.len()).any(|w| w == marker.as_slice())
            && !fired.swap(true, Ordering::SeqCst);
        if lose {
            cut.store(true, Ordering::SeqCst);
        }
        if server_write.write_all(&head).await.is_err()
            || server_write.write_all(&body).await.is_err()
        {
            break;
        }
        if lose {
            // Let the server run and commit it, then cut the client off unanswered.
            tokio::time::sleep(Duration::from_millis(500)).await;
            break;
        }
    }
    drop(server_write);
    downstream.abort();
}
