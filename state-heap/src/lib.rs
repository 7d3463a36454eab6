//! In-memory keyed state backend (being written).
