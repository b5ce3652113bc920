//! The debug console's byte stream between `cocoon exec` and the shim (the admin endpoint's
//! `POST /exec`, upgraded): frames of one kind byte, a big-endian u32 length and the payload.
//! One connection carries stdin, stdout, stderr, window sizes and the exit status, where a
//! container exec has a FIFO per stream and a Wait call. Docker's attach framing has the same
//! shape (a stream byte and a length) but no way to carry the exit status or a resize.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client to shim: bytes for the process's stdin.
    Stdin = 0,
    /// Client to shim: the client's stdin ended.
    StdinEnd = 1,
    /// Client to shim: the terminal's size, rows then columns, u16 each.
    Resize = 2,
    /// Shim to client: the process's output.
    Stdout = 3,
    Stderr = 4,
    /// Shim to client: the process exited with this status (i32; 128+n for signal n). Last.
    Exit = 5,
    /// Shim to client: the session failed (text). Last.
    Error = 6,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Stdin,
            1 => Kind::StdinEnd,
            2 => Kind::Resize,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            5 => Kind::Exit,
            6 => Kind::Error,
            _ => return None,
        })
    }
}

/// The largest payload a frame may carry: a reader refuses more, so a peer can't make it
/// allocate without bound.
pub const MAX_FRAME: usize = 1 << 20;

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("console frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Reads one frame; `None` at a clean end of the stream.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let kind = Kind::from_byte(head[0])
        .ok_or_else(|| std::io::Error::other(format!("unknown console frame {}", head[0])))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other("console frame too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((kind, payload)))
}

/// A [`Kind::Resize`] payload.
pub fn resize_payload(rows: u16, cols: u16) -> [u8; 4] {
    let mut p = [0u8; 4];
    p[..2].copy_from_slice(&rows.to_be_bytes());
    p[2..].copy_from_slice(&cols.to_be_bytes());
    p
}

/// Rows and columns from a [`Kind::Resize`] payload.
pub fn parse_resize(p: &[u8]) -> Option<(u16, u16)> {
    let p: [u8; 4] = p.try_into().ok()?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, Kind::Stdout, b"hello").await.unwrap();
        write_frame(&mut a, Kind::Resize, &resize_payload(24, 80))
            .await
            .unwrap();
        write_frame(&mut a, Kind::Exit, &7i32.to_be_bytes())
            .await
            .unwrap();
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((Kind::Stdout, b"hello".to_vec()))
        );
        let (k, p) = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((k, parse_resize(&p)), (Kind::Resize, Some((24, 80))));
        let (k, p) = read_frame(&mut b).await.unwrap().unwrap();
        assert_eq!((k, p), (Kind::Exit, 7i32.to_be_bytes().to_vec()));
        assert_eq!(read_frame(&mut b).await.unwrap(), None);

        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[9, 0, 0, 0, 0])
            .await
            .unwrap();
        assert!(read_frame(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, &[3, 0xff, 0xff, 0xff, 0xff])
            .await
            .unwrap();
        assert!(read_frame(&mut b).await.is_err());
    }
}
