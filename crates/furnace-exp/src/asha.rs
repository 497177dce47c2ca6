//! ASHA (successive halving at chunk boundaries): at each rung (a chunk boundary), of the
//! runs that reached it, the best `1/eta` by eval loss keep training and the rest stop.

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
    use super::to_stop;

    #[test]
    fn keeps_the_best_fraction_and_at_least_one() {
        let r = [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6)];
        assert_eq!(to_stop(&r, 2), vec![1, 3]);
        assert_eq!(to_stop(&r, 3), vec![1, 3, 4]);
        assert_eq!(to_stop(&r[..1], 2), Vec::<i64>::new());
        assert_eq!(to_stop(&[(5, f64::NAN), (6, 2.0)], 2), vec![5]);
        assert_eq!(to_stop(&[(8, 1.0), (7, 1.0)], 2), vec![8]);
    }
}
