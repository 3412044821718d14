//! The fake Spring Boot monolith: the expense data the report service reads, the dashboard the
//! gateway shows, and expense submission. Every request it receives is recorded with its headers, so a
//! test can prove what the app saw (and, for a denied request, that it saw nothing).
//!
//! - `GET /api/data/reports?startDate=YYYY-MM-DD&endDate=YYYY-MM-DD` → one expense row per day of the
//!   range, deterministic; 400 when a date is missing, malformed or the range is inverted or too long.
//! - `GET /api/dashboard` → a small summary.
//! - `POST /api/expenses` `{"date","category","amountCents"}` → 201 with the stored expense.

use std::sync::Mutex;
use std::sync::PoisonError;

use http::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use time::Date;
use time::macros::format_description;

use crate::harness::app::{
    App, CLIENT_ID_HEADER, Captured, Recorder, ServiceBody as Body, error, json,
};

/// Longest range `GET /api/data/reports` serves, in days (ten years).
pub const MAX_RANGE_DAYS: i64 = 3660;

const CATEGORIES: [&str; 5] = ["travel", "software", "hardware", "meals", "office"];

/// One expense row of the report data export.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExpenseRow {
    /// Day of the expense, `YYYY-MM-DD`.
    pub date: String,
    /// Tenant that spent it.
    pub tenant: String,
    /// Expense category.
    pub category: String,
    /// Amount in cents.
    pub amount_cents: i64,
}

/// Body of `GET /api/data/reports`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReportData {
    /// First day, inclusive.
    pub start_date: String,
    /// Last day, inclusive.
    pub end_date: String,
    /// One row per day.
    pub rows: Vec<ExpenseRow>,
}

/// Body of `POST /api/expenses`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewExpense {
    /// Day of the expense, `YYYY-MM-DD`.
    pub date: String,
    /// Expense category.
    pub category: String,
    /// Amount in cents, positive.
    pub amount_cents: i64,
}

/// Parses a `YYYY-MM-DD` calendar date.
///
/// # Errors
/// A message naming the parameter when the text is not a valid date.
pub fn parse_date(param: &str, text: &str) -> Result<Date, String> {
    Date::parse(text, format_description!("[year]-[month]-[day]"))
        .map_err(|_| format!("{param} must be a calendar date YYYY-MM-DD, got `{text}`"))
}

/// Checks a `startDate`/`endDate` pair: both valid, start ≤ end, at most [`MAX_RANGE_DAYS`] long.
///
/// # Errors
/// A message saying which rule the pair breaks.
pub fn parse_range(start: Option<&str>, end: Option<&str>) -> Result<(Date, Date), String> {
    let start = parse_date("startDate", start.ok_or("startDate is required")?)?;
    let end = parse_date("endDate", end.ok_or("endDate is required")?)?;
    if end < start {
        return Err(format!("endDate {end} is before startDate {start}"));
    }
    let days = (end - start).whole_days() + 1;
    if days > MAX_RANGE_DAYS {
        return Err(format!(
            "range of {days} days exceeds the maximum of {MAX_RANGE_DAYS}"
        ));
    }
    Ok((start, end))
}

/// The deterministic expense rows for `start..=end`, one per day.
pub fn rows_for(start: Date, end: Date) -> Vec<ExpenseRow> {
    let mut rows = Vec::new();
    let mut day = Some(start);
    while let Some(d) = day.filter(|d| *d <= end) {
        let n = i64::from(d.to_julian_day());
        rows.push(ExpenseRow {
            date: d.to_string(),
            tenant: format!("tenant-{:02}", n.rem_euclid(30) + 1),
            category: CATEGORIES[n.rem_euclid(5) as usize].to_owned(),
            amount_cents: (n * 7919).rem_euclid(50_000) + 500,
        });
        day = d.next_day();
    }
    rows
}

/// The monolith app.
#[derive(Debug, Default)]
pub struct Monolith {
    recorder: Recorder,
    expenses: Mutex<Vec<NewExpense>>,
}

impl Monolith {
    /// A monolith with no submitted expenses, recording into `recorder`.
    pub fn new(recorder: Recorder) -> Self {
        Monolith {
            recorder,
            expenses: Mutex::default(),
        }
    }

    fn report_data(req: &Captured) -> Response<Body> {
        match parse_range(req.query_param("startDate"), req.query_param("endDate")) {
            Ok((start, end)) => json(
                StatusCode::OK,
                &ReportData {
                    start_date: start.to_string(),
                    end_date: end.to_string(),
                    rows: rows_for(start, end),
                },
            ),
            Err(message) => error(StatusCode::BAD_REQUEST, &message),
        }
    }

    fn dashboard(&self, req: &Captured) -> Response<Body> {
        let expenses = self
            .expenses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        let viewer = req
            .headers
            .get(CLIENT_ID_HEADER)
            .and_then(|v| v.to_str().ok());
        json(
            StatusCode::OK,
            &serde_json::json!({ "tenants": 30, "submittedExpenses": expenses, "servedTo": viewer }),
        )
    }

    fn add_expense(&self, req: &Captured) -> Response<Body> {
        let expense: NewExpense = match serde_json::from_slice(&req.body) {
            Ok(e) => e,
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("invalid expense: {e}")),
        };
        if let Err(message) = parse_date("date", &expense.date) {
            return error(StatusCode::BAD_REQUEST, &message);
        }
        if expense.amount_cents <= 0 {
            return error(StatusCode::BAD_REQUEST, "amountCents must be positive");
        }
        let mut expenses = self.expenses.lock().unwrap_or_else(PoisonError::into_inner);
        expenses.push(expense.clone());
        let id = expenses.len();
        json(
            StatusCode::CREATED,
            &serde_json::json!({ "id": id, "expense": expense }),
        )
    }
}

impl App for Monolith {
    async fn handle(&self, req: Captured) -> Response<Body> {
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/api/data/reports") => Self::report_data(&req),
            (&Method::GET, "/api/dashboard") => self.dashboard(&req),
            (&Method::POST, "/api/expenses") => self.add_expense(&req),
            _ => error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {} {}", req.method, req.path),
            ),
        }
    }

    fn recorder(&self) -> Option<&Recorder> {
        Some(&self.recorder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_rules() {
        assert!(parse_range(Some("2024-01-01"), Some("2024-12-31")).is_ok());
        assert!(parse_range(Some("2024-02-29"), Some("2024-02-29")).is_ok());
        assert!(
            parse_range(None, Some("2024-12-31"))
                .unwrap_err()
                .contains("startDate is required")
        );
        assert!(
            parse_range(Some("2024-01-01"), None)
                .unwrap_err()
                .contains("endDate is required")
        );
        assert!(
            parse_range(Some("2023-02-29"), Some("2024-01-01"))
                .unwrap_err()
                .contains("startDate")
        );
        assert!(parse_range(Some("2024-1-1"), Some("2024-01-02")).is_err());
        assert!(
            parse_range(Some("2024-12-31"), Some("2024-01-01"))
                .unwrap_err()
                .contains("before")
        );
        assert!(
            parse_range(Some("2000-01-01"), Some("2024-01-01"))
                .unwrap_err()
                .contains("maximum")
        );
    }

    #[test]
    fn one_deterministic_row_per_day() {
        let (start, end) = parse_range(Some("2024-01-01"), Some("2024-12-31")).unwrap();
        let rows = rows_for(start, end);
        assert_eq!(rows.len(), 366);
        assert_eq!(rows[0].date, "2024-01-01");
        assert_eq!(rows[365].date, "2024-12-31");
        assert_eq!(rows, rows_for(start, end));
        assert!(rows.iter().all(|r| r.amount_cents >= 500));
    }
}
