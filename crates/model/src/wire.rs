//! How replication data travels between two hosts: a job's compression and bandwidth
//! limit, and the words operators give them in.

use serde::{Deserialize, Serialize};

/// How a transfer's blocks travel between two hosts' agents, chosen per job. A transfer
/// within one machine has no wire and ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub compression: Compression,
    /// The most bytes per second on the wire, after compression; None: as fast as it goes.
    pub bandwidth: Option<u64>,
    /// How long a transfer waits for a dropped link to come back, retrying with backoff,
    /// before it fails.
    #[serde(default = "default_retry_window")]
    pub retry_window_secs: u64,
}

/// Five minutes: a link that flaps or a switch that reboots; a site that is gone fails
/// the run soon enough for the operator to act.
pub const DEFAULT_RETRY_WINDOW_SECS: u64 = 300;

fn default_retry_window() -> u64 {
    DEFAULT_RETRY_WINDOW_SECS
}

impl Default for Wire {
    fn default() -> Wire {
        Wire { compression: Compression::default(), bandwidth: None, retry_window_secs: DEFAULT_RETRY_WINDOW_SECS }
    }
}

/// How block data is compressed on the wire. Each frame's checksum is over the data as
/// read, so it is checked after decompression, before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Lz4,
    /// At a fast level: on a link of 100 Mbit/s to 1 Gbit/s the CPU keeps up.
    #[default]
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Lz4, Compression::Zstd];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    pub fn parse(s: &str) -> Option<Compression> {
        Compression::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Compression, String> {
        Compression::parse(s).ok_or_else(|| format!("{s:?} is not a compression: give none, lz4 or zstd"))
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bandwidth limit as an operator writes it: bytes per second with an optional SI
/// suffix (`500K`, `100M`, `1G`), or bits per second ending in `bit` (`800Mbit`).
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a rate: give bytes per second (100M for 100 MB/s) or bits (800Mbit)");
    let t = s.trim();
    let (t, bits) = match t.strip_suffix("bit") {
        Some(rest) => (rest, true),
        None => (t, false),
    };
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => return Err(bad()),
    };
    let rate = n.checked_mul(scale).ok_or_else(bad)?;
    let rate = if bits { rate / 8 } else { rate };
    if rate == 0 {
        return Err(format!("{s:?} is zero: give none for no limit"));
    }
    Ok(rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_in_bytes_or_bits() {
        assert_eq!(parse_bandwidth("100M"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("800Mbit"), Ok(100_000_000));
        assert_eq!(parse_bandwidth("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("64k"), Ok(64_000));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        for bad in ["", "fast", "10X", "-5M", "0", "7bit", "99999999999999999999G"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compression_names() {
        for c in Compression::ALL {
            assert_eq!(Compression::parse(c.as_str()), Some(c));
        }
        assert_eq!(Compression::parse("gzip"), None);
        assert_eq!(Compression::default(), Compression::Zstd);
    }
}
