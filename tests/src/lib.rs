//! Test harness for lb privileged tests.
