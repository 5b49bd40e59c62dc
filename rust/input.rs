//! Input and output conversion between Python and Rust: texts (a Python
//! iterable of str, or Arrow data from Polars / pyarrow / any PyCapsule
//! exporter, read in place), token ids for `decode`, Arrow list columns, and
//! Arrow arrays handed back to Python as `pyarrow.Array`.

use std::sync::Arc;

use numpy::{PyArray1, PyArrayDescrMethods, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyString;
use pyo3_arrow::input::AnyArray;

use crate::errors::id_error;
use crate::texts::Texts;

/// Texts as received from Python: Arrow data (read in place) or an iterator over
/// Python objects (copied to Rust in bounded batches of `PY_BATCH` rows).
pub enum Input<'py> {
    Arrow(Texts),
    Iter(Bound<'py, pyo3::types::PyIterator>),
}

/// Rows copied from a Python sequence per GIL-free parallel step; bounds the
/// memory of the copy whatever the corpus size.
const PY_BATCH: usize = 16_384;

/// Accept a Python list/tuple/iterable of str, or any Arrow array/stream
/// (pyarrow, Polars Series, anything with `__arrow_c_array__`/`__arrow_c_stream__`).
pub fn extract_texts<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Input<'py>> {
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
pub fn for_each_batch<'py>(
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

/// Token ids for `decode`: a 1-D numpy array of any integer dtype and any
/// strides (copied), or any iterable of Python ints (numpy integer scalars too).
pub fn decode_ids(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
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

/// The chunks of an Arrow array or stream argument (`what` names it in errors).
pub fn arrow_chunks(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<arrow_array::ArrayRef>> {
    let any: AnyArray = obj.extract().map_err(|e| {
        PyTypeError::new_err(format!("{what} must be an Arrow array, a Polars Series or a pyarrow array ({e})"))
    })?;
    any.into_reader()?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PyValueError::new_err(format!("cannot read Arrow data of {what}: {e}")))
}

/// Flatten an Arrow list<double> column (List or LargeList) into per-row slices.
pub fn list_rows<O: arrow_array::OffsetSizeTrait>(
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
pub fn to_pyarrow(py: Python<'_>, arr: arrow_array::ArrayRef) -> PyResult<Bound<'_, PyAny>> {
    let obj = Bound::new(py, pyo3_arrow::PyArray::from_array_ref(arr))?;
    py.import(pyo3::intern!(py, "pyarrow"))?.getattr(pyo3::intern!(py, "array"))?.call1((obj,))
}

pub fn large_list(values: arrow_array::ArrayRef, offsets: Vec<i64>) -> PyResult<arrow_array::ArrayRef> {
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

