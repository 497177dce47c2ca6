//! A counting global allocator: the largest single request made by the current thread
//! since the last [`reset`], so the runner can report an input that asks for a huge
//! allocation (a finding) before the operating system refuses it.
//!
//! Implementing `GlobalAlloc` needs `unsafe impl` (the trait is unsafe), so this one
//! module allows `unsafe_code`; it only delegates to [`System`] and counts sizes.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: during thread teardown the slot may be gone; nothing to record then.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

/// The system allocator, counting the largest request per thread. Install it in a
/// binary or test with `#[global_allocator]`.
pub struct CountingAlloc;

// SAFETY: every method forwards the caller's layout and pointer unchanged to `System`,
// which upholds `GlobalAlloc`'s contract; the only extra work is a thread-local `Cell`
// update that never allocates.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout as given to us, see above.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Starts a new measurement on this thread.
pub fn reset() {
    let _ = LARGEST.try_with(|l| l.set(0));
}

/// The largest request on this thread since [`reset`] (0 without [`CountingAlloc`]).
pub fn largest() -> usize {
    LARGEST.try_with(Cell::get).unwrap_or(0)
}
