//! Due timers fired one at a time (`next_due_timer`) on the mmap backend allocate no more than
//! the engine's write buffers take for their tombstones (bounded by the memory budget: at most
//! twice it while a full buffer is flushed and the next one fills), however many come due at
//! once: collecting them (`advance_watermark`) needs `TIMERS × 24` bytes for the
//! `Vec<Timer<u64, u32>>` alone, and aborts under the bound.
//!
//! In a test binary of its own: the bound is enforced by a global allocator (`cap`), which
//! counts every allocation of the process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::System;

use state_api::*;
use state_mmap::MmapKeyedStateBackend;

#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// Timers due at once: half at one timestamp, half spread over 100 earlier ones.
const TIMERS: u64 = 700_000;
/// The backend's memory budget (its write buffers live within it).
const BUDGET: usize = 4 << 20;
/// What firing every timer may allocate at most, all at once: two write buffers and 2 MiB.
const BOUND: usize = 2 * BUDGET + (2 << 20);

#[test]
fn firing_many_due_timers_one_at_a_time_on_mmap_keeps_memory_flat() {
    assert!(TIMERS as usize * std::mem::size_of::<Timer<u64, u32>>() >= BOUND + BOUND / 2);
    let dir = tempfile::tempdir().unwrap();
    let mut b = MmapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .working_directory_in(dir.path())
        .memory_budget(BUDGET)
        .build()
        .unwrap();
    let h = b
        .register_timer_service(TimerServiceDescriptor::<u32>::new("t").unwrap())
        .unwrap();
    for k in 0..TIMERS {
        b.set_current_key(k).unwrap();
        let ts = if k % 2 == 0 { 1_000 } else { (k % 100) as i64 };
        b.timers(&h).register_event_time_timer(&7, ts).unwrap();
    }
    // Not due: must stay.
    b.set_current_key(TIMERS).unwrap();
    b.timers(&h).register_event_time_timer(&7, 1_001).unwrap();
    b.compact().unwrap();
    b.wait_for_background_work().unwrap();

    let baseline = ALLOCATOR.allocated();
    ALLOCATOR
        .set_limit(baseline + BOUND)
        .expect("the limit is above what is allocated");
    let (mut count, mut sum, mut last, mut most) = (0u64, 0u64, i64::MIN, 0usize);
    let mut out_of_order = 0u64;
    while let Some(t) = b.next_due_timer(&h, TimeDomain::EventTime, 1_000).unwrap() {
        count += 1;
        sum = sum.wrapping_add(t.key);
        if t.timestamp < last {
            out_of_order += 1;
        }
        last = t.timestamp;
        most = most.max(ALLOCATOR.allocated().saturating_sub(baseline));
    }
    ALLOCATOR
        .set_limit(usize::MAX)
        .expect("no limit is below what is allocated");
    assert_eq!(count, TIMERS, "every due timer once");
    assert_eq!(sum, TIMERS * (TIMERS - 1) / 2, "every due timer once");
    assert_eq!(out_of_order, 0, "timestamp order");
    let rest = b.advance_watermark(&h, i64::MAX).unwrap();
    assert_eq!(rest.len(), 1, "the timer not due stays: {rest:?}");
    assert!(
        most <= BOUND,
        "firing {TIMERS} timers held {most} bytes at once (bound {BOUND})"
    );
    eprintln!("firing {TIMERS} due timers one at a time held at most {most} bytes at once");
}
