/// Restore points a job keeps when it names no retention.
pub const DEFAULT_RETAIN: u32 = 7;

/// Which restore points retention removes: the oldest ones beyond `keep`. `points` is in
/// chain order, oldest first. Never drops the newest point, whatever `keep` says.
pub fn points_to_drop<T: Clone>(points: &[T], keep: u32) -> Vec<T> {
    let keep = (keep.max(1) as usize).min(points.len());
    points[..points.len() - keep].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[u32], u32, &[u32])] = &[
            (&[], 3, &[]),
            (&[1], 1, &[]),
            (&[1, 2, 3], 3, &[]),
            (&[1, 2, 3, 4], 3, &[1]),
            (&[1, 2, 3, 4, 5], 2, &[1, 2, 3]),
            (&[1, 2, 3], 0, &[1, 2]),
            (&[1, 2], 100, &[]),
        ];
        for (points, keep, want) in cases {
            assert_eq!(points_to_drop(points, *keep), want.to_vec(), "{points:?} keep {keep}");
        }
    }
}
