//! Budgets of bytes in flight: what bounds the driver's memory whatever clients send.
//!
//! Every request takes its cost from its connection's budget and from the driver's global one
//! before its payload is read (a write) or its reply buffer made (a read), and gives it back
//! when its reply is handed to the socket. A connection whose request does not fit waits
//! *without reading its socket*, so the client's own sends block (unix and TCP backpressure)
//! instead of the driver queueing without bound (qemu-nbd and SPDK bound requests in flight
//! the same way).
//!
//! The global budget admits its waiters fairly: first the one whose connection holds the
//! fewest bytes (arrival order among equals), so a light client's 4 KiB write is admitted as
//! soon as 4 KiB come back, ahead of connections that already hold megabytes, and a connection
//! that keeps asking cannot starve one that asks rarely. The first in line is never overtaken
//! by a smaller request that would fit sooner, so large requests are not starved either.
//!
//! A request larger than a whole budget is still served, alone: it waits until nothing else
//! holds that budget.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes one request costs at least, so that requests without payload (trims, zeroing,
/// flushes, errors) are bounded in number too.
pub const MIN_COST: u64 = 4096;

/// One budget of bytes; see the module docs.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    next_ticket: u64,
    waiting: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    ticket: u64,
    /// Bytes the waiter's connection held when it began to wait (0 for unranked waiters, who
    /// then go in arrival order). A snapshot: comparing waiters locks nothing, so a release
    /// costs one pass over the waiters, not a lock of every connection's budget per waiter.
    rank: u64,
}

impl Waiter {
    fn key(&self) -> (u64, u64) {
        (self.rank, self.ticket)
    }
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, state: Mutex::new(State::default()), changed: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only counters live under the lock: a panicking holder leaves them consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fits(&self, s: &State, cost: u64) -> bool {
        s.used == 0 || s.used + cost <= self.limit
    }

    /// Takes `cost` bytes, waiting (in arrival order) until they fit.
    pub fn take(self: &Arc<Self>, cost: u64) -> Held {
        self.take_ranked(cost, 0)
    }

    /// Takes `cost` bytes, waiting until they fit and no waiter ranks before this one: the
    /// one with a lower `rank` (bytes its connection holds), or as low and came first.
    pub fn take_ranked(self: &Arc<Self>, cost: u64, rank: u64) -> Held {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.waiting.push(Waiter { ticket, rank });
        loop {
            let first = s.waiting.iter().min_by_key(|w| w.key()).map(|w| w.ticket);
            if first == Some(ticket) && self.fits(&s, cost) {
                break;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting.retain(|w| w.ticket != ticket);
        s.used += cost;
        let others = !s.waiting.is_empty();
        drop(s);
        // The next in line may fit too.
        if others {
            self.changed.notify_all();
        }
        Held { budget: self.clone(), cost }
    }

    /// Takes `cost` bytes if they fit now and nobody waits.
    pub fn try_take(self: &Arc<Self>, cost: u64) -> Option<Held> {
        let mut s = self.lock();
        if !s.waiting.is_empty() || !self.fits(&s, cost) {
            return None;
        }
        s.used += cost;
        Some(Held { budget: self.clone(), cost })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    cost: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut s = self.budget.lock();
        s.used -= self.cost;
        // Waiters enter `waiting` under the lock before they sleep, so none is missed; with
        // none, no wake-up call (a system call even with nobody to wake: two per request).
        let waiters = !s.waiting.is_empty();
        drop(s);
        if waiters {
            self.budget.changed.notify_all();
        }
    }
}

/// A request's share of its connection's budget and of the global one.
#[derive(Debug)]
pub struct Grant {
    _connection: Held,
    _global: Held,
}

impl Grant {
    /// Takes `cost` from the connection's budget, then from the global one, waiting for each;
    /// `before_wait` runs once if either has to wait (the caller sends what it holds back).
    pub fn take(connection: &Arc<Budget>, global: &Arc<Budget>, cost: u64, mut before_wait: impl FnMut()) -> Grant {
        let cost = cost.max(MIN_COST);
        let mut waited = false;
        let mut wait = || {
            if !waited {
                waited = true;
                before_wait();
            }
        };
        let c = connection.try_take(cost).unwrap_or_else(|| {
            wait();
            connection.take(cost)
        });
        // Ranked by what the connection holds, this request included.
        let g = global.try_take(cost).unwrap_or_else(|| {
            wait();
            global.take_ranked(cost, connection.used())
        });
        Grant { _connection: c, _global: g }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_budget_waits_until_bytes_come_back() {
        let b = Budget::new(10_000);
        let first = b.take(6000);
        assert!(b.try_take(6000).is_none(), "over the limit");
        let small = b.try_take(4000).expect("fits");
        assert_eq!(b.used(), 10_000);
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.take(6000))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "must wait");
        drop(first);
        let got = waiter.join().expect("join");
        assert_eq!(b.used(), 10_000);
        drop((got, small));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_request_larger_than_the_budget_goes_alone() {
        let b = Budget::new(1000);
        let big = b.try_take(5000).expect("alone it fits");
        assert!(b.try_take(1).is_none());
        drop(big);
        assert!(b.try_take(1).is_some());
    }

    /// Arrival order: a small request that arrives after a waiting large one does not pass it.
    #[test]
    fn waiters_are_admitted_in_arrival_order() {
        let b = Budget::new(10_000);
        let held = b.take(8000);
        let large = {
            let b = b.clone();
            std::thread::spawn(move || b.take(9000))
        };
        wait_until_waiting(&b, 1);
        assert!(b.try_take(1000).is_none(), "someone waits: no overtaking");
        drop(held);
        let large = large.join().expect("join");
        assert_eq!(b.used(), 9000);
        drop(large);
    }

    fn wait_until_waiting(b: &Budget, n: usize) {
        while b.lock().waiting.len() < n {
            std::thread::yield_now();
        }
    }

    /// A connection that holds nothing passes connections that hold a lot: a light client is
    /// admitted before a flood's next request, whatever the arrival order.
    #[test]
    fn the_connection_holding_least_goes_first() {
        let global = Budget::new(10_000);
        let (flood, light) = (Budget::new(100_000), Budget::new(100_000));
        let flood_held = vec![Grant::take(&flood, &global, 5000, || {}), Grant::take(&flood, &global, 5000, || {})];
        let next_flood = {
            let (flood, global) = (flood.clone(), global.clone());
            std::thread::spawn(move || Grant::take(&flood, &global, 5000, || {}))
        };
        wait_until_waiting(&global, 1);
        let next_light = {
            let (light, global) = (light.clone(), global.clone());
            std::thread::spawn(move || Grant::take(&light, &global, 5000, || {}))
        };
        wait_until_waiting(&global, 2);
        let mut flood_held = flood_held.into_iter();
        drop(flood_held.next());
        let light_grant = next_light.join().expect("light admitted first");
        assert!(!next_flood.is_finished(), "the flood waits for the next bytes");
        drop(flood_held);
        let flood_grant = next_flood.join().expect("flood admitted after");
        drop((light_grant, flood_grant));
        assert_eq!((global.used(), flood.used(), light.used()), (0, 0, 0));
    }
}
