//! One summary of benchmark samples for every part of `make bench`.

use serde_json::{json, Value};

/// Median, p90, min and count (nearest rank); `null` for no samples.
pub fn summary(samples: &[f64]) -> Value {
    let mut s = samples.to_vec();
    if s.is_empty() {
        return json!(null);
    }
    s.sort_by(f64::total_cmp);
    let pick = |q: f64| s[((s.len() as f64 - 1.0) * q).round() as usize];
    json!({"median": pick(0.5), "p90": pick(0.9), "min": s[0], "n": s.len()})
}

/// One [`summary`] per named column, as a JSON object keyed by the names.
pub fn summaries(cols: std::collections::BTreeMap<&str, Vec<f64>>) -> Value {
    cols.into_iter()
        .map(|(k, v)| (k.to_owned(), summary(&v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_median_and_p90() {
        let v = summary(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(v["median"], 3.0);
        assert_eq!(v["p90"], 5.0);
        assert_eq!(v["min"], 1.0);
        assert_eq!(v["n"], 5);
        assert!(summary(&[]).is_null());
    }
}
