//! Budgets of bytes in flight: what bounds the driver's memory whatever clients send.
//!
//! Every request takes its cost from its connection's budget and from the driver's global one
//! before its payload is read (a write) or its reply buffer made (a read), and gives it back
//! when its reply is handed to the socket. A connection whose request does not fit waits
//! *without reading its socket*, so the client's own sends block (unix and TCP backpressure)
//! instead of the driver queueing without bound (qemu-nbd and SPDK bound requests in flight
//! the same way). The global budget admits waiters in arrival order, so a connection that
//! keeps asking cannot starve one that asks rarely.
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
    /// Tickets handed out and the one whose turn it is: waiters are admitted in order.
    next_ticket: u64,
    turn: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, state: Mutex::new(State::default()), changed: Condvar::new() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Only counters live under the lock: a panicking holder leaves them consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `cost` bytes, waiting (in arrival order) until they fit.
    pub fn take(self: &Arc<Self>, cost: u64) -> Held {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        while s.turn != ticket || !(s.used == 0 || s.used + cost <= self.limit) {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.used += cost;
        s.turn += 1;
        drop(s);
        // The next in line may fit too.
        self.changed.notify_all();
        Held { budget: self.clone(), cost }
    }

    /// Takes `cost` bytes if they fit now and nobody waits.
    pub fn try_take(self: &Arc<Self>, cost: u64) -> Option<Held> {
        let mut s = self.lock();
        if s.turn != s.next_ticket || !(s.used == 0 || s.used + cost <= self.limit) {
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
        drop(s);
        self.budget.changed.notify_all();
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
        let g = global.try_take(cost).unwrap_or_else(|| {
            wait();
            global.take(cost)
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
        loop {
            let s = b.lock();
            if s.next_ticket != s.turn {
                break;
            }
            drop(s);
            std::thread::yield_now();
        }
        assert!(b.try_take(1000).is_none(), "someone waits: no overtaking");
        drop(held);
        let large = large.join().expect("join");
        assert_eq!(b.used(), 9000);
        drop(large);
    }
}
