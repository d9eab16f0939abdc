//! jobwrap library.
