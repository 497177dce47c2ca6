//! ASHA (asynchronous successive halving) over chunks: rungs stand at the minimum
//! resource `r` times `eta^k` chunks (`r`, `r·eta`, `r·eta²`, ...), as in Li et al., "A
//! System for Massively Parallel Hyperparameter Tuning"; at each rung, of the runs that
//! reached it, the best `1/eta` by eval loss go on and the rest pause (promoted later if
//! they rank there once more runs arrive). Between rungs runs train on without decisions:
//! judging at every chunk would compare runs on too little training to tell them apart.

/// Whether chunk count `chunk` is a rung: `min_chunks · eta^k` for some `k >= 0`.
pub fn is_rung(chunk: i64, min_chunks: usize, eta: usize) -> bool {
    let (min, eta) = (min_chunks.max(1) as i64, eta.max(2) as i64);
    if chunk < min || chunk % min != 0 {
        return false;
    }
    let mut q = chunk / min;
    while q % eta == 0 {
        q /= eta;
    }
    q == 1
}

/// The rungs up to `max_chunk` (inclusive), ascending: `min_chunks · eta^k`.
pub fn rungs(min_chunks: usize, eta: usize, max_chunk: i64) -> Vec<i64> {
    let (min, eta) = (min_chunks.max(1) as i64, eta.max(2) as i64);
    let mut out = Vec::new();
    let mut r = min;
    while r <= max_chunk {
        out.push(r);
        match r.checked_mul(eta) {
            Some(n) => r = n,
            None => break,
        }
    }
    out
}

/// The runs among `reached` (run id, eval loss at the rung) that stop: all but the best
/// `max(1, n / eta)` (ties broken by run id, so the result does not depend on the order
/// given). Runs with a non-finite loss rank last.
pub fn to_stop(reached: &[(i64, f64)], eta: usize) -> Vec<i64> {
    let mut ranked: Vec<(i64, f64)> = reached.to_vec();
    let key = |l: f64| if l.is_finite() { l } else { f64::INFINITY };
    ranked.sort_by(|a, b| key(a.1).total_cmp(&key(b.1)).then(a.0.cmp(&b.0)));
    let keep = (ranked.len() / eta.max(2)).max(1);
    let mut stop: Vec<i64> = ranked.into_iter().skip(keep).map(|(id, _)| id).collect();
    stop.sort_unstable();
    stop
}

#[cfg(test)]
mod tests {
    use super::{is_rung, rungs, to_stop};

    #[test]
    fn keeps_the_best_fraction_and_at_least_one() {
        let r = [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6)];
        assert_eq!(to_stop(&r, 2), vec![1, 3]);
        assert_eq!(to_stop(&r, 3), vec![1, 3, 4]);
        assert_eq!(to_stop(&r[..1], 2), Vec::<i64>::new());
        assert_eq!(to_stop(&[(5, f64::NAN), (6, 2.0)], 2), vec![5]);
        assert_eq!(to_stop(&[(8, 1.0), (7, 1.0)], 2), vec![8]);
    }

    #[test]
    fn rungs_grow_geometrically_from_the_minimum_resource() {
        assert_eq!(rungs(1, 2, 16), vec![1, 2, 4, 8, 16]);
        assert_eq!(rungs(1, 3, 20), vec![1, 3, 9]);
        assert_eq!(rungs(2, 2, 15), vec![2, 4, 8]);
        assert_eq!(rungs(3, 4, 2), Vec::<i64>::new());
        assert_eq!(rungs(1, 2, i64::MAX).len(), 63, "no overflow");
        // is_rung agrees with rungs on every chunk count.
        for (min, eta) in [(1, 2), (1, 3), (2, 2), (3, 4), (5, 10)] {
            let want = rungs(min, eta, 500);
            let got: Vec<i64> = (0..=500).filter(|&c| is_rung(c, min, eta)).collect();
            assert_eq!(got, want, "min {min} eta {eta}");
        }
        assert!(!is_rung(0, 1, 2) && !is_rung(-4, 1, 2) && !is_rung(6, 1, 2) && !is_rung(9, 3, 2) && is_rung(6, 3, 2));
        assert!(is_rung(12, 3, 2) && is_rung(1, 1, 2));
    }
}
