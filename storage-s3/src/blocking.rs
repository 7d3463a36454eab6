//! Waiting for a future from synchronous code without starting a runtime.
//!
//! `Runtime::block_on` and `Handle::block_on` panic ("Cannot start a runtime from within a
//! runtime") when the calling thread drives an async runtime, so a blocking API built on them
//! cannot be called from async code. [`block_on_io`] instead polls the future on the calling
//! thread with the given runtime entered (its I/O driver, timers, `spawn` and `spawn_blocking`
//! serve the future) and parks the thread between polls: it works on a plain thread and on a
//! thread of another runtime alike.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use tokio::runtime::Handle;

/// Unparks the waiting thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` to completion on the calling thread, with the runtime of `handle` providing
/// I/O, timers and spawned tasks, and returns its output.
///
/// Unlike `Handle::block_on` it never starts a runtime, so it may be called from anywhere,
/// including a thread that drives another runtime (an `async fn` under `#[tokio::main]`): it
/// then blocks that thread until the future is done, as any blocking call would (async callers
/// should prefer `spawn_blocking` or an async API). `handle` must be a multi-thread runtime,
/// whose worker threads drive its I/O and timers while this thread waits.
pub fn block_on_io<F: Future>(handle: &Handle, future: F) -> F::Output {
    let _runtime = handle.enter();
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        // A wake before this park leaves the token set, so no wake-up is lost; a spurious
        // return just polls again.
        std::thread::park();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    async fn io_timers_and_tasks() -> u32 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let a = tokio::spawn(async { 20 }).await.unwrap();
        let b = tokio::task::spawn_blocking(|| 22).await.unwrap();
        a + b
    }

    #[test]
    fn drives_timers_spawns_and_blocking_tasks_from_a_plain_thread() {
        let rt = runtime();
        assert_eq!(block_on_io(rt.handle(), io_timers_and_tasks()), 42);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn works_on_a_thread_that_drives_another_runtime() {
        let rt = runtime();
        assert_eq!(block_on_io(rt.handle(), io_timers_and_tasks()), 42);
        rt.shutdown_background();
    }
}
