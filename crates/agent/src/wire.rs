//! The framing of an agent connection: JSON lines, and binary frames of block data that
//! are compressed with the stream's codec and checked against the digest their line
//! carries before anyone uses them.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::proto::Codec;

/// Longest JSON line a peer may send: a bound on what it can make us buffer.
const MAX_LINE: u64 = 16 << 20;
/// Largest decoded frame: a transfer's largest item, with room.
pub(crate) const MAX_FRAME: usize = 32 << 20;

/// A transfer's frame bytes on the wire, and the pace they may not exceed: the job's
/// bandwidth limit, shared by every connection of the transfer.
#[derive(Debug)]
pub(crate) struct Meter {
    bytes: AtomicU64,
    /// What those frames carried, decoded: with `bytes`, the compression ratio so far.
    data: AtomicU64,
    limit: Option<u64>,
    /// When the link, at the limit, is free for the next frame.
    free_at: Mutex<Instant>,
}

impl Meter {
    pub(crate) fn new(limit: Option<u64>) -> Arc<Meter> {
        Arc::new(Meter {
            bytes: AtomicU64::new(0),
            data: AtomicU64::new(0),
            limit: limit.filter(|&l| l > 0),
            free_at: Mutex::new(Instant::now()),
        })
    }

    /// Counts `n` more bytes on the wire, a frame of `data` bytes decoded; with a limit,
    /// waits until sending them kept to it. No burst is saved up while idle: the limit
    /// holds over any second.
    pub(crate) fn add(&self, n: u64, data: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
        self.data.fetch_add(data, Ordering::Relaxed);
        let Some(rate) = self.limit else {
            return;
        };
        let wait = {
            let mut free = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            *free = (*free).max(now) + Duration::from_secs_f64(n as f64 / rate as f64);
            *free - now
        };
        std::thread::sleep(wait);
    }

    pub(crate) fn total(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn data(&self) -> u64 {
        self.data.load(Ordering::Relaxed)
    }
}

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
        let mut text = serde_json::to_string(v).map_err(std::io::Error::other)?;
        text.push('\n');
        let s = self.stream.get_mut();
        s.write_all(text.as_bytes())?;
        s.flush()
    }

    /// Writes `line`, then `data` as one frame in `codec`.
    pub(crate) fn write_frame<T: Serialize>(&mut self, line: &T, codec: Codec, data: &[u8]) -> std::io::Result<()> {
        let packed = match codec {
            Codec::None => None,
            Codec::Lz4 => Some(lz4_flex::compress(data)),
            // Level 1: the fast end, which keeps up with a 10 Gbit/s link on one core for
            // typical disk data and still halves text.
            Codec::Zstd => Some(zstd::bulk::compress(data, 1)?),
        };
        let body = packed.as_deref().unwrap_or(data);
        // One write for the line, the length and the body: written apart, each becomes
        // its own small TLS record and TCP segment (the sockets do not wait on Nagle).
        let mut out = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        out.push(b'\n');
        out.reserve(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
        let s = self.stream.get_mut();
        s.write_all(&out)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A lower bound only: sleeping may take longer on a loaded machine, never shorter.
    #[test]
    fn a_limited_meter_never_lets_bytes_go_faster_than_its_limit() {
        let m = Meter::new(Some(4 << 20));
        let start = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || (0..4).for_each(|_| m.add(64 << 10, 64 << 10)))
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert_eq!(m.total(), 1 << 20);
        // 1 MiB at 4 MiB/s: the last frame may leave as soon as the link frees up for it.
        assert!(start.elapsed() >= Duration::from_millis(234), "{:?}", start.elapsed());
        let free = Meter::new(None);
        free.add(u64::MAX / 2, 0);
        assert_eq!(free.total(), u64::MAX / 2);
    }
}
