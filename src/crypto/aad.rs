//! Canonical, unambiguous associated data: a domain label, then length-prefixed fields.

/// Builds AAD as `len(label) ‖ label ‖ len(f1) ‖ f1 ‖ …` with 8-byte big-endian lengths, so no
/// two different field lists encode to the same bytes and no context can be confused with
/// another (each has its own label).
pub(crate) struct AadBuilder(Vec<u8>);

impl AadBuilder {
    pub(crate) fn new(label: &'static str) -> Self {
        AadBuilder(Vec::with_capacity(128)).field(label.as_bytes())
    }

    pub(crate) fn field(mut self, bytes: &[u8]) -> Self {
        // usize is at most 64 bits on every platform Rust supports, so this is lossless.
        self.0
            .extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aad_fields_cannot_be_shifted_between_each_other() {
        let a = AadBuilder::new("l").field(b"ab").field(b"c").finish();
        let b = AadBuilder::new("l").field(b"a").field(b"bc").finish();
        assert_ne!(a, b);
    }

    #[test]
    fn aad_labels_separate_contexts() {
        let a = AadBuilder::new("one").field(b"x").finish();
        let b = AadBuilder::new("two").field(b"x").finish();
        assert_ne!(a, b);
    }
}
