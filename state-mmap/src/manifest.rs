//! The manifest: the list of live sorted runs and the owner's metadata, replaced atomically.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Magic bytes of the manifest.
pub const MANIFEST_MAGIC: [u8; 4] = *b"FLSM";
/// The manifest format version.
pub const MANIFEST_VERSION: u16 = 1;
/// The manifest's file name in the database directory.
pub const MANIFEST_NAME: &str = "MANIFEST";
const MAX_MANIFEST: u64 = 1 << 30;

/// One live file as the manifest records it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileEntry {
    /// Local file number (`<number>.run`).
    pub number: u64,
    /// The file's globally unique name for checkpoints (kept when a file is restored).
    pub name: String,
    /// Only keys in `[lo, hi)` of the file are visible (files restored at another parallelism).
    pub clip: Option<(Vec<u8>, Vec<u8>)>,
}

/// What the manifest records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Manifest {
    /// A random identity of the store, part of its files' checkpoint names.
    pub db_id: u64,
    /// The next file number to use.
    pub next_file: u64,
    /// Sorted runs, newest first; each a list of files in key order.
    pub runs: Vec<Vec<FileEntry>>,
    /// Opaque bytes of the engine's owner (the backend's state registry).
    pub user_meta: Vec<u8>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&self.db_id.to_be_bytes());
        body.extend_from_slice(&self.next_file.to_be_bytes());
        body.extend_from_slice(&(self.runs.len() as u32).to_be_bytes());
        let bytes = |body: &mut Vec<u8>, b: &[u8]| {
            body.extend_from_slice(&(b.len() as u32).to_be_bytes());
            body.extend_from_slice(b);
        };
        for r in &self.runs {
            body.extend_from_slice(&(r.len() as u32).to_be_bytes());
            for f in r {
                body.extend_from_slice(&f.number.to_be_bytes());
                bytes(&mut body, f.name.as_bytes());
                match &f.clip {
                    Some((lo, hi)) => {
                        body.push(1);
                        bytes(&mut body, lo);
                        bytes(&mut body, hi);
                    }
                    None => body.push(0),
                }
            }
        }
        body.extend_from_slice(&(self.user_meta.len() as u32).to_be_bytes());
        body.extend_from_slice(&self.user_meta);
        let mut out = Vec::with_capacity(body.len() + 14);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        out
    }

    fn decode(b: &[u8], path: &Path) -> Result<Manifest> {
        let corrupt = |off: usize, r: &str| Error::corrupt(path, off as u64, r.to_string());
        if b.len() < 14 || b[..4] != MANIFEST_MAGIC {
            return Err(corrupt(
                0,
                "bad magic or too short: not a Flowstate manifest",
            ));
        }
        let version = u16::from_be_bytes([b[4], b[5]]);
        if version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let len = u32::from_be_bytes([b[6], b[7], b[8], b[9]]) as usize;
        if b.len() != 10 + len + 4 {
            return Err(corrupt(6, "length does not match the file size"));
        }
        let body = &b[10..10 + len];
        let crc = &b[10 + len..];
        if u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]) != crc32c::crc32c(body) {
            return Err(corrupt(10 + len, "checksum mismatch"));
        }
        let mut p = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = body
                .get(p..p + n)
                .ok_or_else(|| corrupt(10 + p, "truncated body"))?;
            p += n;
            Ok(s)
        };
        let u32_of = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
        let u64_of = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        };
        let db_id = u64_of(take(8)?);
        let next_file = u64_of(take(8)?);
        let nruns = u32_of(take(4)?) as usize;
        if nruns > len / 4 {
            return Err(corrupt(18, "impossible run count"));
        }
        let mut runs = Vec::with_capacity(nruns);
        for _ in 0..nruns {
            let n = u32_of(take(4)?) as usize;
            if n > len / 8 {
                return Err(corrupt(18, "impossible file count"));
            }
            let mut files = Vec::with_capacity(n);
            for _ in 0..n {
                let number = u64_of(take(8)?);
                let l = u32_of(take(4)?) as usize;
                let name = String::from_utf8(take(l)?.to_vec())
                    .map_err(|_| corrupt(10, "file name is not UTF-8"))?;
                let clip = match take(1)?[0] {
                    0 => None,
                    1 => {
                        let l = u32_of(take(4)?) as usize;
                        let lo = take(l)?.to_vec();
                        let l = u32_of(take(4)?) as usize;
                        Some((lo, take(l)?.to_vec()))
                    }
                    _ => return Err(corrupt(10, "bad clip flag")),
                };
                files.push(FileEntry { number, name, clip });
            }
            runs.push(files);
        }
        let n = u32_of(take(4)?) as usize;
        let user_meta = take(n)?.to_vec();
        Ok(Manifest {
            db_id,
            next_file,
            runs,
            user_meta,
        })
    }

    /// Reads `dir/MANIFEST`, or `None` when there is none.
    pub(crate) fn load(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST_NAME);
        match fs::metadata(&path) {
            Ok(m) if m.len() > MAX_MANIFEST => {
                return Err(Error::corrupt(&path, 0, "manifest larger than 1 GiB"))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading the manifest", &path, e)),
        }
        let bytes = fs::read(&path).map_err(|e| Error::io("reading the manifest", &path, e))?;
        Manifest::decode(&bytes, &path).map(Some)
    }

    /// Writes `dir/MANIFEST` atomically: temporary file, fsync, rename, fsync of the directory.
    pub(crate) fn store(&self, dir: &Path) -> Result<()> {
        let tmp = dir.join("MANIFEST.tmp");
        let path = dir.join(MANIFEST_NAME);
        let mut f = File::create(&tmp).map_err(|e| Error::io("writing the manifest", &tmp, e))?;
        f.write_all(&self.encode())
            .map_err(|e| Error::io("writing the manifest", &tmp, e))?;
        f.sync_all()
            .map_err(|e| Error::io("fsyncing the manifest", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(|e| Error::io("publishing the manifest", &path, e))?;
        sync_dir(dir)
    }
}

/// Fsyncs a directory so renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| Error::io("opening the directory", dir, e))?;
        d.sync_all()
            .map_err(|e| Error::io("fsyncing the directory", dir, e))?;
    }
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            db_id: 42,
            next_file: 9,
            runs: vec![
                vec![
                    FileEntry {
                        number: 7,
                        name: "a-7.run".into(),
                        clip: None,
                    },
                    FileEntry {
                        number: 8,
                        name: "a-8.run".into(),
                        clip: Some((vec![0, 1], vec![0, 9])),
                    },
                ],
                vec![FileEntry {
                    number: 3,
                    name: "b-1.run".into(),
                    clip: None,
                }],
            ],
            user_meta: b"meta".to_vec(),
        };
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Some(m.clone()));
        let path = dir.path().join(MANIFEST_NAME);
        let bytes = fs::read(&path).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x20;
            fs::write(&path, &bad).unwrap();
            let err = Manifest::load(dir.path()).unwrap_err().to_string();
            assert!(err.contains("MANIFEST"), "{err}");
        }
    }
}
