//! Job progress for the page: a client names its request with a job id, the worker reports
//! tiles done, and `GET /api/progress/{id}` reads it back. Entries expire, and the table is
//! bounded, so ids never accumulate.

use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for a worker.
    Queued,
    /// Being decoded or denoised.
    Running,
    /// Finished with a result.
    Done,
    /// Finished with an error.
    Failed,
    /// Dropped because its client went away: skipped while queued, or stopped between passes
    /// over its tiles.
    Cancelled,
}

/// The answer of `GET /api/progress/{id}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub state: State,
    /// Tiles denoised so far (passes over tiles, with a self-ensemble).
    pub done: usize,
    /// Tiles in the image, times the self-ensemble's passes (0 until the image is decoded).
    pub total: usize,
}

struct Entry {
    snapshot: Snapshot,
    updated: Instant,
}

/// All tracked jobs.
pub struct Registry {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
    /// Finished entries are kept this long for a last poll.
    keep_finished: Duration,
    /// Unfinished entries are dropped after this long without news (a lost client).
    keep_stale: Duration,
}

impl Registry {
    /// A registry holding at most `capacity` jobs.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
            keep_finished: Duration::from_secs(60),
            keep_stale: Duration::from_secs(15 * 60),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves a table that is still consistent.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `id` as queued, replacing an earlier job of the same id. `None` when the
    /// table is full of live jobs (the request still runs, without progress).
    pub fn register(self: &Arc<Self>, id: &str) -> Option<ProgressHandle> {
        let mut entries = self.lock();
        let now = Instant::now();
        entries.retain(|_, e| {
            let age = now - e.updated;
            match e.snapshot.state {
                State::Done | State::Failed | State::Cancelled => age < self.keep_finished,
                State::Queued | State::Running => age < self.keep_stale,
            }
        });
        if entries.len() >= self.capacity && !entries.contains_key(id) {
            return None;
        }
        entries.insert(
            id.to_owned(),
            Entry {
                snapshot: Snapshot {
                    state: State::Queued,
                    done: 0,
                    total: 0,
                },
                updated: now,
            },
        );
        Some(ProgressHandle {
            registry: Arc::clone(self),
            id: id.to_owned(),
        })
    }

    /// The state of job `id`, if tracked.
    pub fn get(&self, id: &str) -> Option<Snapshot> {
        self.lock().get(id).map(|e| e.snapshot)
    }

    /// Jobs tracked now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One job's writer end.
#[derive(Clone)]
pub struct ProgressHandle {
    registry: Arc<Registry>,
    id: String,
}

impl ProgressHandle {
    fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        if let Some(e) = self.registry.lock().get_mut(&self.id) {
            f(&mut e.snapshot);
            e.updated = Instant::now();
        }
    }

    /// A worker took the job.
    pub fn running(&self) {
        self.update(|s| s.state = State::Running);
    }

    /// `done` of `total` tiles are denoised.
    pub fn tiles(&self, done: usize, total: usize) {
        self.update(|s| {
            s.done = done;
            s.total = total;
        });
    }

    /// The job ended, with a result (`ok`) or an error.
    pub fn finish(&self, ok: bool) {
        self.update(|s| s.state = if ok { State::Done } else { State::Failed });
    }

    /// The job was dropped because its client went away.
    pub fn cancelled(&self) {
        self.update(|s| s.state = State::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_goes_from_queued_to_done() {
        let reg = Registry::new(4);
        let h = reg.register("job-1").unwrap();
        assert_eq!(reg.get("job-1").unwrap().state, State::Queued);
        h.running();
        h.tiles(2, 5);
        let s = reg.get("job-1").unwrap();
        assert_eq!((s.state, s.done, s.total), (State::Running, 2, 5));
        h.finish(true);
        assert_eq!(reg.get("job-1").unwrap().state, State::Done);
        assert_eq!(reg.get("other"), None);
    }

    #[test]
    fn the_table_is_bounded_and_expires() {
        let reg = Registry::new(2);
        let _a = reg.register("a").unwrap();
        let _b = reg.register("b").unwrap();
        assert!(reg.register("c").is_none(), "full of live jobs");
        assert!(
            reg.register("a").is_some(),
            "re-registering an id is allowed"
        );
        let mut short = Registry::new(2);
        Arc::get_mut(&mut short).unwrap().keep_finished = Duration::ZERO;
        short.register("x").unwrap().finish(false);
        short.register("y").unwrap();
        assert!(short.register("z").is_some(), "finished entries expire");
        assert_eq!(short.get("x"), None);
        assert_eq!(short.len(), 2);
    }
}
