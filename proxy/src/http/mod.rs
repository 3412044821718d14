//! The HTTP layer both sides stand on, below every policy decision: it knows requests,
//! responses, bodies, headers and connections, never identities or routes.
//!
//! - [`activity`]: a connection's requests in flight and write progress, for its idle and
//!   send timeouts;
//! - [`h1_pool`]: the HTTP/1.1 keep-alive pool of both hops (to the app, to a peer);
//! - [`h1_server`]: the HTTP/1.1 server (hyper's), let go of while a connection is idle;
//! - [`h2_client`]: the HTTP/2 client to a peer sidecar (settings, PING keep-alive);
//! - [`h2_server`]: the HTTP/2 server (streams polled in the connection's task), its reset
//!   budget and response-head fitting;
//! - [`body`]: request and response bodies on the sidecar-to-sidecar HTTP/2 hop;
//! - [`grpc`]: gRPC calls, their deadline, and the sidecar's trailers-only answers (issue 17);
//! - [`headers`]: hop-by-hop headers, the headers the sidecar owns, the request framing we
//!   forward, and the one `x-request-id` rule;
//! - [`tunnel`]: a WebSocket tunnel's HTTP/2 leg as a byte stream, and its metrics (issue 17);
//! - [`respond`]: the one JSON error body both sides answer with;
//! - [`linger`]: lingering close of accepted sockets, so a client still writing reads our last
//!   frame (GOAWAY, TLS alert) before end-of-stream instead of a reset.

pub(crate) mod activity;
pub(crate) mod body;
pub(crate) mod grpc;
pub(crate) mod h1_pool;
pub(crate) mod h1_server;
pub(crate) mod h2_client;
pub(crate) mod h2_server;
pub(crate) mod headers;
pub(crate) mod linger;
pub(crate) mod respond;
pub(crate) mod tunnel;
