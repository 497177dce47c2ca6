//! Property tests: every target over a bounded number of seeded inputs (seeds, mutations,
//! crafted inputs) gives a clean result: no panic, no input over the time limit, no
//! allocation over the cap, no empty error message. And the harness itself: a panicking,
//! slow or allocating target is caught.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;
mod targets;

use furnace_fuzz::alloc::CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Runs `f` on a thread with a main thread's stack (test threads have 2 MiB), so a
/// parser that overflows the stack here would overflow in furnace too.
pub fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(8 << 20).spawn(f).unwrap().join().unwrap()
}
