//! Placeholder: the collector work fills this in.
