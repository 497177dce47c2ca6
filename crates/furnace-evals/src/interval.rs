//! Confidence intervals for online aggregation: after every shard, the mean of a metric
//! over the whole eval set is estimated from the examples scored so far, with an interval.
//!
//! The eval set (N examples) is shuffled by a seeded permutation and scored shard by shard,
//! so the scored examples are a simple random sample drawn **without replacement** from a
//! finite population. Every metric has a known range `[a, b]`; values are rescaled to
//! `[0, 1]` by `x = (v − a)/(b − a)`, the interval is computed there and mapped back, so
//! [`Interval`] is in the metric's units. `estimate` is always the sample mean.
//!
//! # Methods
//!
//! With `n` values, sample mean `p̂` (in `[0, 1]` units), `α = 1 − confidence`,
//! `z = Φ⁻¹(1 − α/2)` (Wichura's AS241, [`normal_quantile`]) and, when `fpc` is set and the
//! population `N` is known, the finite population correction `f = sqrt((N − n)/(N − 1))`
//! (`f = 0` once `n = N`, `f = 1` otherwise):
//!
//! * [`Method::Normal`]: `p̂ ± z·f·s/sqrt(n)` with `s² = (1/n)·Σ(xᵢ − p̂)²` (ddof 0),
//!   clipped to `[0, 1]`.
//! * [`Method::Wilson`]: the Wilson score interval with `n_eff = n/f²`:
//!   centre `(p̂ + z²/(2n_eff))/(1 + z²/n_eff)`, half-width
//!   `z·sqrt(p̂(1 − p̂)/n_eff + z²/(4n_eff²))/(1 + z²/n_eff)`, clipped to `[0, 1]`.
//!   Meant for 0/1 metrics; for any other bounded metric the rescaled sample mean is used as
//!   `p̂`, and since a `[0, 1]` variable's variance is at most `p̂(1 − p̂)`, this is a
//!   conservative (wider) normal-type interval.
//! * [`Method::Hoeffding`]: `p̂ ± f·sqrt(ln(2/α)/(2n))` (that is `(b − a)·sqrt(ln(2/α)/(2n))`
//!   in the metric's units), clipped to `[0, 1]`.
//! * [`Method::ConfSeq`] (the default): an anytime-valid confidence sequence by betting,
//!   below. Its guarantee holds at every shard at once, so looking after each shard (and
//!   stopping on what one sees) keeps the coverage; the three above are per-look intervals
//!   whose coverage at *every* look together is well below the nominal level.
//!
//! ## Sources and differences: RapidFire AI
//!
//! The first three follow RapidFire AI's online aggregation,
//! `rapidfireai/evals/metrics/online_strategies.py` (repository `RapidFireAI/rapidfireai`,
//! commit `6dd53c12`), with the strategy chosen in `rapidfireai/evals/metrics/aggregator.py`:
//!
//! * Normal ↔ `NormalApproximationStrategy.normal_approximation` (algebraic metrics,
//!   `population_size = 1`): `z = norm.ppf(1 − α/2)` (`get_z_score`), standard error times
//!   the FPC factor `sqrt((N − n)/(N − 1))` (`apply_finite_population_correction_to_stderr`,
//!   0 when `n ≥ N`), bounds clipped to `[a, b]`. **Difference**: RapidFire's variance
//!   (`get_variance_estimate`) is `p̂(1 − p̂)/n` for the range `(0, 1)` and `(b − a)²/(12n)`
//!   (a uniform distribution's) for any other range. We use the sample variance with ddof 0
//!   for every range: for 0/1 values it *is* `p̂(1 − p̂)`, so 0/1 metrics agree exactly,
//!   while for a general bounded metric a fixed `(b − a)²/12` ignores the data (too narrow
//!   for values piled at the ends, too wide for concentrated ones).
//! * Wilson ↔ `WilsonApproximationStrategy.wilson_approximation`: the same centre and
//!   half-width, the FPC entering as `effective_n = n/f²`, the interval a point once
//!   `n ≥ N`. **Differences**: RapidFire returns the degenerate `[p̂, p̂]` when `p̂` is 0 or
//!   1, and falls back to the normal approximation for ranges other than `(0, 1)`. We keep
//!   the Wilson interval at `p̂ ∈ {0, 1}` (that is the case it exists for: 0 successes in
//!   20 does not make the rate exactly 0; statsmodels' `proportion_confint(method="wilson")`
//!   agrees) and rescale other ranges to `[0, 1]` as said above.
//! * Hoeffding ↔ `HoeffdingApproximationStrategy.hoeffding_approximation`: half-width
//!   `(b − a)·sqrt(ln(2/α)/(2n))` multiplied by the same `sqrt((N − n)/(N − 1))` factor,
//!   clipped to `[a, b]`. **Difference**: RapidFire returns `[p̂, p̂]` when `p̂` is `a` or `b`;
//!   Hoeffding's bound holds whatever the sample, so we keep it. (RapidFire calls its factor
//!   Serfling's correction; Serfling's bound proper has `sqrt(1 − (n − 1)/N)`, slightly
//!   larger. We keep RapidFire's factor, as asked.)
//!
//! As in RapidFire, `fpc` without a known population applies no correction.
//!
//! ## The confidence sequence (Waudby-Smith & Ramdas)
//!
//! Waudby-Smith & Ramdas (2023), *Estimating means of bounded random variables by
//! betting*, JRSS-B 86(1) (arXiv 2010.09686): the hedged capital process with predictable
//! plug-in bets `λ^{PrPl±}` (their with-replacement construction), in its
//! without-replacement form (Section 6, sampling without replacement from a finite
//! population). With `X₁ … X_t ∈ [0, 1]` and a candidate mean `m`:
//!
//! * `μ_t(m) = (N·m − Σ_{i<t} Xᵢ)/(N − t + 1)`, the mean of the population left before
//!   draw `t` if the population mean is `m` (Section 6); without a population,
//!   `μ_t(m) = m` (with replacement / i.i.d.). If `μ_t(m) ∉ [0, 1]`, `m` is impossible
//!   and rejected.
//! * `μ̂_t = (1/2 + Σ_{i≤t} Xᵢ)/(t + 1)`, `σ̂²_t = (1/4 + Σ_{i≤t}(Xᵢ − μ̂ᵢ)²)/(t + 1)`,
//!   `λ_t = sqrt(2·ln(2/α)/(σ̂²_{t−1}·t·ln(1 + t)))`.
//! * `λ⁺_t(m) = min(λ_t, c/μ_t(m))`, `λ⁻_t(m) = min(λ_t, c/(1 − μ_t(m)))` with `c = 1/2`.
//! * `K⁺_t(m) = Π_{i≤t}(1 + λ⁺ᵢ(m)(Xᵢ − μᵢ(m)))`, `K⁻_t(m) = Π_{i≤t}(1 − λ⁻ᵢ(m)(Xᵢ − μᵢ(m)))`,
//!   hedged `K_t(m) = max(θ·K⁺_t(m), (1 − θ)·K⁻_t(m))`, `θ = 1/2`.
//! * `C_t = {m ∈ [0, 1] : K_t(m) < 1/α}`; we report the running intersection
//!   `∩_{s≤n} C_s` (still a confidence sequence; the set of `m` whose hedged capital never
//!   reached `1/α` up to `n`), intersected with the deterministic ("logical") bounds
//!   `[S_n/N, (S_n + N − n)/N]` when `N` is known (`S_n = Σ Xᵢ`; once `n = N` the interval
//!   is the exact mean).
//!
//! This is the `hedged_cs` of the authors' `confseq` package (`src/confseq/betting.py`:
//! `betting_mart` for the WoR `μ_t(m)`, the truncations and the `max` hedge;
//! `cs_from_martingale` for the grid, the logical bounds and the running intersection),
//! with one difference: its bets (`lambda_predmix_eb` in `betting_strategies.py`) use
//! `ln(1/α)`; we use `ln(2/α)`, the predictable plug-in for the hedged process. The bets
//! only change the width, never the validity: `K⁺` and `K⁻` are nonnegative martingales at
//! the true mean for any predictable bets within the truncation, and Ville's inequality
//! bounds the chance that either ever reaches `2/α` by `α/2`.
//!
//! The set is found on the grid `m = k/1000`, `k = 0..=1000`, as the hull of the accepted
//! grid points: the grid is scanned from 0 upwards to the first accepted point and from 1
//! downwards to the last one (points in between are not evaluated: the hedged set is an
//! interval in practice, and the hull can only be wider), then each end is refined by
//! 24 bisection steps between the outermost accepted point and its rejected
//! neighbour, returning the rejected side (conservative by at most 10⁻³/2^24 before
//! rescaling). If no grid point is accepted (probability at most α), the interval is the
//! point `p̂` clamped to the logical bounds.
//!
//! **Cost**: each candidate `m` is one pass over the `n` values that stops as soon as the
//! capital reaches `1/α` (or `μ_t(m)` leaves `[0, 1]`); candidates far from the data stop
//! after a few values. So one call is `O((r + 2 + 48)·n)` steps, `r` the grid
//! points outside the set (at most 1001, most of them cheap), with no allocation but four
//! `n`-long arrays. Recomputed from scratch after each shard, an eval of N = 10 000 in
//! shards of 25 is about 400 calls of at most ~10⁷ cheap steps each; measured (test
//! `confseq_is_fast_enough_for_ten_thousand_values`, debug build at opt-level 1) about 1 s
//! for all 400 together, under 3 ms a call on average.
//!
//! # Ratio metrics
//!
//! [`ratio_interval`] is for metrics that are a ratio of sums (precision as
//! `Σ relevant retrieved / Σ retrieved`): `R = Σ yᵢ / Σ xᵢ` with the delta-method normal
//! interval `R ± z·f·sqrt(Σ(yᵢ − R·xᵢ)²/n)/(sqrt(n)·x̄)` (ddof 0, as for Normal, `f` the
//! FPC factor when asked), whatever [`IntervalOptions::method`] says: neither the Wilson,
//! Hoeffding nor the betting construction applies to a ratio of two random sums. It is not
//! clipped (no range is known); it is a per-look interval, not anytime-valid.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How an interval is computed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Normal approximation with the sample standard deviation.
    Normal,
    /// Wilson score interval.
    Wilson,
    /// Hoeffding's inequality.
    Hoeffding,
    /// Anytime-valid betting confidence sequence (Waudby-Smith & Ramdas), the default.
    #[default]
    ConfSeq,
}

/// Settings of an interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IntervalOptions {
    /// The method.
    pub method: Method,
    /// The confidence level, in (0, 1) (0.95 for 95 %).
    pub confidence: f64,
    /// Apply the finite population correction `sqrt((N − n)/(N − 1))` (Normal, Wilson,
    /// Hoeffding, ratios; needs `population`). ConfSeq uses the population whatever this says.
    pub fpc: bool,
    /// The size N of the whole eval set, when known.
    pub population: Option<usize>,
}

impl Default for IntervalOptions {
    fn default() -> Self {
        IntervalOptions { method: Method::ConfSeq, confidence: 0.95, fpc: true, population: None }
    }
}

/// An estimate and its interval, in the metric's units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The sample mean (or ratio of sums).
    pub estimate: f64,
    /// The lower bound.
    pub lower: f64,
    /// The upper bound.
    pub upper: f64,
}

/// Relative tolerance for values just outside the range (rounding in a metric).
const RANGE_TOL: f64 = 1e-9;
/// Grid breaks of the confidence sequence.
const GRID: usize = 1000;
/// Bisection steps refining each end of the confidence sequence.
const BISECT: usize = 24;
/// Truncation `c` of the bets.
const TRUNC: f64 = 0.5;
/// Hedging weight `θ`.
const THETA: f64 = 0.5;

/// The interval of the mean of `values_in_order` (in the order they were drawn: it matters
/// for [`Method::ConfSeq`]), each in `range = (a, b)`.
///
/// Values beyond the range by at most `1e-9 · max(b − a, 1)` (rounding) are clipped into it.
///
/// Errors ([`Error::Invalid`]): no values, a value that is not finite or outside the range,
/// a bad range, a confidence outside (0, 1), a population smaller than the number of values.
pub fn mean_interval(values_in_order: &[f64], range: (f64, f64), opts: &IntervalOptions) -> Result<Interval> {
    let (a, b) = range;
    if !(a.is_finite() && b.is_finite() && a < b) {
        return Err(Error::Invalid(format!("metric range ({a}, {b}): give finite bounds with min < max")));
    }
    let alpha = check_common(values_in_order.len(), opts)?;
    let width = b - a;
    let tol = RANGE_TOL * width.max(1.0);
    let mut x = Vec::with_capacity(values_in_order.len());
    for (i, &v) in values_in_order.iter().enumerate() {
        if !v.is_finite() || v < a - tol || v > b + tol {
            return Err(Error::Invalid(format!("value {i} is {v}, outside the metric's range [{a}, {b}]: fix the metric or its range")));
        }
        x.push(((v - a) / width).clamp(0.0, 1.0));
    }
    let n = x.len();
    let p = x.iter().sum::<f64>() / n as f64;
    let f = fpc_factor(n, opts);
    let (lo, hi) = match opts.method {
        Method::Normal => {
            let var = x.iter().map(|v| (v - p) * (v - p)).sum::<f64>() / n as f64;
            let half = normal_quantile(1.0 - alpha / 2.0) * f * (var / n as f64).sqrt();
            (p - half, p + half)
        }
        Method::Wilson => wilson(p, n, f, normal_quantile(1.0 - alpha / 2.0)),
        Method::Hoeffding => {
            let half = f * ((2.0 / alpha).ln() / (2.0 * n as f64)).sqrt();
            (p - half, p + half)
        }
        Method::ConfSeq => confseq(&x, alpha, opts.population),
    };
    let (lo, hi) = (lo.clamp(0.0, 1.0), hi.clamp(0.0, 1.0));
    Ok(Interval { estimate: a + width * p, lower: a + width * lo, upper: a + width * hi })
}

/// The interval of the ratio of sums `Σ nums / Σ dens`: a delta-method normal interval
/// (with the finite population correction when `opts.fpc` and `opts.population` say so),
/// whatever `opts.method` is (see the module docs).
///
/// Errors ([`Error::Invalid`]): no values, lengths that differ, a value that is not
/// finite, a zero denominator sum, a bad confidence or population.
pub fn ratio_interval(nums: &[f64], dens: &[f64], opts: &IntervalOptions) -> Result<Interval> {
    if nums.len() != dens.len() {
        return Err(Error::Invalid(format!(
            "ratio metric: {} numerators but {} denominators; give one of each per example",
            nums.len(),
            dens.len()
        )));
    }
    let alpha = check_common(nums.len(), opts)?;
    if let Some(i) = nums.iter().chain(dens).position(|v| !v.is_finite()) {
        let which = if i < nums.len() { "numerator" } else { "denominator" };
        return Err(Error::Invalid(format!("ratio metric: {which} {} is not a finite number", i % nums.len())));
    }
    let n = nums.len() as f64;
    let sum_den: f64 = dens.iter().sum();
    if sum_den == 0.0 {
        return Err(Error::Invalid("ratio metric: the denominators sum to 0, so the ratio is undefined; score more examples".into()));
    }
    let r = nums.iter().sum::<f64>() / sum_den;
    let mean_den = sum_den / n;
    let resid = nums.iter().zip(dens).map(|(y, x)| (y - r * x) * (y - r * x)).sum::<f64>() / n;
    let se = resid.sqrt() / (n.sqrt() * mean_den.abs());
    let half = normal_quantile(1.0 - alpha / 2.0) * fpc_factor(nums.len(), opts) * se;
    Ok(Interval { estimate: r, lower: r - half, upper: r + half })
}

/// Checks what every interval needs; returns α.
fn check_common(n: usize, opts: &IntervalOptions) -> Result<f64> {
    if n == 0 {
        return Err(Error::Invalid("no values to compute an interval from: score at least one example first".into()));
    }
    let c = opts.confidence;
    if !(c.is_finite() && c > 0.0 && c < 1.0) {
        return Err(Error::Invalid(format!("confidence {c}: give a level strictly between 0 and 1, such as 0.95")));
    }
    if let Some(pop) = opts.population {
        if pop < n {
            return Err(Error::Invalid(format!("population {pop} is smaller than the {n} values scored: give the eval set's full size")));
        }
    }
    Ok(1.0 - c)
}

/// RapidFire's finite population correction factor on the standard error.
fn fpc_factor(n: usize, opts: &IntervalOptions) -> f64 {
    match opts.population {
        Some(pop) if opts.fpc => {
            if n >= pop {
                0.0
            } else if pop > 1 {
                ((pop - n) as f64 / (pop - 1) as f64).sqrt()
            } else {
                1.0
            }
        }
        _ => 1.0,
    }
}

/// The Wilson score interval with `n_eff = n/f²`.
fn wilson(p: f64, n: usize, f: f64, z: f64) -> (f64, f64) {
    if f == 0.0 {
        return (p, p);
    }
    let ne = n as f64 / (f * f);
    let z2 = z * z;
    let denom = 1.0 + z2 / ne;
    let center = (p + z2 / (2.0 * ne)) / denom;
    let margin = z * (p * (1.0 - p) / ne + z2 / (4.0 * ne * ne)).sqrt() / denom;
    (center - margin, center + margin)
}

/// Per-draw quantities of the confidence sequence that do not depend on `m`:
/// `μ_t(m) = m·slope − shift`, the bet `λ_t` and the value.
struct Draws {
    x: Vec<f64>,
    lambda: Vec<f64>,
    slope: Vec<f64>,
    shift: Vec<f64>,
    /// Capital threshold for each of `K⁺`, `K⁻`: `1/(θα)` (θ = 1/2 for both).
    threshold: f64,
}

impl Draws {
    fn new(x: &[f64], alpha: f64, population: Option<usize>) -> Draws {
        let n = x.len();
        let log_term = 2.0 * (2.0 / alpha).ln();
        let (mut lambda, mut slope, mut shift) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        // σ̂²_{t−1} starts at σ̂²_0 = 1/4; sums for μ̂ and σ̂².
        let (mut sum_x, mut sum_sq) = (0.0, 0.0);
        for (i, &xi) in x.iter().enumerate() {
            let t = (i + 1) as f64;
            let var_prev = (0.25 + sum_sq) / t; // σ̂²_{t−1} = (1/4 + Σ_{j<t}(X_j − μ̂_j)²)/t
            lambda.push((log_term / (var_prev * t * (1.0 + t).ln())).sqrt());
            match population {
                Some(pop) => {
                    let rem = (pop - i) as f64; // N − (t − 1)
                    slope.push(pop as f64 / rem);
                    shift.push(sum_x / rem);
                }
                None => {
                    slope.push(1.0);
                    shift.push(0.0);
                }
            }
            sum_x += xi;
            let mu_hat = (0.5 + sum_x) / (t + 1.0); // μ̂_t includes X_t
            sum_sq += (xi - mu_hat) * (xi - mu_hat);
        }
        Draws { x: x.to_vec(), lambda, slope, shift, threshold: 1.0 / (THETA * alpha) }
    }

    /// Whether `m` stays in every `C_t`, `t ≤ n` (its hedged capital never reaches 1/α).
    fn accepts(&self, m: f64) -> bool {
        let (mut kp, mut km) = (1.0f64, 1.0f64);
        for i in 0..self.x.len() {
            let mu = m * self.slope[i] - self.shift[i];
            if !(0.0..=1.0).contains(&mu) {
                return false;
            }
            let lam = self.lambda[i];
            let lp = if lam * mu > TRUNC { TRUNC / mu } else { lam };
            let lm = if lam * (1.0 - mu) > TRUNC { TRUNC / (1.0 - mu) } else { lam };
            let d = self.x[i] - mu;
            kp *= 1.0 + lp * d;
            km *= 1.0 - lm * d;
            if kp >= self.threshold || km >= self.threshold {
                return false;
            }
        }
        true
    }

    /// Bisects between an accepted `inside` and a rejected `outside` point; returns the
    /// end of the final bracket on the outside (the wider, conservative one).
    fn bisect(&self, mut inside: f64, mut outside: f64) -> f64 {
        for _ in 0..BISECT {
            let mid = 0.5 * (inside + outside);
            if self.accepts(mid) {
                inside = mid;
            } else {
                outside = mid;
            }
        }
        outside
    }
}

/// The running-intersection confidence sequence at the last draw, in `[0, 1]` units.
fn confseq(x: &[f64], alpha: f64, population: Option<usize>) -> (f64, f64) {
    let n = x.len();
    let draws = Draws::new(x, alpha, population);
    let grid = |k: usize| k as f64 / GRID as f64;
    let first = (0..=GRID).find(|&k| draws.accepts(grid(k)));
    let last = first.and_then(|f| (f..=GRID).rev().find(|&k| draws.accepts(grid(k))));
    let sum: f64 = x.iter().sum();
    let (logical_lo, logical_hi) = match population {
        Some(pop) => (sum / pop as f64, (sum + (pop - n) as f64) / pop as f64),
        None => (0.0, 1.0),
    };
    let point = (sum / n as f64).clamp(logical_lo, logical_hi);
    let (Some(first), Some(last)) = (first, last) else {
        return (point, point);
    };
    let lower = if first == 0 { 0.0 } else { draws.bisect(grid(first), grid(first - 1)) };
    let upper = if last == GRID { 1.0 } else { draws.bisect(grid(last), grid(last + 1)) };
    let (lower, upper) = (lower.max(logical_lo), upper.min(logical_hi));
    if lower > upper {
        (point, point)
    } else {
        (lower, upper)
    }
}

/// The standard normal quantile `Φ⁻¹(p)` for `p ∈ (0, 1)` (±∞ at 0 and 1, NaN outside):
/// Wichura's algorithm AS241 (PPND16, Applied Statistics 37(3), 1988), accurate to about
/// 1e-16 relative.
// The coefficients as Wichura published them (more digits than an f64 holds).
#[allow(clippy::excessive_precision)]
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 8] = [
        3.387_132_872_796_366_608,
        1.331_416_678_917_843_774_5e2,
        1.971_590_950_306_551_442_7e3,
        1.373_169_376_550_946_112_5e4,
        4.592_195_393_154_987_145_7e4,
        6.726_577_092_700_870_085_3e4,
        3.343_057_558_358_812_810_5e4,
        2.509_080_928_730_122_672_7e3,
    ];
    const B: [f64; 8] = [
        1.0,
        4.231_333_070_160_091_125_2e1,
        6.871_870_074_920_579_083e2,
        5.394_196_021_424_751_107_7e3,
        2.121_379_430_158_659_586_7e4,
        3.930_789_580_009_271_061e4,
        2.872_908_573_572_194_267_4e4,
        5.226_495_278_852_854_561e3,
    ];
    const C: [f64; 8] = [
        1.423_437_110_749_683_577_34,
        4.630_337_846_156_545_295_9,
        5.769_497_221_460_691_405_5,
        3.647_848_324_763_204_605_04,
        1.270_458_252_452_368_382_58,
        2.417_807_251_774_506_117_7e-1,
        2.272_384_498_926_918_458_33e-2,
        7.745_450_142_783_414_076_4e-4,
    ];
    const D: [f64; 8] = [
        1.0,
        2.053_191_626_637_758_821_87,
        1.676_384_830_183_803_849_4,
        6.897_673_349_851_000_045_5e-1,
        1.481_039_764_274_800_745_9e-1,
        1.519_866_656_361_645_719_66e-2,
        5.475_938_084_995_344_946e-4,
        1.050_750_071_644_416_843_24e-9,
    ];
    const E: [f64; 8] = [
        6.657_904_643_501_103_777_2,
        5.463_784_911_164_114_369_9,
        1.784_826_539_917_291_335_8,
        2.965_605_718_285_048_912_3e-1,
        2.653_218_952_657_612_309_3e-2,
        1.242_660_947_388_078_438_6e-3,
        2.711_555_568_743_487_578_15e-5,
        2.010_334_399_292_288_132_65e-7,
    ];
    const F: [f64; 8] = [
        1.0,
        5.998_322_065_558_879_376_9e-1,
        1.369_298_809_227_358_053_1e-1,
        1.487_536_129_085_061_485_25e-2,
        7.868_691_311_456_132_591e-4,
        1.846_318_317_510_054_681_8e-5,
        1.421_511_758_316_445_888_7e-7,
        2.044_263_103_389_939_785_64e-15,
    ];
    fn poly(c: &[f64; 8], x: f64) -> f64 {
        c.iter().rev().fold(0.0, |acc, &ci| acc * x + ci)
    }
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180_625 - q * q;
        return q * poly(&A, r) / poly(&B, r);
    }
    let r = if q < 0.0 { p } else { 1.0 - p };
    let r = (-r.ln()).sqrt();
    let v = if r <= 5.0 {
        let r = r - 1.6;
        poly(&C, r) / poly(&D, r)
    } else {
        let r = r - 5.0;
        poly(&E, r) / poly(&F, r)
    };
    if q < 0.0 {
        -v
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_quantile_known_values() {
        // Reference values: scipy.stats.norm.ppf.
        assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-14);
        assert!((normal_quantile(0.95) - 1.644_853_626_951_472_2).abs() < 1e-14);
        assert!((normal_quantile(0.995) - 2.575_829_303_548_900_4).abs() < 1e-14);
        assert!((normal_quantile(0.5)).abs() < 1e-16);
        assert!((normal_quantile(1e-10) + 6.361_340_902_404_056).abs() < 1e-12);
        assert!((normal_quantile(1e-300) + 37.047_096_299_361_2).abs() < 1e-10);
    }
}
