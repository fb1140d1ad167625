use std::collections::HashMap;
use std::io::{BufReader, Read, Write};

use crate::coverage::Coverage;
use crate::wire::*;
use crate::{NbdError, Result};

/// One extent of a block status reply. `flags` is the context's status bits: for
/// `base:allocation` 1 = hole, 2 = reads as zeroes; for `qemu:dirty-bitmap:*` 1 = dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    pub flags: u32,
}

/// Largest single read or write request we send; qemu-nbd accepts up to 32 MiB.
const MAX_IO: usize = 16 << 20;
/// Largest range asked for in one block status request.
const MAX_STATUS: u64 = 1 << 30;

/// A connected NBD client over any byte stream (a unix socket locally, later TLS).
#[derive(Debug)]
pub struct Client<S: Read + Write> {
    conn: BufReader<S>,
    size: u64,
    transmission_flags: u16,
    structured: bool,
    contexts: HashMap<String, u32>,
    cookie: u64,
}

impl<S: Read + Write> Client<S> {
    /// Negotiates `export` with the given metadata contexts (may be empty).
    pub fn connect(stream: S, export: &str, contexts: &[&str]) -> Result<Self> {
        let mut conn = BufReader::new(stream);
        if read_u64(&mut conn)? != NBDMAGIC || read_u64(&mut conn)? != IHAVEOPT {
            return Err(NbdError::Protocol("not an NBD newstyle server".into()));
        }
        let server_flags = read_u16(&mut conn)?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("server lacks fixed newstyle negotiation".into()));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        conn.get_mut().write_all(&client_flags.to_be_bytes())?;

        let mut client =
            Client { conn, size: 0, transmission_flags: 0, structured: false, contexts: HashMap::new(), cookie: 0 };
        client.structured = client.option_ack(OPT_STRUCTURED_REPLY, &[], "structured reply")?;
        if !contexts.is_empty() {
            if !client.structured {
                return Err(NbdError::OptionRefused {
                    option: "structured reply",
                    message: "needed for block status".into(),
                });
            }
            client.set_meta_contexts(export, contexts)?;
        }
        client.go(export)?;
        Ok(client)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.transmission_flags & TFLAG_READ_ONLY != 0
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.conn.get_mut().write_all(&msg)?;
        Ok(())
    }

    /// Reads one option reply: (reply type, payload).
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        if read_u64(&mut self.conn)? != REPLY_MAGIC {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let opt = read_u32(&mut self.conn)?;
        let kind = read_u32(&mut self.conn)?;
        let len = read_u32(&mut self.conn)?;
        if opt != option {
            return Err(NbdError::Protocol(format!("reply for option {opt}, asked {option}")));
        }
        if len > MAX_META_PAYLOAD {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let payload = read_vec(&mut self.conn, len as usize)?;
        Ok((kind, payload))
    }

    /// Sends an option that is answered by a bare ACK; Ok(false) when the server declines.
    fn option_ack(&mut self, option: u32, data: &[u8], _name: &'static str) -> Result<bool> {
        self.send_option(option, data)?;
        let (kind, _) = self.option_reply(option)?;
        Ok(kind == REP_ACK)
    }

    fn set_meta_contexts(&mut self, export: &str, contexts: &[&str]) -> Result<()> {
        let mut data = Vec::new();
        put_str32(&mut data, export);
        data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            put_str32(&mut data, c);
        }
        self.send_option(OPT_SET_META_CONTEXT, &data)?;
        loop {
            let (kind, payload) = self.option_reply(OPT_SET_META_CONTEXT)?;
            match kind {
                REP_ACK => break,
                REP_META_CONTEXT if payload.len() >= 4 => {
                    let id = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    let name = String::from_utf8_lossy(&payload[4..]).into_owned();
                    self.contexts.insert(name, id);
                }
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: "set meta context",
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    })
                }
                k => return Err(NbdError::Protocol(format!("unexpected meta context reply {k}"))),
            }
        }
        for c in contexts {
            if !self.contexts.contains_key(*c) {
                return Err(NbdError::NoContext((*c).to_owned()));
            }
        }
        Ok(())
    }

    fn go(&mut self, export: &str) -> Result<()> {
        let mut data = Vec::new();
        put_str32(&mut data, export);
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut got_export = false;
        loop {
            let (kind, payload) = self.option_reply(OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if payload.len() >= 12 && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT {
                        self.size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                        self.transmission_flags = u16::from_be_bytes([payload[10], payload[11]]);
                        got_export = true;
                    }
                }
                k if k & REP_FLAG_ERROR != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: "go",
                        message: format!("export {export:?}: {}", String::from_utf8_lossy(&payload)),
                    })
                }
                k => return Err(NbdError::Protocol(format!("unexpected reply {k} to go"))),
            }
        }
        if !got_export {
            return Err(NbdError::Protocol("server sent no export size".into()));
        }
        Ok(())
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let mut msg = Vec::with_capacity(28 + data.len());
        msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&self.cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        let w = self.conn.get_mut();
        w.write_all(&msg)?;
        w.write_all(data)?;
        w.flush()?;
        Ok(self.cookie)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::Protocol(format!("range {offset}+{len} lies beyond the export's {} bytes", self.size))),
        }
    }

    /// Reads the replies to one request. `on_chunk` sees each structured chunk's type and
    /// payload; for a simple reply to a read, `simple_data` receives the data.
    fn replies(
        &mut self,
        cookie: u64,
        command: &'static str,
        offset: u64,
        simple_data: Option<&mut [u8]>,
        mut on_chunk: impl FnMut(&mut BufReader<S>, u16, u32) -> Result<()>,
    ) -> Result<()> {
        loop {
            let magic = read_u32(&mut self.conn)?;
            if magic == SIMPLE_REPLY_MAGIC {
                let errno = read_u32(&mut self.conn)?;
                expect_cookie(read_u64(&mut self.conn)?, cookie)?;
                if errno != 0 {
                    return Err(NbdError::Command { command, offset, errno, message: String::new() });
                }
                if let Some(buf) = simple_data {
                    self.conn.read_exact(buf)?;
                }
                return Ok(());
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(NbdError::Protocol(format!("bad reply magic {magic:#x}")));
            }
            let flags = read_u16(&mut self.conn)?;
            let kind = read_u16(&mut self.conn)?;
            expect_cookie(read_u64(&mut self.conn)?, cookie)?;
            let len = read_u32(&mut self.conn)?;
            if kind & REPLY_TYPE_ERROR_BIT != 0 {
                let payload = read_vec(&mut self.conn, bounded(len)?)?;
                let errno = payload.get(..4).map_or(0, |b| u32::from_be_bytes(b.try_into().expect("4 bytes")));
                let msg_len = payload.get(4..6).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
                let message = payload
                    .get(6..6 + msg_len)
                    .map(|m| format!(": {}", String::from_utf8_lossy(m)))
                    .unwrap_or_default();
                return Err(NbdError::Command { command, offset, errno, message });
            }
            if kind != REPLY_TYPE_NONE {
                on_chunk(&mut self.conn, kind, len)?;
            } else if len != 0 {
                return Err(NbdError::Protocol("none chunk with payload".into()));
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
    }

    /// Fills `buf` with the export's bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (i, part) in buf.chunks_mut(MAX_IO).enumerate() {
            let off = offset + (i * MAX_IO) as u64;
            self.read_one(off, part)?;
        }
        Ok(())
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cookie = self.request(CMD_READ, CMD_FLAG_DF, offset, buf.len() as u32, &[])?;
        let mut coverage = Coverage::new(offset, buf.len() as u64);
        let (simple, structured) = if self.structured { (None, Some(&mut *buf)) } else { (Some(&mut *buf), None) };
        let mut target = structured;
        self.replies(cookie, "read", offset, simple, |conn, kind, len| {
            let buf = target.as_deref_mut().ok_or_else(|| NbdError::Protocol("unexpected chunk".into()))?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = read_u64(conn)?;
                    let n = u64::from(len.checked_sub(8).ok_or_else(|| NbdError::Protocol("short data chunk".into()))?);
                    let start = coverage.add("data", at, n)?;
                    conn.read_exact(&mut buf[start..start + n as usize])?;
                }
                REPLY_TYPE_OFFSET_HOLE if len == 12 => {
                    let at = read_u64(conn)?;
                    let n = u64::from(read_u32(conn)?);
                    let start = coverage.add("hole", at, n)?;
                    buf[start..start + n as usize].fill(0);
                }
                other => return Err(NbdError::Protocol(format!("chunk type {other} of {len} bytes in a read reply"))),
            }
            Ok(())
        })?;
        if self.structured {
            coverage.complete()?;
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(offset, data.len() as u64)?;
        for (i, part) in data.chunks(MAX_IO).enumerate() {
            let off = offset + (i * MAX_IO) as u64;
            let cookie = self.request(CMD_WRITE, 0, off, part.len() as u32, part)?;
            self.replies(cookie, "write", off, None, |_, k, _| unexpected(k))?;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes, without sending the zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check_range(offset, len)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(1 << 30) as u32;
            let cookie = self.request(CMD_WRITE_ZEROES, 0, pos, n, &[])?;
            self.replies(cookie, "write zeroes", pos, None, |_, k, _| unexpected(k))?;
            pos += u64::from(n);
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        let cookie = self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.replies(cookie, "flush", 0, None, |_, k, _| unexpected(k))
    }

    /// The extents of `context` covering `[offset, offset+len)`, in order, clipped to it.
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let id = *self.contexts.get(context).ok_or_else(|| NbdError::NoContext(context.to_owned()))?;
        self.check_range(offset, len)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let ask = (end - pos).min(MAX_STATUS) as u32;
            let cookie = self.request(CMD_BLOCK_STATUS, 0, pos, ask, &[])?;
            let mut cursor = pos;
            self.replies(cookie, "block status", pos, None, |conn, kind, len| {
                if kind != REPLY_TYPE_BLOCK_STATUS || len < 4 || (len - 4) % 8 != 0 {
                    return Err(NbdError::Protocol(format!("chunk type {kind} of {len} bytes in block status")));
                }
                let payload = read_vec(conn, bounded(len)?)?;
                let ctx = u32::from_be_bytes(payload[..4].try_into().expect("4 bytes"));
                if ctx != id {
                    return Ok(());
                }
                for d in payload[4..].chunks_exact(8) {
                    let length = u64::from(u32::from_be_bytes(d[..4].try_into().expect("4 bytes")));
                    let flags = u32::from_be_bytes(d[4..].try_into().expect("4 bytes"));
                    let length = length.min(end - cursor);
                    if length == 0 {
                        break;
                    }
                    match out.last_mut() {
                        Some(last) if last.flags == flags && last.offset + last.length == cursor => {
                            last.length += length
                        }
                        _ => out.push(Extent { offset: cursor, length, flags }),
                    }
                    cursor += length;
                }
                Ok(())
            })?;
            if cursor == pos {
                return Err(NbdError::Protocol("block status reply made no progress".into()));
            }
            pos = cursor;
        }
        Ok(out)
    }

    /// Ends the session politely, so the server sees a clean disconnect.
    pub fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}

fn expect_cookie(got: u64, want: u64) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(NbdError::Protocol(format!("reply for request {got}, expected {want}")))
    }
}

fn unexpected(kind: u16) -> Result<()> {
    Err(NbdError::Protocol(format!("unexpected chunk type {kind}")))
}

fn bounded(len: u32) -> Result<usize> {
    if len > MAX_META_PAYLOAD {
        return Err(NbdError::Protocol(format!("chunk of {len} bytes")));
    }
    Ok(len as usize)
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn read_vec(r: &mut impl Read, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn read_u16(r: &mut impl Read) -> Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// A server that replays fixed bytes and swallows whatever the client sends.
    #[derive(Debug)]
    struct Replay(Cursor<Vec<u8>>);

    impl Read for Replay {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Replay {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// The handshake of a server with an 8 KiB export and structured replies.
    fn handshake() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        v.extend(go_replies());
        v
    }

    fn go_replies() -> Vec<u8> {
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&8192u64.to_be_bytes());
        info.extend_from_slice(&0u16.to_be_bytes());
        let mut v = option_reply(OPT_GO, REP_INFO, &info);
        v.extend(option_reply(OPT_GO, REP_ACK, &[]));
        v
    }

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reads_data_and_hole_chunks() {
        let mut bytes = handshake();
        let mut data = 0u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 4096]);
        bytes.extend(chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &data));
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4096u32.to_be_bytes());
        bytes.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &hole));
        let mut c = Client::connect(Replay(Cursor::new(bytes)), "", &[]).unwrap();
        assert_eq!(c.size(), 8192);
        let mut buf = vec![1u8; 8192];
        c.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7) && buf[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn refuses_chunks_outside_the_request_and_short_replies() {
        let mut bytes = handshake();
        let mut data = 4096u64.to_be_bytes().to_vec();
        data.extend_from_slice(&[7u8; 8192]);
        bytes.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &data));
        let mut c = Client::connect(Replay(Cursor::new(bytes)), "", &[]).unwrap();
        assert!(c.read(0, &mut [0u8; 8192]).is_err());
        assert!(c.read(8000, &mut [0u8; 1024]).is_err(), "beyond the export");
    }

    /// The handshake of `handshake()` with the `base:allocation` context granted as id 1.
    fn handshake_with_allocation() -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v.extend(option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[]));
        let mut ctx = 1u32.to_be_bytes().to_vec();
        ctx.extend_from_slice(b"base:allocation");
        v.extend(option_reply(OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx));
        v.extend(option_reply(OPT_SET_META_CONTEXT, REP_ACK, &[]));
        v.extend(go_replies());
        v
    }

    fn data_chunk(flags: u16, at: u64, bytes: &[u8]) -> Vec<u8> {
        let mut data = at.to_be_bytes().to_vec();
        data.extend_from_slice(bytes);
        chunk(flags, REPLY_TYPE_OFFSET_DATA, 1, &data)
    }

    /// Two chunks whose lengths add up to the request but overlap leave a gap: an error,
    /// never a buffer that keeps its old bytes.
    #[test]
    fn overlapping_chunks_that_add_up_are_refused() {
        let mut bytes = handshake();
        bytes.extend(data_chunk(0, 0, &[7u8; 4096]));
        bytes.extend(data_chunk(REPLY_FLAG_DONE, 2048, &[8u8; 4096]));
        let mut c = Client::connect(Replay(Cursor::new(bytes)), "", &[]).unwrap();
        let e = c.read(0, &mut [1u8; 8192]).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
    }

    #[test]
    fn a_reply_with_a_gap_is_refused() {
        let mut bytes = handshake();
        bytes.extend(data_chunk(0, 0, &[7u8; 2048]));
        bytes.extend(data_chunk(REPLY_FLAG_DONE, 4096, &[8u8; 4096]));
        let mut c = Client::connect(Replay(Cursor::new(bytes)), "", &[]).unwrap();
        let e = c.read(0, &mut [1u8; 8192]).unwrap_err().to_string();
        assert!(e.contains("left 2048..4096 unfilled"), "{e}");
    }

    /// Random bytes from a server are errors, never panics, hangs or huge allocations:
    /// without a handshake the connection is refused; after a good handshake every request
    /// answered with garbage fails.
    #[test]
    fn garbage_from_the_server_is_an_error() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut connected = 0;
        for round in 0..2000 {
            let mut bytes = if round % 2 == 0 { handshake_with_allocation() } else { Vec::new() };
            let n = (next() % 200) as usize;
            bytes.extend((0..n).map(|_| next() as u8));
            match Client::connect(Replay(Cursor::new(bytes)), "", &["base:allocation"]) {
                Ok(mut c) => {
                    assert!(round % 2 == 0, "round {round}: garbage passed as a handshake");
                    connected += 1;
                    assert_eq!(c.size(), 8192);
                    assert!(c.block_status("base:allocation", 0, 4096).is_err(), "round {round}: block status");
                    assert!(c.read(0, &mut [0u8; 512]).is_err(), "round {round}: read");
                }
                Err(_) => assert!(round % 2 == 1, "round {round}: a good handshake was refused"),
            }
        }
        assert_eq!(connected, 1000);
    }
}
