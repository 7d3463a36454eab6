//! The front door in an async service: the subtasks run as tokio tasks on a current-thread
//! runtime, polling between records, while `checkpoint_async` waits without blocking them.
//!
//! ```bash
//! cargo run -p flowstate --example pipeline_tokio -- /tmp/flowstate-pipeline-tokio
//! ```

use flowstate::api::{
    assign_to_key_group, KeyedStateBackend, KeyedStateBackendExt, ValueStateDescriptor,
};
use flowstate::config::ConfigLoader;
use flowstate::pipeline::{Error, Pipeline};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/flowstate-pipeline-tokio".into());
    let config = ConfigLoader::new()
        .set("state.checkpoints.dir", format!("file://{dir}"))?
        .set("state.checkpoints.on-shutdown", "retain")?
        .load()?;
    let mut pipeline = Pipeline::heap::<String>(&config, "clicks")?
        .operator("counts", 2)
        .start()?;
    println!("restored from {:?}", pipeline.restored_checkpoint());
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for mut subtask in pipeline.take_subtasks("counts") {
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            let count = subtask
                .backend()
                .register_value(ValueStateDescriptor::<u64>::new("clicks")?)?;
            for u in 0..8 {
                let user = format!("user-{u}");
                let kg = assign_to_key_group(&postcard::to_allocvec(&user)?, 128);
                if subtask.backend().key_group_range().contains(kg) {
                    subtask.backend().set_current_key(user.clone())?;
                    let n = subtask.backend().value(&count).get()?.unwrap_or(0) + 1;
                    subtask.backend().value(&count).update(n)?;
                    println!("subtask {}: {user} has {n} clicks", subtask.index());
                }
                subtask.poll()?;
                tokio::task::yield_now().await;
            }
            let _ = done.send(());
            // Keep answering barriers until the pipeline stops.
            while !subtask.is_stopped() {
                subtask.poll()?;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            Ok::<_, Error>(())
        }));
    }
    for _ in 0..tasks.len() {
        done_rx.recv().await;
    }
    println!("checkpoint {} complete", pipeline.checkpoint_async().await?);
    pipeline.stop()?;
    for t in tasks {
        t.await??;
    }
    Ok(())
}
