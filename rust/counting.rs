//! Parallel token counting and batch encoding (pure Rust, no Python types).
//!
//! Counting keeps one histogram per rayon fold (a few per thread) and drops each
//! encoding as soon as its ids are added, so memory is O(threads x vocab) and
//! does not grow with the corpus.

use rayon::prelude::*;
use tokenizers::Tokenizer;

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
    #[error(
        "row {row}: token id {id} is outside the histogram of {vocab} entries \
         (the tokenizer's vocabulary and added tokens)"
    )]
    IdOutOfRange { row: usize, id: u32, vocab: usize },
}

/// Histogram length for a tokenizer: its vocabulary including added tokens,
/// or the largest id + 1 when the id space has holes.
pub fn histogram_len(tok: &Tokenizer) -> usize {
    let max_id = tok.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
    tok.get_vocab_size(true).max(max_id)
}

/// Rows per unit of parallel work: small enough to balance two threads on a
/// few thousand texts, large enough that scheduling is noise.
pub fn segment_size(rows: usize, threads: usize) -> usize {
    (rows / (threads.max(1) * 16)).clamp(16, 2048)
}

fn encode_one(tok: &Tokenizer, row: usize, text: &str, add_special: bool) -> Result<Vec<u32>, CountError> {
    let enc = tok
        .encode_fast(text, add_special)
        .map_err(|e| CountError::Encode { row, message: e.to_string() })?;
    Ok(enc.get_ids().to_vec())
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
    let mut hist = vec![0u64; vocab];
    count_tokens_into(tok, texts, add_special, 0, &mut hist)?;
    Ok(hist)
}

/// Add the token counts of `texts` to `hist` (whose length is the vocabulary).
/// `row_base` is added to row numbers in error messages (for batched input).
pub fn count_tokens_into(
    tok: &Tokenizer,
    texts: &Texts,
    add_special: bool,
    row_base: usize,
    hist: &mut [u64],
) -> Result<(), CountError> {
    let vocab = hist.len();
    let threads = rayon::current_num_threads();
    let segments: Vec<Segment> = texts.segments(segment_size(texts.len(), threads));
    let part = segments
        .par_iter()
        .try_fold(
            || vec![0u64; vocab],
            |mut hist, seg| {
                texts.visit(seg, |row, text| {
                    let row = row_base + row;
                    let Some(text) = text else { return Ok(()) };
                    let enc = tok
                        .encode_fast(text, add_special)
                        .map_err(|e| CountError::Encode { row, message: e.to_string() })?;
                    for &id in enc.get_ids() {
                        match hist.get_mut(id as usize) {
                            Some(slot) => *slot += 1,
                            None => return Err(CountError::IdOutOfRange { row, id, vocab }),
                        }
                    }
                    Ok(())
                })?;
                Ok(hist)
            },
        )
        .try_reduce(
            || vec![0u64; vocab],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                Ok(a)
            },
        )?;
    hist.iter_mut().zip(part).for_each(|(x, y)| *x += y);
    Ok(())
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
    let threads = rayon::current_num_threads();
    let segments = texts.segments(segment_size(texts.len(), threads));
    let parts: Vec<(Vec<u32>, Vec<usize>)> = segments
        .par_iter()
        .map(|seg| {
            let mut ids = Vec::new();
            let mut lens = Vec::with_capacity(seg.rows.len());
            texts.visit(seg, |row, text| {
                let mut one = match text {
                    Some(t) => encode_one(tok, row_base + row, t, add_special)?,
                    None => Vec::new(),
                };
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
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/tokenizers")
            .join(name)
            .join("tokenizer.json");
        if !p.exists() {
            eprintln!("skipping: {} not found", p.display());
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
            let vocab = histogram_len(&tok);
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
        assert_eq!(histogram_len(&tok), 50257);
        let Some(tok) = shared_tokenizer("smollm2") else { return };
        assert_eq!(histogram_len(&tok), 49152);
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
    fn segment_size_is_bounded() {
        assert_eq!(segment_size(0, 2), 16);
        assert_eq!(segment_size(1_000_000_000, 2), 2048);
        assert_eq!(segment_size(3200, 2), 100);
    }
}
