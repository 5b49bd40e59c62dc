//! Read-only views over a column of texts, owned or borrowed from Arrow memory.
//!
//! The counting and encoding kernels never build a Python list: Arrow string
//! arrays (`Utf8`, `LargeUtf8`, `Utf8View`) are read in place, chunk by chunk.

use std::ops::Range;

use arrow_array::{Array, ArrayRef, LargeStringArray, StringArray, StringViewArray};
use arrow_schema::DataType;

/// A column of texts. Null entries (Arrow nulls, Python `None`) are skipped by
/// counting and encode to an empty sequence.
pub enum Texts {
    /// Strings copied out of a Python list.
    Owned(Vec<Option<String>>),
    /// Arrow string arrays, zero-copy.
    Arrow(Vec<ArrayRef>),
}

/// A contiguous slice of rows inside one chunk: the unit of parallel work.
#[derive(Debug, Clone)]
pub struct Segment {
    pub chunk: usize,
    pub rows: Range<usize>,
    /// Global row index of `rows.start`.
    pub first: usize,
}

/// Data types accepted as a text column.
pub fn is_string_type(dt: &DataType) -> bool {
    matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

impl Texts {
    /// Build from Arrow chunks, checking that every chunk holds strings.
    pub fn from_arrow(chunks: Vec<ArrayRef>) -> Result<Self, String> {
        for c in &chunks {
            if !is_string_type(c.data_type()) {
                return Err(format!(
                    "expected a column of strings (Arrow utf8, large_utf8 or utf8_view), got Arrow type {}",
                    c.data_type()
                ));
            }
        }
        Ok(Texts::Arrow(chunks))
    }

    fn chunk_lens(&self) -> Vec<usize> {
        match self {
            Texts::Owned(v) => vec![v.len()],
            Texts::Arrow(chunks) => chunks.iter().map(|c| c.len()).collect(),
        }
    }

    /// Total number of rows (nulls included).
    pub fn len(&self) -> usize {
        self.chunk_lens().iter().sum()
    }

    /// Split the rows into segments of at most `size` rows, in row order.
    pub fn segments(&self, size: usize) -> Vec<Segment> {
        let size = size.max(1);
        let mut out = Vec::new();
        let mut first = 0;
        for (chunk, n) in self.chunk_lens().into_iter().enumerate() {
            let mut start = 0;
            while start < n {
                let end = (start + size).min(n);
                out.push(Segment { chunk, rows: start..end, first: first + start });
                start = end;
            }
            first += n;
        }
        out
    }

    /// Call `f(global_row, text)` for every row of `seg`, in order.
    pub fn visit<E>(
        &self,
        seg: &Segment,
        mut f: impl FnMut(usize, Option<&str>) -> Result<(), E>,
    ) -> Result<(), E> {
        match self {
            Texts::Owned(v) => {
                for (k, i) in seg.rows.clone().enumerate() {
                    f(seg.first + k, v[i].as_deref())?;
                }
            }
            Texts::Arrow(chunks) => {
                let arr = &chunks[seg.chunk];
                let any = arr.as_any();
                macro_rules! walk {
                    ($a:expr) => {
                        for (k, i) in seg.rows.clone().enumerate() {
                            let t = if $a.is_null(i) { None } else { Some($a.value(i)) };
                            f(seg.first + k, t)?;
                        }
                    };
                }
                if let Some(a) = any.downcast_ref::<StringArray>() {
                    walk!(a);
                } else if let Some(a) = any.downcast_ref::<LargeStringArray>() {
                    walk!(a);
                } else if let Some(a) = any.downcast_ref::<StringViewArray>() {
                    walk!(a);
                } else {
                    unreachable!("checked in Texts::from_arrow");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn collect(t: &Texts, size: usize) -> Vec<(usize, Option<String>)> {
        let mut out = Vec::new();
        for seg in t.segments(size) {
            t.visit::<()>(&seg, |i, s| {
                out.push((i, s.map(str::to_owned)));
                Ok(())
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn arrow_chunks_are_walked_in_order_with_global_indices() {
        let a: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("c")]));
        let b: ArrayRef = Arc::new(LargeStringArray::from(vec!["d", "e"]));
        let c: ArrayRef = Arc::new(StringViewArray::from(vec!["f"]));
        let t = Texts::from_arrow(vec![a, b, c]).unwrap();
        assert_eq!(t.len(), 6);
        for size in [1, 2, 5, 100] {
            let got = collect(&t, size);
            let want: Vec<(usize, Option<String>)> = vec![
                (0, Some("a".into())),
                (1, None),
                (2, Some("c".into())),
                (3, Some("d".into())),
                (4, Some("e".into())),
                (5, Some("f".into())),
            ];
            assert_eq!(got, want, "segment size {size}");
        }
    }

    #[test]
    fn non_string_arrays_are_rejected_with_their_type() {
        let a: ArrayRef = Arc::new(arrow_array::Int64Array::from(vec![1, 2]));
        let err = Texts::from_arrow(vec![a]).err().unwrap();
        assert!(err.contains("Int64"), "{err}");
    }

    #[test]
    fn empty_input_has_no_segments() {
        let t = Texts::Owned(vec![]);
        assert!(t.segments(8).is_empty());
        assert_eq!(t.len(), 0);
    }
}
