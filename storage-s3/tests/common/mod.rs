//! Shared helpers of the integration tests: the S3 test server's settings, unique prefixes, test
//! files, and a private SeaweedFS instance for fault tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use storage_s3::{Storage, StorageConfig};

/// The S3 server the tests use, from the environment `scripts/test` (via `scripts/s3-server`)
/// exports.
#[derive(Clone)]
pub struct S3Env {
    pub endpoint: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
}

/// The S3 test server, or `None` (with a printed notice) when none is configured.
///
/// When `FLOWSTATE_REQUIRE_S3=1` (set by `scripts/test`) or `CI=true`, a missing configuration is
/// a test failure instead of a skip.
pub fn s3_env(test: &str) -> Option<S3Env> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("FLOWSTATE_S3_TEST_ENDPOINT"),
        var("AWS_ACCESS_KEY_ID"),
        var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(endpoint), Some(access_key), Some(secret_key)) => Some(S3Env {
            endpoint,
            bucket: var("FLOWSTATE_S3_TEST_BUCKET").unwrap_or_else(|| "flowstate-test".into()),
            access_key,
            secret_key,
        }),
        _ => {
            let required = var("FLOWSTATE_REQUIRE_S3").is_some_and(|v| v != "0")
                || var("CI").is_some_and(|v| v == "true" || v == "1");
            assert!(
                !required,
                "{test}: the S3 tests are required here (FLOWSTATE_REQUIRE_S3 or CI is set) but no \
                 S3 server is configured: FLOWSTATE_S3_TEST_ENDPOINT, AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY must be set. Run ./scripts/test, which starts SeaweedFS."
            );
            notice(&format!(
                "NOTICE: skipping S3 test {test}: no S3 server configured (set \
                 FLOWSTATE_S3_TEST_ENDPOINT and AWS_* or run ./scripts/test)"
            ));
            None
        }
    }
}

/// Prints past the test harness's output capture, so skip notices show in a plain `cargo test`.
pub fn notice(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

/// A prefix no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl S3Env {
    /// A config for `s3://bucket/<prefix>` on this server, with short retry/timeouts for tests.
    pub fn config(&self, prefix: &str) -> StorageConfig {
        let mut config = StorageConfig::new(format!("s3://{}/{prefix}", self.bucket));
        config.s3.endpoint = Some(self.endpoint.clone());
        config.s3.region = Some("us-east-1".into());
        config.s3.access_key_id = Some(self.access_key.as_str().into());
        config.s3.secret_access_key = Some(self.secret_key.as_str().into());
        config.s3.allow_http = Some(true);
        config.s3.from_env = Some(false);
        config.transfer.part_size = 5 * 1024 * 1024;
        config.transfer.max_concurrency = 4;
        config
    }

    pub fn storage(&self, prefix: &str) -> Storage {
        Storage::from_config(&self.config(prefix)).unwrap()
    }
}

/// Writes `len` pseudo-random bytes (deterministic from `seed`) to a new file in `dir`.
pub fn random_file(dir: &FsPath, name: &str, len: usize, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes = state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        let n = left.min(block.len());
        file.write_all(&block[..n]).unwrap();
        left -= n;
    }
    file.flush().unwrap();
    path
}

/// Asserts two files are equal byte for byte (without loading them whole).
pub fn assert_same_file(a: &FsPath, b: &FsPath) {
    use std::io::Read;
    let mut fa = std::io::BufReader::new(std::fs::File::open(a).unwrap());
    let mut fb = std::io::BufReader::new(std::fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(
            na, nb,
            "{a:?} and {b:?} differ in length near offset {offset}"
        );
        if na == 0 {
            return;
        }
        if ba[..na] != bb[..nb] {
            let i = ba.iter().zip(&bb).position(|(x, y)| x != y).unwrap();
            panic!("{a:?} and {b:?} differ at byte {}", offset + i as u64);
        }
        offset += na as u64;
    }

    fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
        let mut filled = 0;
        while filled < buf.len() {
            let n = r.read(&mut buf[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        filled
    }
}

/// `n` ports nothing listens on, below the kernel's range of ephemeral ports: a port the
/// kernel handed out (`bind` to port 0) can be taken again by an outgoing connection (the
/// tests' own, or weed's between its services) before weed binds it or while the server is
/// stopped for a restart ("bind: address already in use"); outgoing connections never get
/// ports below that range. Parallel test processes start at different places of it.
fn free_ports(n: usize) -> Vec<u16> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            r.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (15_000u64, ephemeral_start.max(20_000));
    let span = high - low;
    let start = u64::from(std::process::id()).wrapping_mul(2_654_435_761) % span;
    let mut held = Vec::new();
    for _ in 0..span {
        let port = low + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            held.push(l);
            if held.len() == n {
                break;
            }
        }
    }
    assert_eq!(held.len(), n, "no {n} free ports in {low}..{high}");
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A private SeaweedFS instance on its own free ports and data directory, for tests that stop
/// and restart the server. Killed when dropped.
pub struct WeedServer {
    weed: PathBuf,
    pub dir: tempfile::TempDir,
    ports: Vec<u16>,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    child: Option<Child>,
}

impl WeedServer {
    /// The `weed` binary exported by `scripts/test` (FLOWSTATE_WEED_BIN), if any.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os("FLOWSTATE_WEED_BIN")
            .map(PathBuf::from)
            .filter(|p| p.exists())
    }

    /// Starts a new instance and waits until its bucket is ready.
    pub fn start(weed: PathBuf) -> Self {
        let ports = free_ports(10);
        let mut server = Self {
            weed,
            dir: tempfile::tempdir().unwrap(),
            ports,
            bucket: "fault-test".into(),
            access_key: "fault-key".into(),
            secret_key: format!("fault-secret-{}", std::process::id()),
            child: None,
        };
        server.restart();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[6])
    }

    pub fn env(&self) -> S3Env {
        S3Env {
            endpoint: self.endpoint(),
            bucket: self.bucket.clone(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// (Re)starts the server on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let p = &self.ports;
        let log = std::fs::File::create(self.dir.path().join("weed.log")).unwrap();
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let child = Command::new(&self.weed)
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args([
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-webdav=false",
                "-master.telemetry=false",
            ])
            .arg(format!("-bucket={}", self.bucket))
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let filer = format!("127.0.0.1:{}", self.ports[4]);
        let s3 = format!("127.0.0.1:{}", self.ports[6]);
        let bucket_path = format!("/buckets/{}/", self.bucket);
        loop {
            if http_status(&filer, &bucket_path) == Some(200) && http_status(&s3, "/").is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "weed exited during start ({status}); log:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "weed not ready after 60 s; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a multipart upload is in progress on this server (SeaweedFS keeps them under
    /// `/buckets/<bucket>/.uploads/` in its filer), then a little longer so parts are stored.
    pub fn wait_for_multipart_upload(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let filer = format!("127.0.0.1:{}", self.ports[4]);
        let uploads = format!("/buckets/{}/.uploads/", self.bucket);
        loop {
            let body = http_get(&filer, &uploads).unwrap_or_default();
            if body.contains("\"Entries\":[") {
                std::thread::sleep(Duration::from_millis(150));
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no multipart upload appeared within {timeout:?}; last listing: {body}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for WeedServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The status code of `GET path` on `addr`, or `None` if nothing answers.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The body of `GET path` on `addr` as JSON, or `None` if nothing answers.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Read;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}
