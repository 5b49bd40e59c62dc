//! DEFT's Q+/Q- assignment for one sample (pure Rust, no Python types).
//!
//! Responses are sorted best-first by score (stable: ties keep their original
//! order), scores are min-max normalised within the sample, and each level's
//! rule marks responses +1 (Q+), -1 (Q-) or 0 (neither):
//! the best response is always +1, the worst always -1, and a response whose
//! normalised score is `> pos` (or `< neg`) joins them when the level has that
//! threshold. A sample whose scores are all equal carries no preference: every
//! normalised score is 0.5 and every polarity 0.

/// Thresholds of one level; `None` means the level has no such rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub pos: Option<f64>,
    pub neg: Option<f64>,
}

#[cfg(test)]
/// The paper's rules: A, B, C.
pub const PAPER_RULES: [Rule; 3] = [
    Rule { pos: Some(0.8), neg: None },
    Rule { pos: Some(0.9), neg: Some(0.1) },
    Rule { pos: None, neg: Some(0.2) },
];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PolarityError {
    #[error("row {row}: field 'scores': {n} score(s); grading needs at least 2")]
    TooFew { row: usize, n: usize },
    #[error("row {row}: field 'scores[{index}]': {value} is not a finite number")]
    NotFinite { row: usize, index: usize, value: f64 },
    #[error("row {row}: field 'scores': missing (null); score the data first or pass scores")]
    Null { row: usize },
    #[error("row {row}: field 'level': code {code} is not 0 (A), 1 (B) or 2 (C)")]
    BadLevel { row: usize, code: u8 },
}

/// Check one threshold the way `deft.grade.Thresholds.check` does: `None`, or
/// a finite number in [0, 1] (normalised scores). The error names `name`.
pub fn check_threshold(name: &str, value: Option<f64>) -> Result<(), String> {
    match value {
        Some(v) if !(0.0..=1.0).contains(&v) => {
            Err(format!("threshold {name}={v} must be between 0 and 1 (normalised scores)"))
        }
        _ => Ok(()),
    }
}

/// Assign one sample. Appends `scores.len()` entries to each output: `order`
/// (original index of the k-th best response), `norm` and `polarity` (both in
/// best-first order).
pub fn assign(
    row: usize,
    scores: &[f64],
    rule: &Rule,
    order: &mut Vec<u32>,
    norm: &mut Vec<f64>,
    polarity: &mut Vec<i8>,
) -> Result<(), PolarityError> {
    let n = scores.len();
    if n < 2 {
        return Err(PolarityError::TooFew { row, n });
    }
    if let Some((index, &value)) = scores.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(PolarityError::NotFinite { row, index, value });
    }
    let start = order.len();
    order.extend(0..n as u32);
    // stable sort, best first; scores are finite here, and -0.0 == 0.0 is a tie
    order[start..].sort_by(|&i, &j| {
        scores[j as usize].partial_cmp(&scores[i as usize]).unwrap_or(std::cmp::Ordering::Equal)
    });
    let hi = scores[order[start] as usize];
    let lo = scores[order[start + n - 1] as usize];
    if hi == lo {
        norm.extend(std::iter::repeat_n(0.5, n));
        polarity.extend(std::iter::repeat_n(0i8, n));
        return Ok(());
    }
    // (s - lo) / (hi - lo); when hi - lo overflows (e.g. scores of +/-1e308)
    // the same ratio on halved scores, which cannot overflow
    let scale = if (hi - lo).is_finite() { 1.0 } else { 0.5 };
    let (hi_s, lo_s) = (hi * scale, lo * scale);
    let span = hi_s - lo_s;
    for k in 0..n {
        let r = (scores[order[start + k] as usize] * scale - lo_s) / span;
        let p = if k == 0 || rule.pos.is_some_and(|t| r > t) {
            1
        } else if k == n - 1 || rule.neg.is_some_and(|t| r < t) {
            -1
        } else {
            0
        };
        norm.push(r);
        polarity.push(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scores: &[f64], level: usize) -> (Vec<u32>, Vec<f64>, Vec<i8>) {
        let (mut o, mut n, mut p) = (vec![], vec![], vec![]);
        assign(0, scores, &PAPER_RULES[level], &mut o, &mut n, &mut p).unwrap();
        (o, n, p)
    }

    #[test]
    fn pairs_get_best_plus_worst_minus_at_every_level() {
        for level in 0..3 {
            let (o, n, p) = run(&[-1.0, 2.0], level);
            assert_eq!(o, vec![1, 0]);
            assert_eq!(n, vec![1.0, 0.0]);
            assert_eq!(p, vec![1, -1]);
        }
    }

    #[test]
    fn paper_rules_on_a_ranked_list() {
        // normalised: 1.0, 0.85, 0.5, 0.15, 0.05, 0.0
        let s = [10.0, 8.5, 5.0, 1.5, 0.5, 0.0];
        assert_eq!(run(&s, 0).2, vec![1, 1, 0, 0, 0, -1], "A: > 0.8 joins Q+, only the worst in Q-");
        assert_eq!(run(&s, 1).2, vec![1, 0, 0, 0, -1, -1], "B: > 0.9 / < 0.1");
        assert_eq!(run(&s, 2).2, vec![1, 0, 0, -1, -1, -1], "C: only the best in Q+, < 0.2 in Q-");
    }

    #[test]
    fn thresholds_are_strict() {
        // normalised 1.0, 0.8, 0.0: 0.8 is not > 0.8
        assert_eq!(run(&[5.0, 4.0, 0.0], 0).2, vec![1, 0, -1]);
        // normalised exactly 0.1 (B's Q- threshold) and 0.2 (C's): not < the threshold
        assert_eq!(run(&[10.0, 1.0, 0.5, 0.0], 1).1[1..3], [0.1, 0.05]);
        assert_eq!(run(&[10.0, 1.0, 0.5, 0.0], 1).2, vec![1, 0, -1, -1]);
        assert_eq!(run(&[5.0, 1.0, 0.0], 2).2, vec![1, 0, -1]);
        // and exactly 0.9 (B's Q+ threshold) is not > 0.9
        assert_eq!(run(&[10.0, 9.0, 0.0], 1).2, vec![1, 0, -1]);
    }

    #[test]
    fn ties_keep_original_order_and_all_equal_is_neutral() {
        let (o, _, p) = run(&[1.0, 3.0, 3.0, 0.0], 0);
        assert_eq!(o, vec![1, 2, 0, 3]);
        assert_eq!(p, vec![1, 1, 0, -1]);
        assert_eq!(run(&[-0.0, 0.0, 1.0], 1).0, vec![2, 0, 1], "-0.0 and 0.0 tie");
        let (o, n, p) = run(&[2.0, 2.0, 2.0], 2);
        assert_eq!(o, vec![0, 1, 2]);
        assert_eq!(n, vec![0.5; 3]);
        assert_eq!(p, vec![0; 3]);
    }

    #[test]
    fn extreme_scores_normalise_without_overflow() {
        let (o, n, p) = run(&[-1e308, 1e308, 0.0], 1);
        assert_eq!(o, vec![1, 2, 0]);
        assert_eq!(n, vec![1.0, 0.5, 0.0]);
        assert_eq!(p, vec![1, 0, -1]);
        let (o, n, p) = run(&[f64::MAX, -f64::MAX, f64::MAX, 1e307], 0);
        assert_eq!(o, vec![0, 2, 3, 1]);
        assert!(n.iter().all(|r| (0.0..=1.0).contains(r)), "{n:?}");
        assert_eq!(p, vec![1, 1, 0, -1]);
        // ordinary spans are unchanged (no halving)
        assert_eq!(run(&[0.1, 0.7, 0.3], 0).1, vec![1.0, (0.3 - 0.1) / (0.7 - 0.1), 0.0]);
    }

    #[test]
    fn thresholds_outside_0_1_or_nan_are_refused_by_name() {
        assert!(check_threshold("a_pos", None).is_ok());
        assert!(check_threshold("a_pos", Some(0.0)).is_ok());
        assert!(check_threshold("a_pos", Some(1.0)).is_ok());
        for bad in [-1.0, 1.5, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = check_threshold("b_neg", Some(bad)).unwrap_err();
            assert!(e.starts_with("threshold b_neg="), "{e}");
        }
    }

    #[test]
    fn bad_scores_are_errors_naming_row_and_index() {
        let (mut o, mut n, mut p) = (vec![], vec![], vec![]);
        let e = assign(7, &[1.0, f64::NAN], &PAPER_RULES[0], &mut o, &mut n, &mut p).unwrap_err();
        assert_eq!(e.to_string(), "row 7: field 'scores[1]': NaN is not a finite number");
        let e = assign(3, &[1.0], &PAPER_RULES[0], &mut o, &mut n, &mut p).unwrap_err();
        assert_eq!(e, PolarityError::TooFew { row: 3, n: 1 });
        assert!(o.is_empty() && n.is_empty() && p.is_empty());
    }
}
