//! Which queued jobs start now: priority, then submission order, with
//! backfill and a bound on starvation.
//!
//! Pure decision logic over a snapshot (no I/O, no clock of its own), so the
//! rules are tested exhaustively without an engine.

use std::time::Duration;

/// A queued job as the scheduler sees it, in queue order.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Job id.
    pub id: String,
    /// Slots it needs.
    pub slots: u32,
    /// GPUs it needs.
    pub gpus: u32,
    /// How long it has waited.
    pub waited: Duration,
    /// Its managed mounts are healthy (a job waiting for a mount does not
    /// block others).
    pub mounts_ready: bool,
    /// Its image is local (a job whose image is being pulled holds no slot
    /// and does not block others).
    pub image_ready: bool,
}

/// A decision to start a job with these GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// Job id.
    pub id: String,
    /// GPU indices assigned.
    pub gpus: Vec<u32>,
}

/// What is free right now.
#[derive(Debug, Clone)]
pub struct Free {
    /// Free slots.
    pub slots: u32,
    /// Free GPU indices, ascending.
    pub gpus: Vec<u32>,
}

/// Picks the jobs to start, in order. A job that does not fit lets smaller
/// ones behind it start (backfill) until it has waited `reserve_after`; from
/// then on it reserves what it is short of: when it lacks slots, no job
/// behind it gets a slot; when it lacks GPUs, no job behind it gets a GPU,
/// but jobs without GPUs still use the free slots (the GPUs it waits for
/// free up with slots of their own).
pub fn select(candidates: &[Candidate], mut free: Free, reserve_after: Duration) -> Vec<Start> {
    let mut starts = Vec::new();
    for c in candidates {
        if !c.mounts_ready || !c.image_ready {
            continue;
        }
        let short_of_slots = c.slots > free.slots;
        let short_of_gpus = c.gpus as usize > free.gpus.len();
        if !short_of_slots && !short_of_gpus {
            free.slots -= c.slots;
            let gpus: Vec<u32> = free.gpus.drain(..c.gpus as usize).collect();
            starts.push(Start {
                id: c.id.clone(),
                gpus,
            });
        } else if c.waited >= reserve_after {
            if short_of_slots {
                free.slots = 0;
            }
            if short_of_gpus {
                free.gpus.clear();
            }
        }
        if free.slots == 0 {
            break;
        }
    }
    starts
}

/// Why a queued job can never start here, naming the limit; `None` when it
/// can (now or once others end). `gpu_inventory` is `None` while the GPUs
/// are not discovered yet (a GPU job then waits rather than fails).
pub fn never_fits(
    slots: u32,
    gpus: u32,
    capacity: u32,
    gpu_inventory: Option<usize>,
) -> Option<String> {
    if slots > capacity {
        return Some(format!(
            "needs {slots} slots but the capacity is now {capacity} \
             (jobs.slots, or jobs.slots_per_core x usable cores)"
        ));
    }
    match gpu_inventory {
        Some(0) if gpus > 0 => Some(format!("asks for {gpus} GPUs but this host has none")),
        Some(n) if gpus as usize > n => {
            Some(format!("asks for {gpus} GPUs but this host has only {n}"))
        }
        _ => None,
    }
}

/// Slot capacity: the absolute `slots` when set, else `slots_per_core` per
/// usable core (at least one).
pub fn capacity(slots: u32, slots_per_core: u32, usable_cores: f64) -> u32 {
    if slots > 0 {
        slots
    } else {
        ((usable_cores * f64::from(slots_per_core)).floor() as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, slots: u32, waited_s: u64) -> Candidate {
        Candidate {
            id: id.into(),
            slots,
            gpus: 0,
            waited: Duration::from_secs(waited_s),
            mounts_ready: true,
            image_ready: true,
        }
    }

    fn ids(starts: &[Start]) -> Vec<&str> {
        starts.iter().map(|s| s.id.as_str()).collect()
    }

    fn free(slots: u32) -> Free {
        Free {
            slots,
            gpus: vec![],
        }
    }

    #[test]
    fn fills_free_slots_in_order() {
        let q = [c("a", 1, 0), c("b", 1, 0), c("c", 1, 0)];
        assert_eq!(
            ids(&select(&q, free(2), Duration::from_secs(60))),
            ["a", "b"]
        );
    }

    #[test]
    fn small_jobs_backfill_around_a_big_one_until_it_has_waited() {
        let q = [c("big", 4, 10), c("small", 1, 0)];
        assert_eq!(
            ids(&select(&q, free(2), Duration::from_secs(60))),
            ["small"]
        );
        let q = [c("big", 4, 61), c("small", 1, 0)];
        assert!(
            select(&q, free(2), Duration::from_secs(60)).is_empty(),
            "big now reserves"
        );
    }

    #[test]
    fn big_job_starts_once_enough_slots_are_free() {
        let q = [c("big", 4, 61), c("small", 1, 0)];
        assert_eq!(ids(&select(&q, free(4), Duration::from_secs(60))), ["big"]);
    }

    #[test]
    fn gpus_are_distinct_and_waited_for() {
        let mut q = [c("two", 1, 0), c("one", 1, 0), c("another", 1, 0)];
        q[0].gpus = 2;
        q[1].gpus = 1;
        q[2].gpus = 1;
        let starts = select(
            &q,
            Free {
                slots: 8,
                gpus: vec![0, 1, 2],
            },
            Duration::from_secs(60),
        );
        assert_eq!(starts[0].gpus, vec![0, 1]);
        assert_eq!(starts[1].gpus, vec![2]);
        assert_eq!(starts.len(), 2, "the third waits for a GPU");
    }

    #[test]
    fn a_job_waiting_for_a_mount_does_not_block() {
        let mut q = [c("mounting", 1, 1000), c("next", 1, 0)];
        q[0].mounts_ready = false;
        assert_eq!(ids(&select(&q, free(1), Duration::from_secs(60))), ["next"]);
    }

    #[test]
    fn a_job_waiting_for_its_image_holds_no_slot_even_when_it_waited_long() {
        // Waiting past reserve_after would reserve slots for a job that does
        // not fit; a job whose image is not local reserves nothing.
        let mut q = [c("pulling", 1, 1000), c("next", 1, 0)];
        q[0].image_ready = false;
        assert_eq!(ids(&select(&q, free(1), Duration::from_secs(60))), ["next"]);
    }

    #[test]
    fn never_more_than_free() {
        for slots in 0..6 {
            let q: Vec<Candidate> = (0..10).map(|i| c(&i.to_string(), 1 + i % 3, 0)).collect();
            let used: u32 = select(&q, free(slots), Duration::from_secs(60))
                .iter()
                .map(|s| q.iter().find(|c| c.id == s.id).unwrap().slots)
                .sum();
            assert!(used <= slots);
        }
    }

    #[test]
    fn a_job_short_of_gpus_reserves_gpus_not_slots() {
        let mut q = [c("gpu", 1, 1000), c("cpu", 1, 0), c("gpu2", 1, 0)];
        q[0].gpus = 2;
        q[2].gpus = 1;
        let starts = select(
            &q,
            Free {
                slots: 4,
                gpus: vec![3],
            },
            Duration::from_secs(60),
        );
        assert_eq!(
            ids(&starts),
            ["cpu"],
            "the CPU job backfills; the free GPU stays for the waiting job"
        );
    }

    #[test]
    fn a_job_short_of_slots_reserves_them_all() {
        let mut q = [c("big", 3, 1000), c("cpu", 1, 0)];
        q[0].gpus = 1;
        let starts = select(
            &q,
            Free {
                slots: 2,
                gpus: vec![0],
            },
            Duration::from_secs(60),
        );
        assert!(starts.is_empty(), "{starts:?}");
    }

    #[test]
    fn impossible_jobs_name_the_limit() {
        assert_eq!(never_fits(2, 0, 2, Some(0)), None);
        let why = never_fits(3, 0, 2, Some(0)).unwrap();
        assert!(
            why.contains("needs 3 slots") && why.contains("capacity is now 2"),
            "{why}"
        );
        assert_eq!(
            never_fits(1, 1, 2, None),
            None,
            "GPUs not discovered yet: wait"
        );
        assert_eq!(
            never_fits(1, 1, 2, Some(0)).unwrap(),
            "asks for 1 GPUs but this host has none"
        );
        assert_eq!(
            never_fits(1, 3, 2, Some(2)).unwrap(),
            "asks for 3 GPUs but this host has only 2"
        );
        assert_eq!(never_fits(1, 2, 2, Some(2)), None);
    }

    #[test]
    fn capacity_rules() {
        assert_eq!(capacity(0, 2, 2.0), 4);
        assert_eq!(capacity(0, 2, 1.5), 3);
        assert_eq!(capacity(0, 2, 0.25), 1);
        assert_eq!(capacity(7, 2, 2.0), 7);
    }
}
