//! Running a job's workers: one process or several (timely's `-n`/`-p`/`-h` configuration), and
//! stopping every worker of a process when the job fails or a peer process dies.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use timely::worker::Worker;

use crate::error::{Error, Result};
use crate::job::{Job, RunStart};

/// Where this process sits in the job: how many processes, which one this is, their
/// addresses, and how many workers each process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// This process's index, `0..addresses.len()` (1 address: a single process).
    pub process: usize,
    /// `host:port` of every process, in process order (timely's hostfile).
    pub addresses: Vec<String>,
    /// Worker threads per process.
    pub workers: usize,
    /// How long to wait for the connections to every other process (default 30 s): a peer
    /// that never comes up is an error, not a hang.
    pub connect_timeout: Duration,
}

impl Cluster {
    /// One process with `workers` worker threads.
    pub fn single(workers: usize) -> Self {
        Cluster {
            process: 0,
            addresses: vec!["127.0.0.1:0".into()],
            workers,
            connect_timeout: Duration::from_secs(30),
        }
    }

    /// Process `process` of the processes listed in `hostfile` (one `host:port` per line,
    /// in process order; blank lines and `#` comments are skipped).
    pub fn from_hostfile(hostfile: &Path, process: usize, workers: usize) -> Result<Self> {
        let text = std::fs::read_to_string(hostfile).map_err(|e| {
            Error::Cluster(format!(
                "cannot read hostfile '{}': {e}",
                hostfile.display()
            ))
        })?;
        let addresses: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        for a in &addresses {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(Error::Cluster(format!(
                    "hostfile '{}': '{a}' is not host:port",
                    hostfile.display()
                )));
            }
        }
        let cluster = Cluster {
            process,
            addresses,
            workers,
            connect_timeout: Duration::from_secs(30),
        };
        cluster.validate()?;
        Ok(cluster)
    }

    /// Number of processes.
    pub fn processes(&self) -> usize {
        self.addresses.len()
    }

    /// Workers of the whole job.
    pub fn peers(&self) -> usize {
        self.processes() * self.workers
    }

    /// Checks the counts.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            return Err(Error::Cluster(
                "at least one worker per process is needed".into(),
            ));
        }
        if self.addresses.is_empty() {
            return Err(Error::Cluster("no process addresses".into()));
        }
        if self.process >= self.addresses.len() {
            return Err(Error::Cluster(format!(
                "process index {} but only {} processes (0..{})",
                self.process,
                self.addresses.len(),
                self.addresses.len()
            )));
        }
        Ok(())
    }

    fn timely_config(&self) -> timely::Config {
        let communication = if self.processes() == 1 {
            timely::CommunicationConfig::Process(self.workers)
        } else {
            timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        };
        timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        }
    }
}

/// Set when any thread of the process panicked (timely's network threads panic when a peer
/// process dies, and the workers that read from them too): the other workers stop instead of
/// waiting for a peer that is gone.
static PANICKED: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

fn install_panic_flag() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Runs this process's workers of `job`: `build` makes each worker's dataflow (with
/// [`crate::Checkpointing`]) and returns what the caller wants back from the worker; the
/// workers then run until every dataflow is done. Returns each local worker's value.
///
/// A failure of the job (see [`Job::fail`]) stops every worker of the process with
/// [`Error::Failed`]; a peer process that dies stops them with [`Error::PeerFailed`] (timely's
/// network threads panic on the broken connection; a panic hook this function installs once
/// tells the other workers). Connecting to the peers waits until every process is up; then
/// worker 0 decides where the run starts (see [`Job`]) and every worker learns it before
/// `build` runs, so `job.restored()` is known inside `build`.
pub fn run<T, F>(cluster: &Cluster, job: &Job, build: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(&mut Worker) -> Result<T> + Send + Sync + 'static,
{
    cluster.validate()?;
    install_panic_flag();
    let job = job.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let config = cluster.timely_config();
    let logic = move |worker: &mut Worker| {
        if let Err(e) = agree(worker, &job) {
            stop.store(true, Ordering::SeqCst);
            drop_all(worker);
            return Err(e);
        }
        let value = match build(worker) {
            Ok(v) => v,
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                drop_all(worker);
                return Err(e);
            }
        };
        while worker.has_dataflows() {
            if let Some(reason) = job.failure() {
                stop.store(true, Ordering::SeqCst);
                drop_all(worker);
                return Err(Error::Failed(reason));
            }
            if PANICKED.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
                drop_all(worker);
                return Err(Error::PeerFailed(
                    "a thread of this process failed (see the message above)".into(),
                ));
            }
            worker.step_or_park(Some(Duration::from_millis(20)));
        }
        Ok(value)
    };
    // Timely connects to every peer before it starts the workers, and waits for a peer that
    // never comes up forever: the connection runs on a thread of its own, given a deadline.
    // It prints its notices ("awaiting connections", "error connecting ... retrying") on
    // standard output, which is the job's: meanwhile standard output goes to standard error.
    let redirect = (cluster.processes() > 1).then(StdoutToStderr::start);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("flowstate-connect".into())
        .spawn(move || {
            let _ = tx.send(timely::execute(config, logic));
        })
        .map_err(|e| Error::Cluster(format!("starting timely: {e}")))?;
    let connected = rx.recv_timeout(cluster.connect_timeout);
    drop(redirect);
    let guards = match connected {
        Ok(r) => r.map_err(|e| Error::Cluster(format!("starting timely: {e}")))?,
        Err(_) => {
            return Err(Error::PeerFailed(format!(
                "not every process of {:?} connected within {:?}: is each one started, \
                 with the same hostfile?",
                cluster.addresses, cluster.connect_timeout
            )))
        }
    };
    // Joining also joins timely's network threads, which panic when a peer is gone.
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || guards.join()))
        .map_err(|_| {
            Error::PeerFailed("the connection to a peer process broke (see above)".into())
        })?;
    let mut out = Vec::new();
    let mut first_error = None;
    for r in joined {
        match r {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(panic) => {
                first_error.get_or_insert(Error::PeerFailed(panic));
            }
        }
    }
    match first_error {
        // A job failure explains the others.
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Every worker learns how the run starts from worker 0 (see [`Job`]): worker 0 decides, a
/// small dataflow broadcasts the decision, and each process settles on it before any dataflow
/// of the job is built.
fn agree(worker: &mut Worker, job: &Job) -> Result<()> {
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::vec::Broadcast;
    use timely::dataflow::operators::{Inspect, ToStream};

    let decision: Vec<RunStart> = if worker.index() == 0 {
        vec![job.decide()]
    } else {
        Vec::new()
    };
    let received: Rc<RefCell<Option<RunStart>>> = Rc::new(RefCell::new(None));
    let slot = Rc::clone(&received);
    worker.dataflow_named::<u64, _, _>("flowstate-run-start", move |scope| {
        decision
            .to_stream(scope)
            .broadcast()
            .inspect(move |s: &RunStart| *slot.borrow_mut() = Some(s.clone()));
    });
    loop {
        if let Some(start) = received.borrow_mut().take() {
            return job.settle(&start);
        }
        if PANICKED.load(Ordering::SeqCst) {
            return Err(Error::PeerFailed(
                "a thread of this process failed while the run started (see above)".into(),
            ));
        }
        if !worker.step_or_park(Some(Duration::from_millis(20))) && received.borrow().is_none() {
            return Err(Error::PeerFailed(
                "the run's start never came from worker 0".into(),
            ));
        }
    }
}

/// Standard output sent to standard error until dropped (nothing happens when the
/// descriptors cannot be duplicated: the notices then stay on standard output).
struct StdoutToStderr {
    saved: Option<std::os::fd::OwnedFd>,
}

impl StdoutToStderr {
    fn start() -> Self {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let saved = rustix::io::dup(std::io::stdout()).ok().filter(|_| {
            rustix::stdio::dup2_stdout(std::io::stderr())
                .map_err(|e| tracing::debug!(error = %e, "standard output stays"))
                .is_ok()
        });
        StdoutToStderr { saved }
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if let Some(fd) = self.saved.take() {
            if let Err(e) = rustix::stdio::dup2_stdout(&fd) {
                tracing::warn!(error = %e, "could not give standard output back");
            }
        }
    }
}

fn drop_all(worker: &mut Worker) {
    for id in worker.installed_dataflows() {
        worker.drop_dataflow(id);
    }
}

/// Builds a dataflow of the job's [`Time`](crate::Time) on `worker` (a scope of
/// `(epoch, watermark)` times inside a dataflow, as timely's root scopes take only times that
/// refine `()`).
pub fn dataflow<R>(
    worker: &mut Worker,
    func: impl FnOnce(timely::dataflow::Scope<'_, crate::Time>) -> R,
) -> R {
    worker.dataflow::<u64, _, _>(|outer| outer.iterative::<i64, _, _>(func))
}
