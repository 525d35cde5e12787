//! The wire schema between vigil agents, the collector and analysts' tools
//! (`vigil.proto`, compiled by `build.rs`), plus the few helpers both sides
//! need to speak it the same way: bundle id validation, severity labels,
//! workload keys, the JSON documents of structured messages and the
//! conversion of the agent's JSON lines (agents before 0.2) into messages.
//!
//! Invariant: nothing here knows about storage, TLS or the agent's
//! internals; agent and collector share this crate and nothing else.

#![warn(missing_docs)]

pub mod codec;
pub mod document;
pub mod encoded;
pub mod json;

pub use encoded::EncodedEventBatch;

/// Generated messages and services of package `vigil.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("vigil.v1");
}

pub use v1::*;

/// Length of a bundle id: lowercase hex SHA-256.
pub const BUNDLE_ID_LEN: usize = 64;

/// Whether `id` is a well-formed bundle id: exactly 64 lowercase hex digits.
/// Anything else (upper case, `../`, slashes, NUL, ...) is refused, which is
/// what makes ids safe to use as file names.
pub fn is_valid_bundle_id(id: &str) -> bool {
    id.len() == BUNDLE_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Severity {
    /// The lowercase label: `info`, `low`, `medium`, `high`, `critical`
    /// (`unspecified` for the default).
    pub fn label(self) -> &'static str {
        match self {
            Severity::Unspecified => "unspecified",
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Parses a label, case-insensitively; also accepts `informational`,
    /// `warning` (medium) and `crit`. Unknown labels give `None`.
    pub fn from_label(label: &str) -> Option<Severity> {
        let l = label.trim().to_ascii_lowercase();
        Some(match l.as_str() {
            "info" | "informational" => Severity::Info,
            "low" => Severity::Low,
            "medium" | "warning" | "moderate" => Severity::Medium,
            "high" => Severity::High,
            "critical" | "crit" => Severity::Critical,
            "unspecified" | "" => Severity::Unspecified,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_ids() {
        assert!(is_valid_bundle_id(&"ab".repeat(32)));
        assert!(!is_valid_bundle_id(&"AB".repeat(32)));
        assert!(!is_valid_bundle_id(&"ab".repeat(31)));
        assert!(!is_valid_bundle_id(&format!("../{}", "a".repeat(61))));
        assert!(!is_valid_bundle_id(&format!("{}/", "a".repeat(63))));
        assert!(!is_valid_bundle_id(""));
    }

    #[test]
    fn severity_labels_round_trip_and_order() {
        for s in [
            Severity::Info,
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ] {
            assert_eq!(Severity::from_label(s.label()), Some(s));
        }
        assert_eq!(Severity::from_label("HIGH"), Some(Severity::High));
        assert_eq!(Severity::from_label("bogus"), None);
        assert!((Severity::High as i32) > (Severity::Medium as i32));
    }
}
