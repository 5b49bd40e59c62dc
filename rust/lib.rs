//! `deft._native`: the small Rust core of deft.
//!
//! Python owns the user experience; this module does the few things that must be
//! fast: tokenising whole corpora in parallel, counting tokens per id, batch
//! encoding for training, and assigning responses to Q+/Q-.

mod counting;
mod polarity;
mod texts;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3_arrow::input::AnyArray;
use tokenizers::Tokenizer as HfTokenizer;

use crate::counting::{for_deft, histogram_len, CountError, Histograms, Side};
use crate::texts::Texts;

/// A tokenizer loaded once from `tokenizer.json` and reused across calls.
#[pyclass(name = "Tokenizer", module = "deft._native", frozen)]
struct PyTokenizer {
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

fn vocab_error(msg: &str) -> PyErr {
    PyValueError::new_err(msg.to_string())
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

/// Texts as received from Python: Arrow data (read in place) or an iterator over
/// Python objects (copied to Rust in bounded batches of `PY_BATCH` rows).
enum Input<'py> {
    Arrow(Texts),
    Iter(Bound<'py, pyo3::types::PyIterator>),
}

/// Rows copied from a Python sequence per GIL-free parallel step; bounds the
/// memory of the copy whatever the corpus size.
const PY_BATCH: usize = 16_384;

/// Accept a Python list/tuple/iterable of str, or any Arrow array/stream
/// (pyarrow, Polars Series, anything with `__arrow_c_array__`/`__arrow_c_stream__`).
fn extract_texts<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Input<'py>> {
    let py = obj.py();
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "texts must be a sequence or Arrow array of strings, not a single str (wrap it in a list)",
        ));
    }
    if obj.hasattr(pyo3::intern!(py, "__arrow_c_array__"))?
        || obj.hasattr(pyo3::intern!(py, "__arrow_c_stream__"))?
    {
        let any: AnyArray = obj.extract()?;
        let reader = any.into_reader()?;
        let chunks = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PyValueError::new_err(format!("cannot read Arrow data: {e}")))?;
        return Texts::from_arrow(chunks).map(Input::Arrow).map_err(PyTypeError::new_err);
    }
    match obj.try_iter() {
        Ok(it) => Ok(Input::Iter(it)),
        Err(_) => Err(PyTypeError::new_err(format!(
            "texts must be a list of str, a Polars Series, a pyarrow array or an Arrow \
             PyCapsule exporter, not {}",
            obj.get_type().name()?
        ))),
    }
}

/// Call `f(texts, first_row)` on the whole Arrow input, or on successive batches
/// of at most `PY_BATCH` rows copied out of a Python iterator.
fn for_each_batch<'py>(
    input: Input<'py>,
    mut f: impl FnMut(&Texts, usize) -> PyResult<()>,
) -> PyResult<()> {
    match input {
        Input::Arrow(texts) => f(&texts, 0),
        Input::Iter(it) => {
            let mut row = 0usize;
            let mut batch: Vec<Option<String>> = Vec::with_capacity(PY_BATCH);
            for item in it {
                let item = item?;
                if item.is_none() {
                    batch.push(None);
                } else if let Ok(s) = item.cast::<PyString>() {
                    batch.push(Some(s.to_cow()?.into_owned()));
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "texts[{}] is {}, expected str or None",
                        row + batch.len(),
                        item.get_type().name()?
                    )));
                }
                if batch.len() == PY_BATCH {
                    let texts = Texts::Owned(std::mem::take(&mut batch));
                    f(&texts, row)?;
                    row += PY_BATCH;
                }
            }
            if !batch.is_empty() || row == 0 {
                f(&Texts::Owned(batch), row)?;
            }
            Ok(())
        }
    }
}

fn count_error(e: CountError) -> PyErr {
    match e {
        CountError::Memory { .. } => PyMemoryError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
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
    let hists = run_parallel(py, pool.as_ref(), || Histograms::new(vocab)).map_err(count_error)?;
    for_each_batch(input, |batch, first| {
        run_parallel(py, pool.as_ref(), || {
            counting::count_tokens_into(&tok, batch, add_special_tokens, first, &hists)
        })
        .map_err(count_error)
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
            .map_err(count_error)?;
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

fn id_error(index: usize, value: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!(
        "ids[{index}] = {value} is not a token id (ids must be integers in 0..2**32)"
    ))
}

/// Token ids for `decode`: a 1-D numpy array of any integer dtype and any
/// strides (copied), or any iterable of Python ints (numpy integer scalars too).
fn decode_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        if a.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "ids must be a 1-D array of token ids, got a {}-D array",
                a.ndim()
            )));
        }
        let kind = a.dtype().kind();
        if kind != b'i' && kind != b'u' {
            return Err(PyTypeError::new_err(format!(
                "ids must be an integer array, got dtype {}",
                a.dtype().str()?
            )));
        }
        if let Ok(a) = obj.cast::<PyArray1<u32>>() {
            if let Ok(v) = a.to_vec() {
                return Ok(v);
            }
        }
        let wide = a.call_method1(pyo3::intern!(obj.py(), "astype"), (if kind == b'i' { "int64" } else { "uint64" },))?;
        return if kind == b'i' {
            let w = wide.cast::<PyArray1<i64>>()?.readonly();
            w.as_array().iter().enumerate().map(|(i, &v)| u32::try_from(v).map_err(|_| id_error(i, v))).collect()
        } else {
            let w = wide.cast::<PyArray1<u64>>()?.readonly();
            w.as_array().iter().enumerate().map(|(i, &v)| u32::try_from(v).map_err(|_| id_error(i, v))).collect()
        };
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(PyTypeError::new_err(format!(
            "ids must be a sequence of ints or a 1-D integer array, not {}",
            obj.get_type().name()?
        )));
    }
    let it = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "ids must be a sequence of ints or a 1-D integer array, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let mut out = Vec::new();
    for (i, item) in it.enumerate() {
        let item = item?;
        match item.extract::<i64>() {
            Ok(v) => out.push(u32::try_from(v).map_err(|_| id_error(i, v))?),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => return Err(id_error(i, item.str()?)),
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "ids[{i}] is {}, expected an int",
                    item.get_type().name()?
                )))
            }
        }
    }
    Ok(out)
}

/// Count token ids over a corpus: `numpy.ndarray[uint64]` of length
/// `vocab_size` (including added tokens). See the `.pyi` stub for details.
#[pyfunction]
#[pyo3(signature = (texts, tokenizer, *, add_special_tokens=false, num_threads=None))]
fn count_tokens<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    tokenizer: &Bound<'py, PyAny>,
    add_special_tokens: bool,
    num_threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let (tok, vocab) = resolve_tokenizer(tokenizer)?;
    count_impl(py, texts, tok, vocab, add_special_tokens, num_threads)
}


fn arrow_chunks(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<arrow_array::ArrayRef>> {
    let any: AnyArray = obj.extract().map_err(|e| {
        PyTypeError::new_err(format!("{what} must be an Arrow array, a Polars Series or a pyarrow array ({e})"))
    })?;
    any.into_reader()?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PyValueError::new_err(format!("cannot read Arrow data of {what}: {e}")))
}

/// Flatten an Arrow list<double> column (List or LargeList) into per-row slices.
fn list_rows<O: arrow_array::OffsetSizeTrait>(
    arr: &arrow_array::GenericListArray<O>,
    first_row: usize,
    mut f: impl FnMut(usize, Option<&[f64]>) -> PyResult<()>,
) -> PyResult<()> {
    use arrow_array::Array;
    let values = arr
        .values()
        .as_any()
        .downcast_ref::<arrow_array::Float64Array>()
        .ok_or_else(|| {
            PyTypeError::new_err(format!(
                "scores must be a list of float64, got list of {}",
                arr.values().data_type()
            ))
        })?;
    // `value_offsets()` is already the (possibly sliced) array's own window
    // into `values`, which may hold more (hidden) entries than the rows use:
    // only the values a visible non-null row references are read or checked.
    let vals = values.values();
    let nulls = values.nulls().filter(|n| n.null_count() > 0);
    let offs = arr.value_offsets();
    for i in 0..arr.len() {
        if arr.is_null(i) {
            f(first_row + i, None)?;
            continue;
        }
        let (a, b) = (offs[i].as_usize(), offs[i + 1].as_usize());
        if let Some(n) = nulls {
            if let Some(k) = (a..b).find(|&k| n.is_null(k)) {
                return Err(PyValueError::new_err(format!(
                    "row {}: field 'scores[{}]': null entry inside a list",
                    first_row + i,
                    k - a
                )));
            }
        }
        f(first_row + i, Some(&vals[a..b]))?;
    }
    Ok(())
}

/// Hand an Arrow array to Python as a `pyarrow.Array` (through the PyCapsule interface, no copy).
fn to_pyarrow(py: Python<'_>, arr: arrow_array::ArrayRef) -> PyResult<Bound<'_, PyAny>> {
    let obj = Bound::new(py, pyo3_arrow::PyArray::from_array_ref(arr))?;
    py.import(pyo3::intern!(py, "pyarrow"))?.getattr(pyo3::intern!(py, "array"))?.call1((obj,))
}

fn large_list(values: arrow_array::ArrayRef, offsets: Vec<i64>) -> PyResult<arrow_array::ArrayRef> {
    let field = Arc::new(arrow_schema::Field::new("item", values.data_type().clone(), false));
    let arr = arrow_array::LargeListArray::try_new(
        field,
        arrow_buffer::OffsetBuffer::new(offsets.into()),
        values,
        None,
    )
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(Arc::new(arr))
}

/// DEFT's Q+/Q- assignment over a whole column. `scores`: Arrow list<double>
/// (a Polars Series or pyarrow array), one list per sample; `levels`: Arrow
/// uint8 codes, 0 = A, 1 = B, 2 = C. Returns three pyarrow large_list arrays,
/// all best-first: `order` (uint32 original indices), `normalised` (float64)
/// and `polarity` (int8: 1 = Q+, -1 = Q-, 0 = neither). See the `.pyi` stub.
#[pyfunction]
#[pyo3(signature = (scores, levels, *, a_pos=Some(0.8), a_neg=None, b_pos=Some(0.9), b_neg=Some(0.1), c_pos=None, c_neg=Some(0.2)))]
#[allow(clippy::too_many_arguments)]
fn assign_polarity<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    levels: &Bound<'py, PyAny>,
    a_pos: Option<f64>,
    a_neg: Option<f64>,
    b_pos: Option<f64>,
    b_neg: Option<f64>,
    c_pos: Option<f64>,
    c_neg: Option<f64>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    use arrow_array::{Array, Float64Array, Int8Array, UInt32Array, UInt8Array};
    use polarity::{PolarityError, Rule};
    for (name, v) in [("a_pos", a_pos), ("a_neg", a_neg), ("b_pos", b_pos), ("b_neg", b_neg), ("c_pos", c_pos), ("c_neg", c_neg)] {
        polarity::check_threshold(name, v).map_err(PyValueError::new_err)?;
    }
    let rules = [
        Rule { pos: a_pos, neg: a_neg },
        Rule { pos: b_pos, neg: b_neg },
        Rule { pos: c_pos, neg: c_neg },
    ];
    let mut codes: Vec<u8> = Vec::new();
    for chunk in arrow_chunks(levels, "levels")? {
        let a = chunk.as_any().downcast_ref::<UInt8Array>().ok_or_else(|| {
            PyTypeError::new_err(format!("levels must be uint8 codes (0=A, 1=B, 2=C), got {}", chunk.data_type()))
        })?;
        if a.null_count() > 0 {
            return Err(PyValueError::new_err("field 'level': contains nulls"));
        }
        codes.extend_from_slice(a.values());
    }
    let chunks = arrow_chunks(scores, "scores")?;
    let n_rows: usize = chunks.iter().map(|c| c.len()).sum();
    if n_rows != codes.len() {
        return Err(PyValueError::new_err(format!(
            "scores has {n_rows} rows but levels has {}",
            codes.len()
        )));
    }
    let (mut order, mut norm, mut pol) = (Vec::new(), Vec::new(), Vec::new());
    let mut offsets: Vec<i64> = Vec::with_capacity(n_rows + 1);
    offsets.push(0);
    let mut first = 0usize;
    for chunk in &chunks {
        let mut visit = |row: usize, s: Option<&[f64]>| -> PyResult<()> {
            let s = s.ok_or(PolarityError::Null { row }).map_err(|e| PyValueError::new_err(e.to_string()))?;
            let code = codes[row];
            let rule = rules.get(code as usize).ok_or_else(|| {
                PyValueError::new_err(PolarityError::BadLevel { row, code }.to_string())
            })?;
            polarity::assign(row, s, rule, &mut order, &mut norm, &mut pol)
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
            offsets.push(order.len() as i64);
            Ok(())
        };
        let any = chunk.as_any();
        if let Some(a) = any.downcast_ref::<arrow_array::LargeListArray>() {
            py.detach(|| list_rows(a, first, &mut visit))?;
        } else if let Some(a) = any.downcast_ref::<arrow_array::ListArray>() {
            py.detach(|| list_rows(a, first, &mut visit))?;
        } else {
            return Err(PyTypeError::new_err(format!(
                "scores must be an Arrow list of float64, got {}",
                chunk.data_type()
            )));
        }
        first += chunk.len();
    }
    let order = large_list(Arc::new(UInt32Array::from(order)), offsets.clone())?;
    let norm = large_list(Arc::new(Float64Array::from(norm)), offsets.clone())?;
    let pol = large_list(Arc::new(Int8Array::from(pol)), offsets)?;
    Ok((to_pyarrow(py, order)?, to_pyarrow(py, norm)?, to_pyarrow(py, pol)?))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(count_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(assign_polarity, m)?)?;
    Ok(())
}
