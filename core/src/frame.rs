//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes. dispy uses the
//! same header; the native protocol adds a hard bound so a peer cannot make us allocate at will.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed inside a frame ({got} of {expected} bytes received)")]
    Truncated { expected: usize, got: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The largest payload a 4-byte header can describe.
pub const MAX_LEN: usize = u32::MAX as usize;

/// Header plus payload, ready to write. A payload over `max` (or over what the header can
/// carry) is refused, never sent with a truncated length.
pub fn frame_within(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let max = max.min(MAX_LEN);
    if payload.len() > max {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Header plus payload for a message that is small by construction (handshakes, pulses,
/// replies without user data, test frames).
///
/// # Panics
/// On a payload the header cannot describe (4 GiB or more): callers with user data use
/// [`frame_within`].
pub fn frame(payload: &[u8]) -> Vec<u8> {
    frame_within(payload, MAX_LEN).expect("a control message is far under 4 GiB")
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated { expected: 4, got })
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { expected: len, got });
        }
        got += n;
    }
    Ok(Some(payload))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes is over the 4-byte header's limit",
                payload.len()
            ),
        )
    })?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await
}

/// Sans-IO decoder: push bytes as they arrive, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let payload = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(payload))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, Request};
    use proptest::prelude::*;

    #[tokio::test]
    async fn read_back_what_was_written() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 100).await.unwrap().unwrap(), b"hello");
        assert_eq!(read_frame(&mut r, 100).await.unwrap().unwrap(), b"");
        assert!(read_frame(&mut r, 100).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversize_and_truncated_frames_are_errors() {
        let big = frame(&[0u8; 64]);
        let err = read_frame(&mut &big[..], 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 64, max: 10 }));
        let cut = &big[..20];
        let err = read_frame(&mut &cut[..], 100).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 64,
                got: 16
            }
        ));
        let err = read_frame(&mut &big[..2], 100).await.unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        ));
    }

    #[test]
    fn frames_over_the_limit_are_refused_not_truncated() {
        let err = frame_within(&[0u8; 65], 64).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 65, max: 64 }));
        assert_eq!(frame_within(&[7u8; 64], 64).unwrap().len(), 68);
        // A limit above the header's range is the header's range.
        let err = frame_within(&[0u8; 8], usize::MAX).map(|f| f.len());
        assert_eq!(err.unwrap(), 12);
    }

    #[test]
    fn decoder_splits_frames_fed_byte_by_byte() {
        let mut bytes = frame(b"one");
        bytes.extend(frame(b"three"));
        let mut d = FrameDecoder::new(16);
        let mut out = Vec::new();
        for b in bytes {
            d.push(&[b]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, vec![b"one".to_vec(), b"three".to_vec()]);
        assert_eq!(d.pending(), 0);
    }

    proptest! {
        // Fuzz-style property: arbitrary bytes never panic the frame decoder or the message
        // decoder; every failure is a reported error.
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut d = FrameDecoder::new(256);
            for c in &chunks {
                d.push(c);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => { let _ = decode::<Request>("request", &f); }
                        Ok(None) => break,
                        Err(e) => { prop_assert!(e.to_string().contains("exceeds the limit")); return Ok(()); }
                    }
                }
            }
        }

        #[test]
        fn valid_frames_roundtrip(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut d = FrameDecoder::new(300);
            for p in &payloads { d.push(&frame(p)); }
            for p in &payloads { prop_assert_eq!(d.next_frame().unwrap().unwrap(), p.clone()); }
            prop_assert!(d.next_frame().unwrap().is_none());
        }
    }
}
