//! The policy texts several test files share, each written once.
