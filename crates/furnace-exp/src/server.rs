//! The experiment HTTP API.
