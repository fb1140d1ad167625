//! Which bytes of one read request the server's chunks have filled.
//!
//! A structured read reply may arrive as many data and hole chunks in any order. Counting
//! bytes is not enough: two overlapping chunks can add up to the request's length while a
//! gap keeps whatever the buffer held before. So every chunk is placed exactly, an overlap
//! is refused at once, and the reply is complete only when the request is covered.

use std::collections::BTreeMap;

use crate::{NbdError, Result};

#[derive(Debug)]
pub(crate) struct Coverage {
    start: u64,
    end: u64,
    /// Filled ranges by start offset, disjoint and non-adjacent-merged (merging is not needed
    /// for correctness, only the disjointness is).
    filled: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    pub(crate) fn new(start: u64, len: u64) -> Self {
        Coverage { start, end: start + len, filled: BTreeMap::new(), covered: 0 }
    }

    /// Records a chunk at `at` of `len` bytes; returns its offset within the request buffer.
    pub(crate) fn add(&mut self, what: &str, at: u64, len: u64) -> Result<usize> {
        let end = at.checked_add(len).filter(|&e| at >= self.start && e <= self.end && len > 0).ok_or_else(|| {
            NbdError::Protocol(format!("{what} chunk {at}+{len} lies outside the request {}..{}", self.start, self.end))
        })?;
        if let Some((&s, &e)) = self.filled.range(..end).next_back() {
            if e > at {
                return Err(NbdError::Protocol(format!("{what} chunk {at}+{len} overlaps the chunk {s}+{}", e - s)));
            }
        }
        self.filled.insert(at, end);
        self.covered += len;
        Ok((at - self.start) as usize)
    }

    /// Ok when every byte of the request was filled exactly once.
    pub(crate) fn complete(&self) -> Result<()> {
        if self.covered == self.end - self.start {
            return Ok(());
        }
        let mut pos = self.start;
        for (&s, &e) in &self.filled {
            if s > pos {
                break;
            }
            pos = e;
        }
        Err(NbdError::Protocol(format!(
            "read reply left {}..{} unfilled ({} of {} bytes covered)",
            pos,
            self.filled.range(pos..).next().map_or(self.end, |(&s, _)| s),
            self.covered,
            self.end - self.start
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-by-byte model of the same rules, to check `Coverage` against.
    fn model(start: u64, len: u64, chunks: &[(u64, u64)]) -> Result<()> {
        let mut seen = vec![false; len as usize];
        for &(at, n) in chunks {
            if n == 0 || at < start || at + n > start + len {
                return Err(NbdError::Protocol("outside".into()));
            }
            for b in &mut seen[(at - start) as usize..(at - start + n) as usize] {
                if *b {
                    return Err(NbdError::Protocol("overlap".into()));
                }
                *b = true;
            }
        }
        if seen.iter().all(|&b| b) {
            Ok(())
        } else {
            Err(NbdError::Protocol("gap".into()))
        }
    }

    fn run(start: u64, len: u64, chunks: &[(u64, u64)]) -> Result<()> {
        let mut c = Coverage::new(start, len);
        for &(at, n) in chunks {
            c.add("data", at, n)?;
        }
        c.complete()
    }

    #[test]
    fn overlap_and_gap_are_errors_even_when_the_bytes_add_up() {
        assert!(run(0, 8, &[(0, 4), (4, 4)]).is_ok());
        assert!(run(0, 8, &[(4, 4), (0, 4)]).is_ok(), "any order");
        let e = run(0, 8, &[(0, 4), (2, 4)]).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        let e = run(0, 8, &[(0, 4), (0, 4)]).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        let e = run(0, 8, &[(0, 2), (4, 4)]).unwrap_err().to_string();
        assert!(e.contains("left 2..4 unfilled"), "{e}");
        assert!(run(0, 8, &[(0, 0), (0, 8)]).is_err(), "empty chunk");
        assert!(run(100, 8, &[(96, 8)]).is_err(), "before the request");
        assert!(run(u64::MAX - 4, 4, &[(u64::MAX - 4, u64::MAX)]).is_err(), "wraps");
    }

    /// Property test: over generated chunk sequences (tiled, shuffled, then perturbed by
    /// overlaps, gaps, shifts and duplicates), `Coverage` agrees with the byte model.
    #[test]
    fn agrees_with_a_byte_model_on_generated_chunk_sequences() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |m: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m.max(1)
        };
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..20_000 {
            let start = next(3) * 4096;
            let len = 1 + next(64);
            let mut chunks = Vec::new();
            let mut pos = 0;
            while pos < len {
                let n = 1 + next(len - pos);
                chunks.push((start + pos, n));
                pos += n;
            }
            for i in (1..chunks.len()).rev() {
                chunks.swap(i, next(i as u64 + 1) as usize);
            }
            match next(6) {
                0 if !chunks.is_empty() => {
                    chunks.remove(next(chunks.len() as u64) as usize);
                }
                1 => {
                    let i = next(chunks.len() as u64) as usize;
                    chunks[i].1 += 1;
                }
                2 => {
                    let i = next(chunks.len() as u64) as usize;
                    chunks[i].0 = chunks[i].0.saturating_sub(1);
                }
                3 => chunks.push(chunks[next(chunks.len() as u64) as usize]),
                _ => {}
            }
            let (got, want) = (run(start, len, &chunks), model(start, len, &chunks));
            assert_eq!(got.is_ok(), want.is_ok(), "start {start} len {len} chunks {chunks:?}: {got:?} vs {want:?}");
            if got.is_ok() {
                ok += 1
            } else {
                bad += 1
            }
        }
        assert!(ok > 1000 && bad > 1000, "the generator exercises both outcomes: {ok} ok, {bad} bad");
    }
}
