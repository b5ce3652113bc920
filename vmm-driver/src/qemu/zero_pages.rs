//! Dropping guest RAM's zero pages from a saved template.
//!
//! QEMU's migration stream records every page of guest RAM, a zero page as a one-byte
//! record. On load, QEMU 7.2 checks each zero page of the destination before it writes it
//! (`ram_handle_compressed`: `buffer_is_zero`, then `memset` if not), and reading a page of the
//! pod's fresh memfd makes the kernel allocate it. So a restore touched all of guest RAM: a
//! 256 MiB guest with 79 MiB of data took ~290 ms to load and held 256 MiB of shared memory
//! until free page reporting gave the rest back, against ~90 ms and 79 MiB without the zero
//! records (the guest's memory after the restore compared equal, byte for byte).
//!
//! A restore always loads into a new memfd, which reads as zeroes, so a zero record of that
//! block carries nothing unless the same page had data earlier in the stream (a page zeroed
//! during a live migration; a template is saved stopped, one record per page). Those are
//! dropped once, after the template is saved. Only those: the ROM blocks (firmware, ACPI
//! tables) are filled by QEMU before the load and keep theirs.
//!
//! The rewrite touches only the RAM section at the start of the stream and copies everything
//! from the first other section on unchanged (device state has no length prefix to parse it
//! by). Anything it does not expect (a capability that adds fields, another record type) makes
//! it leave the stream alone: the template stays valid, only bigger and slower to load.

/// QEMU_VM_SECTION_START, _PART, _END and the per-section footer (`migration/savevm.c`).
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FOOTER: u8 = 0x7e;
/// The RAM section's version (`ram_mig_init`); another would be a format not checked here.
const RAM_VERSION: u32 = 4;
/// Record flags in the low bits of each record's offset (`migration/ram.c`).
const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
const FLAG_MASK: u64 = 0xfff;
/// x86's target page size.
const PAGE: usize = 4096;

/// A rewritten stream and what was taken out.
#[derive(Debug)]
pub(crate) struct Stripped {
    pub stream: Vec<u8>,
    pub dropped_pages: u64,
}

/// `stream` without the zero-page records of RAM block `block`; `Err` says why it was left
/// as it is.
pub(crate) fn strip_zero_pages(stream: &[u8], block: &str) -> Result<Stripped, String> {
    let mut r = Reader { s: stream, p: 0 };
    let header = r.take(8)?;
    if header != b"QEVM\0\0\0\x03" {
        return Err("not a version 3 QEMU migration stream".into());
    }
    let (start, section_id) = find_ram_section(stream)?;
    r.p = start;
    let mut out = Vec::with_capacity(stream.len());
    out.extend_from_slice(&stream[..start]);
    let mut current: Option<&[u8]> = None;
    let mut last_written: Option<&[u8]> = None;
    let mut dropped = 0u64;
    // Pages of `block` given data earlier in the stream: a later zero record for one of them
    // (zeroed while a live migration ran) must stay.
    let mut written = std::collections::HashSet::new();
    loop {
        let at = r.p;
        let word = r.be64()?;
        let (flags, addr) = (word & FLAG_MASK, word & !FLAG_MASK);
        if flags & FLAG_MEM_SIZE != 0 {
            if flags != FLAG_MEM_SIZE {
                return Err(format!("a block list with flags {flags:#x}"));
            }
            r.block_list(addr)?;
            out.extend_from_slice(&stream[at..r.p]);
            continue;
        }
        if flags == FLAG_EOS {
            out.extend_from_slice(&stream[at..r.p]);
            if r.peek()? == SECTION_FOOTER {
                out.extend_from_slice(r.take(5)?);
            }
            let kind = r.peek()?;
            let next_id = stream.get(r.p + 1..r.p + 5);
            if matches!(kind, SECTION_PART | SECTION_END)
                && next_id == Some(&section_id.to_be_bytes()[..])
            {
                out.extend_from_slice(r.take(5)?);
                // Each section names its first block again.
                last_written = None;
                continue;
            }
            out.extend_from_slice(&stream[r.p..]);
            return Ok(Stripped {
                stream: out,
                dropped_pages: dropped,
            });
        }
        let kind = flags & !FLAG_CONTINUE;
        if kind != FLAG_ZERO && kind != FLAG_PAGE {
            return Err(format!("a page record with flags {flags:#x}"));
        }
        if flags & FLAG_CONTINUE == 0 {
            current = Some(r.name()?);
        }
        let name = current.ok_or("a page record before any block was named")?;
        let body = r.take(if kind == FLAG_ZERO { 1 } else { PAGE })?;
        if name == block.as_bytes() {
            if kind == FLAG_ZERO && body == [0] && !written.contains(&addr) {
                dropped += 1;
                continue;
            }
            written.insert(addr);
        }
        if last_written == Some(name) {
            out.extend_from_slice(&(addr | kind | FLAG_CONTINUE).to_be_bytes());
        } else {
            out.extend_from_slice(&(addr | kind).to_be_bytes());
            out.push(u8::try_from(name.len()).map_err(|_| "a block name over 255 bytes")?);
            out.extend_from_slice(name);
            last_written = Some(name);
        }
        out.extend_from_slice(body);
    }
}

/// Where the first record of the RAM section starts, and the section's id: the section start
/// whose name is `ram` at the RAM version, followed by a block list.
fn find_ram_section(s: &[u8]) -> Result<(usize, u32), String> {
    let name = b"\x03ram";
    let mut from = 8;
    while let Some(i) = s[from..].windows(name.len()).position(|w| w == name) {
        let at = from + i;
        from = at + 1;
        // START, section id (4), name, instance id (4), version (4).
        let Some(start) = at.checked_sub(5) else {
            continue;
        };
        let body = at + name.len() + 8;
        let version = s
            .get(body - 4..body)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        let next = s.get(body..body + 8).map(|v| {
            u64::from_be_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]) & FLAG_MASK
        });
        if s[start] == SECTION_START && version == Some(RAM_VERSION) && next == Some(FLAG_MEM_SIZE)
        {
            let id = u32::from_be_bytes([s[at - 4], s[at - 3], s[at - 2], s[at - 1]]);
            return Ok((body, id));
        }
    }
    Err("no RAM section in the stream".into())
}

struct Reader<'a> {
    s: &'a [u8],
    p: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s: &'a [u8] = self.s;
        let v = s
            .get(self.p..self.p + n)
            .ok_or_else(|| format!("the stream ends at byte {}", self.s.len()))?;
        self.p += n;
        Ok(v)
    }

    fn peek(&self) -> Result<u8, String> {
        self.s
            .get(self.p)
            .copied()
            .ok_or_else(|| "the stream ends".into())
    }

    fn be64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn name(&mut self) -> Result<&'a [u8], String> {
        let len = usize::from(self.take(1)?[0]);
        self.take(len)
    }

    /// Each block's name and size, which must add up to `total`: a capability that adds a
    /// field per block (postcopy page sizes, ignore-shared addresses) would not.
    fn block_list(&mut self, total: u64) -> Result<(), String> {
        let mut left = total;
        while left > 0 {
            self.name()?;
            let size = self.be64()?;
            left = left
                .checked_sub(size)
                .ok_or("the RAM block list does not add up (a capability adds fields)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Guest memory by (block, page address).
    type Memory = HashMap<(String, u64), Vec<u8>>;

    fn record(out: &mut Vec<u8>, addr: u64, flags: u64, name: Option<&str>, body: &[u8]) {
        out.extend_from_slice(&(addr | flags).to_be_bytes());
        if let Some(n) = name {
            out.push(n.len() as u8);
            out.extend_from_slice(n.as_bytes());
        }
        out.extend_from_slice(body);
    }

    /// A stream shaped like QEMU's: a config section, the RAM section's setup part (block
    /// list), two iterations, then device state and EOF, which must come through untouched.
    fn stream() -> Vec<u8> {
        let mut s = b"QEVM\0\0\0\x03".to_vec();
        s.extend_from_slice(b"\x07\x0apc-q35-7.2\x03ram-ish"); // configuration
        s.push(SECTION_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(b"\x03ram");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&RAM_VERSION.to_be_bytes());
        record(&mut s, 4 * 4096 + 4096, FLAG_MEM_SIZE, None, b"");
        for (n, size) in [("mem", 4 * 4096u64), ("rom", 4096)] {
            s.push(n.len() as u8);
            s.extend_from_slice(n.as_bytes());
            s.extend_from_slice(&size.to_be_bytes());
        }
        record(&mut s, 0, FLAG_EOS, None, b"");
        s.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        s.push(SECTION_PART);
        s.extend_from_slice(&2u32.to_be_bytes());
        record(&mut s, 0, FLAG_ZERO, Some("mem"), &[0]);
        record(&mut s, 4096, FLAG_PAGE | FLAG_CONTINUE, None, &[7; PAGE]);
        record(&mut s, 8192, FLAG_ZERO | FLAG_CONTINUE, None, &[0]);
        record(&mut s, 0, FLAG_ZERO, Some("rom"), &[0]);
        record(&mut s, 12288, FLAG_PAGE, Some("mem"), &[9; PAGE]);
        record(&mut s, 0, FLAG_EOS, None, b"");
        s.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        s.push(SECTION_END);
        s.extend_from_slice(&2u32.to_be_bytes());
        record(&mut s, 8192, FLAG_ZERO, Some("mem"), &[0]);
        record(&mut s, 4096, FLAG_ZERO | FLAG_CONTINUE, None, &[0]);
        record(&mut s, 0, FLAG_EOS, None, b"");
        s.extend_from_slice(&[SECTION_FOOTER, 0, 0, 0, 2]);
        s.extend_from_slice(b"\x04\0\0\0\x03\x05timer\0\0\0\0\0\0\0\x02device state\x09");
        s
    }

    /// Loads a stream the way QEMU does into fresh memory (every page zero, `rom` all 0xff as
    /// QEMU fills ROMs before a load) and returns it, with the bytes after the RAM section.
    fn load(s: &[u8]) -> (Memory, Vec<u8>) {
        let mut mem = HashMap::new();
        mem.insert(("rom".to_owned(), 0), vec![0xff; PAGE]);
        let (mut p, _) = find_ram_section(s).unwrap();
        let mut r = Reader { s, p };
        let mut block = String::new();
        loop {
            let w = r.be64().unwrap();
            let (flags, addr) = (w & FLAG_MASK, w & !FLAG_MASK);
            if flags == FLAG_MEM_SIZE {
                r.block_list(addr).unwrap();
                continue;
            }
            if flags == FLAG_EOS {
                if r.peek().unwrap() == SECTION_FOOTER {
                    r.take(5).unwrap();
                }
                if matches!(r.peek().unwrap(), SECTION_PART | SECTION_END) {
                    r.take(5).unwrap();
                    continue;
                }
                p = r.p;
                return (mem, s[p..].to_vec());
            }
            if flags & FLAG_CONTINUE == 0 {
                block = String::from_utf8(r.name().unwrap().to_vec()).unwrap();
            }
            let page = if flags & FLAG_ZERO != 0 {
                vec![r.take(1).unwrap()[0]; PAGE]
            } else {
                r.take(PAGE).unwrap().to_vec()
            };
            mem.insert((block.clone(), addr), page);
        }
    }

    fn non_zero(mem: &Memory) -> Memory {
        mem.iter()
            .filter(|(_, v)| v.iter().any(|b| *b != 0))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    #[test]
    fn zero_pages_of_the_ram_block_go_and_nothing_else_changes() {
        let s = stream();
        let out = strip_zero_pages(&s, "mem").unwrap();
        // mem 0 and 8192 (twice); not 4096, which had data before it was zeroed.
        assert_eq!(out.dropped_pages, 3);
        assert!(out.stream.len() < s.len());
        let (before, rest_before) = load(&s);
        let (after, rest_after) = load(&out.stream);
        assert!(
            non_zero(&before) == non_zero(&after),
            "the loaded memory differs"
        );
        // The ROM's zero page is still written over its 0xff fill.
        assert!(after[&("rom".to_owned(), 0)] == vec![0; PAGE]);
        assert_eq!(rest_before, rest_after);
        assert!(rest_after.ends_with(b"device state\x09"));
        // Stripping again finds nothing more.
        assert_eq!(
            strip_zero_pages(&out.stream, "mem").unwrap().dropped_pages,
            0
        );
    }

    #[test]
    fn streams_it_does_not_know_are_left_alone() {
        let s = stream();
        assert!(strip_zero_pages(&s[..s.len() / 2], "mem").is_err());
        assert!(strip_zero_pages(b"QEVM\0\0\0\x02", "mem").is_err());
        // A page record with another flag (XBZRLE).
        let mut other = s.clone();
        let at = other.windows(4).position(|w| w == b"\x03mem").unwrap() - 8;
        other[at + 7] |= 0x40;
        assert!(strip_zero_pages(&other, "mem").is_err());
        // A block list with an extra field per block (ignore-shared) does not add up.
        let mut extra = s.clone();
        let list = extra.windows(4).position(|w| w == b"\x03rom").unwrap() + 12;
        extra.splice(list..list, 0u64.to_be_bytes());
        assert!(strip_zero_pages(&extra, "mem").is_err());
    }
}
