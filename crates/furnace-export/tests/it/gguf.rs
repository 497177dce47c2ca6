//! gguf tests.
