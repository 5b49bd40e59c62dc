//! `deft._native.assign_polarity`: DEFT's Q+/Q- rules (`polarity`) over whole
//! Arrow columns of scores and level codes.

use std::sync::Arc;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::input::{arrow_chunks, large_list, list_rows, to_pyarrow};
use crate::polarity::{self, PolarityError, Rule};

/// DEFT's Q+/Q- assignment over a whole column. `scores`: Arrow list<double>
/// (a Polars Series or pyarrow array), one list per sample; `levels`: Arrow
/// uint8 codes, 0 = A, 1 = B, 2 = C. Returns three pyarrow large_list arrays,
/// all best-first: `order` (uint32 original indices), `normalised` (float64)
/// and `polarity` (int8: 1 = Q+, -1 = Q-, 0 = neither). See the `.pyi` stub.
#[pyfunction]
#[pyo3(signature = (scores, levels, *, a_pos=Some(0.8), a_neg=None, b_pos=Some(0.9), b_neg=Some(0.1), c_pos=None, c_neg=Some(0.2)))]
#[allow(clippy::too_many_arguments)]
pub fn assign_polarity<'py>(
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
            let s = s.ok_or(PolarityError::Null { row })?;
            let code = codes[row];
            let rule = rules.get(code as usize).ok_or(PolarityError::BadLevel { row, code })?;
            polarity::assign(row, s, rule, &mut order, &mut norm, &mut pol)?;
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
