//! The FinTech identities and policy texts several test files share, each written once. Policy
//! pieces are macros expanding to string literals so a test's policy stays a `const` built with
//! `concat!` from the shared head and routes plus its own routes.

/// The FinTech trust domain.
pub const TD: &str = "fintech.internal";
/// The monolith's SPIFFE ID (the inbound, server side).
pub const MONOLITH: &str = "spiffe://fintech.internal/monolith";
/// The report service's SPIFFE ID (the usual caller).
pub const REPORTS: &str = "spiffe://fintech.internal/report-service";
/// The API gateway's SPIFFE ID.
pub const GATEWAY: &str = "spiffe://fintech.internal/api-gateway";
/// The ops team's SPIFFE ID.
pub const OPS: &str = "spiffe://fintech.internal/ops";

/// The head of a FinTech policy: version, trust domain, and `[identities]` naming the report
/// service (a test's policy may name more identities right after it).
#[macro_export]
macro_rules! fintech_policy_head {
    () => {
        r#"
version = 1
trust_domain = "fintech.internal"

[identities]
report-service = "spiffe://fintech.internal/report-service"
"#
    };
}

/// The route for the report data export: the report service may `GET /api/data/reports`.
#[macro_export]
macro_rules! report_export_route {
    () => {
        r#"
[[route]]
name    = "report data export"
methods = ["GET"]
path    = "/api/data/reports"
allow   = ["report-service"]
"#
    };
}

/// The route for bulk transfers: the report service may `GET` and `POST /bulk`.
#[macro_export]
macro_rules! bulk_transfer_route {
    () => {
        r#"
[[route]]
name    = "bulk transfer"
methods = ["GET", "POST"]
path    = "/bulk"
allow   = ["report-service"]
"#
    };
}

/// The monolith's policy for the report data export: the report service may
/// `GET /api/data/reports`, nothing else is routed.
pub const REPORT_EXPORT_POLICY: &str = concat!(fintech_policy_head!(), report_export_route!());
