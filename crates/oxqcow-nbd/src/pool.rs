//! A fixed pool of worker threads running requests of every connection.
//!
//! Locks: the job queue's mutex, held only to push or pop a job. Jobs never
//! touch a socket (replies go to the connection's writer thread), so a
//! client that stops reading cannot hold a worker.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    jobs: VecDeque<Job>,
    closing: bool,
    /// Workers waiting for a job: a submit wakes one only if there is one
    /// (a wake is a system call, and most submits find every worker busy
    /// or about to look at the queue again).
    idle: usize,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The worker pool.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` workers (at least one).
    pub fn new(n: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closing: false, idle: 0 }),
            ready: Condvar::new(),
        });
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let s = Arc::clone(&shared);
            threads.push(std::thread::Builder::new().name(format!("nbd-worker-{i}")).spawn(move || work(&s))?);
        }
        Ok(Pool { shared, threads })
    }

    /// Queues a job.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.jobs.push_back(Box::new(job));
        let wake = q.idle > 0;
        drop(q);
        if wake {
            self.shared.ready.notify_one();
        }
    }
}

fn work(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closing {
                    return;
                }
                q.idle += 1;
                q = s.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                q.idle -= 1;
            }
        };
        job();
    }
}

impl Drop for Pool {
    /// Runs the queued jobs to the end, then stops the workers.
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|p| p.into_inner()).closing = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
