//! The DNS relay's frames on `DNS_RELAY_PORT` (one stream per pod, opened by the host): the
//! guest sends each query it received on 127.0.0.11:53, the host answers each with a frame of
//! the same id (an empty message: no answer). A frame is a 7-byte header, big-endian
//! `[id: u32][flags: u8][len: u16]`, then `len` bytes of DNS message.

/// Bytes before the message.
pub const HEADER_LEN: usize = 7;
/// Flag: the query came over TCP (the host asks upstream over TCP too, so that answers too
/// large for UDP still arrive whole).
pub const FLAG_TCP: u8 = 1;

/// One query or answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsFrame {
    pub id: u32,
    pub tcp: bool,
    pub msg: Vec<u8>,
}

impl DnsFrame {
    /// The frame on the wire; a message longer than 65535 bytes (impossible for DNS) is cut.
    pub fn encode(&self) -> Vec<u8> {
        let len = u16::try_from(self.msg.len()).unwrap_or(u16::MAX);
        let mut out = Vec::with_capacity(HEADER_LEN + usize::from(len));
        out.extend_from_slice(&self.id.to_be_bytes());
        out.push(if self.tcp { FLAG_TCP } else { 0 });
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.msg[..usize::from(len)]);
        out
    }
}

/// A header: (id, tcp, message length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, bool, usize) {
    let id = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let len = u16::from_be_bytes([h[5], h[6]]);
    (id, h[4] & FLAG_TCP != 0, usize::from(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = DnsFrame {
            id: 0x0102_0304,
            tcp: true,
            msg: vec![9; 300],
        };
        let bytes = f.encode();
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&bytes[..HEADER_LEN]);
        assert_eq!(parse_header(&h), (0x0102_0304, true, 300));
        assert_eq!(&bytes[HEADER_LEN..], &f.msg[..]);
    }
}
