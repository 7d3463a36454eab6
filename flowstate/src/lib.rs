//! Flowstate facade (work in progress).
