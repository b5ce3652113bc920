//! The port-forward stream (vsock port [`crate::FORWARD_PORT`]): after the hello, raw TCP
//! bytes both ways. Both ends relay it the same way, so the relay is part of the protocol.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Copies both ways until either side ends, then closes both, as containerd's own forward
/// does. Waiting for both directions instead would hang: a half-close does not cross hybrid
/// vsock, so one end would never see the other's end of stream.
pub async fn splice<A, B>(a: A, b: B)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::select! {
        _ = tokio::io::copy(&mut ar, &mut bw) => { let _ = bw.shutdown().await; }
        _ = tokio::io::copy(&mut br, &mut aw) => { let _ = aw.shutdown().await; }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn bytes_cross_both_ways_and_one_end_closing_closes_the_other() {
        let (mut client, near) = tokio::io::duplex(64);
        let (far, mut server) = tokio::io::duplex(64);
        let relay = tokio::spawn(splice(near, far));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // The server ends; the client sees its end of stream although it never closed.
        drop(server);
        let mut rest = vec![];
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        relay.await.unwrap();
    }
}
