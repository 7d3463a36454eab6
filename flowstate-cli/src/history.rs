//! `flowstate checkpoints history`: every checkpoint attempt of a job (completed, aborted,
//! declined, with the reason) as a table, as JSON, or as an SVG picture of durations and sizes
//! over time with the failures marked.

use checkpoint::{read_history, AttemptStatus, CheckpointAttempt};
use serde_json::json;

use crate::job::JobError;
use crate::tools::{c_size, job_storage, jobs_hint, shown_dir, time, to_url};
use flowstate::config::Config;

/// Writes a line to standard output (see [`crate::tools::print_line`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        crate::tools::print_line(format_args!($($arg)*))?
    };
}

/// An attempt as JSON, with its subtasks.
pub fn attempt_json(a: &CheckpointAttempt) -> serde_json::Value {
    json!({
        "id": a.checkpoint_id,
        "epoch": a.epoch,
        "kind": match a.kind {
            checkpoint::CheckpointKind::Checkpoint => "checkpoint",
            checkpoint::CheckpointKind::Savepoint => "savepoint",
        },
        "status": a.status.name(),
        "reason": a.reason,
        "time": time(a.trigger_timestamp_millis),
        "trigger_timestamp_millis": a.trigger_timestamp_millis,
        "duration_millis": a.duration_millis,
        "bytes": a.bytes,
        "delta_bytes": a.delta_bytes,
        "subtasks": a.subtasks.iter().map(|s| json!({
            "operator": s.operator_id,
            "subtask": s.subtask,
            "status": s.status.name(),
            "sync_micros": s.sync_micros,
            "async_millis": s.async_millis,
            "bytes": s.bytes,
            "delta_bytes": s.delta_bytes,
            "reason": s.reason,
        })).collect::<Vec<_>>(),
    })
}

/// Prints the history of `job` under `dir`: a table, or JSON with `json_out`; with `plot`, also
/// writes an SVG picture there.
pub fn history(
    config: &Config,
    dir: &str,
    job: &str,
    json_out: bool,
    plot: Option<&std::path::Path>,
) -> Result<(), JobError> {
    let storage = job_storage(config, dir, job)?;
    let attempts = read_history(&storage)?;
    if attempts.is_empty() {
        return Err(format!(
            "no checkpoint history of job '{job}' under {}{}",
            shown_dir(&to_url(dir)?),
            jobs_hint(&storage)?
        )
        .into());
    }
    if let Some(path) = plot {
        plot_svg(&attempts, job, path)?;
    }
    if json_out {
        let doc: Vec<serde_json::Value> = attempts.iter().map(attempt_json).collect();
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    outln!(
        "{:>6}  {:<20}  {:<10}  {:<9}  {:>9}  {:>10}  {:>10}  {:>9}  {:>9}  reason",
        "id",
        "time (UTC)",
        "kind",
        "status",
        "duration",
        "size",
        "delta",
        "sync max",
        "async max"
    );
    for a in &attempts {
        let sync = a.subtasks.iter().filter_map(|s| s.sync_micros).max();
        let asy = a.subtasks.iter().filter_map(|s| s.async_millis).max();
        outln!(
            "{:>6}  {:<20}  {:<10}  {:<9}  {:>9}  {:>10}  {:>10}  {:>9}  {:>9}  {}",
            a.checkpoint_id,
            time(a.trigger_timestamp_millis),
            match a.kind {
                checkpoint::CheckpointKind::Checkpoint => "checkpoint",
                checkpoint::CheckpointKind::Savepoint => "savepoint",
            },
            a.status.name(),
            format!("{} ms", a.duration_millis),
            c_size(a.bytes),
            c_size(a.delta_bytes),
            sync.map_or("-".into(), |us| format!("{:.2} ms", us as f64 / 1000.0)),
            asy.map_or("-".into(), |ms| format!("{ms} ms")),
            a.reason.as_deref().unwrap_or("")
        );
    }
    if let Some(path) = plot {
        outln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Draws durations (top) and sizes (bottom) over time, failed attempts as red crosses.
pub fn plot_svg(
    attempts: &[CheckpointAttempt],
    job: &str,
    path: &std::path::Path,
) -> Result<(), JobError> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("drawing '{}': {e}", path.display());
    let t0 = attempts
        .iter()
        .map(|a| a.trigger_timestamp_millis)
        .min()
        .unwrap_or(0);
    let x = |a: &CheckpointAttempt| (a.trigger_timestamp_millis - t0) as f64 / 1000.0;
    let x_max = attempts.iter().map(x).fold(0.0, f64::max).max(0.01) * 1.05;
    let d_max = attempts
        .iter()
        .map(|a| a.duration_millis as f64)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let kib = |b: u64| b as f64 / 1024.0;
    let s_max = attempts
        .iter()
        .map(|a| kib(a.bytes))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let ok: Vec<&CheckpointAttempt> = attempts
        .iter()
        .filter(|a| a.status == AttemptStatus::Completed)
        .collect();
    let failed: Vec<&CheckpointAttempt> = attempts
        .iter()
        .filter(|a| a.status != AttemptStatus::Completed)
        .collect();

    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(320);

    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!(
                "job '{job}': checkpoint duration ({} completed, {} failed)",
                ok.len(),
                failed.len()
            ),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..d_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first attempt")
        .y_desc("duration (ms)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            ok.iter().map(|a| (x(a), a.duration_millis as f64)),
            &BLUE,
        ))
        .map_err(|e| err(&e))?
        .label("completed")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, BLUE.filled()));
    chart
        .draw_series(
            ok.iter()
                .map(|a| Circle::new((x(a), a.duration_millis as f64), 3, BLUE.filled())),
        )
        .map_err(|e| err(&e))?;
    chart
        .draw_series(
            failed
                .iter()
                .map(|a| Cross::new((x(a), a.duration_millis as f64), 6, RED.stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label("aborted or declined")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption("checkpoint size", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..s_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first attempt")
        .y_desc("KiB")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            ok.iter().map(|a| (x(a), kib(a.bytes))),
            &BLUE,
        ))
        .map_err(|e| err(&e))?
        .label("full size")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            ok.iter().map(|a| (x(a), kib(a.delta_bytes))),
            &GREEN,
        ))
        .map_err(|e| err(&e))?
        .label("written (delta)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_series(
            failed
                .iter()
                .map(|a| Cross::new((x(a), kib(a.bytes)), 6, RED.stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label("aborted or declined")
        .legend(|(x, y)| Cross::new((x + 10, y), 5, RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
