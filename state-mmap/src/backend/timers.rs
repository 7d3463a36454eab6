//! Timers of the mmap backend, kept in the engine in due-time order.
//!
//! One engine entry per timer, with an empty value:
//!
//! `key group u16 | state id u16 | domain u8 | timestamp u64 | key_len u32 | key | ns_len u32 | ns`
//!
//! (the timestamp is the `i64` with its sign bit flipped, big-endian, so timestamps sort
//! numerically). One `(key group, service, domain)` is a contiguous range ordered by due time:
//! firing is a range scan from the start of the range up to the time, registering is one blind
//! put (putting the same timer again changes nothing, so a second registration is a no-op
//! without a read) and deleting one blind tombstone. The only thing held in memory per service is
//! [`DueIndex`]: a lower bound of the earliest timestamp per key group and domain, which lets an
//! advance skip key groups with nothing due and start each scan past the tombstones of timers
//! fired earlier. Millions of timers therefore live in the sorted runs, not on the heap.
//!
//! Stores written before this layout (registry version 1) kept timers under the generic state
//! key (`kg | id | key | ns | domain | timestamp`); [`migrate_v1`] rewrites them when such a
//! store or native checkpoint is opened.

use std::collections::{BTreeSet, HashMap, VecDeque};

use state_api::{Error, KeyGroupRange, Result, StateName, TimeDomain};

use crate::codec::{kg_state, parse_key};
use crate::engine::Db;

/// Length of `key group | state id | domain | timestamp`.
const HEAD: usize = 13;

/// The domains, in the order of [`DueIndex`] slots.
const DOMAINS: [TimeDomain; 2] = [TimeDomain::EventTime, TimeDomain::ProcessingTime];

fn slot(domain: TimeDomain) -> usize {
    match domain {
        TimeDomain::EventTime => 0,
        TimeDomain::ProcessingTime => 1,
    }
}

/// A timestamp as 8 bytes that sort like the numbers.
fn ts_bytes(ts: i64) -> [u8; 8] {
    ((ts as u64) ^ (1 << 63)).to_be_bytes()
}

fn ts_of_bytes(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

/// `key group | state id | domain` (the range of one domain of one service in one key group).
fn domain_prefix(kg: u32, id: u16, domain: TimeDomain) -> [u8; 5] {
    let mut b = [0u8; 5];
    b[..4].copy_from_slice(&kg_state(kg, id));
    b[4] = domain.code();
    b
}

/// `key group | state id | domain | timestamp`: the first possible key of a timestamp.
fn due_bound(kg: u32, id: u16, domain: TimeDomain, ts: i64) -> [u8; HEAD] {
    let mut b = [0u8; HEAD];
    b[..5].copy_from_slice(&domain_prefix(kg, id, domain));
    b[5..].copy_from_slice(&ts_bytes(ts));
    b
}

/// The end of a domain's range: the same prefix with the domain byte plus one.
fn domain_end(kg: u32, id: u16, domain: TimeDomain) -> [u8; 5] {
    let mut b = domain_prefix(kg, id, domain);
    // Domain codes are 1 and 2: no overflow.
    b[4] += 1;
    b
}

/// The exclusive end of the timers of a domain due at `time`: the first possible key after
/// `time`, or past the whole domain for `i64::MAX`.
fn due_end(kg: u32, id: u16, domain: TimeDomain, time: i64) -> [u8; HEAD] {
    match time.checked_add(1) {
        Some(after) => due_bound(kg, id, domain, after),
        None => {
            let mut b = [0u8; HEAD];
            b[..5].copy_from_slice(&domain_end(kg, id, domain));
            b
        }
    }
}

/// Writes the head of a timer key and the key into `out` (cleared first), and a placeholder for
/// the namespace length; returns the placeholder's position for [`end_timer_key`].
pub(crate) fn begin_timer_key(
    out: &mut Vec<u8>,
    kg: u32,
    id: u16,
    domain: TimeDomain,
    ts: i64,
    key: &[u8],
) -> usize {
    out.clear();
    out.extend_from_slice(&due_bound(kg, id, domain, ts));
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Fills in the namespace length of a key started with [`begin_timer_key`] once the namespace
/// bytes follow the placeholder.
pub(crate) fn end_timer_key(out: &mut [u8], at: usize) {
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Writes the whole timer key into `out` (cleared first).
pub(crate) fn timer_key(
    out: &mut Vec<u8>,
    kg: u32,
    id: u16,
    domain: TimeDomain,
    ts: i64,
    key: &[u8],
    ns: &[u8],
) {
    let at = begin_timer_key(out, kg, id, domain, ts, key);
    out.extend_from_slice(ns);
    end_timer_key(out, at);
}

/// The parts of a stored timer key.
pub(crate) struct TimerKey<'a> {
    pub kg: u32,
    pub domain: TimeDomain,
    pub ts: i64,
    pub key: &'a [u8],
    pub ns: &'a [u8],
}

fn u32_at(b: &[u8], at: usize) -> Option<usize> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

/// Parses a timer key; a malformed one is `Error::Corrupt` naming the service.
pub(crate) fn parse_timer_key<'a>(k: &'a [u8], state: &StateName) -> Result<TimerKey<'a>> {
    let bad = || Error::Corrupt {
        stream: format!("timers of '{state}'"),
        offset: 0,
        reason: format!("malformed stored timer key {:02x?}", &k[..k.len().min(32)]),
    };
    let head = k.get(..HEAD).ok_or_else(bad)?;
    let domain = TimeDomain::from_code(head[4]).ok_or_else(bad)?;
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&head[5..]);
    let klen = u32_at(k, HEAD).ok_or_else(bad)?;
    let key = k.get(HEAD + 4..HEAD + 4 + klen).ok_or_else(bad)?;
    let nlen = u32_at(k, HEAD + 4 + klen).ok_or_else(bad)?;
    let ns_at = HEAD + 8 + klen;
    if k.len() != ns_at + nlen {
        return Err(bad());
    }
    Ok(TimerKey {
        kg: u32::from(u16::from_be_bytes([head[0], head[1]])),
        domain,
        ts: ts_of_bytes(ts),
        key,
        ns: &k[ns_at..],
    })
}

/// Per key group and domain of one timer service, a lower bound of the earliest timestamp set
/// (`None`: no timer), and the same bounds ordered per domain so the key group that may hold the
/// earliest timer is found in `O(log n)`. This is all a timer service keeps in memory: about
/// 100 bytes per key group, whatever the number of timers, and the engine key of the last timer
/// fired one at a time ([`DueIndex::next_due`]).
#[derive(Debug)]
pub(crate) struct DueIndex {
    range: KeyGroupRange,
    next: Vec<[Option<i64>; 2]>,
    /// `(lower bound, key-group position)` of every key group with a bound, per domain slot.
    heads: [BTreeSet<(i64, usize)>; 2],
    /// The engine key of the timer [`DueIndex::next_due`] returned last, with its key-group
    /// position and domain slot: the next scan of that key group starts after it instead of
    /// stepping over the tombstones of every timer fired before it at the same timestamp.
    /// Cleared when a timer is registered there at or before its timestamp.
    resume: Option<(usize, usize, i64, Vec<u8>)>,
    /// Per `(key-group position, domain slot)`: the due timers read after the one
    /// [`DueIndex::next_due`] returned last from that key group, in engine order, not deleted
    /// yet (at most [`DUE_BATCH`]), so firing one at a time costs a seek per batch, not per
    /// timer. Cleared when a timer is registered there at or before the last of them, or any
    /// timer of that key group is deleted.
    batches: HashMap<(usize, usize), Batch>,
}

/// Due timers read ahead in one key group and domain, and what follows them when the read saw
/// it: `then` is `Some(Some(ts))` when the next timer there is at `ts` (later than the time
/// the batch was read for), `Some(None)` when there is none, `None` when the batch filled up
/// first. Once the batch is fired, a known `then` is the key group's exact next bound: no seek
/// to find it.
#[derive(Debug, Default)]
struct Batch {
    due: VecDeque<Due>,
    then: Option<Option<i64>>,
}

/// Due timers [`DueIndex::next_due`] reads ahead in one key group.
const DUE_BATCH: usize = 32;

/// A due timer read from the engine: its timestamp, the length of its key and its engine key.
#[derive(Debug)]
pub(crate) struct Due {
    pub ts: i64,
    klen: usize,
    pub raw: Vec<u8>,
}

impl Due {
    /// The serialized key.
    pub fn key(&self) -> &[u8] {
        &self.raw[HEAD + 4..HEAD + 4 + self.klen]
    }
    /// The serialized namespace.
    pub fn ns(&self) -> &[u8] {
        &self.raw[HEAD + 8 + self.klen..]
    }
}

impl DueIndex {
    /// Reads the earliest timestamp of every owned key group and domain of service `id` (two
    /// seeks per key group).
    pub fn load(db: &Db, range: KeyGroupRange, id: u16, name: &StateName) -> Result<DueIndex> {
        let mut next = Vec::with_capacity(range.len() as usize);
        for kg in range.iter() {
            let mut slots = [None; 2];
            for d in DOMAINS {
                let mut it = db.iter(&domain_prefix(kg, id, d), Some(&domain_end(kg, id, d)))?;
                if let Some((k, _)) = it.next()? {
                    slots[slot(d)] = Some(parse_timer_key(k, name)?.ts);
                }
            }
            next.push(slots);
        }
        let mut heads = [BTreeSet::new(), BTreeSet::new()];
        for (i, slots) in next.iter().enumerate() {
            for (s, bound) in slots.iter().enumerate() {
                if let Some(b) = bound {
                    heads[s].insert((*b, i));
                }
            }
        }
        Ok(DueIndex {
            range,
            next,
            heads,
            resume: None,
            batches: HashMap::new(),
        })
    }

    /// Sets the bound of key-group position `i` in domain slot `s`, keeping `heads` in step.
    fn set_bound(&mut self, i: usize, s: usize, bound: Option<i64>) {
        let Some(slots) = self.next.get_mut(i) else {
            return;
        };
        let old = std::mem::replace(&mut slots[s], bound);
        if old != bound {
            if let Some(b) = old {
                self.heads[s].remove(&(b, i));
            }
            if let Some(b) = bound {
                self.heads[s].insert((b, i));
            }
        }
    }

    /// Notes a timer registered at `ts` in key group `kg`.
    #[inline]
    pub fn note(&mut self, kg: u32, domain: TimeDomain, ts: i64) {
        let Some(i) = kg.checked_sub(self.range.start()) else {
            return;
        };
        let (i, s) = (i as usize, slot(domain));
        if self
            .resume
            .as_ref()
            .is_some_and(|r| r.0 == i && r.1 == s && ts <= r.2)
        {
            self.resume = None;
        }
        if let Some(b) = self.batches.get_mut(&(i, s)) {
            if b.due.back().is_some_and(|last| ts <= last.ts) {
                self.batches.remove(&(i, s));
            } else if let Some(then) = &mut b.then {
                // A timer before the one known to follow the batch is now the next one.
                if then.is_none_or(|t| ts < t) {
                    *then = Some(ts);
                }
            }
        }
        if let Some(slots) = self.next.get(i) {
            if slots[s].is_none_or(|n| ts < n) {
                self.set_bound(i, s, Some(ts));
            }
        }
    }

    /// Heap bytes held (the ordered bounds counted at about 48 bytes an entry).
    pub fn heap_bytes(&self) -> usize {
        self.next.capacity() * std::mem::size_of::<[Option<i64>; 2]>()
            + (self.heads[0].len() + self.heads[1].len()) * 48
            + self.resume.as_ref().map_or(0, |r| r.3.capacity())
            + self
                .batches
                .values()
                .flat_map(|b| b.due.iter())
                .map(|d| d.raw.capacity() + std::mem::size_of::<Due>())
                .sum::<usize>()
    }

    /// A timer of key group `kg` and `domain` was deleted: timers read ahead there are read
    /// again (the deleted one among them must not fire).
    pub fn forget(&mut self, kg: u32, domain: TimeDomain) {
        if let Some(i) = kg.checked_sub(self.range.start()) {
            self.batches.remove(&(i as usize, slot(domain)));
        }
    }

    /// Reads the earliest timer of `domain` due at `time` of service `id`, without deleting it:
    /// its key-group position and the timer (`None`: nothing due). The caller deletes it and
    /// then calls [`DueIndex::fired`].
    ///
    /// The key group with the lowest bound is read from its bound (one seek); if its first
    /// timer is later than the bound, the bound becomes exact and the next lowest is tried, so
    /// the timer returned is the earliest of all. Ties between key groups go by key-group order,
    /// within one by engine key.
    pub fn next_due(
        &mut self,
        db: &Db,
        id: u16,
        domain: TimeDomain,
        time: i64,
        name: &StateName,
    ) -> Result<Option<(usize, Due)>> {
        let s = slot(domain);
        loop {
            let Some(&(bound, i)) = self.heads[s].first() else {
                return Ok(None);
            };
            if bound > time {
                return Ok(None);
            }
            if let Some(batch) = self.batches.get_mut(&(i, s)) {
                match batch.due.front().map(|d| d.ts) {
                    Some(ts) if ts == bound => {
                        if let Some(due) = batch.due.pop_front() {
                            return Ok(Some((i, due)));
                        }
                    }
                    // The next timer there is later: the bound becomes exact.
                    Some(ts) => {
                        self.set_bound(i, s, Some(ts));
                        continue;
                    }
                    None => {
                        let then = batch.then;
                        self.batches.remove(&(i, s));
                        // What follows the batch is known: it is the exact bound.
                        if let Some(next) = then {
                            self.set_bound(i, s, next);
                            continue;
                        }
                    }
                }
            }
            let kg = self.range.start() + i as u32;
            let start = match &self.resume {
                // The smallest key after the last fired one: the key followed by a zero byte.
                Some((ri, rs, ts, key)) if *ri == i && *rs == s && *ts == bound => {
                    let mut k = key.clone();
                    k.push(0);
                    k
                }
                _ => due_bound(kg, id, domain, bound).to_vec(),
            };
            let mut it = db.iter(&start, Some(&domain_end(kg, id, domain)))?;
            let first = match it.next()? {
                Some((k, _)) => {
                    let t = parse_timer_key(k, name)?;
                    Some(Due {
                        ts: t.ts,
                        klen: t.key.len(),
                        raw: k.to_vec(),
                    })
                }
                None => None,
            };
            if first.as_ref().is_some_and(|d| d.ts == bound) {
                // Read the next due timers of this key group with the same seek.
                let mut batch = Batch::default();
                while batch.due.len() < DUE_BATCH {
                    let Some((k, _)) = it.next()? else {
                        batch.then = Some(None);
                        break;
                    };
                    let t = parse_timer_key(k, name)?;
                    if t.ts > time {
                        batch.then = Some(Some(t.ts));
                        break;
                    }
                    batch.due.push_back(Due {
                        ts: t.ts,
                        klen: t.key.len(),
                        raw: k.to_vec(),
                    });
                }
                if !batch.due.is_empty() || batch.then.is_some() {
                    self.batches.insert((i, s), batch);
                }
            }
            drop(it);
            match first {
                Some(due) if due.ts == bound => return Ok(Some((i, due))),
                Some(due) => self.set_bound(i, s, Some(due.ts)),
                None => self.set_bound(i, s, None),
            }
        }
    }

    /// Notes that the timer [`DueIndex::next_due`] returned at key-group position `i` was
    /// deleted: the next scan there starts after it.
    pub fn fired(&mut self, i: usize, domain: TimeDomain, due: Due) {
        self.resume = Some((i, slot(domain), due.ts, due.raw));
    }

    /// Reads every timer of `domain` due at `time` (timestamp at or before it) of service `id`,
    /// in timestamp order (ties: key bytes, then namespace bytes, as the heap backend). Nothing
    /// is deleted and the index is unchanged: the caller deletes the returned keys and then
    /// applies the returned new lower bounds with [`DueIndex::apply`].
    ///
    /// A key group is scanned only from its lower bound to `time` (a borrowing range scan that
    /// reads nothing past the due timers). One that had due timers gets `time + 1` as its new
    /// bound; one that had none is looked up once for its exact next timestamp, so key groups
    /// with nothing due are skipped by later advances.
    #[allow(clippy::type_complexity)]
    pub fn collect_due(
        &self,
        db: &Db,
        id: u16,
        domain: TimeDomain,
        time: i64,
        name: &StateName,
    ) -> Result<(Vec<Due>, Vec<(usize, Option<i64>)>)> {
        let mut due = Vec::new();
        let mut updates = Vec::new();
        let s = slot(domain);
        for (i, kg) in self.range.iter().enumerate() {
            let Some(first) = self.next[i][s] else {
                continue;
            };
            if first > time {
                continue;
            }
            let start = due_bound(kg, id, domain, first);
            let end = due_end(kg, id, domain, time);
            let before = due.len();
            db.scan(&start, &end, |k, _| -> Result<bool> {
                let t = parse_timer_key(k, name)?;
                due.push(Due {
                    ts: t.ts,
                    klen: t.key.len(),
                    raw: k.to_vec(),
                });
                Ok(true)
            })?;
            let next = if due.len() > before || time == i64::MAX {
                time.checked_add(1)
            } else {
                // Nothing due here: find the exact next timestamp (or none) once.
                let mut it = db.iter(&end, Some(&domain_end(kg, id, domain)))?;
                match it.next()? {
                    Some((k, _)) => Some(parse_timer_key(k, name)?.ts),
                    None => None,
                }
            };
            updates.push((i, next));
        }
        due.sort_unstable_by(|a, b| (a.ts, a.key(), a.ns()).cmp(&(b.ts, b.key(), b.ns())));
        Ok((due, updates))
    }

    /// Installs the lower bounds computed by [`DueIndex::collect_due`].
    pub fn apply(&mut self, domain: TimeDomain, updates: &[(usize, Option<i64>)]) {
        self.resume = None;
        self.batches.clear();
        for &(i, next) in updates {
            self.set_bound(i, slot(domain), next);
        }
    }
}

/// Reads the user-key part of a version-1 timer entry: `domain u8 | timestamp u64` (sign bit
/// flipped).
fn parse_v1_suffix(b: &[u8]) -> Option<(TimeDomain, i64)> {
    let (&code, ts) = b.split_first()?;
    let ts: [u8; 8] = ts.try_into().ok()?;
    Some((TimeDomain::from_code(code)?, ts_of_bytes(ts)))
}

/// Rewrites the timers of service `id` stored in the version-1 layout (under the generic state
/// key, user key `domain | timestamp`) into the due-time layout, in the key groups of `range`.
/// Version-1 entries sort before every due-time entry of the service (their key length's first
/// byte is 0, a domain code is 1 or 2), so the scan never meets rewritten entries.
pub(crate) fn migrate_v1(
    db: &mut Db,
    range: KeyGroupRange,
    id: u16,
    name: &StateName,
) -> Result<()> {
    const BATCH: usize = 4096;
    let mut nk = Vec::new();
    for kg in range.iter() {
        let mut start = kg_state(kg, id).to_vec();
        start.push(0);
        let mut end = kg_state(kg, id).to_vec();
        end.push(1);
        loop {
            let mut batch = Vec::new();
            let mut it = db.iter(&start, Some(&end))?;
            while batch.len() < BATCH {
                match it.next()? {
                    Some((k, _)) => batch.push(k.to_vec()),
                    None => break,
                }
            }
            drop(it);
            for k in &batch {
                let p = parse_key(k, name.as_str())?;
                let (domain, ts) = parse_v1_suffix(p.user_key).ok_or_else(|| Error::Corrupt {
                    stream: format!("timers of '{name}'"),
                    offset: 0,
                    reason: "malformed version-1 timer entry".into(),
                })?;
                timer_key(&mut nk, p.kg, id, domain, ts, p.key, p.ns);
                db.put(&nk, &[])?;
                db.delete(k)?;
            }
            match batch.last() {
                Some(k) if batch.len() == BATCH => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_due_time() {
        let name = StateName::new("t").unwrap();
        let mut keys = Vec::new();
        for ts in [i64::MIN, -5, 0, 3, i64::MAX] {
            let mut k = Vec::new();
            timer_key(&mut k, 7, 3, TimeDomain::EventTime, ts, b"key", b"ns");
            let p = parse_timer_key(&k, &name).unwrap();
            assert_eq!((p.kg, p.domain, p.ts), (7, TimeDomain::EventTime, ts));
            assert_eq!((p.key, p.ns), (&b"key"[..], &b"ns"[..]));
            keys.push(k);
        }
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, keys, "engine order is timestamp order");
        let mut bad = keys[1].clone();
        bad.push(0);
        assert!(parse_timer_key(&bad, &name).is_err(), "trailing byte");
        bad = keys[1].clone();
        bad[4] = 9;
        assert!(parse_timer_key(&bad, &name).is_err(), "unknown domain");
        assert!(parse_timer_key(&keys[1][..20], &name).is_err(), "truncated");
    }
}
