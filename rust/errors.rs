//! Error mapping: how the pure-Rust errors of `counting` and `polarity` reach
//! Python (`From<Error> for PyErr`), and the messages the bindings raise.

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::PyErr;

use crate::counting::CountError;
use crate::polarity::PolarityError;

/// Out of memory for the histograms: `MemoryError`; anything else about the
/// texts or the tokenizer: `ValueError`.
impl From<CountError> for PyErr {
    fn from(e: CountError) -> PyErr {
        match e {
            CountError::Memory { .. } => PyMemoryError::new_err(e.to_string()),
            _ => PyValueError::new_err(e.to_string()),
        }
    }
}

/// A bad row of scores or level codes: `ValueError` naming the row.
impl From<PolarityError> for PyErr {
    fn from(e: PolarityError) -> PyErr {
        PyValueError::new_err(e.to_string())
    }
}

/// A tokenizer that cannot be counted with (why, from `histogram_len`).
pub fn vocab_error(msg: &str) -> PyErr {
    PyValueError::new_err(msg.to_string())
}

/// An entry of `decode`'s ids that is not a token id.
pub fn id_error(index: usize, value: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!(
        "ids[{index}] = {value} is not a token id (ids must be integers in 0..2**32)"
    ))
}
