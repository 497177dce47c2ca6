#!/usr/bin/env python3
"""Fixtures for furnace-evals' confidence intervals (crates/furnace-evals/src/interval.rs).

Writes crates/furnace-evals/tests/fixtures/interval_cases.jsonl: one JSON object a line, a
data set (values in order, their range, the population size N or null) with the intervals
expected for it. Every interval here is computed by this script, independently of the Rust:

* normal / wilson / hoeffding, with and without the finite population correction, following
  RapidFire AI's ``rapidfireai/evals/metrics/online_strategies.py`` (the verbatim formulas are
  ported below as ``rf_*`` and asserted equal to ours wherever the two are meant to agree;
  where we differ on purpose, see the Rust module docs);
* the same normal and wilson intervals checked against statsmodels:
  ``proportion_confint(method="normal"/"wilson")`` for 0/1 data, and
  ``DescrStatsW(x).zconfint_mean`` for any data (statsmodels' standard error uses ddof 1,
  ours ddof 0: its half-width times sqrt((n - 1)/n) is ours). The statsmodels numbers are
  stored too, so the Rust test checks against them as well;
* the betting confidence sequence of Waudby-Smith & Ramdas (2023, JRSS-B), "Estimating means
  of bounded random variables by betting": hedged capital with predictable plug-in bets,
  with replacement (mu_t(m) = m) and without replacement (Section 6,
  mu_t(m) = (N m - sum_{i<t} X_i)/(N - t + 1)), running intersection, logical bounds,
  written from the paper's formulas in log space on a 20 000-break grid of m (the Rust
  uses 1 000 breaks refined by bisection), reported after several prefixes of the data;
* ratio of sums with its delta-method normal interval.

Regenerate (from the repository root):

    python3 -m venv /tmp/venv-intervalfix
    /tmp/venv-intervalfix/bin/pip install numpy scipy statsmodels
    /tmp/venv-intervalfix/bin/python scripts/make_interval_fixtures.py

The output is deterministic (seeded numpy Generator).
"""

import json
import math
import os

import numpy as np
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "crates",
    "furnace-evals",
    "tests",
    "fixtures",
    "interval_cases.jsonl",
)

C_TRUNC = 0.5  # truncation c of the bets (the paper's choice for confidence sequences)
THETA = 0.5  # hedging weight
BREAKS = 20000  # grid of candidate means


# ---------------------------------------------------------------- RapidFire, verbatim ports
def rf_fpc(se, n, N, use_fpc):
    """apply_finite_population_correction_to_stderr"""
    if not use_fpc or not N:
        return se
    if n >= N:
        return 0
    if N > 1:
        return se * math.sqrt((N - n) / (N - 1))
    return se


def rf_normal(p, n, N, a, b, conf, use_fpc):
    """NormalApproximationStrategy.normal_approximation (algebraic, population_size=1)"""
    if p == a or p == b:
        return p, p, p
    if a == 0 and b == 1:
        var = p * (1 - p) / n
    else:
        var = (b - a) ** 2 / (12 * n)
    se = rf_fpc(math.sqrt(var), n, N, use_fpc)
    m = norm.ppf(1 - (1 - conf) / 2) * se
    return p, max(a, p - m), min(b, p + m)


def rf_wilson(p, n, N, conf, use_fpc):
    """WilsonApproximationStrategy.wilson_approximation ([0, 1] metrics, 0 < p < 1)"""
    z = norm.ppf(1 - (1 - conf) / 2)
    ne = n
    if use_fpc and N:
        if n >= N:
            return p, p, p
        if N > 1:
            f = math.sqrt((N - n) / (N - 1))
            ne = n / f**2
    d = 1 + z**2 / ne
    c = (p + z**2 / (2 * ne)) / d
    m = z * math.sqrt(p * (1 - p) / ne + z**2 / (4 * ne**2)) / d
    return p, max(0, c - m), min(1, c + m)


def rf_hoeffding(p, n, N, a, b, conf, use_fpc):
    """HoeffdingApproximationStrategy.hoeffding_approximation (algebraic)"""
    if p in (a, b):
        return p, p, p
    eps = (b - a) * math.sqrt(math.log(2 / (1 - conf)) / (2 * n))
    eps = rf_fpc(eps, n, N, use_fpc)
    return p, max(a, p - eps), min(b, p + eps)


# ---------------------------------------------------------------- ours (documented differences)
def fpc_factor(n, N, use_fpc):
    return rf_fpc(1.0, n, N, use_fpc)


def ours(method, v, a, b, N, conf, use_fpc):
    x = (np.asarray(v, dtype=float) - a) / (b - a)
    n = len(x)
    p = float(x.mean())
    z = norm.ppf(1 - (1 - conf) / 2)
    f = fpc_factor(n, N, use_fpc)
    if method == "normal":
        half = z * f * math.sqrt(float(np.var(x)) / n)  # np.var: ddof 0
        lo, hi = p - half, p + half
    elif method == "wilson":
        if f == 0:
            lo = hi = p
        else:
            ne = n / f**2
            d = 1 + z**2 / ne
            c = (p + z**2 / (2 * ne)) / d
            m = z * math.sqrt(p * (1 - p) / ne + z**2 / (4 * ne**2)) / d
            lo, hi = c - m, c + m
    elif method == "hoeffding":
        half = f * math.sqrt(math.log(2 / (1 - conf)) / (2 * n))
        lo, hi = p - half, p + half
    else:
        raise ValueError(method)
    lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
    return a + (b - a) * p, a + (b - a) * lo, a + (b - a) * hi


def check_against_rapidfire(method, v, a, b, N, conf, use_fpc, got):
    """Where RapidFire and we are meant to agree, assert it."""
    x = np.asarray(v, dtype=float)
    n = len(x)
    pm = float(x.mean())
    binary = bool(np.all((x == a) | (x == b)))
    if method == "normal" and binary and (a, b) == (0, 1):
        exp = rf_normal(pm, n, N, a, b, conf, use_fpc)
    elif method == "wilson" and (a, b) == (0, 1) and 0 < pm < 1:
        exp = rf_wilson(pm, n, N, conf, use_fpc)
    elif method == "hoeffding" and a < pm < b:
        exp = rf_hoeffding(pm, n, N, a, b, conf, use_fpc)
    else:
        return
    assert np.allclose(exp, got, rtol=0, atol=1e-12), (method, exp, got)


def statsmodels_refs(v, a, b, conf):
    """statsmodels' intervals of the same data, in the metric's units."""
    x = (np.asarray(v, dtype=float) - a) / (b - a)
    n = len(x)
    alpha = 1 - conf
    refs = []
    if np.all((x == 0) | (x == 1)):
        k = int(x.sum())
        for m in ("normal", "wilson"):
            lo, hi = proportion_confint(k, n, alpha=alpha, method=m)
            refs.append({"kind": "proportion_" + m, "confidence": conf, "lower": a + (b - a) * lo, "upper": a + (b - a) * hi})
    if n >= 2:
        lo, hi = DescrStatsW(np.asarray(v, dtype=float)).zconfint_mean(alpha=alpha)
        refs.append({"kind": "zconfint_mean", "confidence": conf, "lower": float(lo), "upper": float(hi)})
    return refs


# ---------------------------------------------------------------- the confidence sequence
def betting_cs(x, alpha, N, prefixes):
    """Hedged-capital betting CS (running intersection) after each prefix length, in [0, 1]."""
    x = np.asarray(x, dtype=float)
    n = len(x)
    t = np.arange(1, n + 1, dtype=float)
    S = np.cumsum(x)
    S_prev = S - x
    mu_hat = (0.5 + S) / (t + 1)  # mu_hat_t, includes X_t
    sig2 = (0.25 + np.cumsum((x - mu_hat) ** 2)) / (t + 1)  # sigma_hat^2_t
    sig2_prev = np.concatenate([[0.25], sig2[:-1]])  # sigma_hat^2_{t-1}
    lam = np.sqrt(2 * np.log(2 / alpha) / (sig2_prev * t * np.log(1 + t)))
    threshold = math.log(1 / alpha)
    ms = np.linspace(0.0, 1.0, BREAKS + 1)
    idx = np.asarray(prefixes) - 1
    accepted = np.zeros((len(ms), len(prefixes)), dtype=bool)
    for start in range(0, len(ms), 256):
        m = ms[start : start + 256][:, None]
        if N is None:
            mu = np.broadcast_to(m, (m.shape[0], n))
        else:
            mu = (N * m - S_prev[None, :]) / (N - t[None, :] + 1)
        bad = (mu < 0) | (mu > 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.minimum(lam[None, :], C_TRUNC / mu)
            lm = np.minimum(lam[None, :], C_TRUNC / (1 - mu))
            log_p = np.log(1 + lp * (x[None, :] - mu))
            log_m = np.log(1 - lm * (x[None, :] - mu))
        log_p = np.where(bad, np.inf, log_p)
        log_m = np.where(bad, np.inf, log_m)
        hedged = np.maximum(math.log(THETA) + np.cumsum(log_p, axis=1), math.log(1 - THETA) + np.cumsum(log_m, axis=1))
        running = np.maximum.accumulate(hedged, axis=1)
        accepted[start : start + 256] = running[:, idx] < threshold
    out = []
    for j, k in enumerate(prefixes):
        s = float(S[k - 1])
        if N is None:
            llo, lhi = 0.0, 1.0
        else:
            llo, lhi = s / N, (s + N - k) / N
        point = min(max(s / k, llo), lhi)
        where = np.flatnonzero(accepted[:, j])
        if len(where) == 0:
            out.append((point, point))
            continue
        lo, hi = max(ms[where[0]], llo), min(ms[where[-1]], lhi)
        out.append((point, point) if lo > hi else (lo, hi))
    return out


def ratio(nums, dens, N, conf, use_fpc):
    y, x = np.asarray(nums, float), np.asarray(dens, float)
    n = len(y)
    r = y.sum() / x.sum()
    se = math.sqrt(np.mean((y - r * x) ** 2)) / (math.sqrt(n) * abs(x.mean()))
    half = norm.ppf(1 - (1 - conf) / 2) * fpc_factor(n, N, use_fpc) * se
    return float(r), float(r - half), float(r + half)


# ---------------------------------------------------------------- data sets
def main():
    rng = np.random.default_rng(20261130)
    datasets = []

    def bern(p, n):
        return [int(v) for v in (rng.random(n) < p)]

    def beta(a_, b_, n, lo=0.0, hi=1.0, digits=4):
        return [round(lo + (hi - lo) * float(v), digits) for v in rng.beta(a_, b_, n)]

    for n, p, N in [(5, 0.4, None), (5, 0.5, 20), (20, 0.3, None), (20, 0.0, 100), (40, 1.0, None),
                    (100, 0.3, 1000), (100, 0.05, None), (500, 0.9, 600), (2000, 0.3, None), (2000, 0.5, 2000)]:
        datasets.append({"name": f"bernoulli p={p} n={n} N={N}", "values": bern(p, n), "range": [0, 1], "population": N})
    for n, N, lo, hi in [(5, None, 0.0, 1.0), (30, 50, 0.0, 1.0), (200, 1000, 0.0, 10.0), (1000, None, -1.0, 1.0), (2000, 5000, 0.0, 1.0)]:
        datasets.append({"name": f"beta(2,5) n={n} N={N} range=[{lo},{hi}]", "values": beta(2, 5, n, lo, hi), "range": [lo, hi], "population": N})
    # A Bernoulli metric on a non-[0, 1] range (a 0/5 score).
    datasets.append({"name": "0/5 score n=60 N=80", "values": [5 * v for v in bern(0.6, 60)], "range": [0, 5], "population": 80})

    lines = []
    for d in datasets:
        v, (a, b), N = d["values"], d["range"], d["population"]
        n = len(v)
        cases = []
        for method in ("normal", "wilson", "hoeffding"):
            for conf in (0.9, 0.95, 0.99):
                for use_fpc in (False, True):
                    est, lo, hi = ours(method, v, a, b, N, conf, use_fpc)
                    check_against_rapidfire(method, v, a, b, N, conf, use_fpc, (est, lo, hi))
                    cases.append({"method": method, "confidence": conf, "fpc": use_fpc, "estimate": est, "lower": lo, "upper": hi})
        refs = []
        for conf in (0.9, 0.95, 0.99):
            mine = statsmodels_refs(v, a, b, conf)
            # Our normal (no FPC) and wilson against statsmodels, here too.
            est, lo, hi = ours("normal", v, a, b, None, conf, False)
            _, wlo, whi = ours("wilson", v, a, b, None, conf, False)
            for r in mine:
                if r["kind"] == "proportion_normal":
                    exp = (min(max(r["lower"], a), b), min(max(r["upper"], a), b))
                    assert abs(exp[0] - lo) < 1e-9 and abs(exp[1] - hi) < 1e-9, (r, lo, hi)
                if r["kind"] == "proportion_wilson":
                    assert abs(r["lower"] - wlo) < 1e-9 and abs(r["upper"] - whi) < 1e-9, (r, wlo, whi)
                if r["kind"] == "zconfint_mean":
                    half = (r["upper"] - r["lower"]) / 2 * math.sqrt((n - 1) / n)
                    assert abs(lo - max(a, est - half)) < 1e-9 and abs(hi - min(b, est + half)) < 1e-9, (r, lo, hi)
            refs += mine
        prefixes = sorted({k for k in (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, n) if k <= n})
        x01 = (np.asarray(v, float) - a) / (b - a)
        confseq = []
        for conf in (0.9, 0.95, 0.99):
            for k, (lo, hi) in zip(prefixes, betting_cs(x01, 1 - conf, N, prefixes)):
                confseq.append({"confidence": conf, "prefix": k, "lower": a + (b - a) * lo, "upper": a + (b - a) * hi})
            if N is not None:
                # The with-replacement form for the same data too.
                for k, (lo, hi) in zip(prefixes, betting_cs(x01, 1 - conf, None, prefixes)):
                    confseq.append({"confidence": conf, "prefix": k, "with_replacement": True, "lower": a + (b - a) * lo, "upper": a + (b - a) * hi})
        lines.append({"kind": "mean", **d, "cases": cases, "statsmodels": refs, "confseq": confseq})

    for n, N in [(10, None), (200, 500), (1000, None)]:
        dens = [int(k) for k in rng.integers(1, 11, n)]
        nums = [int(rng.binomial(k, 0.4)) for k in dens]
        cases = []
        for conf in (0.9, 0.95, 0.99):
            for use_fpc in (False, True):
                est, lo, hi = ratio(nums, dens, N, conf, use_fpc)
                cases.append({"confidence": conf, "fpc": use_fpc, "estimate": est, "lower": lo, "upper": hi})
        lines.append({"kind": "ratio", "name": f"ratio n={n} N={N}", "nums": nums, "dens": dens, "population": N, "cases": cases})

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        for line in lines:
            f.write(json.dumps(line, separators=(",", ":")) + "\n")
    print(f"wrote {len(lines)} data sets to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
