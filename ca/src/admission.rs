//! Per-source admission of TLS connections, shared by every event loop of a listener: before a
//! connection may start its TLS handshake, its source address must be under its caps and the
//! listener under its budget of pending (unauthenticated) handshakes. One rule for the
//! sidecar's inbound listener (caps from `[inbound]`) and `ca serve` (`--max-connections-per-source`).
//!
//! - `connections_per_source`: open connections from one IP address (handshaking or
//!   authenticated);
//! - `handshakes_per_source`: connections from one IP address that have not completed
//!   their handshake;
//! - `pending_handshakes`: handshakes in progress over all sources, kept below the listener's
//!   connection limit so a flood of connections that never finish a handshake cannot take the
//!   slots authenticated peers need.
//!
//! A source whose peer sent a certificate chain over the bounds of [`crate::chain_bounds`] (a
//! path-building bomb) is *penalized* for `failed_handshake_delay`: its next connections wait
//! that long before their handshake starts (still counted against its caps). A refused chain
//! is cheap, but a hostile client retrying in a tight loop would otherwise keep the event loop
//! busy with handshakes; the delay turns that loop into one attempt per delay per connection.
//!
//! A connection over any of them is closed right after the accept, before a TLS byte is read;
//! the listener counts it by [`Refusal::reason`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Why a connection was refused at admission (bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its source has `connections_per_source` connections open.
    SourceConnections,
    /// Its source has `handshakes_per_source` handshakes in progress.
    SourceHandshakes,
    /// `pending_handshakes` handshakes are in progress over all sources.
    PendingHandshakes,
}

impl Refusal {
    /// The `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::SourceConnections => "source_connections",
            Self::SourceHandshakes => "source_handshakes",
            Self::PendingHandshakes => "pending_handshakes",
        }
    }
}

/// The caps a listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Open connections per source address.
    pub connections_per_source: usize,
    /// Handshakes in progress per source address.
    pub handshakes_per_source: usize,
    /// Handshakes in progress over all sources.
    pub pending_handshakes: usize,
    /// How long a penalized source's connections wait before their handshake.
    pub failed_handshake_delay: Duration,
}

/// Most penalized sources remembered; past it, expired penalties are dropped, and if none
/// expired the oldest-expiring goes (the table stays bounded under a spread-out attack).
const MAX_PENALIZED: usize = 4096;

#[derive(Debug, Default)]
struct Counts {
    connections: usize,
    handshakes: usize,
}

#[derive(Debug, Default)]
struct Table {
    by_source: HashMap<IpAddr, Counts>,
    pending: usize,
    /// Penalized sources and when their penalty ends.
    penalized: HashMap<IpAddr, Instant>,
}

/// The admission table, one per listener (shared by its event loops).
#[derive(Debug)]
pub struct Sources {
    caps: Caps,
    table: Mutex<Table>,
}

impl Sources {
    /// An empty table enforcing `caps`.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // The critical sections only update counters: a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip` into the handshake phase, or says why not.
    ///
    /// # Errors
    /// The [`Refusal`] naming the cap that is full.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let mut t = self.lock();
        if t.pending >= self.caps.pending_handshakes {
            return Err(Refusal::PendingHandshakes);
        }
        let c = t.by_source.entry(ip).or_default();
        if c.connections >= self.caps.connections_per_source {
            return Err(Refusal::SourceConnections);
        }
        if c.handshakes >= self.caps.handshakes_per_source {
            return Err(Refusal::SourceHandshakes);
        }
        c.connections += 1;
        c.handshakes += 1;
        t.pending += 1;
        let delay = match t.penalized.get(&ip) {
            Some(until) => until.checked_duration_since(Instant::now()),
            None => None,
        };
        if delay.is_none() {
            t.penalized.remove(&ip);
        }
        Ok(Admission {
            sources: self.clone(),
            ip,
            handshaking: true,
            delay,
        })
    }

    /// Penalizes `ip` (its peer sent a chain over the bounds): its connections wait
    /// `failed_handshake_delay` before their handshake, until that long from now.
    pub fn penalize(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut t = self.lock();
        if t.penalized.len() >= MAX_PENALIZED && !t.penalized.contains_key(&ip) {
            t.penalized.retain(|_, until| *until > now);
            if t.penalized.len() >= MAX_PENALIZED {
                let first = t
                    .penalized
                    .iter()
                    .min_by_key(|(_, u)| **u)
                    .map(|(ip, _)| *ip);
                if let Some(first) = first {
                    t.penalized.remove(&first);
                }
            }
        }
        t.penalized
            .insert(ip, now + self.caps.failed_handshake_delay);
    }
}

/// One admitted connection; releases its counts when dropped.
#[derive(Debug)]
pub struct Admission {
    sources: Arc<Sources>,
    ip: IpAddr,
    handshaking: bool,
    delay: Option<Duration>,
}

impl Admission {
    /// How long to wait before the handshake (the source is penalized), if at all.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// Waits out the source's penalty (it sent a chain over the bounds), if it has one: call
    /// it before any TLS work.
    pub async fn penalty(&self) {
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
    }

    /// The TLS handshake failed with `e` (the I/O error of the accept): a chain over the
    /// bounds of [`crate::chain_bounds`] penalizes the source.
    pub fn handshake_failed(&self, e: &std::io::Error) {
        if crate::chain_bounds::is_bound_refusal_io(e) {
            self.sources.penalize(self.ip);
        }
    }

    /// The handshake completed: the connection no longer counts as pending.
    pub fn authenticated(&mut self) {
        if self.handshaking {
            self.handshaking = false;
            let mut t = self.sources.lock();
            t.pending -= 1;
            if let Some(c) = t.by_source.get_mut(&self.ip) {
                c.handshakes -= 1;
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut t = self.sources.lock();
        if self.handshaking {
            t.pending -= 1;
        }
        let gone = t.by_source.get_mut(&self.ip).is_some_and(|c| {
            c.connections -= 1;
            if self.handshaking {
                c.handshakes -= 1;
            }
            c.connections == 0
        });
        if gone {
            t.by_source.remove(&self.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(per_conn: usize, per_hs: usize, pending: usize) -> Arc<Sources> {
        Arc::new(Sources::new(Caps {
            connections_per_source: per_conn,
            handshakes_per_source: per_hs,
            pending_handshakes: pending,
            failed_handshake_delay: Duration::from_secs(60),
        }))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

    #[test]
    fn per_source_handshakes_are_capped_and_freed_by_authentication() {
        let s = sources(10, 2, 100);
        let mut a1 = s.admit(A).expect("first");
        let _a2 = s.admit(A).expect("second");
        assert_eq!(s.admit(A).unwrap_err(), Refusal::SourceHandshakes);
        assert!(s.admit(B).is_ok(), "another source is not affected");
        a1.authenticated();
        let _a3 = s.admit(A).expect("a finished handshake frees its place");
    }

    #[test]
    fn per_source_connections_are_capped_and_freed_on_close() {
        let s = sources(2, 2, 100);
        let mut a1 = s.admit(A).expect("first");
        a1.authenticated();
        let mut a2 = s.admit(A).expect("second");
        a2.authenticated();
        assert_eq!(s.admit(A).unwrap_err(), Refusal::SourceConnections);
        drop(a1);
        assert!(s.admit(A).is_ok());
        drop(a2);
        assert!(
            s.lock().by_source.is_empty(),
            "closed sources are forgotten"
        );
    }

    #[test]
    fn penalized_sources_wait_before_their_handshake() {
        let s = sources(10, 10, 10);
        assert_eq!(s.admit(A).expect("a").delay(), None);
        s.penalize(A);
        let d = s.admit(A).expect("a").delay().expect("penalized");
        assert!(d > Duration::from_secs(59) && d <= Duration::from_secs(60));
        assert_eq!(
            s.admit(B).expect("b").delay(),
            None,
            "only the penalized source"
        );
    }

    #[test]
    fn pending_handshakes_are_capped_over_all_sources() {
        let s = sources(10, 10, 2);
        let _a = s.admit(A).expect("a");
        let mut b = s.admit(B).expect("b");
        assert_eq!(s.admit(B).unwrap_err(), Refusal::PendingHandshakes);
        b.authenticated();
        assert!(s.admit(B).is_ok());
    }
}
