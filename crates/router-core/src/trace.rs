//! W3C Trace Context (`traceparent`): a caller's trace continued into each upstream call.
//!
//! A `traceparent` header is `00-{trace id: 32 hex}-{parent id: 16 hex}-{flags: 2 hex}`. The
//! router keeps the caller's trace id and flags and gives each attempt a span id of its own, so
//! that the upstream's logs (and a tracing backend that receives the router's spans) place
//! every attempt under the caller's request. Version 00 is the only one defined; a header of a
//! later version is read by its first four fields, as the specification asks, and written back
//! as 00. An all-zero trace or parent id is invalid, and so is anything that is not lowercase
//! hex of the right length: such a header is ignored (the caller's trace is not continued).

use std::fmt;

/// One position in a W3C trace: the trace, the span, and the sampled flag.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0_u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

impl TraceContext {
    /// Reads a `traceparent` header; `None` when it is not a valid one.
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let [version] = hex_bytes::<1>(version)?;
        let trace_id = hex_bytes::<16>(parts.next()?)?;
        let span_id = hex_bytes::<8>(parts.next()?)?;
        let [flags] = hex_bytes::<1>(parts.next()?)?;
        // Version ff is forbidden; version 00 has exactly four fields.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A span of the same trace, child of this one, with `span_id` (drawn by the caller: an
    /// all-zero id is replaced by 1).
    #[must_use]
    pub fn child(&self, span_id: u64) -> Self {
        Self {
            span_id: span_id.max(1).to_be_bytes(),
            ..*self
        }
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", u128::from_be_bytes(self.trace_id))
    }

    /// The span id, 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        format!("{:016x}", u64::from_be_bytes(self.span_id))
    }

    /// Whether the caller sampled the trace (flag 01).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The `traceparent` header value.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        write_hex(f, &self.trace_id)?;
        f.write_str("-")?;
        write_hex(f, &self.span_id)?;
        write!(f, "-{:02x}", self.flags)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_reads_and_writes_back_the_same() {
        let context = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(context.to_string(), EXAMPLE);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert!(context.sampled());
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_span_of_its_own() {
        let context = TraceContext::parse(EXAMPLE).unwrap();
        let child = context.child(0xdead_beef);
        assert_eq!(
            child.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000deadbeef-01"
        );
        assert_eq!(context.child(0).span_id(), "0000000000000001");
    }

    #[test]
    fn invalid_headers_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version is read by its first four fields.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more";
        assert_eq!(
            TraceContext::parse(later).unwrap().to_string(),
            EXAMPLE,
            "written back as version 00"
        );
    }
}
