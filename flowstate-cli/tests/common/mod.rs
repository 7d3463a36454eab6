//! Running the `flowstate` binary from the end-to-end tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

/// Runs the binary with `args` and the environment variables `env` (never a checkpoint
/// directory inherited from the caller's environment).
pub fn flowstate_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flowstate"))
        .args(args)
        .env_remove("FLOWSTATE_STATE_CHECKPOINTS_DIR")
        .envs(env.iter().copied())
        .output()
        .expect("the binary runs")
}

/// Runs the binary with `args`.
pub fn flowstate(args: &[&str]) -> Output {
    flowstate_env(args, &[])
}

/// Runs the binary, requires success and returns its standard output.
pub fn ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = flowstate_env(args, env);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "flowstate {args:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// [`ok_env`] without extra variables.
pub fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

/// The state digest a run prints.
pub fn digest(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("state digest: "))
        .unwrap_or_else(|| panic!("no digest in:\n{output}"))
        .to_string()
}
