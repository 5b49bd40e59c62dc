//! Parallel token counting and batch encoding (pure Rust, no Python types).
//!
//! Counting keeps one histogram per rayon fold (a few per thread) and drops each
//! encoding as soon as its ids are added, so memory is O(threads x vocab) and
//! does not grow with the corpus.

use std::sync::Mutex;

use rayon::prelude::*;
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

use crate::texts::{Segment, Texts};

/// Which end of a sequence to cut when it is longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

#[derive(Debug, thiserror::Error)]
pub enum CountError {
    #[error("row {row}: the tokenizer failed: {message}")]
    Encode { row: usize, message: String },
    #[error("cannot allocate the token histograms ({threads} x {vocab} entries of 8 bytes)")]
    Memory { threads: usize, vocab: usize },
    #[error(
        "row {row}: token id {id} is outside the histogram of {vocab} entries \
         (the tokenizer's vocabulary and added tokens)"
    )]
    IdOutOfRange { row: usize, id: u32, vocab: usize },
}

/// A tokenizer as deft uses it: the file's own `padding` and `truncation`
/// settings are dropped (a saved `enable_padding()` or a sentence-transformers
/// `Fixed(128)` would otherwise add pad ids to every count and cut every
/// response); deft counts and encodes unpadded, untruncated sequences and cuts
/// them only where asked (`encode(max_length=...)`).
pub fn for_deft(mut tok: Tokenizer) -> Tokenizer {
    tok.with_padding(None);
    // clearing truncation cannot fail (only a stride check on Some(..) can)
    let _ = tok.with_truncation(None);
    tok
}

/// Largest histogram deft accepts for a sparse id space (entries), and the
/// sparsity factor beyond which a tokenizer is refused: a histogram longer than
/// both `SPARSE_MIN_ENTRIES` and `SPARSE_FACTOR` x the token count would be
/// mostly holes (e.g. a WordLevel `[UNK]` at id 4e9: 32 GB per thread).
pub const SPARSE_MIN_ENTRIES: usize = 1 << 20;
pub const SPARSE_FACTOR: usize = 2;

/// Histogram length for a tokenizer: its vocabulary including added tokens,
/// or the largest id + 1 when the id space has (small) holes. Refused (with a
/// message saying why) when the id space is absurdly sparse.
pub fn histogram_len(tok: &Tokenizer) -> Result<usize, String> {
    let vocab = tok.get_vocab(true);
    let tokens = vocab.len();
    let max_id = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
    let len = tok.get_vocab_size(true).max(max_id);
    if len > SPARSE_MIN_ENTRIES && len > SPARSE_FACTOR * tokens.max(1) {
        let (tok_name, id) = vocab.iter().max_by_key(|(_, &id)| id).map(|(t, &i)| (t.clone(), i)).unwrap_or_default();
        return Err(format!(
            "the tokenizer's id space is too sparse to count: it has {tokens} tokens (vocabulary and added \
             tokens) but its largest id is {id} (token {tok_name:?}), so a histogram would need {len} entries; \
             renumber the vocabulary so ids are (nearly) contiguous from 0"
        ));
    }
    Ok(len)
}

/// Rows per unit of parallel work: small enough to balance two threads on a
/// few thousand texts, large enough that scheduling is noise.
pub fn segment_size(rows: usize, threads: usize) -> usize {
    (rows / (threads.max(1) * 16)).clamp(16, 2048)
}

/// Whether `ids_into` may skip building an `Encoding`: without special tokens,
/// truncation or padding, post-processing does not change ids, so they are the
/// concatenation of the tokenized pre-tokenizer splits.
pub fn lean_path_ok(tok: &Tokenizer, add_special: bool) -> bool {
    !add_special && tok.get_truncation().is_none() && tok.get_padding().is_none()
}

/// Append the ids of `text` to `out`. With `lean`, run the tokenizer's own
/// stages (added tokens + normalizer, pre-tokenizer, model) without building an
/// `Encoding` (no token strings, offsets or masks are kept); otherwise call
/// `encode_fast`. Both give the same ids (tested against the Python library).
fn ids_into(tok: &Tokenizer, row: usize, text: &str, add_special: bool, lean: bool, out: &mut Vec<u32>) -> Result<(), CountError> {
    let fail = |e: tokenizers::Error| CountError::Encode { row, message: e.to_string() };
    if !lean {
        let enc = tok.encode_fast(text, add_special).map_err(fail)?;
        out.extend_from_slice(enc.get_ids());
        return Ok(());
    }
    let mut pre = tok.get_added_vocabulary().extract_and_normalize(tok.get_normalizer(), text);
    if let Some(pt) = tok.get_pre_tokenizer() {
        pt.pre_tokenize(&mut pre).map_err(fail)?;
    }
    let model = tok.get_model();
    pre.tokenize(|n| model.tokenize(n.get())).map_err(fail)?;
    for (_, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
        if let Some(tokens) = tokens {
            out.extend(tokens.iter().map(|t| t.id));
        }
    }
    Ok(())
}

/// One histogram per worker thread, reused across calls and batches and summed
/// once at the end: memory is threads x vocab, whatever the corpus size.
pub struct Histograms {
    per_thread: Vec<Mutex<Vec<u64>>>,
}

impl Histograms {
    /// Histograms for the current rayon pool (call inside `pool.install` when
    /// using a custom pool). Allocation failure is an error, not an abort.
    pub fn new(vocab: usize) -> Result<Self, CountError> {
        let n = rayon::current_num_threads().max(1);
        let mut per_thread = Vec::new();
        let oom = |_| CountError::Memory { threads: n, vocab };
        per_thread.try_reserve_exact(n).map_err(oom)?;
        for _ in 0..n {
            let mut h: Vec<u64> = Vec::new();
            h.try_reserve_exact(vocab).map_err(oom)?;
            h.resize(vocab, 0);
            per_thread.push(Mutex::new(h));
        }
        Ok(Histograms { per_thread })
    }

    pub fn vocab(&self) -> usize {
        self.per_thread[0].lock().unwrap().len()
    }

    /// The histogram of the calling worker thread (uncontended lock).
    fn mine(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        let i = rayon::current_thread_index().unwrap_or(0) % self.per_thread.len();
        self.per_thread[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn sum(self) -> Vec<u64> {
        let mut it = self.per_thread.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()));
        let mut total = it.next().unwrap_or_default();
        for h in it {
            total.iter_mut().zip(h).for_each(|(x, y)| *x += y);
        }
        total
    }
}

#[cfg(test)]
/// Count how often every token id occurs in the encodings of `texts`.
/// Null rows are skipped.
pub fn count_tokens(
    tok: &Tokenizer,
    texts: &Texts,
    add_special: bool,
    vocab: usize,
) -> Result<Vec<u64>, CountError> {
    let hists = Histograms::new(vocab)?;
    count_tokens_into(tok, texts, add_special, 0, &hists)?;
    Ok(hists.sum())
}

/// Add the token counts of `texts` to the per-thread histograms.
/// `row_base` is added to row numbers in error messages (for batched input).
pub fn count_tokens_into(
    tok: &Tokenizer,
    texts: &Texts,
    add_special: bool,
    row_base: usize,
    hists: &Histograms,
) -> Result<(), CountError> {
    let vocab = hists.vocab();
    let lean = lean_path_ok(tok, add_special);
    let threads = rayon::current_num_threads();
    let segments: Vec<Segment> = texts.segments(segment_size(texts.len(), threads));
    segments.par_iter().try_for_each_init(
        || Vec::with_capacity(256),
        |ids: &mut Vec<u32>, seg| {
            let mut hist = hists.mine();
            texts.visit(seg, |row, text| {
                let row = row_base + row;
                let Some(text) = text else { return Ok(()) };
                ids.clear();
                ids_into(tok, row, text, add_special, lean, ids)?;
                for &id in ids.iter() {
                    match hist.get_mut(id as usize) {
                        Some(slot) => *slot += 1,
                        None => return Err(CountError::IdOutOfRange { row, id, vocab }),
                    }
                }
                Ok(())
            })
        },
    )
}

/// Encode every row; return all ids flattened and `offsets` of length rows + 1
/// (row i is `ids[offsets[i]..offsets[i+1]]`). Null rows give empty rows.
/// Sequences longer than `max_length` are cut at `side`, after special tokens
/// were added.
pub fn encode_batch(
    tok: &Tokenizer,
    texts: &Texts,
    row_base: usize,
    add_special: bool,
    max_length: Option<usize>,
    side: Side,
) -> Result<(Vec<u32>, Vec<i64>), CountError> {
    let lean = lean_path_ok(tok, add_special);
    let threads = rayon::current_num_threads();
    let segments = texts.segments(segment_size(texts.len(), threads));
    let parts: Vec<(Vec<u32>, Vec<usize>)> = segments
        .par_iter()
        .map(|seg| {
            let mut ids = Vec::new();
            let mut lens = Vec::with_capacity(seg.rows.len());
            texts.visit(seg, |row, text| {
                let mut one = Vec::new();
                if let Some(t) = text {
                    ids_into(tok, row_base + row, t, add_special, lean, &mut one)?;
                }
                if let Some(m) = max_length {
                    if one.len() > m {
                        match side {
                            Side::Right => one.truncate(m),
                            Side::Left => {
                                one.drain(..one.len() - m);
                            }
                        }
                    }
                }
                lens.push(one.len());
                ids.extend_from_slice(&one);
                Ok(())
            })?;
            Ok((ids, lens))
        })
        .collect::<Result<_, CountError>>()?;
    let total: usize = parts.iter().map(|(ids, _)| ids.len()).sum();
    let mut ids = Vec::with_capacity(total);
    let mut offsets = Vec::with_capacity(texts.len() + 1);
    offsets.push(0i64);
    for (part, lens) in parts {
        ids.extend_from_slice(&part);
        for l in lens {
            let last = *offsets.last().unwrap();
            offsets.push(last + l as i64);
        }
    }
    Ok((ids, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shared_tokenizer(name: &str) -> Option<Tokenizer> {
        // DEFT_SHARED_DIR overrides ../shared (cargo-mutants tests a copy of the tree elsewhere)
        let shared = std::env::var_os("DEFT_SHARED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
        let p = shared.join("tokenizers").join(name).join("tokenizer.json");
        if !p.exists() {
            // DEFT_NO_SKIPS=1 (CI): the shared tokenizers must be there; a skip would hide the tests
            assert!(
                std::env::var("DEFT_NO_SKIPS").as_deref() != Ok("1"),
                "DEFT_NO_SKIPS=1 but {} is missing (CI provides ../shared)",
                p.display()
            );
            eprintln!("SKIPPING a real-tokenizer test: {} not found (the shared data belongs in ../shared)", p.display());
            return None;
        }
        Some(Tokenizer::from_file(p).expect("load tokenizer"))
    }

    fn corpus() -> Texts {
        Texts::Owned(vec![
            Some("Hello world, this is deft.".into()),
            None,
            Some(String::new()),
            Some("Émoji 🎉 and combining e\u{301} marks\0 with NUL".into()),
            Some("  leading spaces and\nnew lines\n\n".into()),
        ])
    }

    #[test]
    fn histogram_equals_sum_of_single_encodings() {
        for name in ["gpt2", "smollm2"] {
            let Some(tok) = shared_tokenizer(name) else { return };
            let vocab = histogram_len(&tok).unwrap();
            let texts = corpus();
            let hist = count_tokens(&tok, &texts, false, vocab).unwrap();
            let mut want = vec![0u64; vocab];
            if let Texts::Owned(v) = &texts {
                for t in v.iter().flatten() {
                    for &id in tok.encode(t.as_str(), false).unwrap().get_ids() {
                        want[id as usize] += 1;
                    }
                }
            }
            assert_eq!(hist, want, "{name}");
            assert!(hist.iter().sum::<u64>() > 10);
        }
    }

    #[test]
    fn histogram_length_covers_every_id() {
        let Some(tok) = shared_tokenizer("gpt2") else { return };
        assert_eq!(histogram_len(&tok), Ok(50257));
        let Some(tok) = shared_tokenizer("smollm2") else { return };
        assert_eq!(histogram_len(&tok), Ok(49152));
    }

    #[test]
    fn encode_batch_offsets_and_truncation() {
        let Some(tok) = shared_tokenizer("gpt2") else { return };
        let texts = corpus();
        let (ids, offsets) = encode_batch(&tok, &texts, 0, false, None, Side::Right).unwrap();
        assert_eq!(offsets.len(), 6);
        assert_eq!(*offsets.last().unwrap() as usize, ids.len());
        assert_eq!(offsets[1], offsets[2], "null row is empty");
        let first: Vec<u32> = tok.encode("Hello world, this is deft.", false).unwrap().get_ids().to_vec();
        assert_eq!(&ids[..offsets[1] as usize], first.as_slice());

        let (l, lo) = encode_batch(&tok, &texts, 0, false, Some(3), Side::Left).unwrap();
        assert_eq!(&l[..lo[1] as usize], &first[first.len() - 3..]);
        let (r, ro) = encode_batch(&tok, &texts, 0, false, Some(3), Side::Right).unwrap();
        assert_eq!(&r[..ro[1] as usize], &first[..3]);
    }

    #[test]
    fn padding_and_truncation_of_the_file_are_ignored() {
        use tokenizers::{PaddingParams, PaddingStrategy, TruncationParams};
        for name in ["gpt2", "smollm2"] {
            let Some(plain) = shared_tokenizer(name) else { return };
            let mut padded = plain.clone();
            padded.with_padding(Some(PaddingParams { strategy: PaddingStrategy::Fixed(128), pad_id: 7, ..Default::default() }));
            padded.with_truncation(Some(TruncationParams { max_length: 4, ..Default::default() })).unwrap();
            let padded: Tokenizer = padded.to_string(false).unwrap().parse().unwrap();
            assert!(padded.get_padding().is_some() && padded.get_truncation().is_some());
            let fixed = for_deft(padded);
            assert!(fixed.get_padding().is_none() && fixed.get_truncation().is_none());
            let vocab = histogram_len(&plain).unwrap();
            assert_eq!(histogram_len(&fixed), Ok(vocab));
            for add in [false, true] {
                assert_eq!(
                    count_tokens(&fixed, &corpus(), add, vocab).unwrap(),
                    count_tokens(&plain, &corpus(), add, vocab).unwrap(),
                    "{name} add_special={add}"
                );
                let a = encode_batch(&fixed, &corpus(), 0, add, None, Side::Right).unwrap();
                let b = encode_batch(&plain, &corpus(), 0, add, None, Side::Right).unwrap();
                assert_eq!(a, b, "{name} add_special={add}");
                let (ids, off) = encode_batch(&fixed, &corpus(), 0, add, Some(2), Side::Right).unwrap();
                assert_eq!(off[1], 2, "deft's own max_length still cuts");
                assert_eq!(&ids[..2], &b.0[..2]);
            }
        }
    }

    fn word_level(vocab: &[(&str, u32)]) -> Tokenizer {
        let json = serde_like_json(vocab);
        json.parse().expect("word-level tokenizer")
    }

    fn serde_like_json(vocab: &[(&str, u32)]) -> String {
        let entries: Vec<String> = vocab.iter().map(|(t, i)| format!("{t:?}: {i}")).collect();
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":{{"type":"Whitespace"}},"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"[UNK]"}}}}"#,
            entries.join(",")
        )
    }

    #[test]
    fn absurdly_sparse_id_spaces_are_refused_small_holes_kept() {
        for big in [4_000_000_000u32, 1 << 28, (1 << 20) + 5] {
            let tok = word_level(&[("[UNK]", big), ("a", 0)]);
            let e = histogram_len(&tok).unwrap_err();
            assert!(e.contains("too sparse") && e.contains(&big.to_string()) && e.contains("2 tokens"), "{e}");
        }
        // a small id space with holes keeps largest id + 1
        let tok = word_level(&[("[UNK]", 0), ("a", 1), ("b", 1000)]);
        assert_eq!(histogram_len(&tok), Ok(1001));
        let h = count_tokens(&tok, &Texts::Owned(vec![Some("b a zz".into())]), false, 1001).unwrap();
        assert_eq!((h[0], h[1], h[1000], h.iter().sum::<u64>()), (1, 1, 1, 3));
        // an id beyond a too-short histogram is an error naming the row, not a panic
        let e = count_tokens(&tok, &Texts::Owned(vec![None, Some("b".into())]), false, 10).unwrap_err();
        assert!(matches!(e, CountError::IdOutOfRange { row: 1, id: 1000, vocab: 10 }), "{e}");
    }

    #[test]
    fn sparse_refusal_boundaries() {
        // longer than 2^20 entries AND more than 2x the token count: both conditions are strict
        let at_limit = word_level(&[("[UNK]", (1 << 20) - 1), ("a", 0)]);
        assert_eq!(histogram_len(&at_limit), Ok(1 << 20), "exactly 2^20 entries is kept");
        assert!(histogram_len(&word_level(&[("[UNK]", 1 << 20), ("a", 0)])).is_err(), "2^20 + 1 entries of 2 tokens");
        // 2^19 + 1 tokens on even ids: 2^20 + 1 entries = 2 x tokens - 1, kept; one more hole refuses
        let n = (1usize << 19) + 1;
        let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
        let dense: Vec<(&str, u32)> = names.iter().enumerate().map(|(i, t)| (t.as_str(), (2 * i) as u32)).collect();
        assert_eq!(histogram_len(&word_level(&dense)), Ok(2 * n - 1));
        let mut holey = dense.clone();
        holey[n - 1].1 = (2 * n + 1) as u32; // largest id 2n+1: 2n+2 entries > 2 x n tokens
        let e = histogram_len(&word_level(&holey)).unwrap_err();
        assert!(e.contains(&format!("{n} tokens")) && e.contains(&format!("{} entries", 2 * n + 2)), "{e}");
        let mut exact = dense;
        exact[n - 1].1 = (2 * n - 1) as u32; // 2n entries = 2 x tokens: kept
        assert_eq!(histogram_len(&word_level(&exact)), Ok(2 * n));
    }

    #[test]
    fn lean_path_only_without_special_tokens_truncation_or_padding() {
        use tokenizers::{PaddingParams, TruncationParams};
        let plain = word_level(&[("[UNK]", 0), ("a", 1)]);
        assert!(lean_path_ok(&plain, false));
        assert!(!lean_path_ok(&plain, true));
        let mut padded = plain.clone();
        padded.with_padding(Some(PaddingParams::default()));
        assert!(!lean_path_ok(&padded, false));
        let mut truncated = plain.clone();
        truncated.with_truncation(Some(TruncationParams::default())).unwrap();
        assert!(!lean_path_ok(&truncated, false));
    }

    fn with_template(vocab: &[(&str, u32)]) -> Tokenizer {
        // WordLevel plus a post-processor that wraps every sequence in [CLS] ... [SEP]
        let json = serde_like_json(vocab).replace(
            r#""post_processor":null"#,
            r#""post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"[CLS]","type_id":0}},
               {"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"[SEP]","type_id":0}}],
               "pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],
               "special_tokens":{"[CLS]":{"id":"[CLS]","ids":[7],"tokens":["[CLS]"]},
                                 "[SEP]":{"id":"[SEP]","ids":[8],"tokens":["[SEP]"]}}}"#,
        );
        json.parse().expect("word-level tokenizer with a template")
    }

    #[test]
    fn special_tokens_are_added_only_when_asked() {
        let tok = with_template(&[("[UNK]", 0), ("a", 1), ("b", 2), ("[CLS]", 7), ("[SEP]", 8)]);
        let texts = Texts::Owned(vec![Some("a b".into()), None, Some("b".into())]);
        let (ids, off) = encode_batch(&tok, &texts, 0, true, None, Side::Right).unwrap();
        assert_eq!((ids, off), (vec![7, 1, 2, 8, 7, 2, 8], vec![0, 4, 4, 7]));
        let (ids, off) = encode_batch(&tok, &texts, 0, false, None, Side::Right).unwrap();
        assert_eq!((ids, off), (vec![1, 2, 2], vec![0, 2, 2, 3]));
        // cut after the special tokens were added
        let (ids, _) = encode_batch(&tok, &texts, 0, true, Some(2), Side::Left).unwrap();
        assert_eq!(ids, vec![2, 8, 2, 8]);
        let h = count_tokens(&tok, &texts, true, 9).unwrap();
        assert_eq!(h, vec![0, 1, 2, 0, 0, 0, 0, 2, 2]);
        assert_eq!(count_tokens(&tok, &texts, false, 9).unwrap(), vec![0, 1, 2, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn tokenizer_failures_name_the_global_row() {
        // a WordLevel model without its unk token fails on an unknown word
        let tok: Tokenizer = serde_like_json(&[("a", 0)]).parse().unwrap();
        let texts = Texts::Owned(vec![Some("a".into()), Some("a".into()), Some("zz".into())]);
        let e = encode_batch(&tok, &texts, 10, false, None, Side::Right).unwrap_err();
        assert!(matches!(e, CountError::Encode { row: 12, .. }), "{e}");
        let hists = Histograms::new(1).unwrap();
        let e = count_tokens_into(&tok, &texts, false, 10, &hists).unwrap_err();
        assert!(matches!(e, CountError::Encode { row: 12, .. }), "{e}");
    }

    #[test]
    fn per_thread_histograms_are_summed() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let hists = pool.install(|| Histograms::new(4)).unwrap();
        assert_eq!(hists.per_thread.len(), 3);
        for (i, h) in hists.per_thread.iter().enumerate() {
            let mut h = h.lock().unwrap();
            h[i] += 5;
            h[3] += i as u64 + 1;
        }
        assert_eq!(hists.vocab(), 4);
        assert_eq!(hists.sum(), vec![5, 5, 5, 6]);
    }

    #[test]
    fn histogram_allocation_failure_is_an_error() {
        let e = Histograms::new(usize::MAX / 4).err().expect("cannot allocate");
        assert!(matches!(e, CountError::Memory { .. }), "{e}");
    }

    #[test]
    fn segment_size_is_bounded() {
        assert_eq!(segment_size(0, 2), 16);
        assert_eq!(segment_size(1_000_000_000, 2), 2048);
        assert_eq!(segment_size(3200, 2), 100);
    }
}
