//! combine tests.
