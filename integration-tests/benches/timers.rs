//! Timer benchmark on both backends: register 1,000,000 event-time timers over 100,000 keys,
//! then fire them all by advancing the watermark in 1,000 steps (Flink's
//! ProcessingTimerBenchmark uses 150,000 timers). Prints ops/s; asserts only that every timer
//! fires once.

use std::hint::black_box;
use std::time::Instant;

use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, TimerServiceDescriptor,
};
use state_heap::HeapKeyedStateBackend;
use state_mmap::MmapKeyedStateBackend;

const KEYS: u64 = 100_000;
const TIMERS: u64 = 1_000_000;

/// Median (register/s, fire/s) of three rounds on fresh backends from `make`.
fn measure<B: KeyedStateBackend<Key = u64>>(make: impl Fn() -> B) -> (f64, f64) {
    let mut register = Vec::new();
    let mut fire = Vec::new();
    for _ in 0..3 {
        let mut b = make();
        let h = b
            .register_timer_service(TimerServiceDescriptor::<u64>::new("timers").expect("name"))
            .expect("service");
        let t = Instant::now();
        for i in 0..TIMERS {
            b.set_current_key(i % KEYS).expect("key");
            // Timestamps spread over 0..1,000,000 ms, 10 per key.
            let ts = ((i * 7_919) % TIMERS) as i64;
            b.timers(&h)
                .register_event_time_timer(&0, ts)
                .expect("register");
        }
        register.push(TIMERS as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut fired = 0;
        for step in 1..=1000 {
            fired += black_box(b.advance_watermark(&h, step * 1000).expect("advance")).len();
        }
        assert_eq!(fired as u64, TIMERS, "every timer fires once");
        fire.push(TIMERS as f64 / t.elapsed().as_secs_f64());
    }
    register.sort_by(f64::total_cmp);
    fire.sort_by(f64::total_cmp);
    (register[1], fire[1])
}

fn main() {
    let heap = measure(|| {
        HeapKeyedStateBackend::<u64>::builder()
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .build()
            .expect("heap backend")
    });
    let mmap = measure(|| {
        MmapKeyedStateBackend::<u64>::builder()
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .build()
            .expect("mmap backend")
    });
    println!("timers: {TIMERS} over {KEYS} keys, median of 3 (timers/s)");
    println!("{:<6} {:>12} {:>12}", "", "register", "fire");
    for (name, (r, f)) in [("heap", heap), ("mmap", mmap)] {
        println!("{name:<6} {:>11.2}M {:>11.2}M", r / 1e6, f / 1e6);
    }
}
