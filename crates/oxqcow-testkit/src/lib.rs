//! Test helpers for oxqcow (filled in by the test suite work).
