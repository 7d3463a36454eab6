//! Helpers the multi-process tests share.

use std::path::Path;

/// Number of completion entries in the job's commit log (entry files are named by their
/// number; byte 6 is the kind, 2 for a completion; staging files of a put in progress are not
/// entries).
pub fn completions(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir.join("ck/keyed/_commits")) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter(|b| b.len() == 27 && b[6] == 2)
        .count()
}
