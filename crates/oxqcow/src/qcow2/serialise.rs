//! Serialisation of overlapping write requests whose read-modify-write
//! spans more than the bytes they change.
//!
//! An encrypted image is encrypted in whole 512-byte sectors, so a write
//! that covers part of a sector reads the sector, patches it and writes it
//! back. Two such writes into different bytes of one sector, or one of them
//! and any other write to that sector, would each write back a sector that
//! lacks the other's bytes. QEMU's block layer prevents that by marking
//! unaligned requests "serialising": they wait for every overlapping
//! request in flight, and every request waits for the overlapping
//! serialising ones. This module does the same for oxqcow's threads.
//!
//! Requests register the whole sectors they touch before anything else and
//! hold nothing while they wait, so waiting cannot deadlock with the
//! metadata lock or the I/O gate.

use std::sync::{Condvar, Mutex};

/// The write requests in flight on one image.
#[derive(Debug, Default)]
pub(crate) struct RequestSerialiser {
    state: Mutex<State>,
    finished: Condvar,
}

#[derive(Debug, Default)]
struct State {
    in_flight: Vec<Request>,
    next_id: u64,
}

#[derive(Clone, Copy, Debug)]
struct Request {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
}

impl Request {
    fn conflicts_with(&self, other: &Request) -> bool {
        self.start < other.end && other.start < self.end && (self.serialising || other.serialising)
    }
}

/// A registered request; finishing it (dropping the guard) lets the
/// requests waiting for it go on.
#[must_use = "the request counts as in flight until the guard is dropped"]
pub(crate) struct InFlight<'a> {
    owner: &'a RequestSerialiser,
    id: u64,
}

impl RequestSerialiser {
    /// Waits until no conflicting request is in flight, then registers
    /// `[start, end)`. A `serialising` request conflicts with every
    /// overlapping one; the others only with overlapping serialising ones.
    pub(crate) fn begin(&self, start: u64, end: u64, serialising: bool) -> InFlight<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut request = Request { id: 0, start, end, serialising };
        while state.in_flight.iter().any(|r| r.conflicts_with(&request)) {
            state = self.finished.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        request.id = state.next_id;
        state.next_id += 1;
        state.in_flight.push(request);
        InFlight { owner: self, id: request.id }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.owner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.in_flight.retain(|r| r.id != self.id);
        drop(state);
        self.owner.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn request(start: u64, end: u64, serialising: bool) -> Request {
        Request { id: 0, start, end, serialising }
    }

    #[test]
    fn conflicts_need_an_overlap_and_a_serialising_side() {
        let table = [
            // Overlapping, one side serialising.
            (request(0, 512, true), request(256, 1024, false), true),
            (request(0, 4096, false), request(512, 1024, true), true),
            (request(0, 512, true), request(0, 512, true), true),
            // Overlapping plain requests go on in parallel.
            (request(0, 4096, false), request(0, 4096, false), false),
            // Touching ends do not overlap.
            (request(0, 512, true), request(512, 1024, true), false),
            (request(1024, 1536, true), request(0, 1024, false), false),
        ];
        for (a, b, expected) in table {
            assert_eq!(a.conflicts_with(&b), expected, "{a:?} {b:?}");
            assert_eq!(b.conflicts_with(&a), expected, "{b:?} {a:?}");
        }
    }

    /// A conflicting request waits until the one in flight finishes, and
    /// then gets in.
    #[test]
    fn a_conflicting_request_waits_for_the_one_in_flight() {
        let s = RequestSerialiser::default();
        for (held, waiting) in [((512, 1024, true), (0, 600, false)), ((512, 1024, false), (1000, 1536, true))] {
            let guard = s.begin(held.0, held.1, held.2);
            let (tx, rx) = mpsc::channel();
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    let _g = s.begin(waiting.0, waiting.1, waiting.2);
                    tx.send(()).unwrap();
                });
                assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "{waiting:?} got in past {held:?}");
                drop(guard);
                rx.recv_timeout(Duration::from_secs(60)).expect("the waiting request never got in");
            });
        }
        // Both finished: nothing is left in flight.
        assert!(s.state.lock().unwrap().in_flight.is_empty());
    }
}
