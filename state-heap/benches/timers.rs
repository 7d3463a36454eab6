//! Timer benchmark: register 1,000,000 event-time timers over 100,000 keys on the heap backend,
//! then fire them all by advancing the watermark in 1,000 steps (Flink's ProcessingTimerBenchmark
//! uses 150,000 timers). Prints ops/s; no assertions on time.

use std::hint::black_box;
use std::time::Instant;

use state_api::{
    FixedWidthSerializer, KeyedStateBackend, KeyedStateBackendExt, TimerServiceDescriptor,
};
use state_heap::HeapKeyedStateBackend;

const KEYS: u64 = 100_000;
const TIMERS: u64 = 1_000_000;

fn main() {
    let mut rates = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let mut b = HeapKeyedStateBackend::<u64>::builder()
            .key_serializer(FixedWidthSerializer::<u64>::new())
            .build()
            .expect("backend");
        let h = b
            .register_timer_service(TimerServiceDescriptor::<u64>::new("timers").expect("name"))
            .expect("service");
        let t = Instant::now();
        for i in 0..TIMERS {
            let key = i % KEYS;
            b.set_current_key(key).expect("key");
            // Timestamps spread over 0..1,000,000 ms, 10 per key.
            let ts = ((i * 7_919) % TIMERS) as i64;
            b.timers(&h)
                .register_event_time_timer(&0, ts)
                .expect("register");
        }
        rates.0.push(TIMERS as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut fired = 0;
        for step in 1..=1000 {
            fired += black_box(b.advance_watermark(&h, step * 1000).expect("advance")).len();
        }
        assert_eq!(fired as u64, TIMERS, "every timer fires once");
        rates.1.push(TIMERS as f64 / t.elapsed().as_secs_f64());
    }
    rates.0.sort_by(f64::total_cmp);
    rates.1.sort_by(f64::total_cmp);
    println!("heap timers, {TIMERS} timers over {KEYS} keys (median of 3)");
    println!("register: {:.2}M timers/s", rates.0[1] / 1e6);
    println!("fire:     {:.2}M timers/s", rates.1[1] / 1e6);
}
