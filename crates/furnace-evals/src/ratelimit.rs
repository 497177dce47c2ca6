//! A sliding-window limiter of requests and tokens per window (per minute for an API's
//! `rpm` and `tpm` limits), shared by the threads that send requests.
//!
//! Before a request a thread [`acquire`](SlidingWindow::acquire)s a [`Permit`] for one
//! request and an estimate of its tokens, sleeping until the window has room; after the
//! answer it [`finish`](Permit::finish)es the permit with the tokens really used.
//!
//! When a request counts: from its reservation while it runs (however long it runs), and
//! then for one window from the moment its answer came back. Counting from the answer
//! rather than from the send is a little conservative (a slot is held for the window plus
//! the request's latency), but it is the one stamp a client can be sure is not earlier
//! than the server saw the request arrive: so the server never sees more than `rpm`
//! requests (or `tpm` tokens) in any window, whatever the network delays were.

use crate::{Error, Result};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Time as the limiter sees it: the system's clock, or a fake one in tests.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
    /// Sleeps `d` (a fake clock just advances).
    fn sleep(&self, d: Duration);
}

/// The real clock: [`Instant::now`] and [`std::thread::sleep`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
}

/// How long a thread sleeps before looking again when only running requests fill the
/// window (their answers, not the clock, free it).
const POLL: Duration = Duration::from_millis(20);

/// One counted request.
#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    tokens: u64,
    /// When its answer came back; `None` while it runs (it counts until then and for one
    /// window after).
    done: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next_id: u64,
}

/// Limits requests and tokens per sliding window. Thread-safe: share it by reference (or
/// in an `Arc`) between the threads that send.
pub struct SlidingWindow {
    rpm: Option<u32>,
    tpm: Option<u64>,
    window: Duration,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

impl std::fmt::Debug for SlidingWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlidingWindow").field("rpm", &self.rpm).field("tpm", &self.tpm).field("window", &self.window).finish()
    }
}

/// The right to send one request, from [`SlidingWindow::acquire`]. Finish it with the
/// tokens really used; a permit dropped unfinished keeps its estimate.
#[derive(Debug)]
#[must_use = "a permit counts its request until it is finished or dropped"]
pub struct Permit<'a> {
    limiter: &'a SlidingWindow,
    id: u64,
    finished: bool,
}

impl Permit<'_> {
    /// The answer came back: the request counts for one window from now, with `tokens`
    /// (the real usage) in place of the estimate when given.
    pub fn finish(mut self, tokens: Option<u64>) {
        self.limiter.complete(self.id, tokens);
        self.finished = true;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.limiter.complete(self.id, None);
        }
    }
}

impl SlidingWindow {
    /// At most `rpm` requests and `tpm` tokens in any `window` (no limit where `None`),
    /// on the system clock.
    pub fn new(rpm: Option<u32>, tpm: Option<u64>, window: Duration) -> Self {
        Self::with_clock(rpm, tpm, window, Arc::new(SystemClock))
    }

    /// The same on another clock (a fake one in tests).
    pub fn with_clock(rpm: Option<u32>, tpm: Option<u64>, window: Duration, clock: Arc<dyn Clock>) -> Self {
        SlidingWindow { rpm, tpm, window, clock, state: Mutex::new(State::default()) }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        self.window
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left the entries consistent (no
        // step leaves them half-updated), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reserves one request of about `tokens` tokens, sleeping until the window has room.
    /// A request larger than the token limit (it could never fit) is an error at once, as
    /// is an `rpm` of 0.
    pub fn acquire(&self, tokens: u64) -> Result<Permit<'_>> {
        loop {
            match self.try_acquire(tokens)? {
                Ok(permit) => return Ok(permit),
                Err(wait) => self.clock.sleep(wait),
            }
        }
    }

    /// Reserves one request of about `tokens` tokens if the window has room now; otherwise
    /// how long to wait before trying again. Errors as [`acquire`](Self::acquire).
    pub fn try_acquire(&self, tokens: u64) -> Result<std::result::Result<Permit<'_>, Duration>> {
        if self.rpm == Some(0) {
            return Err(Error::Spec {
                key: "generator.rpm".into(),
                msg: "is 0: no request could ever be sent; set it to 1 or more, or leave it out".into(),
            });
        }
        if let Some(tpm) = self.tpm {
            if tokens > tpm {
                return Err(Error::Generator(format!(
                    "a request of about {tokens} tokens (prompt characters / 4 + max_tokens) is over the limit of {tpm} tokens per {}: it could never be sent; lower max_tokens or shorten the prompt, or raise tpm",
                    window_name(self.window)
                )));
            }
        }
        let now = self.clock.now();
        let mut st = self.lock();
        // Forget what has left the window.
        let window = self.window;
        st.entries.retain(|e| e.done.is_none_or(|t| now.saturating_duration_since(t) < window));
        match self.wait_for(&st.entries, tokens, now) {
            Some(wait) => Ok(Err(wait)),
            None => {
                let id = st.next_id;
                st.next_id += 1;
                st.entries.push(Entry { id, tokens, done: None });
                Ok(Ok(Permit { limiter: self, id, finished: false }))
            }
        }
    }

    /// `None` when one more request of `tokens` fits now; otherwise how long until it may.
    fn wait_for(&self, entries: &[Entry], tokens: u64, now: Instant) -> Option<Duration> {
        let fits = |count: usize, used: u64| {
            self.rpm.is_none_or(|r| count < r as usize) && self.tpm.is_none_or(|t| used.saturating_add(tokens) <= t)
        };
        let mut count = entries.len();
        let mut used: u64 = entries.iter().map(|e| e.tokens).sum();
        if fits(count, used) {
            return None;
        }
        // Finished entries leave the window oldest first: the first moment enough have left.
        let mut done: Vec<(Instant, u64)> = entries.iter().filter_map(|e| e.done.map(|t| (t, e.tokens))).collect();
        done.sort_by_key(|d| d.0);
        for (t, tok) in done {
            count -= 1;
            used -= tok;
            if fits(count, used) {
                let until = (t + self.window).saturating_duration_since(now);
                return Some(until.max(Duration::from_millis(1)));
            }
        }
        // Only running requests' answers can make room.
        Some(POLL.min(self.window))
    }

    fn complete(&self, id: u64, tokens: Option<u64>) {
        let now = self.clock.now();
        let mut st = self.lock();
        if let Some(e) = st.entries.iter_mut().find(|e| e.id == id) {
            e.done = Some(now);
            if let Some(t) = tokens {
                e.tokens = t;
            }
        }
    }

    /// Requests and tokens counted in the window now (running ones included).
    pub fn in_window(&self) -> (usize, u64) {
        let now = self.clock.now();
        let st = self.lock();
        let live = st.entries.iter().filter(|e| e.done.is_none_or(|t| now.saturating_duration_since(t) < self.window));
        live.fold((0, 0), |(n, tok), e| (n + 1, tok + e.tokens))
    }
}

fn window_name(window: Duration) -> String {
    if window == Duration::from_secs(60) {
        "minute".into()
    } else {
        format!("{:.3} s", window.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A clock that only moves when slept on (or advanced by hand).
    struct FakeClock(Mutex<Instant>);

    impl FakeClock {
        fn new() -> Arc<Self> {
            Arc::new(FakeClock(Mutex::new(Instant::now())))
        }
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, d: Duration) {
            self.advance(d)
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    /// The most stamps in any half-open window `[t, t + w)`.
    fn max_in_window(stamps: &[Instant], w: Duration) -> usize {
        stamps.iter().map(|&s| stamps.iter().filter(|&&t| t >= s && t < s + w).count()).max().unwrap_or(0)
    }

    #[test]
    fn never_more_than_rpm_requests_in_any_window() {
        let clock = FakeClock::new();
        let lim = SlidingWindow::with_clock(Some(5), None, MIN, clock.clone());
        let start = clock.now();
        let mut sent = Vec::new();
        for i in 0..23 {
            let p = lim.acquire(1).unwrap();
            sent.push(clock.now());
            // Answers take a varying while.
            clock.advance(Duration::from_millis(100 * (i % 7)));
            p.finish(Some(1));
        }
        assert_eq!(max_in_window(&sent, MIN), 5);
        // 23 requests at 5 a minute: the 21st waits four full windows (plus latencies).
        assert!(sent[20] - start >= 4 * MIN, "{:?}", sent[20] - start);
        assert!(sent[20] - start < 5 * MIN);
        // The first five go at once.
        assert!(sent[4] - start < Duration::from_secs(2));
    }

    #[test]
    fn running_requests_count_until_answered_and_a_window_after() {
        let clock = FakeClock::new();
        let lim = SlidingWindow::with_clock(Some(2), None, MIN, clock.clone());
        let a = lim.acquire(1).unwrap();
        let b = lim.acquire(1).unwrap();
        assert!(lim.try_acquire(1).unwrap().is_err(), "two running fill a window of 2");
        clock.advance(2 * MIN);
        assert!(lim.try_acquire(1).unwrap().is_err(), "still running after two windows: still counted");
        a.finish(Some(1));
        clock.advance(MIN - Duration::from_millis(1));
        match lim.try_acquire(1).unwrap() {
            Err(wait) => assert_eq!(wait, Duration::from_millis(1)),
            Ok(_) => panic!("a window has not passed since the answer"),
        }
        clock.advance(Duration::from_millis(1));
        let c = lim.try_acquire(1).unwrap().expect("a left the window");
        drop(b);
        drop(c);
        assert_eq!(lim.in_window().0, 2);
    }

    #[test]
    fn tokens_are_reserved_then_corrected_with_the_real_usage() {
        let clock = FakeClock::new();
        let lim = SlidingWindow::with_clock(None, Some(1000), MIN, clock.clone());
        // Estimated 600: a second 600 does not fit...
        let p = lim.acquire(600).unwrap();
        assert!(lim.try_acquire(600).unwrap().is_err());
        // ...but the first really used 100, so after the correction it does, at once.
        p.finish(Some(100));
        assert_eq!(lim.in_window(), (1, 100));
        clock.advance(Duration::from_secs(10));
        let q = lim.try_acquire(600).unwrap().expect("100 + 600 <= 1000");
        q.finish(Some(900));
        // Now 1000 are used: 50 more wait until the first answer (100) leaves the window,
        // 60 s after it came back, 50 s from now.
        let t0 = clock.now();
        let r = lim.acquire(50).unwrap();
        assert_eq!(clock.now() - t0, Duration::from_secs(50));
        // An unfinished permit keeps its estimate.
        r.finish(None);
        assert_eq!(lim.in_window(), (2, 950));
        // The correction can also be upward: a real usage over the estimate counts in full.
        let s = lim.acquire(10).unwrap();
        s.finish(Some(990));
        assert_eq!(lim.in_window(), (3, 1940));
        assert!(lim.try_acquire(20).unwrap().is_err());
    }

    #[test]
    fn a_request_over_the_token_limit_is_an_error_not_a_hang() {
        let clock = FakeClock::new();
        let lim = SlidingWindow::with_clock(Some(10), Some(500), MIN, clock.clone());
        let e = lim.acquire(501).unwrap_err().to_string();
        assert!(e.contains("501") && e.contains("500 tokens per minute"), "{e}");
        assert_eq!(lim.in_window(), (0, 0), "nothing reserved");
        // Exactly the limit is fine.
        lim.acquire(500).unwrap().finish(None);
        // And rpm 0 is refused rather than waited on forever.
        let zero = SlidingWindow::with_clock(Some(0), None, MIN, clock);
        assert!(zero.acquire(1).unwrap_err().to_string().contains("generator.rpm"));
    }

    #[test]
    fn threads_sharing_a_short_real_window_never_exceed_it() {
        // The real clock, a 300 ms window, 3 requests per window, 6 threads of 2 requests.
        let w = Duration::from_millis(300);
        let lim = SlidingWindow::new(Some(3), None, w);
        let sent = Mutex::new(Vec::new());
        let done = Mutex::new(Vec::new());
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| {
                    for _ in 0..2 {
                        let p = lim.acquire(1).unwrap();
                        sent.lock().unwrap().push(Instant::now());
                        std::thread::sleep(Duration::from_millis(10));
                        done.lock().unwrap().push(Instant::now());
                        p.finish(Some(1));
                    }
                });
            }
        });
        let sent = sent.into_inner().unwrap();
        assert_eq!(sent.len(), 12);
        // Each send is at least a window after the answer of the send three before it, so
        // no window of sends holds more than 3.
        assert!(max_in_window(&sent, w) <= 3, "{sent:?}");
        // 12 requests at 3 a window: at least three windows.
        assert!(start.elapsed() >= 3 * w, "{:?}", start.elapsed());
    }
}
