//! A small `strftime` for the `strftime_now(format)` template function.
//!
//! Chat templates (Llama 3.x and others) put today's date into the system prompt with
//! `strftime_now("%d %b %Y")`. This implements the C-locale conversions of Python's
//! `datetime.strftime` without a date-time dependency; the time is UTC.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
const MONTHS: [&str; 12] =
    ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DateTime {
    year: i64,
    /// 1..=12
    month: u32,
    /// 1..=31
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    micros: u32,
    /// 0 = Sunday
    weekday: u32,
    /// 0-based day of the year
    yday: u32,
    /// Seconds since the Unix epoch.
    unix: i64,
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

impl DateTime {
    /// The current UTC time.
    pub(crate) fn now() -> Self {
        let (secs, micros) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(0), d.subsec_micros()),
            Err(_) => (0, 0),
        };
        Self::from_unix(secs, micros)
    }

    /// Breaks down seconds since the epoch (proleptic Gregorian calendar).
    pub(crate) fn from_unix(unix: i64, micros: u32) -> Self {
        let days = unix.div_euclid(86_400);
        let secs = unix.rem_euclid(86_400) as u32;
        // Civil date from day count (era-based algorithm).
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = cumulative[month as usize - 1] + day - 1 + u32::from(month > 2 && is_leap(year));
        DateTime {
            year,
            month,
            day,
            hour: secs / 3600,
            minute: secs / 60 % 60,
            second: secs % 60,
            micros,
            weekday: (days + 4).rem_euclid(7) as u32,
            yday,
            unix,
        }
    }

    /// Formats like C's `strftime` in the C locale (plus Python's `%f`); the `-`
    /// flag (`%-d`) drops padding. Unknown conversions are copied unchanged.
    pub(crate) fn format(&self, fmt: &str) -> String {
        let mut out = String::with_capacity(fmt.len() + 16);
        let mut chars = fmt.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let no_pad = chars.peek() == Some(&'-');
            if no_pad {
                chars.next();
            }
            let Some(spec) = chars.next() else {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                break;
            };
            let num = |out: &mut String, value: i64, width: usize, pad: char| {
                if no_pad {
                    let _ = write!(out, "{value}");
                } else if pad == ' ' {
                    let _ = write!(out, "{value:>width$}");
                } else {
                    let _ = write!(out, "{value:0width$}");
                }
            };
            let hour12 = match self.hour % 12 {
                0 => 12,
                h => h,
            };
            let weekday = WEEKDAYS[self.weekday as usize % 7];
            let month = MONTHS[(self.month as usize + 11) % 12];
            match spec {
                'a' => out.push_str(&weekday[..3]),
                'A' => out.push_str(weekday),
                'w' => num(&mut out, i64::from(self.weekday), 1, '0'),
                'u' => num(&mut out, i64::from((self.weekday + 6) % 7 + 1), 1, '0'),
                'd' => num(&mut out, i64::from(self.day), 2, '0'),
                'e' => num(&mut out, i64::from(self.day), 2, ' '),
                'b' | 'h' => out.push_str(&month[..3]),
                'B' => out.push_str(month),
                'm' => num(&mut out, i64::from(self.month), 2, '0'),
                'y' => num(&mut out, self.year.rem_euclid(100), 2, '0'),
                'Y' => num(&mut out, self.year, 4, '0'),
                'C' => num(&mut out, self.year.div_euclid(100), 2, '0'),
                'H' => num(&mut out, i64::from(self.hour), 2, '0'),
                'k' => num(&mut out, i64::from(self.hour), 2, ' '),
                'I' => num(&mut out, i64::from(hour12), 2, '0'),
                'l' => num(&mut out, i64::from(hour12), 2, ' '),
                'p' => out.push_str(if self.hour < 12 { "AM" } else { "PM" }),
                'P' => out.push_str(if self.hour < 12 { "am" } else { "pm" }),
                'M' => num(&mut out, i64::from(self.minute), 2, '0'),
                'S' => num(&mut out, i64::from(self.second), 2, '0'),
                'f' => num(&mut out, i64::from(self.micros), 6, '0'),
                'j' => num(&mut out, i64::from(self.yday + 1), 3, '0'),
                'U' => num(&mut out, i64::from((self.yday + 7 - self.weekday) / 7), 2, '0'),
                'W' => num(&mut out, i64::from((self.yday + 7 - (self.weekday + 6) % 7) / 7), 2, '0'),
                's' => num(&mut out, self.unix, 1, '0'),
                'z' => out.push_str("+0000"),
                'Z' => out.push_str("UTC"),
                'D' | 'x' => out.push_str(&self.format("%m/%d/%y")),
                'F' => out.push_str(&self.format("%Y-%m-%d")),
                'T' | 'X' => out.push_str(&self.format("%H:%M:%S")),
                'R' => out.push_str(&self.format("%H:%M")),
                'r' => out.push_str(&self.format("%I:%M:%S %p")),
                'c' => out.push_str(&self.format("%a %b %e %H:%M:%S %Y")),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '%' => out.push('%'),
                other => {
                    out.push('%');
                    if no_pad {
                        out.push('-');
                    }
                    out.push(other);
                }
            }
        }
        out
    }
}

/// `strftime_now(format)`: the current UTC time formatted with `format`.
pub(crate) fn strftime_now(format: &str) -> String {
    DateTime::now().format(format)
}

#[cfg(test)]
mod tests {
    use super::DateTime;

    #[test]
    fn known_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        let t = DateTime::from_unix(1_721_999_109, 42);
        assert_eq!(t.format("%d %b %Y"), "26 Jul 2024");
        assert_eq!(t.format("%A %B %-d, %Y %H:%M:%S %p"), "Friday July 26, 2024 13:05:09 PM");
        assert_eq!(t.format("%F %T %j %f %% %q"), "2024-07-26 13:05:09 208 000042 % %q");
        assert_eq!(t.format("%I %y %e %a %c"), "01 24 26 Fri Fri Jul 26 13:05:09 2024");
        assert_eq!(t.format("%U %W %u %w"), "29 30 5 5");
        assert_eq!(DateTime::from_unix(1_704_499_200, 0).format("%F %a %U %W"), "2024-01-06 Sat 00 01");
        // Leap day and the epoch.
        assert_eq!(DateTime::from_unix(951_782_400, 0).format("%F %a %j"), "2000-02-29 Tue 060");
        assert_eq!(DateTime::from_unix(0, 0).format("%F %A %U %W"), "1970-01-01 Thursday 00 00");
        assert_eq!(DateTime::from_unix(-86_400, 0).format("%F"), "1969-12-31");
    }
}
