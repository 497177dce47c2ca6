//! Text metrics: one prediction against one or more references.
//!
//! With several references every metric takes the best score over them, as the reference
//! libraries do (SQuAD's `metric_max_over_ground_truths`, `rouge-score`'s `score_multi`);
//! BLEU is the exception that uses all references at once, as sacrebleu does. With no
//! reference at all every metric scores 0.

use std::collections::HashMap;

use serde_json::Value;

/// Whitespace as Python's `str.split()` and `str.strip()` see it: Unicode `White_Space`
/// plus the ASCII separators U+001C..U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.split()`.
fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(py_space).filter(|t| !t.is_empty())
}

/// The best of `score` over `refs` (0 without references).
fn max_over<S: AsRef<str>>(refs: &[S], score: impl Fn(&str) -> f64) -> f64 {
    refs.iter().map(|r| score(r.as_ref())).fold(0.0, f64::max)
}

/// SQuAD v1.1's `normalize_answer`: lowercase, remove ASCII punctuation
/// (`string.punctuation`), remove the articles `a`, `an`, `the` (whole words), then
/// collapse whitespace to single spaces.
///
/// A word is a run of alphanumeric characters or `_`, as Python's Unicode `\b` sees it
/// (Rust's `is_alphanumeric` differs from Python's only on rare combining marks).
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // `re.sub(r'\b(a|an|the)\b', ' ', text)`: a whole word equal to an article becomes a space.
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut no_articles = String::with_capacity(no_punct.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in no_punct.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut no_articles);
            no_articles.push(c);
        }
    }
    flush(&mut word, &mut no_articles);
    py_split(&no_articles).collect::<Vec<_>>().join(" ")
}

/// 1 if the prediction equals a reference, else 0.
///
/// With `normalize`, both sides go through SQuAD's [`normalize_answer`] first (SQuAD's
/// `exact_match_score`); without it the strings must be identical, whitespace included.
pub fn exact_match<S: AsRef<str>>(pred: &str, refs: &[S], normalize: bool) -> f64 {
    if normalize {
        let p = normalize_answer(pred);
        max_over(refs, |r| f64::from(u8::from(normalize_answer(r) == p)))
    } else {
        max_over(refs, |r| f64::from(u8::from(r == pred)))
    }
}

/// 1 if a reference occurs (as a substring) in the prediction, else 0.
///
/// With `normalize`, both sides go through SQuAD's [`normalize_answer`] first. A reference
/// that is empty (after normalizing, when normalizing) matches nothing: it would otherwise
/// match every prediction.
pub fn contains<S: AsRef<str>>(pred: &str, refs: &[S], normalize: bool) -> f64 {
    let hit = |p: &str, r: &str| f64::from(u8::from(!r.is_empty() && p.contains(r)));
    if normalize {
        let p = normalize_answer(pred);
        max_over(refs, |r| hit(&p, &normalize_answer(r)))
    } else {
        max_over(refs, |r| hit(pred, r))
    }
}

/// SQuAD v1.1's `f1_score`: the F1 of the multiset overlap of the normalized tokens
/// ([`normalize_answer`], split on whitespace), the best over the references. 0 when
/// nothing overlaps (so also when both sides are empty, as in v1.1).
pub fn token_f1<S: AsRef<str>>(pred: &str, refs: &[S]) -> f64 {
    let p_norm = normalize_answer(pred);
    let p_tokens: Vec<&str> = py_split(&p_norm).collect();
    let mut p_counts: HashMap<&str, usize> = HashMap::new();
    for t in &p_tokens {
        *p_counts.entry(t).or_default() += 1;
    }
    max_over(refs, |r| {
        let r_norm = normalize_answer(r);
        let r_tokens: Vec<&str> = py_split(&r_norm).collect();
        let mut r_counts: HashMap<&str, usize> = HashMap::new();
        for t in &r_tokens {
            *r_counts.entry(t).or_default() += 1;
        }
        let same: usize = p_counts.iter().map(|(t, n)| (*n).min(r_counts.get(t).copied().unwrap_or(0))).sum();
        if same == 0 {
            return 0.0;
        }
        let precision = same as f64 / p_tokens.len() as f64;
        let recall = same as f64 / r_tokens.len() as f64;
        (2.0 * precision * recall) / (precision + recall)
    })
}

/// `rouge-score`'s default tokenizer without stemming: lowercase, every character outside
/// `[a-z0-9]` separates tokens (so non-ASCII letters are dropped entirely).
fn rouge_tokens(s: &str) -> Vec<String> {
    s.to_lowercase().split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit())).filter(|t| !t.is_empty()).map(str::to_owned).collect()
}

/// The length of the longest common subsequence of two token lists.
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F-measure as Google's `rouge-score` computes it
/// (`RougeScorer(['rougeL'], use_stemmer=False)`): the longest common subsequence of the
/// tokens (lowercased, split on every character outside `[a-z0-9]`), precision over the
/// prediction's tokens, recall over the reference's, their harmonic mean; the best over the
/// references (`score_multi`). 0 when either side has no token.
pub fn rouge_l<S: AsRef<str>>(pred: &str, refs: &[S]) -> f64 {
    let p = rouge_tokens(pred);
    max_over(refs, |r| {
        let t = rouge_tokens(r);
        if p.is_empty() || t.is_empty() {
            return 0.0;
        }
        let lcs = lcs_len(&t, &p) as f64;
        let precision = lcs / p.len() as f64;
        let recall = lcs / t.len() as f64;
        if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        }
    })
}

/// sacrebleu's `13a` tokenizer (mteval-v13a), applied after `rstrip()`, returning tokens.
fn tokenize_13a(s: &str) -> Vec<String> {
    let mut line = s.trim_end_matches(py_space).replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    let chars: Vec<char> = format!(" {line} ").chars().collect();
    // `([\{-\~\[-\` -\&\(-\+\:-\@\/])` -> ` \1 `
    let mut a = Vec::with_capacity(chars.len() * 2);
    for &c in &chars {
        if matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') {
            a.extend([' ', c, ' ']);
        } else {
            a.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';
    // Two-character patterns, substituted left to right without overlap as `re.sub` does.
    let sub2 = |v: Vec<char>, first: &dyn Fn(char) -> bool, second: &dyn Fn(char) -> bool, out: &dyn Fn(char, char) -> Vec<char>| {
        let mut r = Vec::with_capacity(v.len() * 2);
        let mut i = 0;
        while i < v.len() {
            if i + 1 < v.len() && first(v[i]) && second(v[i + 1]) {
                r.extend(out(v[i], v[i + 1]));
                i += 2;
            } else {
                r.push(v[i]);
                i += 1;
            }
        }
        r
    };
    // `([^0-9])([\.,])` -> `\1 \2 `: period and comma unless preceded by a digit.
    let b = sub2(a, &|c| !digit(c), &period_comma, &|x, y| vec![x, ' ', y, ' ']);
    // `([\.,])([^0-9])` -> ` \1 \2`: period and comma unless followed by a digit.
    let c = sub2(b, &period_comma, &|c| !digit(c), &|x, y| vec![' ', x, ' ', y]);
    // `([0-9])(-)` -> `\1 \2 `: a dash after a digit.
    let d = sub2(c, &digit, &|c| c == '-', &|x, y| vec![x, ' ', y, ' ']);
    let text: String = d.into_iter().collect();
    py_split(&text).map(str::to_owned).collect()
}

/// Counts of all n-grams of orders 1 to `MAX_ORDER`.
fn ngram_counts(tokens: &[String]) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for w in tokens.windows(n) {
            *counts.entry(w).or_default() += 1;
        }
    }
    counts
}

const MAX_ORDER: usize = 4;

/// Sentence BLEU in `[0, 1]`: sacrebleu's `sentence_bleu(pred, refs)` with its defaults
/// divided by 100: tokenizer `13a`, case-sensitive, n-grams up to 4, clipped counts against
/// the element-wise maximum over the references, the closest reference length (the shorter
/// on a tie) for the brevity penalty, `exp` smoothing (the i-th order without a match counts
/// as `1 / (2^i * total)`) and effective order (orders the prediction is too short for are
/// left out). 0 without any matching unigram or without references.
pub fn bleu<S: AsRef<str>>(pred: &str, refs: &[S]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    let hyp = tokenize_13a(pred);
    let ref_tokens: Vec<Vec<String>> = refs.iter().map(|r| tokenize_13a(r.as_ref())).collect();
    let mut ref_max: HashMap<&[String], usize> = HashMap::new();
    for r in &ref_tokens {
        for (g, n) in ngram_counts(r) {
            let e = ref_max.entry(g).or_default();
            *e = (*e).max(n);
        }
    }
    let hyp_len = hyp.len();
    // `_get_closest_ref_len`: the closest length, the shorter one on a tie.
    let mut closest: Option<(usize, usize)> = None;
    for r in &ref_tokens {
        let diff = hyp_len.abs_diff(r.len());
        closest = match closest {
            Some((d, l)) if d < diff || (d == diff && l <= r.len()) => Some((d, l)),
            _ => Some((diff, r.len())),
        };
    }
    let ref_len = closest.map_or(0, |(_, l)| l);
    let mut correct = [0usize; MAX_ORDER];
    let mut total = [0usize; MAX_ORDER];
    for (g, n) in ngram_counts(&hyp) {
        total[g.len() - 1] += n;
        if let Some(m) = ref_max.get(g) {
            correct[g.len() - 1] += n.min(*m);
        }
    }
    let bp = if hyp_len < ref_len {
        if hyp_len > 0 {
            (1.0 - ref_len as f64 / hyp_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let mut precisions = [0.0f64; MAX_ORDER];
    let mut smooth = 1.0f64;
    let mut eff_order = MAX_ORDER;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        eff_order = n + 1;
        if correct[n] == 0 {
            smooth *= 2.0;
            precisions[n] = 100.0 / (smooth * total[n] as f64);
        } else {
            precisions[n] = 100.0 * correct[n] as f64 / total[n] as f64;
        }
    }
    let log_sum = precisions[..eff_order].iter().fold(0.0, |acc, &p| acc + if p == 0.0 { -9_999_999_999.0 } else { p.ln() });
    bp * (log_sum / eff_order as f64).exp() / 100.0
}

/// 1 if `pattern` matches anywhere in the prediction, else 0.
pub fn regex_match(pred: &str, pattern: &regex::Regex) -> f64 {
    f64::from(u8::from(pattern.is_match(pred)))
}

/// The numbers written in `s`, in order.
///
/// A number is an optional `-` (a sign only when not preceded by a letter or digit, so
/// `3-4` reads as 3 and 4), digits with optional thousands separators (a comma followed by
/// exactly three digits: `1,234,567`), and an optional fraction (`.5`, also alone as `.5`).
/// Anything around it is ignored, a `%` included: `50%` reads as 50. No exponents.
pub fn numbers_in(s: &str) -> Vec<f64> {
    let b = s.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = digit(i) || (b[i] == b'.' && digit(i + 1) && !(i > 0 && digit(i - 1)));
        if !starts {
            i += 1;
            continue;
        }
        let negative = i > 0 && b[i - 1] == b'-' && !(i > 1 && b[i - 2].is_ascii_alphanumeric());
        let mut text = String::from(if negative { "-" } else { "" });
        let mut j = i;
        while digit(j) {
            text.push(char::from(b[j]));
            j += 1;
        }
        while j > i && b.get(j) == Some(&b',') && digit(j + 1) && digit(j + 2) && digit(j + 3) && !digit(j + 4) {
            text.push_str(&s[j + 1..j + 4]);
            j += 4;
        }
        if b.get(j) == Some(&b'.') && digit(j + 1) {
            text.push('.');
            j += 1;
            while digit(j) {
                text.push(char::from(b[j]));
                j += 1;
            }
        }
        if let Ok(x) = text.parse::<f64>() {
            out.push(x);
        }
        i = j;
    }
    out
}

/// 1 if the last number in the prediction equals the last number of a reference within
/// tolerance, else 0 (also when either has no number). Numbers are read by [`numbers_in`];
/// `a` and `b` are equal when `|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)`, Python's
/// `math.isclose`.
pub fn numeric_match<S: AsRef<str>>(pred: &str, refs: &[S], rel_tol: f64, abs_tol: f64) -> f64 {
    let Some(p) = numbers_in(pred).last().copied() else { return 0.0 };
    max_over(refs, |r| match numbers_in(r).last() {
        Some(&x) => f64::from(u8::from((p - x).abs() <= (rel_tol * p.abs().max(x.abs())).max(abs_tol))),
        None => 0.0,
    })
}

/// The prediction trimmed, without a Markdown code fence around it (```` ``` ```` or
/// ```` ```json ````, any case).
pub fn strip_fence(pred: &str) -> &str {
    let t = pred.trim();
    if t.len() >= 6 && t.starts_with("```") && t.ends_with("```") {
        let inner = &t[3..t.len() - 3];
        let inner = match inner.get(..4) {
            Some(tag) if tag.eq_ignore_ascii_case("json") => &inner[4..],
            _ => inner,
        };
        inner.trim()
    } else {
        t
    }
}

/// The prediction parsed as strict JSON (RFC 8259: no `NaN`, no trailing commas) after
/// [`strip_fence`].
fn parse_json(pred: &str) -> Option<Value> {
    serde_json::from_str(strip_fence(pred)).ok()
}

/// 1 if the prediction (trimmed, without a ```` ```json ```` fence around it) parses as
/// strict JSON, else 0.
pub fn json_valid(pred: &str) -> f64 {
    f64::from(u8::from(parse_json(pred).is_some()))
}

/// JSON equality with numbers compared as `f64` (`1` equals `1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w))),
        _ => a == b,
    }
}

/// The value at a dotted path (`a.b.0.c`: object keys, array indices); the empty path is
/// the whole value.
fn at_path<'a>(mut v: &'a Value, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return Some(v);
    }
    for seg in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// 1 if the value at the dotted `path` (`a.b.0.c`; empty for the whole value) of the
/// predicted JSON (as [`json_valid`] parses it) equals a reference, else 0 (also when the
/// prediction is not JSON or has nothing at `path`).
///
/// A reference matches when it parses as JSON equal to the value (numbers compared as `f64`,
/// so the reference `1` matches the value `1.0`), or when the value is a string equal to the
/// reference's text: the references `Paris` (not JSON) and `"Paris"` (JSON) both match the
/// value `"Paris"`, and the reference `42` matches both `42` and `"42"`.
pub fn json_field_match<S: AsRef<str>>(pred: &str, refs: &[S], path: &str) -> f64 {
    let Some(root) = parse_json(pred) else { return 0.0 };
    let Some(v) = at_path(&root, path) else { return 0.0 };
    max_over(refs, |r| {
        let as_json = serde_json::from_str::<Value>(r).is_ok_and(|rv| json_eq(v, &rv));
        let as_text = matches!(v, Value::String(s) if s == r);
        f64::from(u8::from(as_json || as_text))
    })
}
