//! The hook for constrained decoding: a [`Constraint`] (a grammar engine, a JSON schema, a
//! fixed choice) decides which tokens a sequence may take next, one token at a time.
//!
//! At each step of a sequence with a constraint the engine, in order:
//! 1. ends the sequence with [`crate::FinishReason::Stop`] if [`Constraint::is_done`];
//! 2. applies the penalties to the logits, then calls [`Constraint::mask`], which sets the
//!    logits of disallowed tokens to `-inf` (log-probabilities stay those of the raw logits);
//! 3. samples among the allowed tokens and calls [`Constraint::commit`] with the chosen one
//!    (except for an end-of-sequence token that ends the sequence: it ends as
//!    [`crate::FinishReason::Eos`] without a commit);
//! 4. ends the sequence with [`crate::FinishReason::Stop`] if the constraint is now done.
//!
//! An error of `mask` or `commit`, or a mask that allows no token, ends that sequence with
//! [`crate::FinishReason::Error`] (a token `commit` rejected is not part of the output);
//! other sequences of the batch go on.

/// Decides which tokens one sequence may generate next. Each request gets its own
/// ([`Constraint::box_clone`] copies one, state included).
pub trait Constraint: Send {
    /// Sets the logits of the tokens not allowed next to `f32::NEG_INFINITY`
    /// (`logits.len()` is the vocabulary size).
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String>;
    /// Advances past `token`, the token just generated.
    fn commit(&mut self, token: u32) -> Result<(), String>;
    /// Whether generation must end now (the sequence finishes as
    /// [`crate::FinishReason::Stop`] without another token).
    fn is_done(&self) -> bool;
    /// A copy of this constraint in its current state.
    fn box_clone(&self) -> Box<dyn Constraint>;
}
