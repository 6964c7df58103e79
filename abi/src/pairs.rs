//! `(u64, u64)` lists as byte fields of a frame (u64 LE pairs): the
//! `offset, length` extents and streams of the checkpoint bodies and the
//! `first page, count` runs of `DedupZeroRuns`.

use alloc::vec::Vec;

/// Encodes the pairs.
pub fn encode(pairs: impl IntoIterator<Item = (u64, u64)>) -> Vec<u8> {
    pairs.into_iter().flat_map(|(a, b)| a.to_le_bytes().into_iter().chain(b.to_le_bytes())).collect()
}

/// Decodes pairs; `None` unless the length is a multiple of 16.
pub fn decode(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    b.len().is_multiple_of(16).then(|| {
        b.chunks_exact(16)
            .map(|p| {
                let a = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
                (a, u64::from_le_bytes(p[8..].try_into().expect("8 bytes")))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pairs_round_trip_and_a_ragged_field_is_refused() {
        let p = [(1, 2), (u64::MAX, 0)];
        assert_eq!(super::decode(&super::encode(p)), Some(p.to_vec()));
        assert_eq!(super::decode(&[0; 17]), None);
        assert_eq!(super::decode(&[]), Some(alloc::vec::Vec::new()));
    }
}
