//! The framing of an agent connection: JSON lines, and binary frames of block data that
//! are compressed with the stream's codec and checked against the digest their line
//! carries before anyone uses them.

use std::io::{BufRead, BufReader, Read, Write};

use serde::Serialize;

use crate::proto::Codec;

/// Longest JSON line a peer may send: a bound on what it can make us buffer.
const MAX_LINE: u64 = 16 << 20;
/// Largest decoded frame: a transfer's largest item, with room.
pub(crate) const MAX_FRAME: usize = 32 << 20;

/// JSON lines and frames over a stream (TLS, in practice).
#[derive(Debug)]
pub(crate) struct Line<S: Read + Write> {
    stream: BufReader<S>,
    /// Frame bytes sent and received, as they went on the wire (after compression).
    pub(crate) wire_bytes: u64,
}

fn invalid(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// The digest a frame's line carries: BLAKE3 of the decoded bytes.
pub(crate) fn digest(data: &[u8]) -> String {
    standby_host::transfer::block_digest(data)
}

impl<S: Read + Write> Line<S> {
    pub(crate) fn new(s: S) -> Self {
        Line { stream: BufReader::with_capacity(256 << 10, s), wire_bytes: 0 }
    }

    pub(crate) fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    pub(crate) fn read<T: serde::de::DeserializeOwned>(&mut self) -> std::io::Result<T> {
        let mut line = String::new();
        let n = (&mut self.stream).take(MAX_LINE).read_line(&mut line)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed the connection"));
        }
        serde_json::from_str(&line).map_err(invalid)
    }

    pub(crate) fn write<T: Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        self.send(v)?;
        self.stream.get_mut().flush()
    }

    /// Writes a line without flushing: a frame follows.
    fn send<T: Serialize>(&mut self, v: &T) -> std::io::Result<()> {
        let mut text = serde_json::to_string(v).map_err(std::io::Error::other)?;
        text.push('\n');
        self.stream.get_mut().write_all(text.as_bytes())
    }

    /// Writes `line`, then `data` as one frame in `codec`.
    pub(crate) fn write_frame<T: Serialize>(&mut self, line: &T, codec: Codec, data: &[u8]) -> std::io::Result<()> {
        self.send(line)?;
        let packed = match codec {
            Codec::None => None,
            Codec::Lz4 => Some(lz4_flex::compress(data)),
            // Level 1: the fast end, which keeps up with a 10 Gbit/s link on one core for
            // typical disk data and still halves text.
            Codec::Zstd => Some(zstd::bulk::compress(data, 1)?),
        };
        let body = packed.as_deref().unwrap_or(data);
        let s = self.stream.get_mut();
        s.write_all(&(body.len() as u32).to_be_bytes())?;
        s.write_all(body)?;
        self.wire_bytes += 4 + body.len() as u64;
        s.flush()
    }

    /// Reads one frame of `len` decoded bytes in `codec` into `out` and checks `digest`.
    pub(crate) fn read_frame(
        &mut self,
        codec: Codec,
        len: u64,
        digest: &str,
        out: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        if len as usize > MAX_FRAME {
            return Err(invalid(format!("a frame of {len} bytes is larger than {MAX_FRAME}")));
        }
        let mut n = [0u8; 4];
        self.stream.read_exact(&mut n)?;
        let n = u32::from_be_bytes(n) as usize;
        if n > MAX_FRAME + 1024 {
            return Err(invalid(format!("a frame of {n} bytes on the wire is larger than {MAX_FRAME}")));
        }
        let mut body = vec![0u8; n];
        self.stream.read_exact(&mut body)?;
        self.wire_bytes += 4 + n as u64;
        *out = match codec {
            Codec::None => body,
            Codec::Lz4 => lz4_flex::decompress(&body, len as usize).map_err(invalid)?,
            Codec::Zstd => zstd::bulk::decompress(&body, len as usize)?,
        };
        if out.len() as u64 != len {
            return Err(invalid(format!("a frame decoded to {} bytes, not the {len} its header said", out.len())));
        }
        if self::digest(out) != digest {
            return Err(invalid("a block batch's checksum does not match its data; nothing of it was written"));
        }
        Ok(())
    }
}
