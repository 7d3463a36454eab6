//! The front door on plain threads: two subtasks count clicks per user, a checkpoint is taken,
//! and a second run (at parallelism 3) starts from it.
//!
//! ```bash
//! cargo run -p flowstate --example pipeline -- /tmp/flowstate-pipeline
//! ```

use flowstate::api::{
    assign_to_key_group, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor,
};
use flowstate::config::ConfigLoader;
use flowstate::pipeline::Pipeline;

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/flowstate-pipeline".into());
    let config = ConfigLoader::new()
        .set("state.checkpoints.dir", format!("file://{dir}"))?
        .set("state.checkpoints.on-shutdown", "retain")?
        .load()?;
    for parallelism in [2, 3] {
        let mut pipeline = Pipeline::heap::<String>(&config, "clicks")?
            .operator("counts", parallelism)
            .start()?;
        println!(
            "parallelism {parallelism}, restored from {:?}",
            pipeline.restored_checkpoint()
        );
        let mut workers = Vec::new();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for mut subtask in pipeline.take_subtasks("counts") {
            let done = done_tx.clone();
            workers.push(std::thread::spawn(move || {
                let count = subtask
                    .backend()
                    .register_value(ValueStateDescriptor::<u64>::new("clicks")?)?;
                // A click of each of 8 users; a subtask handles the users whose key group it owns
                // (in a real job the records are routed to it by the same rule).
                for u in 0..8 {
                    let user = format!("user-{u}");
                    let kg = assign_to_key_group(&postcard::to_allocvec(&user)?, 128);
                    if !subtask.backend().key_group_range().contains(kg) {
                        continue;
                    }
                    subtask.backend().set_current_key(user.clone())?;
                    let n = subtask.backend().value(&count).get()?.unwrap_or(0) + 1;
                    subtask.backend().value(&count).update(n)?;
                    println!("  subtask {}: {user} has {n} clicks", subtask.index());
                    subtask.poll()?;
                }
                let _ = done.send(());
                subtask.serve_until_stopped()
            }));
        }
        // Once every subtask is through its clicks, a checkpoint holds all of them (one taken
        // earlier would be a consistent cut with some clicks still to come).
        for _ in 0..workers.len() {
            done_rx.recv()?;
        }
        println!("  checkpoint {} complete", pipeline.checkpoint()?);
        pipeline.stop()?;
        for w in workers {
            w.join().map_err(|_| "a subtask panicked")??;
        }
    }
    Ok(())
}
