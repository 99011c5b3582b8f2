//! End-to-end tests live in `tests/tests/`: Fairlead's components together,
//! against the embedded API server (and, as later issues land, the sandbox).
