//! A paced load generator for "no request fails while X happens" tests: keep-alive HTTP/1.1
//! workers against a plaintext listener (an outbound sidecar), each pacing its requests so
//! that together they aim at a rate; a worker reconnects when its connection ends. Every
//! request is recorded with its status or transport error.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// One request: when it started and its status, or the transport error.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request started.
    pub at: Instant,
    /// The response status once the whole body arrived, or what went wrong.
    pub outcome: Result<u16, String>,
}

impl Sample {
    /// A 200 with its whole body.
    pub fn is_200(&self) -> bool {
        self.outcome == Ok(200)
    }
}

/// Running workers; [`Load::stop`] ends them and returns every sample.
pub struct Load {
    /// When the load started.
    pub started: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `workers` keep-alive workers sending `GET path` (`Host: host`) to `addr`, at
    /// about `rate` requests/s together.
    pub fn start(addr: SocketAddr, path: &str, host: &str, workers: usize, rate: f64) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        #[allow(clippy::cast_precision_loss)] // a handful of workers
        let period = Duration::from_secs_f64(workers as f64 / rate);
        let tasks = (0..workers)
            .map(|_| {
                let (samples, stop) = (samples.clone(), stop.clone());
                let (path, host) = (path.to_owned(), host.to_owned());
                tokio::spawn(async move {
                    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let at = Instant::now();
                        let outcome = one_request(addr, &mut sender, &path, &host).await;
                        if outcome.is_err() {
                            sender = None;
                        }
                        samples
                            .lock()
                            .expect("samples")
                            .push(Sample { at, outcome });
                    }
                })
            })
            .collect();
        Self {
            started: Instant::now(),
            samples,
            stop,
            tasks,
        }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    /// Waits until the load is flowing: two 200 answers per worker, so every worker's
    /// keep-alive connection is up and in use (instead of a fixed warm-up sleep).
    ///
    /// # Panics
    /// When that does not happen within 30 s.
    pub async fn wait_flowing(&self) {
        let want = 2 * self.tasks.len();
        crate::harness::eventually("the load to flow", Duration::from_secs(30), async || {
            let ok = self.samples.lock().expect("samples");
            (ok.iter().filter(|s| s.is_200()).count() >= want).then_some(())
        })
        .await
        .expect("load flowing");
    }

    /// Stops the workers (each finishes its request) and returns every sample and the time
    /// the load ran.
    pub async fn stop(self) -> (Vec<Sample>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        let elapsed = self.started.elapsed();
        let samples = self.samples.lock().expect("samples").clone();
        (samples, elapsed)
    }
}

/// Every sample that is not `ok`, as readable lines (at most 10), times relative to `start`.
pub fn failures(samples: &[Sample], start: Instant, ok: impl Fn(&Sample) -> bool) -> Vec<String> {
    samples
        .iter()
        .filter(|s| !ok(s))
        .take(10)
        .map(|s| {
            format!(
                "t={:.3}s {:?}",
                s.at.duration_since(start).as_secs_f64(),
                s.outcome
            )
        })
        .collect()
}

/// `GET path` on `sender`'s keep-alive connection to `addr`, connecting first when there is
/// none (or it closed).
pub async fn one_request(
    addr: SocketAddr,
    sender: &mut Option<SendRequest<Empty<Bytes>>>,
    path: &str,
    host: &str,
) -> Result<u16, String> {
    if sender.as_ref().is_none_or(SendRequest::is_closed) {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        *sender = Some(s);
    }
    let send = sender.as_mut().expect("connected above");
    exchange(send, path, host, Duration::from_secs(15)).await
}

/// `GET path` with `Host: host` on an open HTTP/1.1 connection: the status once the whole
/// response has arrived, or what went wrong (also no response `within`).
pub async fn exchange(
    send: &mut SendRequest<Empty<Bytes>>,
    path: &str,
    host: &str,
    within: Duration,
) -> Result<u16, String> {
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::new())
        .expect("request");
    let exchange = async {
        send.ready().await?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        resp.into_body().collect().await?;
        Ok::<_, hyper::Error>(status)
    };
    match tokio::time::timeout(within, exchange).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no response within {within:?}")),
    }
}
