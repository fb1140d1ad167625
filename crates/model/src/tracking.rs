//! Change tracking's two decisions, made the same way by replication, failback and undo:
//! can a dirty bitmap be trusted to name every change since its run, and so which method
//! a disk's transfer uses.

use crate::{Method, Seq};

/// What standby sees of one of a replica's bitmaps on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenBitmap {
    /// The run that started it.
    pub seq: Seq,
    /// QEMU did not save it cleanly (the VM crashed): it may miss writes.
    pub inconsistent: bool,
    /// It still records changes.
    pub recording: bool,
}

/// Why a bitmap cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distrust {
    /// No run recorded a bitmap for the disk.
    NoneRecorded,
    /// The bitmap the last run recorded is gone from the disk.
    Missing,
    /// It, or one started after it, was not saved cleanly.
    Inconsistent,
    /// None of them records changes any more (asked for by callers that read what is
    /// written while they run).
    NotRecording,
}

impl Distrust {
    pub fn reason(self) -> &'static str {
        match self {
            Distrust::NoneRecorded => "no dirty bitmap was recorded for it",
            Distrust::Missing => "its dirty bitmap is gone",
            Distrust::Inconsistent => "a dirty bitmap was not saved cleanly (the VM crashed)",
            Distrust::NotRecording => "no dirty bitmap is recording",
        }
    }
}

/// Whether the bitmap of run `current` still names every change since that run: it is
/// on the disk, and neither it nor any bitmap started after it was left inconsistent by a
/// crash (bitmaps started later hold the rest of the changes; they merge into it).
/// `need_recording` also asks that one of them still records.
pub fn bitmap_trust(current: Option<Seq>, ours: &[SeenBitmap], need_recording: bool) -> Result<(), Distrust> {
    let current = current.ok_or(Distrust::NoneRecorded)?;
    if !ours.iter().any(|b| b.seq == current) {
        return Err(Distrust::Missing);
    }
    let since: Vec<&SeenBitmap> = ours.iter().filter(|b| b.seq >= current).collect();
    if since.iter().any(|b| b.inconsistent) {
        return Err(Distrust::Inconsistent);
    }
    if need_recording && !since.iter().any(|b| b.recording) {
        return Err(Distrust::NotRecording);
    }
    Ok(())
}

/// A disk as the method choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSeen {
    /// The disk's size at the previous restore point, if there is one.
    pub previous_size: Option<u64>,
    pub size: u64,
    /// Raw images carry no bitmaps.
    pub raw: bool,
    /// What [`bitmap_trust`] said of its bitmap.
    pub bitmap: Result<(), Distrust>,
}

/// The method for one disk's transfer, and for digest, why.
pub fn choose_method(d: DiskSeen) -> (Method, Option<String>) {
    let Some(previous) = d.previous_size else {
        return (Method::Full, None);
    };
    if d.raw {
        return (Method::Digest, Some("raw disk has no dirty bitmap, compared by digest".into()));
    }
    if previous != d.size {
        return (Method::Digest, Some("disk size changed, compared by digest".into()));
    }
    match d.bitmap {
        Ok(()) => (Method::Cbt, None),
        Err(why) => (
            Method::Digest,
            Some(format!("dirty bitmap missing or inconsistent ({}), compared by digest", why.reason())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(seq: i64, inconsistent: bool, recording: bool) -> SeenBitmap {
        SeenBitmap { seq: Seq(seq), inconsistent, recording }
    }

    #[test]
    fn bitmap_trust_table() {
        type Row<'a> = (Option<i64>, &'a [SeenBitmap], bool, Result<(), Distrust>);
        let rows: &[Row<'_>] = &[
            (Some(5), &[b(5, false, true)], true, Ok(())),
            // A run interrupted after its instant left a newer bitmap: both count.
            (Some(5), &[b(5, false, false), b(6, false, true)], true, Ok(())),
            (Some(5), &[b(5, false, false), b(6, false, false)], false, Ok(())),
            (Some(5), &[b(5, false, false), b(6, false, false)], true, Err(Distrust::NotRecording)),
            (None, &[b(5, false, true)], false, Err(Distrust::NoneRecorded)),
            (Some(5), &[b(4, false, true), b(6, false, true)], false, Err(Distrust::Missing)),
            (Some(5), &[b(5, true, true)], false, Err(Distrust::Inconsistent)),
            (Some(5), &[b(5, false, true), b(6, true, true)], false, Err(Distrust::Inconsistent)),
            // An older bitmap retired late does not matter.
            (Some(5), &[b(4, true, false), b(5, false, true)], false, Ok(())),
        ];
        for (current, ours, need, want) in rows {
            assert_eq!(bitmap_trust(current.map(Seq), ours, *need), *want, "{current:?} {ours:?} {need}");
        }
    }

    #[test]
    fn method_table() {
        let d = |previous_size, size, raw, bitmap| DiskSeen { previous_size, size, raw, bitmap };
        let ok = Ok(());
        let gone = Err(Distrust::Missing);
        assert_eq!(choose_method(d(None, 8, false, ok)), (Method::Full, None));
        assert_eq!(choose_method(d(None, 8, true, gone)), (Method::Full, None));
        assert_eq!(choose_method(d(Some(8), 8, false, ok)), (Method::Cbt, None));
        assert_eq!(choose_method(d(Some(8), 8, false, gone)).0, Method::Digest);
        assert!(choose_method(d(Some(8), 16, false, ok)).1.unwrap().contains("size changed"));
        assert!(choose_method(d(Some(8), 8, true, ok)).1.unwrap().contains("raw disk"));
    }
}
