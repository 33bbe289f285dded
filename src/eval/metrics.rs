//! Answer metrics: SQuAD-normalised exact match and token F1, and summary statistics.

use std::collections::HashMap;

/// SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces.
pub fn normalize(s: &str) -> String {
    let lower: String =
        s.to_lowercase().chars().map(|c| if c.is_alphanumeric() || c.is_whitespace() { c } else { ' ' }).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

pub fn exact_match(pred: &str, gold: &str) -> bool {
    normalize(pred) == normalize(gold)
}

pub fn f1(pred: &str, gold: &str) -> f64 {
    let p = normalize(pred);
    let g = normalize(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return (pt.is_empty() && gt.is_empty()) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let prec = common as f64 / pt.len() as f64;
    let rec = common as f64 / gt.len() as f64;
    2.0 * prec * rec / (prec + rec)
}

/// Best EM and F1 over the gold answers.
pub fn best(pred: &str, golds: &[String]) -> (f64, f64) {
    golds.iter().fold((0.0, 0.0), |(em, f), g| (em.max(exact_match(pred, g) as u8 as f64), f.max(f1(pred, g))))
}

/// Whether the normalised answer contains a normalised gold answer (lenient accuracy for
/// sentence-style answers).
pub fn contains_any(pred: &str, golds: &[String]) -> bool {
    let p = format!(" {} ", normalize(pred));
    golds.iter().any(|g| {
        let g = normalize(g);
        !g.is_empty() && p.contains(&format!(" {g} "))
    })
}

/// Whether an answer abstains ("unanswerable", "I don't know", ...).
pub fn abstains(pred: &str) -> bool {
    let n = normalize(pred);
    n.is_empty()
        || [
            "unanswerable", "i don t know", "not mentioned", "no answer", "cannot be answered", "not provided",
            "does not mention",
        ]
        .iter()
        .any(|p| n.contains(p))
}

/// Arithmetic mean (0 for no values).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Mean, median and 95th percentile.
pub fn summary(xs: &[f64]) -> (f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let pct = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    (mean, pct(0.5), pct(0.95))
}

/// Mean of paired differences and its 95% percentile bootstrap interval (`samples`
/// resamples of the differences with replacement, seeded): (mean, low, high).
pub fn paired_bootstrap(diffs: &[f64], samples: usize, seed: u64) -> (f64, f64, f64) {
    let m = mean(diffs);
    if diffs.is_empty() || samples == 0 {
        return (m, m, m);
    }
    let mut rng = crate::rng::Rng(seed);
    let mut means: Vec<f64> = (0..samples)
        .map(|_| (0..diffs.len()).map(|_| diffs[rng.below(diffs.len())]).sum::<f64>() / diffs.len() as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |p: f64| means[((p * (samples - 1) as f64).round() as usize).min(samples - 1)];
    (m, at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_normalisation_and_scores() {
        assert_eq!(normalize("The  Nobel-Prize!"), "nobel prize");
        assert!(exact_match("the Nobel Prize.", "Nobel Prize"));
        assert!((f1("Nobel Prize in physics", "Nobel Prize") - 2.0 * 0.5 * 1.0 / 1.5).abs() < 1e-9);
        assert_eq!(f1("otter", "beaver"), 0.0);
        let (em, f) = best("over 100", &["100".into(), "over 100".into()]);
        assert_eq!((em, f), (1.0, 1.0));
        assert!(abstains("I don't know."));
        assert!(contains_any("The year is 1745.", &["1745".into()]));
        assert!(!contains_any("In 17450 BC", &["1745".into()]));
        assert!(!abstains("1745"));
        assert_eq!(summary(&[3.0, 1.0, 2.0]), (2.0, 2.0, 3.0));
    }

    #[test]
    fn paired_bootstrap_brackets_the_mean() {
        // constant differences: no spread
        assert_eq!(paired_bootstrap(&[0.5; 40], 500, 3), (0.5, 0.5, 0.5));
        // half +1, half -1: mean 0, an interval around it that shrinks with more pairs
        let d: Vec<f64> = (0..100).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let (m, lo, hi) = paired_bootstrap(&d, 2000, 1);
        assert!(m.abs() < 1e-12 && lo < 0.0 && hi > 0.0 && lo > -0.3 && hi < 0.3, "{lo} {hi}");
        let d4: Vec<f64> = d.iter().cycle().take(400).copied().collect();
        let (_, lo4, hi4) = paired_bootstrap(&d4, 2000, 1);
        assert!(hi4 - lo4 < 0.7 * (hi - lo), "{lo4}..{hi4} vs {lo}..{hi}");
        // same seed, same interval
        assert_eq!(paired_bootstrap(&d, 300, 9), paired_bootstrap(&d, 300, 9));
    }
}
