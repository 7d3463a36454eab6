//! Key groups: the unit in which keyed state is partitioned, snapshotted and redistributed.
//!
//! Semantics follow Flink: a key belongs to key group `hash(key_bytes) % max_parallelism`, where
//! `hash` is a stable hash of the key's **serialized bytes** (never `std::hash` with random
//! state), so the assignment is the same in every process and every release. Subtask `i` of `p`
//! owns a contiguous [`KeyGroupRange`].

use std::fmt;

use crate::error::{Error, Result};

/// Lower bound of the default max parallelism.
pub const DEFAULT_LOWER_BOUND_MAX_PARALLELISM: u32 = 128;
/// Highest allowed max parallelism (number of key groups).
pub const UPPER_BOUND_MAX_PARALLELISM: u32 = 32_768;

/// The stable 64-bit hash of a serialized key: XXH3-64 with seed 0.
///
/// Backends derive both the key group (from the upper 32 bits, see [`key_group_for_hash`]) and
/// their own table hashes from it, so a key's bytes are hashed once per access.
#[inline]
pub fn stable_key_hash(key_bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key_bytes)
}

/// The key group of a key with stable hash `hash`: `(hash >> 32) % max_parallelism`.
///
/// The 32-bit key-group hash is the upper half of [`stable_key_hash`]; the lower half stays
/// free for hash tables inside a key group.
#[inline]
pub fn key_group_for_hash(hash: u64, max_parallelism: u32) -> u32 {
    let h = (hash >> 32) as u32;
    let m = max_parallelism.max(1);
    // Same result as `h % m`; the mask avoids a division on every record for the usual
    // power-of-two max parallelism.
    if m.is_power_of_two() {
        h & (m - 1)
    } else {
        h % m
    }
}

/// The key group of a serialized key.
#[inline]
pub fn assign_to_key_group(key_bytes: &[u8], max_parallelism: u32) -> u32 {
    key_group_for_hash(stable_key_hash(key_bytes), max_parallelism)
}

/// The subtask (operator index) that owns `key_group`: `key_group * parallelism / max_parallelism`.
#[inline]
pub fn operator_index_for_key_group(max_parallelism: u32, parallelism: u32, key_group: u32) -> u32 {
    (u64::from(key_group) * u64::from(parallelism) / u64::from(max_parallelism.max(1))) as u32
}

/// Flink's default max parallelism for an operator of `parallelism`:
/// `min(max(next_power_of_two(p + p / 2), 128), 32768)`.
pub fn default_max_parallelism(parallelism: u32) -> u32 {
    let p = u64::from(parallelism);
    let rounded = (p + p / 2).max(1).next_power_of_two();
    rounded.clamp(
        u64::from(DEFAULT_LOWER_BOUND_MAX_PARALLELISM),
        u64::from(UPPER_BOUND_MAX_PARALLELISM),
    ) as u32
}

/// Checks a max parallelism (`1..=32768`) and a parallelism (`1..=max_parallelism`).
pub fn validate_parallelism(max_parallelism: u32, parallelism: u32) -> Result<()> {
    validate_max_parallelism(max_parallelism)?;
    if parallelism == 0 {
        return Err(Error::InvalidParallelism {
            reason: "parallelism must be at least 1".into(),
        });
    }
    if parallelism > max_parallelism {
        return Err(Error::InvalidParallelism {
            reason: format!(
                "parallelism {parallelism} is larger than max parallelism {max_parallelism}"
            ),
        });
    }
    Ok(())
}

/// Checks that a max parallelism is in `1..=32768`.
pub fn validate_max_parallelism(max_parallelism: u32) -> Result<()> {
    if max_parallelism == 0 || max_parallelism > UPPER_BOUND_MAX_PARALLELISM {
        return Err(Error::InvalidParallelism {
            reason: format!(
                "max parallelism {max_parallelism} is outside 1..={UPPER_BOUND_MAX_PARALLELISM}"
            ),
        });
    }
    Ok(())
}

/// A contiguous, half-open range of key groups `[start, end)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyGroupRange {
    start: u32,
    end: u32,
}

impl KeyGroupRange {
    /// The range `[start, end)`; `end < start` gives the empty range at `start`.
    pub fn new(start: u32, end: u32) -> Self {
        KeyGroupRange {
            start,
            end: end.max(start),
        }
    }

    /// Every key group of `max_parallelism`: `[0, max_parallelism)`.
    pub fn all(max_parallelism: u32) -> Self {
        KeyGroupRange::new(0, max_parallelism)
    }

    /// The range owned by subtask `index` of `parallelism` (Flink's assignment).
    pub fn for_operator(max_parallelism: u32, parallelism: u32, index: u32) -> Result<Self> {
        validate_parallelism(max_parallelism, parallelism)?;
        if index >= parallelism {
            return Err(Error::InvalidParallelism {
                reason: format!("subtask index {index} is not below parallelism {parallelism}"),
            });
        }
        let (mp, p, i) = (
            u64::from(max_parallelism),
            u64::from(parallelism),
            u64::from(index),
        );
        let start = (i * mp).div_ceil(p);
        let end = ((i + 1) * mp - 1) / p + 1;
        Ok(KeyGroupRange::new(start as u32, end as u32))
    }

    /// First key group of the range.
    pub fn start(&self) -> u32 {
        self.start
    }

    /// One past the last key group of the range.
    pub fn end(&self) -> u32 {
        self.end
    }

    /// Number of key groups in the range.
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// True when the range holds no key group.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True when `key_group` is in the range.
    #[inline]
    pub fn contains(&self, key_group: u32) -> bool {
        key_group >= self.start && key_group < self.end
    }

    /// The overlap of two ranges (possibly empty).
    pub fn intersect(&self, other: &KeyGroupRange) -> KeyGroupRange {
        KeyGroupRange::new(self.start.max(other.start), self.end.min(other.end))
    }

    /// The key groups of the range in order.
    pub fn iter(&self) -> std::ops::Range<u32> {
        self.start..self.end
    }
}

impl fmt::Display for KeyGroupRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_max_parallelism_follows_flink() {
        assert_eq!(default_max_parallelism(1), 128);
        assert_eq!(default_max_parallelism(85), 128);
        assert_eq!(default_max_parallelism(86), 256); // 86 + 43 = 129 -> 256
        assert_eq!(default_max_parallelism(1000), 2048);
        assert_eq!(default_max_parallelism(30_000), 32_768);
        assert_eq!(default_max_parallelism(u32::MAX), 32_768);
    }

    #[test]
    fn validation_rejects_bad_values() {
        assert!(validate_parallelism(0, 1).is_err());
        assert!(validate_parallelism(32_769, 1).is_err());
        assert!(validate_parallelism(128, 0).is_err());
        let err = validate_parallelism(128, 129).unwrap_err().to_string();
        assert!(err.contains("129") && err.contains("128"), "{err}");
        assert!(validate_parallelism(32_768, 32_768).is_ok());
        assert!(KeyGroupRange::for_operator(128, 4, 4).is_err());
    }

    #[test]
    fn ranges_partition_key_groups_and_match_operator_index() {
        for &mp in &[1u32, 7, 128, 1000, 32_768] {
            for p in [1u32, 2, 3, 4, 7, 13, 128].into_iter().filter(|p| *p <= mp) {
                let mut next = 0;
                for i in 0..p {
                    let r = KeyGroupRange::for_operator(mp, p, i).unwrap();
                    assert_eq!(r.start(), next, "mp={mp} p={p} i={i}");
                    for kg in r.iter() {
                        assert_eq!(operator_index_for_key_group(mp, p, kg), i);
                    }
                    next = r.end();
                }
                assert_eq!(next, mp);
            }
        }
    }

    #[test]
    fn key_groups_are_stable_and_in_bounds() {
        // Fixed values: the assignment must never change between releases.
        assert_eq!(stable_key_hash(b""), 0x2d06800538d394c2);
        let kg = assign_to_key_group(b"user-42", 128);
        assert_eq!(kg, assign_to_key_group(b"user-42", 128));
        for i in 0u32..1000 {
            assert!(assign_to_key_group(&i.to_be_bytes(), 7) < 7);
        }
        for h in [0u64, 1 << 32, u64::MAX, 0xdead_beef_0000_1234] {
            for m in [1u32, 2, 7, 128, 1000, 32_768] {
                assert_eq!(key_group_for_hash(h, m), ((h >> 32) % u64::from(m)) as u32);
            }
        }
        let r = KeyGroupRange::new(3, 5);
        assert!(r.contains(3) && r.contains(4) && !r.contains(5));
        assert_eq!(
            r.intersect(&KeyGroupRange::new(4, 9)),
            KeyGroupRange::new(4, 5)
        );
        assert!(KeyGroupRange::new(5, 3).is_empty());
        assert_eq!(r.to_string(), "[3, 5)");
    }
}
