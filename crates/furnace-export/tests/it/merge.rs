//! merge tests.
