//! The reconnecting wrapper: the state callers and the connection thread share (the current
//! connection, or why there is none), the connection thread that reads replies and, with a
//! [`Reconnect`] policy, makes new connections with backoff until the client gives up, and
//! the check that a new connection offers the export first negotiated.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::SessionError;

use super::conn::Conn;
use super::negotiate::{negotiate, Settled};
use super::{describe, lock};

/// The least wait between two attempts, whatever the policy says: never a busy loop.
const MIN_BACKOFF: Duration = Duration::from_millis(1);

/// The least time a reconnect attempt gets for its handshake, even when the give-up time is
/// (nearly) over, so that the last attempt is a real one.
const MIN_HANDSHAKE_TIME: Duration = Duration::from_millis(100);

/// How a client reconnects after its connection fails. See the [module documentation](crate::client)
/// for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// The wait before the first attempt once a working connection failed.
    pub initial_backoff: Duration,
    /// The wait doubles after every attempt up to this (and is never below 1 ms).
    pub max_backoff: Duration,
    /// How long an outage may last before the client gives up for good. The handshake of an
    /// attempt is bounded by what is left of it (at least 100 ms).
    pub give_up_after: Duration,
}

impl Default for Reconnect {
    /// 10 ms doubling to 1 s, giving up after 60 s.
    fn default() -> Self {
        Reconnect {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// What the client's callers and its connection thread share.
#[derive(Debug)]
pub(super) struct Inner {
    /// Where to reconnect to; `None` when the client does not reconnect.
    pub(super) target: Option<Target>,
    pub(super) link: Mutex<Link>,
    /// Signalled whenever `link` changes.
    pub(super) changed: Condvar,
    /// Connections made after the first.
    pub(super) reconnects: AtomicU64,
}

#[derive(Debug)]
pub(super) struct Target {
    pub(super) path: PathBuf,
    pub(super) export_name: String,
    pub(super) policy: Reconnect,
}

#[derive(Debug)]
pub(super) struct Link {
    pub(super) state: LinkState,
    /// The client is being dropped: the connection thread makes no new connection.
    pub(super) closing: bool,
    /// A connection in its handshake, so that closing can cut the handshake short.
    pub(super) handshaking: Option<UnixStream>,
}

#[derive(Debug)]
pub(super) enum LinkState {
    /// Requests go out on this connection (which may have failed a moment ago: then the
    /// connection thread changes the state soon).
    Up(Arc<Conn>),
    /// The connection failed for this cause and the connection thread is making a new one.
    Down { cause: String },
    /// For good: every request fails.
    Failed(Fatal),
}

/// Why a reconnecting client stopped for good.
#[derive(Debug, Clone)]
pub(super) enum Fatal {
    Closing,
    GaveUp { waited: Duration, attempts: u32, last: String },
    ExportChanged { what: &'static str, before: u64, after: u64 },
}

impl Fatal {
    pub(super) fn error(&self) -> SessionError {
        match self {
            Fatal::Closing => SessionError::Disconnected { cause: "the client is closing".into() },
            Fatal::GaveUp { waited, attempts, last } => {
                SessionError::GaveUp { waited: *waited, attempts: *attempts, last: last.clone() }
            }
            &Fatal::ExportChanged { what, before, after } => SessionError::ExportChanged { what, before, after },
        }
    }
}

/// The state of the reconnect attempts of one outage.
#[derive(Debug)]
pub(super) struct Outage {
    since: Instant,
    /// The wait before the next attempt.
    backoff: Duration,
    attempts: u32,
    /// Why the last attempt failed.
    last: String,
}

impl Outage {
    pub(super) fn new(backoff: Duration) -> Outage {
        Outage { since: Instant::now(), backoff, attempts: 0, last: "no attempt was made".into() }
    }
}

/// The reconnect rule on the export: a new connection must offer what the first did.
impl Settled {
    /// The first way in which `now` differs from `self`, if any.
    fn change(&self, now: &Settled) -> Option<Fatal> {
        let fields = [
            ("size", self.size, now.size),
            ("transmission flags", self.flags.into(), now.flags.into()),
            ("minimum block size", self.block_sizes.0.into(), now.block_sizes.0.into()),
            ("preferred block size", self.block_sizes.1.into(), now.block_sizes.1.into()),
            ("maximum payload", self.block_sizes.2.into(), now.block_sizes.2.into()),
        ];
        let (what, before, after) = fields.into_iter().find(|(_, before, after)| before != after)?;
        Some(Fatal::ExportChanged { what, before, after })
    }
}

impl Inner {
    pub(super) fn new(target: Option<Target>, cause: &str) -> Inner {
        Inner {
            target,
            link: Mutex::new(Link {
                state: LinkState::Down { cause: cause.to_string() },
                closing: false,
                handshaking: None,
            }),
            changed: Condvar::new(),
            reconnects: AtomicU64::new(0),
        }
    }

    /// The connection a request should go out on: the current one, unless it is the one the
    /// request was just lost on; then waits for the next (or for the client to give up).
    pub(super) fn usable(&self, lost_on: Option<u64>) -> Result<Arc<Conn>, SessionError> {
        let mut link = lock(&self.link);
        loop {
            match &link.state {
                LinkState::Up(conn) if Some(conn.generation) != lost_on => return Ok(Arc::clone(conn)),
                LinkState::Failed(fatal) => return Err(fatal.error()),
                // Down, or Up on the connection that just failed, which the connection thread
                // is about to replace.
                LinkState::Up(_) | LinkState::Down { .. } => {}
            }
            if link.closing {
                return Err(Fatal::Closing.error());
            }
            link = self.changed.wait(link).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The connection thread: reads replies until the connection fails; when reconnecting,
    /// makes a new connection and goes on, until the client closes or gives up.
    pub(super) fn run(&self, mut conn: Arc<Conn>, settled: Settled) {
        let Some(target) = &self.target else {
            // The broken connection stays in place and answers every later request.
            conn.read_replies();
            return;
        };
        let policy = target.policy;
        let mut outage: Option<Outage> = None;
        loop {
            let ended = conn.read_replies();
            let mut current = outage.take().unwrap_or_else(|| Outage::new(policy.initial_backoff));
            if ended.answered {
                current = Outage::new(policy.initial_backoff);
            } else if !ended.lost_any {
                // An idle connection ended: nobody waited, so no outage went on meanwhile; the
                // backoff still grows, against a server that drops every connection at once.
                current.since = Instant::now();
                current.attempts = 0;
            } else {
                // The connection lost requests and answered none: the outage goes on, with its
                // give-up time and backoff.
                current.last = format!("a connection was lost before it answered anything: {}", ended.cause);
            }
            if !self.set_state(LinkState::Down { cause: ended.cause }) {
                return;
            }
            let fatal = match self.connect_again(&mut current, conn.generation + 1) {
                Ok((new, now)) => {
                    let change = settled.change(&now);
                    if change.is_none() && self.install(&new, true) {
                        conn = new;
                        outage = Some(current);
                        continue;
                    }
                    new.close();
                    change.unwrap_or(Fatal::Closing)
                }
                Err(fatal) => fatal,
            };
            lock(&self.link).state = LinkState::Failed(fatal);
            self.changed.notify_all();
            return;
        }
    }

    /// Makes connections until one completes its handshake, or the outage has lasted the
    /// policy's `give_up_after`, or the client closes.
    pub(super) fn connect_again(&self, outage: &mut Outage, generation: u64) -> Result<(Arc<Conn>, Settled), Fatal> {
        let Some(target) = &self.target else {
            return Err(Fatal::Closing);
        };
        let policy = target.policy;
        // None: never (a give-up time too far in the future to represent).
        let deadline = outage.since.checked_add(policy.give_up_after);
        let left = |deadline: Option<Instant>| deadline.map(|d| d.saturating_duration_since(Instant::now()));
        loop {
            // Checked before an attempt too: in an outage carried over from connections that
            // were made but answered nothing, attempts may keep succeeding.
            if outage.attempts > 0 && left(deadline) == Some(Duration::ZERO) {
                return Err(Fatal::GaveUp {
                    waited: outage.since.elapsed(),
                    attempts: outage.attempts,
                    last: outage.last.clone(),
                });
            }
            let wait = left(deadline).map_or(outage.backoff, |left| left.min(outage.backoff));
            if !self.pause(wait) {
                return Err(Fatal::Closing);
            }
            outage.attempts += 1;
            let budget = left(deadline).map(|left| left.max(MIN_HANDSHAKE_TIME));
            let result = self.attempt(target, budget, generation);
            outage.backoff =
                outage.backoff.saturating_mul(2).max(policy.initial_backoff).min(policy.max_backoff).max(MIN_BACKOFF);
            match result {
                Ok(Some(made)) => return Ok(made),
                Ok(None) => return Err(Fatal::Closing),
                Err(e) => outage.last = describe(&e),
            }
        }
    }

    /// One connection and handshake, with the handshake bounded by `budget`. `Ok(None)` if the
    /// client is closing.
    fn attempt(
        &self,
        target: &Target,
        budget: Option<Duration>,
        generation: u64,
    ) -> Result<Option<(Arc<Conn>, Settled)>, SessionError> {
        let io = |what| move |source| SessionError::Io { what, source };
        let socket = UnixStream::connect(&target.path).map_err(io("connect"))?;
        // A server that is restarting may accept only much later (the connection waits in the
        // listen backlog meanwhile).
        socket.set_read_timeout(budget).map_err(io("set the handshake timeout"))?;
        socket.set_write_timeout(budget).map_err(io("set the handshake timeout"))?;
        let cut_short = socket.try_clone().map_err(io("clone the connection"))?;
        {
            let mut link = lock(&self.link);
            if link.closing {
                return Ok(None);
            }
            link.handshaking = Some(cut_short);
        }
        let settled = negotiate(&mut &socket, &target.export_name);
        lock(&self.link).handshaking = None;
        let settled = settled?;
        socket.set_read_timeout(None).map_err(io("clear the handshake timeout"))?;
        socket.set_write_timeout(None).map_err(io("clear the handshake timeout"))?;
        Ok(Some((Arc::new(Conn::new(socket, generation)), settled)))
    }

    /// Sleeps for `wait` unless the client closes first; false if it does.
    fn pause(&self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        let mut link = lock(&self.link);
        loop {
            if link.closing {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            link = match self.changed.wait_timeout(link, until - now) {
                Ok((link, _)) => link,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Makes `conn` the connection requests go out on, unless the client is closing (false).
    pub(super) fn install(&self, conn: &Arc<Conn>, reconnected: bool) -> bool {
        if !self.set_state(LinkState::Up(Arc::clone(conn))) {
            return false;
        }
        if reconnected {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Sets the link state and wakes whoever waits for it, unless the client is closing.
    fn set_state(&self, state: LinkState) -> bool {
        {
            let mut link = lock(&self.link);
            if link.closing {
                return false;
            }
            link.state = state;
        }
        self.changed.notify_all();
        true
    }
}
