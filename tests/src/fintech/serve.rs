//! Process plumbing for the fake-service binaries: bind listeners with an error that says what to do,
//! serve apps on them, and stop on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::http::{App, DebugApp, Recorder, serve};

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct BindError {
    /// What the listener is for.
    pub what: &'static str,
    /// The address asked for.
    pub addr: SocketAddr,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// The servers of one fake-service process.
#[derive(Debug, Default)]
pub struct Servers {
    tasks: JoinSet<()>,
}

impl Servers {
    /// Binds `addr` and serves `app` on it; prints one `NAME listening on ADDR` line.
    ///
    /// # Errors
    /// [`BindError`] when the address cannot be bound.
    pub async fn add<A: App>(
        &mut self,
        what: &'static str,
        addr: SocketAddr,
        app: Arc<A>,
    ) -> Result<(), BindError> {
        let listener =
            TcpListener::bind(addr)
                .await
                .map_err(|source| BindError { what, addr, source })?;
        println!("{what} listening on {addr}");
        self.tasks.spawn(serve(listener, app));
        Ok(())
    }

    /// Adds the loopback debug endpoint (`GET /requests`) for `recorder`, when an address is given.
    ///
    /// # Errors
    /// [`BindError`] when the address cannot be bound.
    pub async fn add_debug(
        &mut self,
        addr: Option<SocketAddr>,
        recorder: &Recorder,
    ) -> Result<(), BindError> {
        match addr {
            Some(addr) => {
                self.add("debug endpoint", addr, Arc::new(DebugApp(recorder.clone())))
                    .await
            }
            None => Ok(()),
        }
    }

    /// Runs until SIGINT or SIGTERM.
    pub async fn run_until_signal(mut self) {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let terminated = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminated => {}
            _ = self.tasks.join_next() => {}
        }
        self.tasks.shutdown().await;
    }
}

/// The `main` of a one-app fake service: serves `app` as `program` on `listen`, plus the debug
/// endpoint for `recorder` when `debug_listen` is given, until SIGINT/SIGTERM. Exit code 0, or 2
/// (rendered) when a listener cannot be bound.
pub async fn run_app<A: App>(
    program: &'static str,
    listen: SocketAddr,
    app: Arc<A>,
    debug_listen: Option<SocketAddr>,
    recorder: &Recorder,
) -> std::process::ExitCode {
    let mut servers = Servers::default();
    let bound = match servers.add(program, listen, app).await {
        Ok(()) => servers.add_debug(debug_listen, recorder).await,
        Err(e) => Err(e),
    };
    if let Err(e) = bound {
        return render_bind_error(program, &e);
    }
    servers.run_until_signal().await;
    std::process::ExitCode::SUCCESS
}

/// Prints a bind failure the way every fake-service binary does, and returns exit code 2.
pub fn render_bind_error(program: &str, e: &BindError) -> std::process::ExitCode {
    eprintln!("{program}: error: {e}");
    eprintln!(
        "  help: another process (an earlier demo run?) may hold port {}; stop it or pick another address",
        e.addr.port()
    );
    std::process::ExitCode::from(2)
}
