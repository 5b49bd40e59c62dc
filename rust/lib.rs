//! `deft._native`: the small Rust core of deft.
//!
//! Python owns the user experience; this module does the few things that must be
//! fast: tokenising whole corpora in parallel, counting tokens per id, batch
//! encoding for training, and assigning responses to Q+/Q-.
//!
//! One file per concern: `tokenizer` (the `Tokenizer` class and `count_tokens`),
//! `polarity_binding` (`assign_polarity`), `input` (Python / Arrow conversion),
//! `errors` (`From<Error> for PyErr`); the pure-Rust cores without Python types
//! are `counting`, `polarity` and `texts`.

mod counting;
mod errors;
mod input;
mod polarity;
mod polarity_binding;
mod texts;
mod tokenizer;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_function(wrap_pyfunction!(tokenizer::count_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(polarity_binding::assign_polarity, m)?)?;
    Ok(())
}
