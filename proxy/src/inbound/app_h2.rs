//! The hop to the app in h2c (`[inbound] app_protocol = "h2c"`, issue 17): HTTP/2 cleartext
//! with prior knowledge on ONE connection per event loop, every request a stream on it (what
//! gRPC servers expect), through the same `h2` client machinery as the outbound side's
//! HTTP/2 hop ([`crate::http::h2_client`]: settings, PING keep-alive, request bodies copied
//! under flow control, trailers both ways).
//!
//! The connection is opened by the first request and shared; once it has ended (the app
//! closed it, a PING went unanswered, GOAWAY) the next request opens a new one. A request the
//! connection refused before any of it was queued comes back and is sent once more on a new
//! connection; nothing else is retried.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tokio::net::TcpStream;
use tracing::debug;

use super::upstream::AppError;
use crate::http::body::BoxError;
use crate::http::h2_client::{self, H2Sender, send_h2};

/// The shared h2c connection to the app (one per event loop).
#[derive(Debug)]
pub(crate) struct AppH2 {
    addr: SocketAddr,
    conn: Mutex<Option<H2Sender>>,
    /// Held while a connection is being opened, so a burst opens one, not one per request.
    connecting: tokio::sync::Mutex<()>,
}

impl AppH2 {
    /// No connection until the first request.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends `req` (absolute URI, `http` scheme) on the shared connection and waits for the
    /// response head; the request body is copied by a task of its own.
    ///
    /// # Errors
    /// No connection to the app, or the stream failed.
    pub(crate) async fn send<B>(
        &self,
        req: Request<B>,
    ) -> Result<Response<h2::RecvStream>, AppError>
    where
        B: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static,
    {
        let mut req = req;
        let mut retried = false;
        loop {
            let mut sender = self.sender().await?;
            match send_h2(&mut sender, req).await {
                Ok(resp) => return Ok(resp),
                Err((e, Some(back))) if !retried => {
                    debug!(app = %self.addr, error = %e, "the app's h2c connection refused a new stream; retrying on a new one");
                    retried = true;
                    req = back;
                }
                Err((e, _)) => return Err(AppError::H2(e)),
            }
        }
    }

    fn current(&self) -> Option<H2Sender> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        conn.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<H2Sender, AppError> {
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.current() {
            return Ok(s);
        }
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|source| AppError::Connect {
                addr: self.addr,
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let (sender, driver) = h2_client::handshake(tcp).await.map_err(AppError::H2)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                debug!(app = %addr, error = %e, "h2c connection to the app ended with an error");
            }
        });
        *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender.clone());
        Ok(sender)
    }
}
