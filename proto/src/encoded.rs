//! [`EncodedEventBatch`]: an `EventBatch` whose events are already encoded.
//!
//! An agent writes each event's protobuf once, straight from its own types,
//! and appends it to a batch body; sending the batch copies that body
//! once. On the wire it is an ordinary `EventBatch` (a `repeated Event` is
//! a sequence of length-delimited field-2 entries, which is what the body
//! holds), so the collector decodes it as one.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;

/// The field number of `EventBatch.events`: each entry of a body is this
/// field's key, the event's length and the event.
pub const EVENTS_FIELD: u32 = 2;

/// An `EventBatch` with its events kept encoded (see the module docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedEventBatch {
    /// As `EventBatch.batch_id`.
    pub batch_id: String,
    /// The events: field-[`EVENTS_FIELD`] entries, one after another.
    pub events: Bytes,
}

impl EncodedEventBatch {
    /// Appends one encoded `Event` message as an entry of a batch body.
    pub fn append_entry(body: &mut Vec<u8>, event: &[u8]) {
        encoding::encode_key(EVENTS_FIELD, WireType::LengthDelimited, body);
        encoding::encode_varint(event.len() as u64, body);
        body.extend_from_slice(event);
    }
}

impl prost::Message for EncodedEventBatch {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.batch_id.is_empty() {
            encoding::string::encode(1, &self.batch_id, buf);
        }
        buf.put_slice(&self.events);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::string::merge(wire_type, &mut self.batch_id, buf, ctx),
            EVENTS_FIELD => {
                let mut event = Vec::new();
                encoding::bytes::merge(wire_type, &mut event, buf, ctx)?;
                let mut body = Vec::from(std::mem::take(&mut self.events));
                Self::append_entry(&mut body, &event);
                self.events = body.into();
                Ok(())
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let id = if self.batch_id.is_empty() {
            0
        } else {
            encoding::string::encoded_len(1, &self.batch_id)
        };
        id + self.events.len()
    }

    fn clear(&mut self) {
        self.batch_id.clear();
        self.events = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, EventBatch};
    use prost::Message;

    fn events() -> Vec<Event> {
        (0..3)
            .map(|i| Event {
                kind: "exec".into(),
                pid: i,
                argv: vec!["sh".into(), "-c".into(), "x".repeat(200 * i as usize)],
                ..Event::default()
            })
            .collect()
    }

    /// A body of entries is, on the wire, the `EventBatch` of those events;
    /// and an `EventBatch`'s bytes read back as the same body.
    #[test]
    fn an_encoded_batch_is_an_event_batch_on_the_wire() {
        let mut body = Vec::new();
        for e in events() {
            EncodedEventBatch::append_entry(&mut body, &e.encode_to_vec());
        }
        let enc = EncodedEventBatch {
            batch_id: "ev-1-2".into(),
            events: body.into(),
        };
        let plain = EventBatch {
            batch_id: "ev-1-2".into(),
            events: events(),
        };
        assert_eq!(enc.encode_to_vec(), plain.encode_to_vec());
        assert_eq!(enc.encoded_len(), plain.encoded_len());
        assert_eq!(EventBatch::decode(&enc.encode_to_vec()[..]).unwrap(), plain);
        assert_eq!(
            EncodedEventBatch::decode(&plain.encode_to_vec()[..]).unwrap(),
            enc
        );
        // No id, no events: an empty message.
        assert!(EncodedEventBatch::default().encode_to_vec().is_empty());
    }

    /// A truncated entry is a decode error, not a short batch.
    #[test]
    fn a_truncated_body_does_not_decode() {
        let plain = EventBatch {
            batch_id: String::new(),
            events: events(),
        }
        .encode_to_vec();
        let cut = &plain[..plain.len() - 5];
        assert!(EncodedEventBatch::decode(cut).is_err());
        assert!(EventBatch::decode(cut).is_err());
    }
}
