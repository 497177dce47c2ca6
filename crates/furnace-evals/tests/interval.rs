//! Intervals against the fixtures of `scripts/make_interval_fixtures.py` (an independent
//! numpy implementation, RapidFire's formulas, statsmodels), the errors, and a coverage
//! simulation: the confidence sequence keeps the true mean at every shard of a
//! without-replacement eval with probability ≥ 1 − α, the per-shard normal interval not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use furnace_evals::interval::{mean_interval, normal_quantile, ratio_interval, Interval, IntervalOptions, Method};
use furnace_evals::Error;
use serde_json::Value;

const FIXTURES: &str = include_str!("fixtures/interval_cases.jsonl");

fn opts(method: Method, confidence: f64, fpc: bool, population: Option<usize>) -> IntervalOptions {
    IntervalOptions { method, confidence, fpc, population }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn population(d: &Value) -> Option<usize> {
    d["population"].as_u64().map(|n| n as usize)
}

fn close(got: &Interval, lower: f64, upper: f64, tol: f64, what: &str) {
    assert!(
        (got.lower - lower).abs() <= tol && (got.upper - upper).abs() <= tol,
        "{what}: got [{}, {}], expected [{lower}, {upper}] (tolerance {tol})",
        got.lower,
        got.upper
    );
}

fn datasets(kind: &str) -> Vec<Value> {
    FIXTURES.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).filter(|d| d["kind"] == kind).collect()
}

fn method(name: &str) -> Method {
    serde_json::from_value(Value::String(name.into())).unwrap()
}

#[test]
fn normal_wilson_hoeffding_match_the_fixtures() {
    let mut checked = 0;
    for d in datasets("mean") {
        let values = f64s(&d["values"]);
        let range = f64s(&d["range"]);
        let (a, b) = (range[0], range[1]);
        let tol = 1e-9 * (b - a).max(1.0);
        for c in d["cases"].as_array().unwrap() {
            let o =
                opts(method(c["method"].as_str().unwrap()), c["confidence"].as_f64().unwrap(), c["fpc"].as_bool().unwrap(), population(&d));
            let got = mean_interval(&values, (a, b), &o).unwrap();
            let what = format!("{} {:?}", d["name"], c);
            assert!((got.estimate - c["estimate"].as_f64().unwrap()).abs() <= tol, "{what}: estimate {}", got.estimate);
            close(&got, c["lower"].as_f64().unwrap(), c["upper"].as_f64().unwrap(), tol, &what);
            checked += 1;
        }
    }
    assert!(checked >= 250, "only {checked} cases");
}

#[test]
fn normal_and_wilson_agree_with_statsmodels() {
    let (mut props, mut zs) = (0, 0);
    for d in datasets("mean") {
        let values = f64s(&d["values"]);
        let range = f64s(&d["range"]);
        let (a, b) = (range[0], range[1]);
        let n = values.len() as f64;
        let tol = 1e-9 * (b - a).max(1.0);
        for r in d["statsmodels"].as_array().unwrap() {
            let conf = r["confidence"].as_f64().unwrap();
            let (lo, hi) = (r["lower"].as_f64().unwrap(), r["upper"].as_f64().unwrap());
            let what = format!("{} {:?}", d["name"], r);
            match r["kind"].as_str().unwrap() {
                "proportion_normal" => {
                    let got = mean_interval(&values, (a, b), &opts(Method::Normal, conf, false, None)).unwrap();
                    close(&got, lo.clamp(a, b), hi.clamp(a, b), tol, &what);
                    props += 1;
                }
                "proportion_wilson" => {
                    let got = mean_interval(&values, (a, b), &opts(Method::Wilson, conf, false, None)).unwrap();
                    close(&got, lo, hi, tol, &what);
                    props += 1;
                }
                "zconfint_mean" => {
                    // statsmodels' standard error has ddof 1, ours ddof 0.
                    let got = mean_interval(&values, (a, b), &opts(Method::Normal, conf, false, None)).unwrap();
                    let mid = (lo + hi) / 2.0;
                    let half = (hi - lo) / 2.0 * ((n - 1.0) / n).sqrt();
                    assert!((got.estimate - mid).abs() <= tol, "{what}");
                    close(&got, (mid - half).max(a), (mid + half).min(b), tol, &what);
                    zs += 1;
                }
                other => panic!("unknown kind {other}"),
            }
        }
    }
    assert!(props >= 40 && zs >= 40, "{props} proportion and {zs} zconfint checks");
}

/// The Rust grid has 1000 breaks refined by bisection, the fixtures' 20 000 breaks; both
/// find the same set up to a grid cell, so 2e-3 of the range (two Rust cells) is ample and
/// still far below the widths compared (≥ 0.02 at n = 2000).
#[test]
fn confseq_matches_the_independent_implementation() {
    let mut checked = 0;
    let mut worst: f64 = 0.0;
    for d in datasets("mean") {
        let values = f64s(&d["values"]);
        let range = f64s(&d["range"]);
        let (a, b) = (range[0], range[1]);
        for c in d["confseq"].as_array().unwrap() {
            let k = c["prefix"].as_u64().unwrap() as usize;
            let wr = c["with_replacement"].as_bool().unwrap_or(false);
            let pop = if wr { None } else { population(&d) };
            let o = opts(Method::ConfSeq, c["confidence"].as_f64().unwrap(), true, pop);
            let got = mean_interval(&values[..k], (a, b), &o).unwrap();
            let (lo, hi) = (c["lower"].as_f64().unwrap(), c["upper"].as_f64().unwrap());
            worst = worst.max((got.lower - lo).abs().max((got.upper - hi).abs()) / (b - a));
            close(&got, lo, hi, 2e-3 * (b - a), &format!("{} {:?}", d["name"], c));
            checked += 1;
        }
    }
    eprintln!("confseq: {checked} intervals, largest difference {worst:.2e} of the range");
    assert!(checked >= 200, "only {checked} cases");
}

#[test]
fn ratio_matches_the_fixtures() {
    for d in datasets("ratio") {
        let (nums, dens) = (f64s(&d["nums"]), f64s(&d["dens"]));
        for c in d["cases"].as_array().unwrap() {
            for m in [Method::Normal, Method::ConfSeq] {
                let o = opts(m, c["confidence"].as_f64().unwrap(), c["fpc"].as_bool().unwrap(), population(&d));
                let got = ratio_interval(&nums, &dens, &o).unwrap();
                let what = format!("{} {:?}", d["name"], c);
                assert!((got.estimate - c["estimate"].as_f64().unwrap()).abs() <= 1e-9, "{what}");
                close(&got, c["lower"].as_f64().unwrap(), c["upper"].as_f64().unwrap(), 1e-9, &what);
            }
        }
    }
}

#[test]
fn the_whole_population_gives_the_exact_mean() {
    let values: Vec<f64> = (0..50).map(|i| (i % 7) as f64 / 6.0).collect();
    let mean = values.iter().sum::<f64>() / 50.0;
    for m in [Method::Normal, Method::Wilson, Method::Hoeffding, Method::ConfSeq] {
        let got = mean_interval(&values, (0.0, 1.0), &opts(m, 0.95, true, Some(50))).unwrap();
        assert!((got.lower - mean).abs() < 1e-12 && (got.upper - mean).abs() < 1e-12, "{m:?}: {got:?}");
    }
}

#[test]
fn options_and_methods_serialize_lowercase_with_confseq_by_default() {
    assert_eq!(Method::default(), Method::ConfSeq);
    for (m, s) in [(Method::Normal, "normal"), (Method::Wilson, "wilson"), (Method::Hoeffding, "hoeffding"), (Method::ConfSeq, "confseq")] {
        assert_eq!(serde_json::to_value(m).unwrap(), Value::String(s.into()));
    }
    let o: IntervalOptions = serde_json::from_str(r#"{"method": "wilson"}"#).unwrap();
    assert_eq!(o, IntervalOptions { method: Method::Wilson, ..IntervalOptions::default() });
    assert_eq!(IntervalOptions::default().confidence, 0.95);
    let i = Interval { estimate: 0.5, lower: 0.25, upper: 0.75 };
    assert_eq!(serde_json::to_string(&i).unwrap(), r#"{"estimate":0.5,"lower":0.25,"upper":0.75}"#);
    assert!((normal_quantile(0.975) - 1.959_963_984_540_054).abs() < 1e-14);
}

fn invalid(r: Result<Interval, Error>, needle: &str) {
    match r {
        Err(Error::Invalid(msg)) => assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}"),
        other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_refused_with_what_to_fix() {
    let d = IntervalOptions::default();
    invalid(mean_interval(&[], (0.0, 1.0), &d), "score at least one example");
    invalid(mean_interval(&[0.5, 1.2], (0.0, 1.0), &d), "value 1 is 1.2, outside the metric's range [0, 1]");
    invalid(mean_interval(&[f64::NAN], (0.0, 1.0), &d), "outside the metric's range");
    invalid(mean_interval(&[-0.1], (0.0, 1.0), &d), "fix the metric or its range");
    // Rounding just outside the range is accepted (and clipped).
    let ok = mean_interval(&[1.0 + 1e-12, 0.0], (0.0, 1.0), &d).unwrap();
    assert!((ok.estimate - 0.5).abs() < 1e-9);
    for c in [0.0, 1.0, 1.5, -0.5, f64::NAN] {
        invalid(mean_interval(&[0.5], (0.0, 1.0), &IntervalOptions { confidence: c, ..d.clone() }), "strictly between 0 and 1");
    }
    invalid(
        mean_interval(&[0.5; 10], (0.0, 1.0), &IntervalOptions { population: Some(9), ..d.clone() }),
        "population 9 is smaller than the 10 values",
    );
    invalid(mean_interval(&[0.5], (1.0, 1.0), &d), "min < max");
    invalid(mean_interval(&[0.5], (0.0, f64::INFINITY), &d), "finite bounds");
    invalid(ratio_interval(&[1.0], &[1.0, 2.0], &d), "1 numerators but 2 denominators");
    invalid(ratio_interval(&[], &[], &d), "score at least one example");
    invalid(ratio_interval(&[1.0, 0.0], &[0.0, 0.0], &d), "denominators sum to 0");
    invalid(ratio_interval(&[1.0, f64::INFINITY], &[1.0, 1.0], &d), "numerator 1 is not a finite number");
    invalid(ratio_interval(&[1.0, 1.0], &[1.0, f64::NAN], &d), "denominator 1 is not a finite number");
    invalid(ratio_interval(&[1.0, 1.0], &[1.0, 1.0], &IntervalOptions { population: Some(1), ..d.clone() }), "population 1");
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// For `reps` shuffles of `population`, scored in shards of 25–50 with an interval after
/// every shard: the fraction of shuffles in which the true mean stayed inside at every
/// check, for each method.
fn coverage(population: &[f64], methods: &[Method], reps: usize, alpha: f64, rng: &mut Rng) -> Vec<f64> {
    let n_pop = population.len();
    let truth = population.iter().sum::<f64>() / n_pop as f64;
    let mut covered = vec![0usize; methods.len()];
    let mut order = population.to_vec();
    for _ in 0..reps {
        for i in (1..n_pop).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut ok = vec![true; methods.len()];
        let mut n = 0;
        while n < n_pop {
            n = (n + 25 + rng.below(26)).min(n_pop);
            for (j, &m) in methods.iter().enumerate() {
                if ok[j] {
                    let iv = mean_interval(&order[..n], (0.0, 1.0), &opts(m, 1.0 - alpha, true, Some(n_pop))).unwrap();
                    ok[j] = iv.lower - 1e-12 <= truth && truth <= iv.upper + 1e-12;
                }
            }
        }
        for j in 0..methods.len() {
            covered[j] += ok[j] as usize;
        }
    }
    covered.iter().map(|&c| c as f64 / reps as f64).collect()
}

#[test]
fn confseq_covers_at_every_shard_and_the_normal_interval_does_not() {
    let start = std::time::Instant::now();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let alpha = 0.05;
    let reps = 500;
    let bernoulli: Vec<f64> = (0..1000).map(|_| (rng.unit() < 0.3) as u8 as f64).collect();
    // Beta(1/2, 1): U² for U uniform on [0, 1].
    let continuous: Vec<f64> = (0..1000).map(|_| rng.unit().powi(2)).collect();
    let methods = [Method::ConfSeq, Method::Normal];
    for (name, pop) in [("Bernoulli(0.3)", &bernoulli), ("Beta(1/2, 1)", &continuous)] {
        let cov = coverage(pop, &methods, reps, alpha, &mut rng);
        eprintln!(
            "{name}, N = 1000, {reps} replications, shards of 25–50: coverage at every shard: confseq {:.3}, normal {:.3}",
            cov[0], cov[1]
        );
        assert!(cov[0] >= 1.0 - alpha, "{name}: confseq covered at every shard in only {:.3}", cov[0]);
        assert!(cov[1] < 1.0 - alpha, "{name}: the per-shard normal interval covered in {:.3}", cov[1]);
    }
    eprintln!("coverage simulation took {:.1} s", start.elapsed().as_secs_f64());
}

/// The cost the module docs state: N = 10 000 recomputed after each of 400 shards of 25.
#[test]
fn confseq_is_fast_enough_for_ten_thousand_values() {
    let mut rng = Rng(7);
    let values: Vec<f64> = (0..10_000).map(|_| rng.unit()).collect();
    let o = opts(Method::ConfSeq, 0.95, true, Some(10_000));
    let start = std::time::Instant::now();
    let mut last = None;
    for n in (25..=10_000).step_by(25) {
        last = Some(mean_interval(&values[..n], (0.0, 1.0), &o).unwrap());
    }
    let took = start.elapsed().as_secs_f64();
    eprintln!("N = 10 000, 400 recomputations: {took:.2} s; last {last:?}");
    assert!(took < 30.0, "too slow: {took:.1} s");
}
