//! The recording loop: one thread owns the [`Tracker`] (kernel capture and
//! in-memory change sets) and feeds the [`ChangeLog`]: gaps as they appear,
//! settle reports at each check, seals periodically and on request.

use std::{
    sync::{mpsc, Arc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use crate::{
    changelog::{lock, LogError, SharedLog, Stamp},
    tracker::{Tracker, TrackerError},
};

#[derive(Debug, Clone)]
pub struct RecorderOptions {
    /// How often the event rings are drained.
    pub poll_interval: Duration,
    /// How often loss counters, the witness and devices are checked.
    pub check_interval: Duration,
    /// How often the open segment is sealed without being asked.
    pub segment_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the recorder has stopped")]
    Stopped,
}

enum Request {
    Seal(oneshot::Sender<Result<Stamp, String>>),
    Status(Box<dyn FnOnce(&Tracker) + Send>),
}

/// Controls a running recorder thread.
pub struct Recorder {
    requests: mpsc::Sender<Request>,
    thread: std::sync::Mutex<Option<JoinHandle<Result<(), RecorderError>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    pub fn spawn(tracker: Tracker, log: SharedLog, options: RecorderOptions) -> Self {
        let (requests, inbox) = mpsc::channel();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("recorder".into())
            .spawn(move || run(tracker, log, inbox, options, stop_flag))
            .expect("spawning the recorder thread");
        Self { requests, thread: std::sync::Mutex::new(Some(thread)), stop }
    }

    /// Seals now; returns the cut: every change submitted before it is in
    /// the durable log.
    pub async fn seal(&self) -> Result<Stamp, RecorderError> {
        let (reply, answer) = oneshot::channel();
        self.requests.send(Request::Seal(reply)).map_err(|_| RecorderError::Stopped)?;
        match answer.await {
            Ok(Ok(cut)) => Ok(cut),
            Ok(Err(e)) => Err(RecorderError::Log(LogError::Sealing(e))),
            Err(_) => Err(RecorderError::Stopped),
        }
    }

    /// Runs `f` on the tracker between two drains (for status reports).
    pub async fn with_tracker<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tracker) -> T + Send + 'static,
    ) -> Result<T, RecorderError> {
        let (reply, answer) = oneshot::channel();
        let job: Box<dyn FnOnce(&Tracker) + Send> = Box::new(move |t| {
            let _ = reply.send(f(t));
        });
        self.requests.send(Request::Status(job)).map_err(|_| RecorderError::Stopped)?;
        answer.await.map_err(|_| RecorderError::Stopped)
    }

    /// Whether the thread ended (by error) on its own.
    pub fn is_finished(&self) -> bool {
        self.thread.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_none_or(|t| t.is_finished())
    }

    /// Final seal, clean-stop record, and the thread's outcome (blocks).
    pub fn stop(&self) -> Result<(), RecorderError> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take().ok_or(RecorderError::Stopped)?;
        thread.join().unwrap_or_else(|_| Err(RecorderError::Stopped))
    }
}

fn run(
    mut tracker: Tracker,
    log: SharedLog,
    inbox: mpsc::Receiver<Request>,
    options: RecorderOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), RecorderError> {
    let mut next_check = Instant::now() + options.check_interval;
    let mut next_seal = Instant::now() + options.segment_interval;
    let seal = |tracker: &mut Tracker| -> Result<Stamp, RecorderError> {
        let seal = tracker.seal()?;
        forward_gaps(tracker, &log)?;
        let mut log = lock(&log);
        let cut = log.stamp(seal.cut_ns);
        log.apply_seal(seal)?;
        Ok(cut)
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let request = match inbox.recv_timeout(options.poll_interval) {
            Ok(r) => Some(r),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            // Every handle is gone: nobody can stop us any more but the flag.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(options.poll_interval);
                None
            }
        };
        tracker.poll();
        forward_gaps(&mut tracker, &log)?;
        match request {
            Some(Request::Seal(reply)) => {
                let result = seal(&mut tracker);
                let failed = result.as_ref().err().map(ToString::to_string);
                let _ = reply.send(result.map_err(|e| e.to_string()));
                if let Some(e) = failed {
                    // The log could not be written: stop; a restart turns
                    // the interval into a gap rather than risk a hole.
                    return Err(RecorderError::Log(LogError::Sealing(e)));
                }
                next_seal = Instant::now() + options.segment_interval;
            }
            Some(Request::Status(job)) => job(&tracker),
            None => {}
        }
        let now = Instant::now();
        if now >= next_check {
            let report = tracker.check()?;
            forward_gaps(&mut tracker, &log)?;
            let mut log = lock(&log);
            for key in report.settled {
                log.settle(key, report.at_ns)?;
            }
            next_check = now + options.check_interval;
        }
        if now >= next_seal {
            seal(&mut tracker)?;
            next_seal = now + options.segment_interval;
        }
    }
    tracker.check()?;
    seal(&mut tracker)?;
    lock(&log).stop()?;
    Ok(())
}

fn forward_gaps(tracker: &mut Tracker, log: &SharedLog) -> Result<(), RecorderError> {
    let gaps = tracker.new_gaps();
    if !gaps.is_empty() {
        let mut log = lock(log);
        for gap in &gaps {
            log.record_gap(gap)?;
        }
    }
    Ok(())
}
