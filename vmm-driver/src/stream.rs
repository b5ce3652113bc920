//! A connected byte stream to a guest port, whatever carries it (vsock, the serial channel).

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connected byte stream to a guest port, whatever the transport.
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + std::fmt::Debug> GuestStream for T {}

/// A boxed [`GuestStream`].
pub type BoxedStream = Pin<Box<dyn GuestStream>>;
