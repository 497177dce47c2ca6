//! User-defined metrics: a program that scores a batch of items.
//!
//! The program is started once per batch. It reads one JSON object per line on stdin (one
//! line per item, in order; what an item holds is up to the caller) and must print one line
//! per item on stdout, in the same order: a JSON number or an object `{"score": x}`. Blank
//! lines are skipped; anything on stderr is only shown when the program fails. It must exit
//! with status 0 within the timeout.

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Error, Result};

/// How much of the program's stderr an error shows (its end).
const STDERR_TAIL: usize = 2000;

/// A metric computed by an external program (see the module docs for the protocol).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandMetric {
    /// The metric's name (used in errors).
    pub name: String,
    /// The program and its arguments (`["python3", "score.py"]`); not run through a shell.
    pub argv: Vec<String>,
    /// The most time one batch may take, output included; the program is killed after it.
    pub timeout: Duration,
}

/// One of the program's output streams, read to its end.
enum Stream {
    Stdout(std::io::Result<Vec<u8>>),
    Stderr(std::io::Result<Vec<u8>>),
}

impl CommandMetric {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Metric { metric: self.name.clone(), msg: msg.into() }
    }

    fn program(&self) -> String {
        self.argv.join(" ")
    }

    /// Scores `items`, one score per item, in order. An empty batch starts no program.
    ///
    /// Fails with [`Error::Metric`] when the program cannot be started, exits with a non-zero
    /// status (the error shows the end of its stderr), runs past the timeout (it is killed),
    /// prints a line count other than the item count, or prints a line that is neither a
    /// number nor `{"score": number}`.
    pub fn score(&self, items: &[Value]) -> Result<Vec<f64>> {
        let lines = self.run(items)?;
        self.parse(&lines, items.len())
    }

    /// Scores of a ratio-of-sums metric: one line per item, `{"num": a, "den": b}`.
    pub fn score_ratio(&self, items: &[Value]) -> Result<Vec<(f64, f64)>> {
        let stdout = self.run(items)?;
        self.parse_lines(&stdout, items.len(), "{\"num\": number, \"den\": number}", |v| {
            let get = |k: &str| v.get(k).and_then(Value::as_f64).filter(|x| x.is_finite());
            Some((get("num")?, get("den")?))
        })
    }

    /// Runs the program over the items; its stdout.
    fn run(&self, items: &[Value]) -> Result<Vec<u8>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let Some((prog, args)) = self.argv.split_first() else {
            return Err(self.err("the command is empty: give the program and its arguments (argv)"));
        };
        let mut input = Vec::new();
        for item in items {
            let line = serde_json::to_string(item).map_err(|e| self.err(format!("an item could not be written as JSON: {e}")))?;
            input.extend_from_slice(line.as_bytes());
            input.push(b'\n');
        }
        let start = Instant::now();
        let mut child =
            Command::new(prog).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| {
                self.err(format!("could not start `{}`: {e}; check that the program exists and is executable", self.program()))
            })?;
        // Stdin is written and the outputs are read on their own threads, so a program that
        // prints before it has read all its input cannot deadlock against us.
        let (tx, rx) = mpsc::channel();
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::spawn(move || {
                // A program that exits without reading everything closes the pipe: not an error
                // here; its exit status and output say what went wrong.
                let _ = stdin.write_all(&input);
            });
        }
        if let Some(mut out) = child.stdout.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let r = out.read_to_end(&mut buf).map(|_| buf);
                let _ = tx.send(Stream::Stdout(r));
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let r = err.read_to_end(&mut buf).map(|_| buf);
                let _ = tx.send(Stream::Stderr(r));
            });
        }
        drop(tx);
        // No deadline when the timeout is too large to add to the clock.
        let deadline = start.checked_add(self.timeout);
        let status = self.wait(&mut child, deadline, items.len())?;
        let (mut stdout, mut stderr) = (None, None);
        while stdout.is_none() || stderr.is_none() {
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            match rx.recv_timeout(left) {
                Ok(Stream::Stdout(r)) => stdout = Some(r.map_err(|e| self.err(format!("reading its output: {e}")))?),
                Ok(Stream::Stderr(r)) => stderr = Some(r.unwrap_or_default()),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(self.timed_out(items.len())),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let stdout = stdout.unwrap_or_default();
        let stderr = stderr.unwrap_or_default();
        if !status.success() {
            return Err(self.err(format!(
                "`{}` exited with {status}; it must exit with status 0. The end of its stderr:\n{}",
                self.program(),
                tail(&stderr)
            )));
        }
        Ok(stdout)
    }

    /// Waits for the program until `deadline` (if any), killing it then.
    fn wait(&self, child: &mut Child, deadline: Option<Instant>, n: usize) -> Result<ExitStatus> {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(self.err(format!("waiting for `{}`: {e}", self.program())));
                }
            }
            let now = Instant::now();
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(now));
            if left.is_zero() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.timed_out(n));
            }
            std::thread::sleep(left.min(Duration::from_millis(5)));
        }
    }

    fn timed_out(&self, n: usize) -> Error {
        self.err(format!(
            "`{}` did not finish a batch of {n} items within {:?} and was killed; make it faster or raise the metric's timeout",
            self.program(),
            self.timeout
        ))
    }

    /// One score per non-blank line of `stdout`.
    fn parse(&self, stdout: &[u8], n: usize) -> Result<Vec<f64>> {
        self.parse_lines(stdout, n, "a number or {\"score\": number}", |v| match v {
            Value::Number(x) => x.as_f64(),
            Value::Object(m) => m.get("score").and_then(Value::as_f64),
            _ => None,
        })
    }

    /// One value per non-blank line of `stdout`, each read by `read` from its JSON;
    /// `expected` says what a line must hold.
    fn parse_lines<T>(&self, stdout: &[u8], n: usize, expected: &str, read: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
        let text = String::from_utf8_lossy(stdout);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != n {
            return Err(self.err(format!(
                "`{}` printed {} score lines for {n} items; it must print exactly one line per input line, in order",
                self.program(),
                lines.len()
            )));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str::<Value>(line).ok().as_ref().and_then(&read).ok_or_else(|| {
                    let shown: String = line.chars().take(200).collect();
                    self.err(format!("output line {}: expected {expected}, got `{shown}`", i + 1))
                })
            })
            .collect()
    }
}

/// The end of a program's stderr, as text.
fn tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim_end();
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= STDERR_TAIL {
        text.to_owned()
    } else {
        let mut s = String::from("...");
        s.extend(&chars[chars.len() - STDERR_TAIL..]);
        s
    }
}
