//! `deft._native.Tokenizer` and `count_tokens`: a `tokenizers` tokenizer
//! loaded once, counting and encoding whole corpora in parallel (rayon,
//! without the GIL).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use numpy::PyArray1;
use pyo3::exceptions::{PyFileNotFoundError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use tokenizers::Tokenizer as HfTokenizer;

use crate::counting::{self, for_deft, histogram_len, Histograms, Side};
use crate::errors::vocab_error;
use crate::input::{decode_ids, extract_texts, for_each_batch};

/// A tokenizer loaded once from `tokenizer.json` and reused across calls.
#[pyclass(name = "Tokenizer", module = "deft._native", frozen)]
pub struct PyTokenizer {
    inner: Arc<HfTokenizer>,
    source: String,
    /// Histogram length, or why this tokenizer cannot be counted with.
    vocab: Result<usize, String>,
}

fn load_tokenizer_file(path: &Path) -> PyResult<PyTokenizer> {
    let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
    if !file.exists() {
        let hint = if path.is_dir() { " (the folder has no tokenizer.json)" } else { "" };
        return Err(PyFileNotFoundError::new_err(format!(
            "tokenizer file not found: {}{hint}",
            file.display()
        )));
    }
    let tok = HfTokenizer::from_file(&file).map_err(|e| {
        PyValueError::new_err(format!("cannot load tokenizer from {}: {e}", file.display()))
    })?;
    Ok(PyTokenizer::wrap(tok, file.display().to_string()))
}

fn load_tokenizer_json(json: &str) -> PyResult<PyTokenizer> {
    let tok: HfTokenizer = json
        .parse()
        .map_err(|e| PyValueError::new_err(format!("cannot parse tokenizer JSON text: {e}")))?;
    Ok(PyTokenizer::wrap(tok, "<json text>".to_string()))
}

impl PyTokenizer {
    fn wrap(tok: HfTokenizer, source: String) -> Self {
        let tok = for_deft(tok);
        let vocab = histogram_len(&tok).map_err(|e| format!("tokenizer {source}: {e}"));
        PyTokenizer { inner: Arc::new(tok), source, vocab }
    }

    /// A path (str or os.PathLike, file or folder holding tokenizer.json) or JSON text.
    fn from_any(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(s) = obj.cast::<PyString>() {
            let s = s.to_cow()?;
            if s.trim_start().starts_with('{') {
                return load_tokenizer_json(&s);
            }
            return load_tokenizer_file(Path::new(s.as_ref()));
        }
        if let Ok(p) = obj.extract::<PathBuf>() {
            return load_tokenizer_file(&p);
        }
        Err(PyTypeError::new_err(format!(
            "tokenizer must be a path to tokenizer.json, its JSON text, or a deft._native.Tokenizer, not {}",
            obj.get_type().name()?
        )))
    }
}

/// Borrow a `Tokenizer` handle or load one from a path / JSON text.
fn resolve_tokenizer(obj: &Bound<'_, PyAny>) -> PyResult<(Arc<HfTokenizer>, usize)> {
    if let Ok(t) = obj.cast::<PyTokenizer>() {
        let t = t.get();
        let vocab = t.vocab.as_ref().map_err(|e| vocab_error(e))?;
        return Ok((t.inner.clone(), *vocab));
    }
    let t = PyTokenizer::from_any(obj)?;
    let vocab = t.vocab.map_err(|e| vocab_error(&e))?;
    Ok((t.inner, vocab))
}

/// Run `f` without the GIL, on `pool` (or rayon's global pool).
fn run_parallel<T: Send>(
    py: Python<'_>,
    pool: Option<&rayon::ThreadPool>,
    f: impl FnOnce() -> T + Send,
) -> T {
    match pool {
        None => py.detach(f),
        Some(p) => py.detach(|| p.install(f)),
    }
}

fn make_pool(num_threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    match num_threads {
        None => Ok(None),
        Some(0) => Err(PyValueError::new_err("num_threads must be >= 1 (or None for all cores)")),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map(Some)
            .map_err(|e| PyValueError::new_err(format!("cannot start {n} threads: {e}"))),
    }
}

fn count_impl<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    tok: Arc<HfTokenizer>,
    vocab: usize,
    add_special_tokens: bool,
    num_threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let pool = make_pool(num_threads)?;
    let input = extract_texts(texts)?;
    let hists = run_parallel(py, pool.as_ref(), || Histograms::new(vocab)).map_err(PyErr::from)?;
    for_each_batch(input, |batch, first| {
        run_parallel(py, pool.as_ref(), || {
            counting::count_tokens_into(&tok, batch, add_special_tokens, first, &hists)
        })
        .map_err(PyErr::from)
    })?;
    Ok(PyArray1::from_vec(py, hists.sum()))
}

#[pymethods]
impl PyTokenizer {
    /// Load from a path to tokenizer.json (or a folder holding one) or from its JSON text.
    #[new]
    fn py_new(source: &Bound<'_, PyAny>) -> PyResult<Self> {
        PyTokenizer::from_any(source)
    }

    #[staticmethod]
    fn from_file(path: PathBuf) -> PyResult<Self> {
        load_tokenizer_file(&path)
    }

    #[staticmethod]
    fn from_str(json: &str) -> PyResult<Self> {
        load_tokenizer_json(json)
    }

    /// Vocabulary size including added tokens (the length of `count_tokens` output).
    #[getter]
    fn vocab_size(&self) -> PyResult<usize> {
        self.vocab.clone().map_err(|e| vocab_error(&e))
    }

    /// Where the tokenizer was loaded from.
    #[getter]
    fn source(&self) -> &str {
        &self.source
    }

    #[pyo3(signature = (texts, *, add_special_tokens=false, num_threads=None))]
    fn count_tokens<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        add_special_tokens: bool,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let vocab = *self.vocab.as_ref().map_err(|e| vocab_error(e))?;
        count_impl(py, texts, self.inner.clone(), vocab, add_special_tokens, num_threads)
    }

    /// Encode every text. Returns `(ids, offsets)`: `ids` uint32 of all tokens
    /// concatenated, `offsets` int64 of length n + 1 (text i is
    /// `ids[offsets[i]:offsets[i+1]]`). `max_length` cuts each sequence (after
    /// special tokens) at `truncation_side` ("right" or "left").
    #[pyo3(signature = (texts, *, add_special_tokens=false, max_length=None, truncation_side="right", num_threads=None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        add_special_tokens: bool,
        max_length: Option<usize>,
        truncation_side: &str,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>)> {
        let side = match truncation_side {
            "right" => Side::Right,
            "left" => Side::Left,
            other => {
                return Err(PyValueError::new_err(format!(
                    "truncation_side must be 'left' or 'right', got {other:?}"
                )))
            }
        };
        let pool = make_pool(num_threads)?;
        let input = extract_texts(texts)?;
        let tok = self.inner.clone();
        let mut ids: Vec<u32> = Vec::new();
        let mut offsets: Vec<i64> = vec![0];
        for_each_batch(input, |batch, first| {
            let (part, offs) = run_parallel(py, pool.as_ref(), || {
                counting::encode_batch(&tok, batch, first, add_special_tokens, max_length, side)
            })
            .map_err(PyErr::from)?;
            let base = ids.len() as i64;
            ids.extend_from_slice(&part);
            offsets.extend(offs[1..].iter().map(|o| o + base));
            Ok(())
        })?;
        Ok((PyArray1::from_vec(py, ids), PyArray1::from_vec(py, offsets)))
    }

    /// Decode ids to text: any 1-D integer numpy array (any integer dtype,
    /// any strides) or a sequence of ints.
    #[pyo3(signature = (ids, *, skip_special_tokens=false))]
    fn decode(&self, ids: &Bound<'_, PyAny>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = decode_ids(ids)?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| PyValueError::new_err(format!("cannot decode: {e}")))
    }

    /// The token string of an id, or None.
    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, or None.
    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn __repr__(&self) -> String {
        match &self.vocab {
            Ok(v) => format!("Tokenizer(source={:?}, vocab_size={v})", self.source),
            Err(_) => format!("Tokenizer(source={:?}, vocab_size=<too sparse to count>)", self.source),
        }
    }
}

/// Count token ids over a corpus: `numpy.ndarray[uint64]` of length
/// `vocab_size` (including added tokens). See the `.pyi` stub for details.
#[pyfunction]
#[pyo3(signature = (texts, tokenizer, *, add_special_tokens=false, num_threads=None))]
pub fn count_tokens<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    tokenizer: &Bound<'py, PyAny>,
    add_special_tokens: bool,
    num_threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let (tok, vocab) = resolve_tokenizer(tokenizer)?;
    count_impl(py, texts, tok, vocab, add_special_tokens, num_threads)
}
