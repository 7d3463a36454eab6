//! The entries of one map state value: a vector scanned front to back while the map is small
//! (most map states hold a few entries per key: one allocation, read in order, where a hash
//! map's access reads its control bytes and then a bucket elsewhere), a hash map above
//! [`SMALL`] entries.

use std::hash::Hash;

/// Entries kept in a vector up to this many; a map that grows past it becomes a hash map (and
/// stays one).
pub(crate) const SMALL: usize = 16;

/// A map with the part of `hashbrown::HashMap`'s interface map states use. Iteration order is
/// unspecified, as a hash map's.
#[derive(Clone, Debug)]
pub(crate) enum SmallMap<K, V> {
    Small(Vec<(K, V)>),
    Large(hashbrown::HashMap<K, V>),
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Small(Vec::new())
    }
}

impl<K: Eq + Hash, V> SmallMap<K, V> {
    /// An empty map with room for `n` entries.
    pub fn with_capacity(n: usize) -> Self {
        if n <= SMALL {
            SmallMap::Small(Vec::with_capacity(n))
        } else {
            SmallMap::Large(hashbrown::HashMap::with_capacity(n))
        }
    }

    /// The number of entries.
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            SmallMap::Small(v) => v.len(),
            SmallMap::Large(m) => m.len(),
        }
    }

    /// True without entries.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `k`.
    #[inline]
    pub fn get(&self, k: &K) -> Option<&V> {
        match self {
            SmallMap::Small(v) => v.iter().find(|(x, _)| x == k).map(|(_, v)| v),
            SmallMap::Large(m) => m.get(k),
        }
    }

    /// The value of `k`, to change.
    #[inline]
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        match self {
            SmallMap::Small(v) => v.iter_mut().find(|(x, _)| x == k).map(|(_, v)| v),
            SmallMap::Large(m) => m.get_mut(k),
        }
    }

    /// True when `k` has an entry.
    #[inline]
    pub fn contains_key(&self, k: &K) -> bool {
        self.get(k).is_some()
    }

    /// Sets the value of `k`; returns the one it replaces.
    #[inline]
    pub fn insert(&mut self, k: K, value: V) -> Option<V> {
        match self {
            SmallMap::Small(v) => {
                if let Some((_, old)) = v.iter_mut().find(|(x, _)| *x == k) {
                    return Some(std::mem::replace(old, value));
                }
                if v.len() < SMALL {
                    v.push((k, value));
                    return None;
                }
                self.grow().insert(k, value)
            }
            SmallMap::Large(m) => m.insert(k, value),
        }
    }

    /// Moves the entries into a hash map (the vector is full).
    #[cold]
    #[inline(never)]
    fn grow(&mut self) -> &mut hashbrown::HashMap<K, V> {
        if let SmallMap::Small(v) = self {
            let mut m = hashbrown::HashMap::with_capacity(v.len() * 2);
            m.extend(std::mem::take(v));
            *self = SmallMap::Large(m);
        }
        match self {
            SmallMap::Large(m) => m,
            SmallMap::Small(_) => unreachable!("grown just above"),
        }
    }

    /// Removes `k`; returns its value.
    #[inline]
    pub fn remove(&mut self, k: &K) -> Option<V> {
        match self {
            SmallMap::Small(v) => {
                let i = v.iter().position(|(x, _)| x == k)?;
                Some(v.swap_remove(i).1)
            }
            SmallMap::Large(m) => m.remove(k),
        }
    }

    /// Keeps the entries `f` accepts.
    pub fn retain(&mut self, mut f: impl FnMut(&K, &mut V) -> bool) {
        match self {
            SmallMap::Small(v) => v.retain_mut(|(k, v)| f(k, v)),
            SmallMap::Large(m) => m.retain(|k, v| f(k, v)),
        }
    }

    /// The entries.
    #[inline]
    pub fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Small(v) => Iter::Small(v.iter()),
            SmallMap::Large(m) => Iter::Large(m.iter()),
        }
    }

    /// The entries, values to change.
    pub fn iter_mut(&mut self) -> IterMut<'_, K, V> {
        match self {
            SmallMap::Small(v) => IterMut::Small(v.iter_mut()),
            SmallMap::Large(m) => IterMut::Large(m.iter_mut()),
        }
    }

    /// The values.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    /// The values, to change.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.iter_mut().map(|(_, v)| v)
    }
}

impl<K: Eq + Hash, V> Extend<(K, V)> for SmallMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, items: I) {
        for (k, v) in items {
            self.insert(k, v);
        }
    }
}

impl<K: Eq + Hash, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(items: I) -> Self {
        let items = items.into_iter();
        let mut m = SmallMap::with_capacity(items.size_hint().0);
        m.extend(items);
        m
    }
}

impl<K: Eq + Hash, V: PartialEq> PartialEq for SmallMap<K, V> {
    fn eq(&self, o: &Self) -> bool {
        self.len() == o.len() && self.iter().all(|(k, v)| o.get(k) == Some(v))
    }
}

/// The entries of a [`SmallMap`].
pub(crate) enum Iter<'a, K, V> {
    Small(std::slice::Iter<'a, (K, V)>),
    Large(hashbrown::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Small(i) => i.next().map(|(k, v)| (k, v)),
            Iter::Large(i) => i.next(),
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Iter::Small(i) => i.size_hint(),
            Iter::Large(i) => i.size_hint(),
        }
    }
}

/// The entries of a [`SmallMap`], values to change.
pub(crate) enum IterMut<'a, K, V> {
    Small(std::slice::IterMut<'a, (K, V)>),
    Large(hashbrown::hash_map::IterMut<'a, K, V>),
}

impl<'a, K, V> Iterator for IterMut<'a, K, V> {
    type Item = (&'a K, &'a mut V);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            IterMut::Small(i) => i.next().map(|(k, v)| (&*k, v)),
            IterMut::Large(i) => i.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same operations on a `SmallMap` and a `HashMap` agree, across the switch from the
    /// vector to the hash map.
    #[test]
    fn small_map_behaves_as_a_hash_map_across_the_switch() {
        let mut s: SmallMap<u32, u32> = SmallMap::default();
        let mut h: std::collections::HashMap<u32, u32> = Default::default();
        let mut x = 7u32;
        for step in 0..5_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let k = x % (2 * SMALL as u32 + 4);
            match x % 5 {
                0 | 1 => assert_eq!(s.insert(k, step), h.insert(k, step)),
                2 => assert_eq!(s.remove(&k), h.remove(&k)),
                3 => {
                    if let Some(v) = s.get_mut(&k) {
                        *v += 1;
                    }
                    if let Some(v) = h.get_mut(&k) {
                        *v += 1;
                    }
                }
                _ => s.retain(|k, _| {
                    let keep = (k + step) % 7 != 0;
                    if !keep {
                        h.remove(k);
                    }
                    keep
                }),
            }
            assert_eq!(s.len(), h.len());
            assert_eq!(s.get(&k), h.get(&k));
            assert_eq!(s.contains_key(&k), h.contains_key(&k));
            let mut a: Vec<_> = s.iter().map(|(k, v)| (*k, *v)).collect();
            a.sort();
            let mut b: Vec<_> = h.iter().map(|(k, v)| (*k, *v)).collect();
            b.sort();
            assert_eq!(a, b);
        }
        assert!(matches!(s, SmallMap::Large(_)) || s.len() <= SMALL);
        let big: SmallMap<u32, u32> = (0..100).map(|i| (i % 40, i)).collect();
        assert_eq!(big.len(), 40);
        assert_eq!(big.get(&3), Some(&83));
    }
}
