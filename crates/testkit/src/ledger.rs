//! The test guest's write ledger. The guest writes record `seq` (a 4 KiB block that starts
//! with `STANDBY-LEDGER seq=<8 digits>\n`, zeros after) to block `start + seq - 1` of its
//! disk, flushes it, and only then prints `LEDGER <seq>` on its console. A line on the
//! console is therefore a write the guest saw acknowledged as durable.

pub const LEDGER_BLOCK: usize = 4096;

/// The exact bytes of record `seq`.
pub fn ledger_record(seq: u64) -> Vec<u8> {
    let mut b = format!("STANDBY-LEDGER seq={seq:08}\n").into_bytes();
    b.resize(LEDGER_BLOCK, 0);
    b
}

#[derive(Debug, Clone, Copy)]
pub struct Ledger {
    /// First 4 KiB block of the ledger region.
    pub start_block: u64,
}

impl Ledger {
    /// Highest record the console reports as flushed (records are written in order).
    pub fn acknowledged(console: &str) -> u64 {
        console.lines().filter_map(|l| l.trim().strip_prefix("LEDGER ")?.trim().parse::<u64>().ok()).max().unwrap_or(0)
    }

    /// Checks that the image bytes hold exactly records 1..=k for some k, each intact, and
    /// nothing after; returns k. A torn or missing record in the middle, or one past a gap,
    /// is an error: an image must be a state the guest's disk really passed through.
    pub fn records_in(&self, image: &[u8], max: u64) -> Result<u64, String> {
        let mut k = 0;
        for seq in 1..=max {
            let off = (self.start_block + seq - 1) as usize * LEDGER_BLOCK;
            let Some(block) = image.get(off..off + LEDGER_BLOCK) else {
                break;
            };
            if block == ledger_record(seq).as_slice() {
                if k != seq - 1 {
                    return Err(format!("record {seq} present after missing record {}", k + 1));
                }
                k = seq;
            } else if block.iter().any(|&b| b != 0) {
                return Err(format!("block of record {seq} holds neither the record nor zeros"));
            }
        }
        Ok(k)
    }
}

/// `base` (a disk's content before its guest wrote) with ledger records 1..=`k` written
/// from block `start_block`: what a point holding exactly those records reads.
pub fn with_ledger(base: &[u8], start_block: u64, k: u64) -> Vec<u8> {
    let mut img = base.to_vec();
    for seq in 1..=k {
        let off = (start_block + seq - 1) as usize * LEDGER_BLOCK;
        img[off..off + LEDGER_BLOCK].copy_from_slice(&ledger_record(seq));
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_prefix() {
        let l = Ledger { start_block: 1 };
        let mut img = vec![0u8; 8 * LEDGER_BLOCK];
        for seq in 1..=3u64 {
            let off = (l.start_block + seq - 1) as usize * LEDGER_BLOCK;
            img[off..off + LEDGER_BLOCK].copy_from_slice(&ledger_record(seq));
        }
        assert_eq!(l.records_in(&img, 6), Ok(3));
        // A gap is a state no disk passes through.
        let off = (l.start_block + 1) as usize * LEDGER_BLOCK;
        img[off..off + LEDGER_BLOCK].fill(0);
        assert!(l.records_in(&img, 6).is_err());
        assert_eq!(Ledger::acknowledged("x\nLEDGER 1\nLEDGER 2\r\nLEDGER-DONE 2\n"), 2);
    }
}
