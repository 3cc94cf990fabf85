//! Model checking of the queue between a connection's reader and its
//! workers (`nbd/src/queue.rs`) with shuttle: the reader reserves budget
//! and dispatches jobs of several sizes (one larger than the budget),
//! workers start as the queue asks and take, do and release jobs, and
//! the reader closes the queue at the end. Shuttle explores the
//! interleavings: a lost wake-up is a deadlock it reports; every job
//! must be done exactly once, and the bytes held never exceed the
//! budget unless one job alone holds them. Run with
//! `cargo test -p rimg-nbd --features shuttle --test queue_model`.
#![cfg(feature = "shuttle")]

use std::sync::Arc;

use rimg_model::schedules;
use rimg_nbd::queue::Queue;
use shuttle::sync::Mutex;

const BUDGET: u64 = 64;

/// Jobs (id, cost) through a queue of at most `workers` workers, each
/// start succeeding if `starts` says so; a worker that takes job `fail`
/// fails as a panicking one does (closes the queue, gives its room
/// back, ends). Returns the ids done, in order.
fn run(costs: &[u64], workers: usize, starts: bool, fail: Option<usize>) -> Vec<usize> {
    let q = Arc::new(Queue::<(usize, u64)>::new(BUDGET, workers));
    let done = Arc::new(Mutex::new(Vec::new()));
    let handles = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let (q, done) = (q.clone(), done.clone());
        move || {
            while let Some((id, cost)) = q.take() {
                if Some(id) == fail {
                    q.close();
                    q.release(cost);
                    return;
                }
                done.lock().unwrap().push(id);
                q.release(cost);
            }
        }
    };
    for (id, &cost) in costs.iter().enumerate() {
        q.reserve(cost);
        let held = q.held();
        // Past the budget only alone, or once closed (the connection
        // ends: nothing more is read).
        assert!(
            held <= BUDGET || held == cost || q.is_closed(),
            "{held} bytes held"
        );
        let start = || {
            if starts {
                let w = worker.clone();
                handles.lock().unwrap().push(shuttle::thread::spawn(w));
            }
            starts
        };
        if let Some((id, cost)) = q.dispatch((id, cost), start) {
            done.lock().unwrap().push(id);
            q.release(cost);
        }
    }
    q.close();
    let hs: Vec<_> = std::mem::take(&mut *handles.lock().unwrap());
    assert!(hs.len() <= workers, "{} workers started", hs.len());
    for h in hs {
        h.join().unwrap();
    }
    assert_eq!(q.held(), 0, "bytes still held");
    let mut v = done.lock().unwrap().clone();
    v.sort_unstable();
    v
}

#[test]
fn every_job_is_done_once_within_the_budget() {
    const COSTS: [u64; 7] = [40, 30, 100, 0, 10, 50, 64];
    let all = || (0..COSTS.len()).collect::<Vec<_>>();
    shuttle::check_random(
        move || assert_eq!(run(&COSTS, 2, true, None), all()),
        schedules(3000),
    );
    shuttle::check_pct(
        move || assert_eq!(run(&COSTS, 3, true, None), all()),
        schedules(1000),
        3,
    );
}

#[test]
fn without_workers_the_reader_does_the_jobs() {
    const COSTS: [u64; 3] = [40, 30, 100];
    shuttle::check_random(
        || assert_eq!(run(&COSTS, 2, false, None), vec![0, 1, 2]),
        schedules(200),
    );
}

/// A worker that fails while the reader waits for room (its job held
/// most of the budget): the reader goes on and everything ends; the
/// failed job is never done.
#[test]
fn a_failed_worker_leaves_nothing_waiting() {
    const COSTS: [u64; 4] = [60, 60, 10, 60];
    shuttle::check_random(
        || {
            let done = run(&COSTS, 2, true, Some(0));
            assert!(!done.contains(&0), "{done:?}");
        },
        schedules(2000),
    );
}
