//! `qemu-img`, with JSON output where it has one.

use crate::chain::{chain_filename, Chain, Format};
use crate::{run, QemuError, Result};
pub use standby_model::image::{BitmapInfo, BitmapOp, ImageInfo};

const QEMU_IMG: &str = "qemu-img";

fn parse_err(detail: impl Into<String>) -> QemuError {
    QemuError::Parse { program: QEMU_IMG.into(), detail: detail.into() }
}

/// Reads an image's header as `format`, without opening any backing file (`qemu-img
/// info` never does without `--backing-chain`). `force_share` reads images that a running
/// QEMU holds.
pub fn info(path: &str, format: Format, force_share: bool) -> Result<ImageInfo> {
    let mut args = vec!["info".into(), "--output=json".into(), "-f".into(), format.as_str().into()];
    if force_share {
        args.push("-U".into());
    }
    args.push(path.into());
    let out = run(QEMU_IMG, &args)?;
    parse_info(&out.stdout)
}

/// Reads an image's header, guessing its format from its contents: only for a disk an
/// operator registers without stating its format, once; the answer is stored and shown,
/// and every later open states it.
pub fn probe(path: &str) -> Result<ImageInfo> {
    let args = vec!["info".into(), "--output=json".into(), path.into()];
    let out = run(QEMU_IMG, &args)?;
    parse_info(&out.stdout)
}

/// `qemu-img info --output=json`, as far as standby reads it. Fields it does not read
/// are ignored; a value it reads that it does not know (a format, a bitmap flag) is an
/// error, never a default.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct InfoJson {
    format: String,
    virtual_size: u64,
    backing_filename: Option<String>,
    format_specific: Option<FormatSpecificJson>,
}

#[derive(Debug, serde::Deserialize)]
struct FormatSpecificJson {
    #[serde(default)]
    data: FormatDataJson,
}

#[derive(Debug, Default, serde::Deserialize)]
struct FormatDataJson {
    #[serde(default)]
    bitmaps: Vec<BitmapJson>,
}

#[derive(Debug, serde::Deserialize)]
struct BitmapJson {
    name: String,
    flags: Vec<BitmapFlag>,
}

#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum BitmapFlag {
    InUse,
    Auto,
}

pub fn parse_info(stdout: &[u8]) -> Result<ImageInfo> {
    let v: InfoJson = serde_json::from_slice(stdout).map_err(|e| parse_err(format!("info: {e}")))?;
    let format = Format::parse(&v.format).ok_or_else(|| QemuError::Parse {
        program: QEMU_IMG.into(),
        detail: format!("image format {:?} is not qcow2 or raw", v.format),
    })?;
    let bitmaps = v
        .format_specific
        .map(|f| f.data.bitmaps)
        .unwrap_or_default()
        .into_iter()
        .map(|b| BitmapInfo {
            in_use: b.flags.contains(&BitmapFlag::InUse),
            enabled: b.flags.contains(&BitmapFlag::Auto),
            name: b.name,
        })
        .collect();
    Ok(ImageInfo { format, virtual_size: v.virtual_size, bitmaps, backing_filename: v.backing_filename })
}

/// Creates a qcow2 image. With `backing`, the header records that absolute path so that
/// operators' `qemu-img` finds the chain; standby itself always opens chains explicitly.
/// `-u`: the backing is named, never opened (without it `qemu-img` opens the whole chain
/// the backing's own header names, which may be anything a guest or a hostile image put
/// there: a FIFO that hangs, an `nbd:` URL that connects out).
pub fn create_qcow2(path: &str, size: u64, backing: Option<(&str, Format)>) -> Result<()> {
    let mut args = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some((b, format)) = backing {
        args.extend(["-u".into(), "-b".into(), b.into(), "-F".into(), format.as_str().into()]);
    }
    args.extend([path.into(), size.to_string()]);
    run(QEMU_IMG, &args).map(drop)
}

pub fn bitmap(path: &str, format: Format, name: &str, op: BitmapOp<'_>) -> Result<()> {
    let mut args = vec!["bitmap".into()];
    match op {
        BitmapOp::Add => args.push("--add".into()),
        BitmapOp::Remove => args.push("--remove".into()),
        BitmapOp::Enable => args.push("--enable".into()),
        BitmapOp::Disable => args.push("--disable".into()),
        BitmapOp::MergeFrom(src) => args.extend(["--merge".into(), src.into()]),
    }
    args.extend(["-f".into(), format.as_str().into(), path.into(), name.into()]);
    run(QEMU_IMG, &args).map(drop)
}

/// Writes the top layer's data into the layer below it, leaving the top layer as it was.
pub fn commit_keep_top(chain: &Chain) -> Result<()> {
    let args = vec!["commit".into(), "-q".into(), "-d".into(), chain_filename(chain)];
    run(QEMU_IMG, &args).map(drop)
}

/// Rewrites the backing-file name in `path`'s header without touching data.
pub fn set_backing_name(path: &str, backing: Option<&str>) -> Result<()> {
    let mut args = vec!["rebase".into(), "-u".into(), "-f".into(), "qcow2".into()];
    match backing {
        Some(b) => args.extend(["-b".into(), b.into(), "-F".into(), "qcow2".into()]),
        None => args.extend(["-b".into(), String::new()]),
    }
    args.push(path.into());
    run(QEMU_IMG, &args).map(drop)
}

/// Copies everything the chain's lower layers hold into its top layer and drops the
/// backing: the top becomes a standalone image with the same content.
pub fn flatten(chain: &Chain) -> Result<()> {
    let args = vec!["rebase".into(), "-q".into(), "-b".into(), String::new(), chain_filename(chain)];
    run(QEMU_IMG, &args).map(drop)
}

/// Copies the chain's guest-visible content into a new standalone qcow2 image at `dst`
/// (which the caller proved absent). Sparse: unallocated and zero ranges stay holes.
pub fn convert(chain: &Chain, dst: &str) -> Result<()> {
    let args = vec!["convert".into(), "-q".into(), "-O".into(), "qcow2".into(), chain_filename(chain), dst.into()];
    run(QEMU_IMG, &args).map(drop)
}

/// The ranges `path`'s own qcow2 layer holds (data or explicit zeroes), read from its
/// metadata alone with its backing cut off: what this layer changes over the layers below.
/// Shared locks, so a running VM's read-only backing layers can be mapped.
pub fn allocated(path: &str) -> Result<Vec<(u64, u64)>> {
    let layer = chain_filename(&Chain::single(path, Format::Qcow2));
    let args: Vec<String> = vec!["map".into(), "-U".into(), "--output=json".into(), layer];
    let out = run(QEMU_IMG, &args)?;
    parse_map(&out.stdout)
}

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, serde::Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
}

pub fn parse_map(stdout: &[u8]) -> Result<Vec<(u64, u64)>> {
    let entries: Vec<MapEntry> = serde_json::from_slice(stdout).map_err(|e| parse_err(format!("map: {e}")))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in entries {
        if !e.present || e.depth != 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.0 + last.1 == e.start => last.1 += e.length,
            _ => out.push((e.start, e.length)),
        }
    }
    Ok(out)
}

/// Byte-compares two chains' guest-visible content (opened with shared locks so a paused
/// VM's images can be read); Ok(true) when identical.
pub fn compare(a: &Chain, b: &Chain) -> Result<bool> {
    let (a, b) = (chain_filename(a), chain_filename(b));
    let out = std::process::Command::new(QEMU_IMG)
        .args(["compare", "-q", "-U", &a, &b])
        .output()
        .map_err(|source| QemuError::Spawn { program: QEMU_IMG.into(), source })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(QemuError::Failed {
            program: QEMU_IMG.into(),
            args: format!("compare {a} {b}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bitmaps_and_flags() {
        let out = br#"{"virtual-size": 1073741824, "filename": "a.qcow2", "format": "qcow2",
          "format-specific": {"type": "qcow2", "data": {"bitmaps": [
            {"flags": ["auto"], "name": "b1", "granularity": 65536},
            {"flags": ["in-use", "auto"], "name": "b2", "granularity": 65536},
            {"flags": [], "name": "b3", "granularity": 65536}]}}}"#;
        let i = parse_info(out).unwrap();
        assert_eq!(i.virtual_size, 1 << 30);
        assert_eq!(
            i.bitmaps,
            vec![
                BitmapInfo { name: "b1".into(), in_use: false, enabled: true },
                BitmapInfo { name: "b2".into(), in_use: true, enabled: true },
                BitmapInfo { name: "b3".into(), in_use: false, enabled: false },
            ]
        );
    }

    #[test]
    fn maps_only_the_layer_itself() {
        let out = br#"[{ "start": 0, "length": 2097152, "depth": 0, "present": false, "zero": true, "data": false},
            { "start": 2097152, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
            { "start": 2162688, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},
            { "start": 4194304, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
            { "start": 4259840, "length": 6225920, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        assert_eq!(parse_map(out).unwrap(), vec![(2097152, 131072), (4194304, 65536)]);
        assert!(parse_map(br#"[{"start": 0, "length": 1}]"#).is_err());
    }

    #[test]
    fn refuses_other_formats() {
        let out = br#"{"virtual-size": 1, "format": "vmdk"}"#;
        assert!(parse_info(out).is_err());
        assert!(parse_info(b"not json").is_err());
    }

    #[test]
    fn refuses_what_it_reads_and_does_not_know() {
        // A bitmap flag no QEMU standby knows wrote: its meaning for trust is unknown.
        let out = br#"{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2",
          "data": {"bitmaps": [{"flags": ["in-use", "sideways"], "name": "b", "granularity": 65536}]}}}"#;
        assert!(parse_info(out).unwrap_err().to_string().contains("sideways"));
        // A bitmap without a name, a size that is no number.
        let out = br#"{"virtual-size": 1, "format": "qcow2", "format-specific": {"type": "qcow2",
          "data": {"bitmaps": [{"flags": []}]}}}"#;
        assert!(parse_info(out).is_err());
        assert!(parse_info(br#"{"virtual-size": "big", "format": "raw"}"#).is_err());
        // Raw images have no format-specific part; qcow2 ones without bitmaps have no list.
        let raw = parse_info(br#"{"virtual-size": 4096, "format": "raw"}"#).unwrap();
        assert!(raw.bitmaps.is_empty() && raw.backing_filename.is_none());
        let plain = br#"{"virtual-size": 4096, "format": "qcow2", "backing-filename": "/b.qcow2",
          "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#;
        assert_eq!(parse_info(plain).unwrap().backing_filename.as_deref(), Some("/b.qcow2"));
        assert!(parse_map(br#"[{"start": 0, "length": 1, "depth": 0, "present": "yes"}]"#).is_err());
    }
}
