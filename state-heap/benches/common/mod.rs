//! What the heap benchmarks share.

/// A shuffled order of `0..n` (Fisher-Yates with splitmix64 and a fixed seed): the same order in
/// every benchmark and run.
pub fn key_order(n: u64) -> Vec<u64> {
    let mut keys: Vec<u64> = (0..n).collect();
    let mut state = 0x1234_5678_9abc_def0u64;
    for i in (1..keys.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        keys.swap(i, (z % (i as u64 + 1)) as usize);
    }
    keys
}
